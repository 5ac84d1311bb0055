"""CONTRIBUTING.md's module map matches the tree: every module is named, nothing named is gone."""

from __future__ import annotations

from pathlib import Path
import re

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "mutualkd"
TEXT = (REPO / "CONTRIBUTING.md").read_text(encoding="utf-8")


def _section(title: str) -> str:
    start = TEXT.index(title)
    end = TEXT.find("\n## ", start + 1)
    nxt = TEXT.find("\n### ", start + 1)
    ends = [e for e in (end, nxt) if e != -1]
    return TEXT[start:min(ends)] if ends else TEXT[start:]


def _layout_block() -> str:
    section = _section("## Layout")
    return section[section.index("```") + 3:section.index("```", section.index("```") + 3)]


def _names(block: str) -> set[str]:
    """Every file or folder name the map mentions (``a.py``, ``b/``, ``c.py, d.py``)."""
    return set(re.findall(r"[A-Za-z_][\w-]*(?:\.py|/)", block))


def test_every_top_level_module_and_package_is_in_the_layout():
    named = _names(_layout_block())
    entries = {p.name for p in PKG.glob("*.py") if p.name != "__init__.py"}
    entries |= {p.name + "/" for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    missing = sorted(entries - named)
    assert not missing, f"CONTRIBUTING.md's layout does not name {missing}: add a line for each"


def test_the_layout_names_nothing_that_is_gone():
    block = _layout_block()
    core = block[:block.index("plugins/")]
    present = {p.name for p in PKG.rglob("*.py")} | {p.name + "/" for p in PKG.rglob("*") if p.is_dir()}
    stale = sorted(n for n in _names(core) - {"mutualkd/", "docs/"} if n not in present)
    assert not stale, f"CONTRIBUTING.md's layout names {stale}, which mutualkd/ does not have"
    plugins = {p.name + "/" for p in (REPO / "plugins").iterdir() if p.is_dir() and not p.name.startswith((".", "_"))}
    plugins = {p for p in plugins if p != "__pycache__/"}
    assert plugins <= _names(block), f"plugins not in the layout: {sorted(plugins - _names(block))}"


def test_every_data_module_is_in_the_data_map():
    section = _section("### The data package, module by module")
    section = section[section.index("```") + 3:section.index("```", section.index("```") + 3)]
    named = {n.removeprefix("data/") for n in _names(section)}
    modules = {p.name for p in (PKG / "data").glob("*.py") if p.name != "__init__.py"}
    assert not sorted(modules - named), f"the data map does not name {sorted(modules - named)}"
    assert not sorted(n for n in named if n.endswith(".py") and n not in modules), "the data map names a module that is gone"


def test_the_engine_table_lists_every_module_with_its_length():
    section = _section("### The engine, module by module")
    rows = dict(re.findall(r"^\| `engine/(\w+\.py)` \| (\d+) \|", section, flags=re.M))
    modules = {p.name for p in (PKG / "engine").glob("*.py") if p.name != "__init__.py"}
    assert set(rows) == modules, f"engine table rows {sorted(set(rows) ^ modules)} differ from mutualkd/engine/"
    for name, listed in rows.items():
        actual = len((PKG / "engine" / name).read_text(encoding="utf-8").splitlines())
        assert abs(actual - int(listed)) <= max(15, actual // 10), (
            f"engine/{name} is {actual} lines; CONTRIBUTING.md says {listed}: update the table"
        )
