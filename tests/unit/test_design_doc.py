"""docs/design.md stays true to the code: every `module.name` it cites exists, every module of
the package is listed in its module table, and each code name that table gives a module is
defined in that module."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DESIGN = (ROOT / "docs" / "design.md").read_text()
PACKAGE = ROOT / "src" / "mlmkit"
MODULES = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
CITED = sorted({m.group(0).strip("`") for m in re.finditer(
    r"`(?:" + "|".join(MODULES) + r")\.(?!py`)[A-Za-z_][\w.]*`", DESIGN)})


def module_table() -> dict[str, str]:
    """The "## Modules" block: module name -> its description (continuation lines joined)."""
    block = re.search(r"## Modules\n\n```\n(.*?)```", DESIGN, flags=re.S).group(1)
    entries: dict[str, str] = {}
    for line in block.splitlines():
        head = re.match(r"^(\w+)\.py\s+(.*)$", line)
        if head:
            name = head.group(1)
            entries[name] = head.group(2)
        elif line.strip():
            entries[name] += " " + line.strip()
    return entries


def code_names(text: str) -> list[str]:
    """Identifiers that can only be code: snake_case with an underscore, CamelCase or
    UPPER_CASE words (flags, file names and dotted paths are not)."""
    text = re.sub(r"--[\w-]+|`[^`]*`|\w+\.(py|json|jsonl|yaml)\b", " ", text)
    return sorted(set(re.findall(r"(?<![\w./<-])(?:[a-z]+_[a-z_]+|[A-Z][a-z]+[A-Z]\w*|"
                                 r"[A-Z]+_[A-Z_]+)(?![\w<])", text)))


def test_the_design_doc_cites_code():
    assert len(CITED) > 40  # the contract table cites code, not prose


@pytest.mark.parametrize("name", CITED)
def test_every_cited_name_exists(name):
    module, *attrs = name.split(".")
    obj = importlib.import_module(f"mlmkit.{module}")
    for attr in attrs:
        assert hasattr(obj, attr), f"docs/design.md cites `{name}`: {obj!r} has no {attr!r}"
        obj = getattr(obj, attr)


def test_the_module_table_lists_the_package():
    assert sorted(module_table()) == MODULES


@pytest.mark.parametrize("module", MODULES)
def test_the_module_table_names_what_each_module_defines(module):
    described = module_table().get(module, "")
    mod = importlib.import_module(f"mlmkit.{module}")
    classes = [v for v in vars(mod).values() if isinstance(v, type)]
    missing = [n for n in code_names(described) if n not in MODULES and not hasattr(mod, n)
               and not any(hasattr(c, n) for c in classes)]  # a method, e.g. (read_into)
    assert not missing, f"docs/design.md lists {missing} under {module}.py"
