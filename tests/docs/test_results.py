"""bench/RESULTS.md opens with a summary table, and every number in it is the number of the section it
links to: lorafit's figure, the peer's, the ratio (lorafit / peer, or peer / lorafit for times), and
whether the target is met."""

from __future__ import annotations

import re

from tests.docs.conftest import ROOT, docs_hooks

RESULTS = ROOT / "bench" / "RESULTS.md"
NUMBER = re.compile(r"(?<![\d.])\d+(?:\.\d+)?(?![\d])(?!\.\d)")


def summary_rows() -> list[dict[str, str]]:
    hooks = docs_hooks()
    text = RESULTS.read_text()
    table = text[text.index(hooks.SUMMARY_START) + len(hooks.SUMMARY_START):text.index(hooks.SUMMARY_END)]
    lines = [line.strip() for line in table.strip().splitlines()]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


def section(anchor: str) -> str:
    """The text of the log section that `<a id="anchor">` marks: its heading to the next heading of the
    same or a higher level."""
    text = RESULTS.read_text()
    start = text.index(f'<a id="{anchor}"></a>')
    heading = re.compile(r"^(#+) ", re.M).search(text, start)
    level = len(heading.group(1))
    end = re.compile(rf"^#{{1,{level}}} ", re.M).search(text, heading.end())
    return text[heading.start():end.start() if end else len(text)]


def parent_headings(anchor: str) -> str:
    """The headings above the section (a "###" run's date is in its "##" heading)."""
    text = RESULTS.read_text()
    start = text.index(f'<a id="{anchor}"></a>')
    level = len(re.compile(r"^(#+) ", re.M).search(text, start).group(1))
    above = re.findall(r"^(#+) .*$", text[:start], re.M)
    lines = [m.group(0) for m in re.finditer(r"^(#+) .*$", text[:start], re.M)]
    parents, want = [], level - 1
    for line, hashes in zip(reversed(lines), reversed(above)):
        if 0 < len(hashes) <= want:
            parents.append(line)
            want = len(hashes) - 1
    return "\n".join(parents)


def numbers(cell: str) -> list[str]:
    return NUMBER.findall(cell.replace("`", ""))


def test_results_open_with_the_summary_table():
    text = RESULTS.read_text()
    first_section = text.index("\n## ")
    assert text.index(docs_hooks().SUMMARY_START) < first_section
    rows = summary_rows()
    assert len(rows) >= 12
    scripts = {s for row in rows for s in re.findall(r"bench/\w+\.py", row["benchmark"])}
    assert {"bench/lora_step.py", "bench/train.py", "bench/nf4.py", "bench/serve.py"} <= scripts


def test_every_number_of_the_summary_is_in_the_section_it_links_to():
    for row in summary_rows():
        anchor = re.search(r"\]\(#([\w-]+)\)", row["benchmark"]).group(1)
        body = section(anchor)
        assert row["measured"][:10] in parent_headings(anchor) + body, (anchor, "date")
        for column in ("lorafit", "peer", "ratio"):
            for value in numbers(row[column]):
                assert NUMBER.search(body) and re.search(rf"(?<![\d.]){re.escape(value)}(?![\d])(?!\.\d)", body), \
                    f"{row['benchmark']}: {column} {value} is not in section #{anchor}"


def test_every_ratio_is_lorafit_over_peer_and_says_whether_the_target_is_met():
    checked = 0
    for row in summary_rows():
        ours, theirs, ratio = numbers(row["lorafit"]), numbers(row["peer"]), numbers(row["ratio"])
        if len(ours) == len(theirs) == len(ratio) == 1:
            a, b, r = float(ours[0]), float(theirs[0]), float(ratio[0])
            faster = "wall time" in row["measure"]  # times: peer / lorafit
            assert abs((b / a if faster else a / b) - r) <= 0.01 * r, row
            checked += 1
        target = re.fullmatch(r"([≥≤]) ?(\d+(?:\.\d+)?)x", row["target"])
        if target and row["met"] in ("✓", "✗"):
            bound = float(target.group(2))
            worst = min(map(float, ratio)) if target.group(1) == "≥" else max(map(float, ratio))
            met = worst >= bound if target.group(1) == "≥" else worst <= bound
            assert met == (row["met"] == "✓"), row
    assert checked >= 10


def test_the_results_page_shows_the_summary_linked_to_the_log(site):
    page = (site / "results.html").read_text()
    log = (site / "results-log.html").read_text()
    anchors = {re.search(r"\]\(#([\w-]+)\)", row["benchmark"]).group(1) for row in summary_rows()}
    for anchor in anchors:
        assert f'href="results-log.html#{anchor}"' in page
        assert f'id="{anchor}"' in log
    for figure in re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", (ROOT / "docs" / "results.md").read_text()):
        assert (site / figure).is_file(), figure


def test_the_home_pages_figures_are_the_summarys():
    home = (ROOT / "docs" / "index.md").read_text()
    table = home[home.index("## Measured"):home.index("\n## ", home.index("## Measured") + 3)]
    shown = {n for line in table.splitlines()[4:] if line.startswith("|") for n in numbers(line.split("|")[2])}
    ratios = {n for row in summary_rows() for n in numbers(row["ratio"])}
    assert shown and shown <= ratios, shown - ratios
