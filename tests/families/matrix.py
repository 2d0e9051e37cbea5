"""The family matrix's results, as the tests of tests/families produce them, and its table (docs/families.md).

Each link of the chain is one or more parametrized tests (`LINKS`: column -> test function names). A test
that passes for a family fills its cell with ✓; a test that checks a refusal calls `refused(family, link,
error)` before it passes, and the cell holds ✗ and the refusal's line. conftest.py records every outcome;
test_zz_doc.py (run last) renders the table and compares it with docs/families.md, or writes it when
LORAFIT_WRITE_DOCS=1 is set.
"""

from __future__ import annotations

LINKS: dict[str, tuple[str, ...]] = {
    "default targets": ("test_default_targets_and_all_linear",),
    "train (fp32)": ("test_training_step",),
    "QLoRA (NF4)": ("test_nf4_load_and_qlora_step",),
    "packing": ("test_packed_equals_unpacked",),
    "PEFT ⇄ lorafit": ("test_peft_loads_ours_and_we_load_peft",),
    "merge / unmerge": ("test_merge_equals_unmerged",),
    "3-D experts": ("test_each_routed_expert_and_no_other_gets_a_gradient", "test_peft_loads_our_expert_adapter"),
    "GGUF (model + adapter)": ("test_gguf_model_and_adapter",),
    "chat template": ("test_chat_template_trains_and_prompts_alike",),
    "serve (2 adapters)": ("test_per_row_adapters_equal_solo_runs",),
    "estimate": ("test_estimate_counts_every_parameter",),
}
LINK_OF = {test: link for link, tests in LINKS.items() for test in tests}

OUTCOMES: dict[tuple[str, str], list[str]] = {}  # (family, link) -> "passed" / "failed" / "skipped", per test
REFUSALS: dict[tuple[str, str], str] = {}  # (family, link) -> the refusal's line


def refused(family: str, link: str, line: str) -> None:
    """Record that `family` refuses `link` with `line` (from the one-line error the test has checked)."""
    assert link in LINKS, link
    REFUSALS[(family, link)] = line


def cell(family: str, link: str) -> str | None:
    """The table cell, or None when this run has no complete answer for it."""
    outcomes = OUTCOMES.get((family, link))
    if not outcomes or any(o != "passed" for o in outcomes):
        return None
    if (family, link) in REFUSALS:
        return "✗ " + REFUSALS[(family, link)]
    return "✓"
