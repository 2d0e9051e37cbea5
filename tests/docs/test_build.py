"""The site builds with `mkdocs build --strict`, and every page of its nav is there, rendered."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import yaml

from tests.docs.conftest import ROOT


def nav_pages(nav) -> list[str]:
    """Every .md file named in mkdocs.yml's nav, in order."""
    pages = []
    for item in nav:
        value = next(iter(item.values())) if isinstance(item, dict) else item
        pages += nav_pages(value) if isinstance(value, list) else [value]
    return pages


def config() -> dict:
    return yaml.safe_load((ROOT / "mkdocs.yml").read_text())


def test_the_strict_build_warns_of_nothing(built_site):
    _, log = built_site
    assert not re.search(r"^(WARNING|ERROR)\b", log, re.M), log


def test_every_page_of_the_nav_is_built_and_every_api_target_rendered(site: Path):
    pages = nav_pages(config()["nav"])
    assert len(pages) >= 25 and len(set(pages)) == len(pages)
    for page in pages:
        html = (site / page).with_suffix(".html").read_text()
        assert 'class="md-nav md-nav--primary"' in html, page  # the site's navigation is on every page
        assert ":::" not in re.sub(r"<pre.*?</pre>", "", html, flags=re.S), f"{page}: an unresolved ::: directive"
    for page in (ROOT / "docs" / "reference" / "api").glob("*.md"):
        targets = re.findall(r"^::: ([\w.]+)$", page.read_text(), re.M)
        html = (site / "reference" / "api" / page.name).with_suffix(".html").read_text()
        for target in targets:
            assert f'id="{target}"' in html, f"{page.name}: {target} has no section"


def test_every_markdown_file_under_docs_is_a_page_of_the_nav():
    """A page someone adds to docs/ must be reachable from the navigation (the strict build says the same)."""
    pages = set(nav_pages(config()["nav"]))
    files = {str(p.relative_to(ROOT / "docs")) for p in (ROOT / "docs").rglob("*.md")}
    assert files - pages == set()


def test_the_public_api_is_documented(site: Path):
    """lorafit.__all__, the Trainer, the Engine and every config class have their section in the API pages."""
    import lorafit

    html = "".join(p.read_text() for p in (site / "reference" / "api").glob("*.html"))
    for name in lorafit.__all__:
        module = lorafit._EXPORTS[name]
        assert f'id="{module}.{name}"' in html, name
    for target in ("lorafit.train.trainer.Trainer", "lorafit.serve.engine.Engine", "lorafit.train.config.TrainConfig",
                   "lorafit.train.data.config.DataConfig", "lorafit.train.run.RunConfig"):
        assert f'id="{target}"' in html, target


def config_classes() -> list[type]:
    """Every config dataclass a user writes: a `lorafit train` YAML file (RunConfig) and every dataclass its
    fields hold, found by walking their type hints (a config added later is found too), and the adapter
    configs."""
    from lorafit.config import AdaLoraConfig, IA3Config, LoraConfig
    from lorafit.train.run import RunConfig

    def types_in(hint):
        yield hint
        for arg in typing.get_args(hint):
            yield from types_in(arg)

    found, todo = [], [RunConfig, LoraConfig, IA3Config, AdaLoraConfig]
    while todo:
        cls = todo.pop(0)
        if cls not in found:
            found.append(cls)
            hints = typing.get_type_hints(cls)
            todo += [t for f in dataclasses.fields(cls) for t in types_in(hints[f.name]) if dataclasses.is_dataclass(t)]
    return found


def test_every_config_field_is_documented_with_its_docstring(site: Path):
    """Every config dataclass has its section in the API reference, and each of its fields appears there
    with its docstring's text."""
    from lorafit.fieldinfo import field_docs

    pages = {p.name: p.read_text() for p in (site / "reference" / "api").glob("*.html")}
    classes = config_classes()
    assert len(classes) >= 6
    for cls in classes:
        target = f"{cls.__module__}.{cls.__qualname__}"
        page = next((name for name, html in pages.items() if f'id="{target}"' in html), None)
        assert page, f"{target} has no section in docs/reference/api/ (add `::: {target}`)"
        text = plain_text(pages[page])
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert f.name in docs, f"{cls.__name__}.{f.name} has no docstring"
            assert squash(docs[f.name]) in text, f"{cls.__name__}.{f.name}: docstring not on {page}"


def plain_text(html: str) -> str:
    import html as html_lib

    return squash(html_lib.unescape(re.sub(r"<[^>]+>", "", html)))


def squash(text: str) -> str:
    """Text as Markdown renders it, for comparison: no emphasis or code marks, single spaces."""
    return re.sub(r"\s+", " ", re.sub(r"[*`]", "", text)).strip()
