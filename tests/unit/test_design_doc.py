"""docs/design.md stays true to the code: every `module.name` it cites exists, every module of
the package is listed in its module table, each code name that table gives a module is defined in
that module, and the imports run as the table says: one way, from a stage to the stages below it,
never in a circle."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DESIGN = (ROOT / "docs" / "design.md").read_text()
PACKAGE = ROOT / "src" / "mlmkit"
# module path as the table writes it ("batch/layout") -> its dotted name ("mlmkit.batch.layout")
MODULES = {p.relative_to(PACKAGE).with_suffix("").as_posix():
           "mlmkit." + ".".join(p.relative_to(PACKAGE).with_suffix("").parts)
           for p in PACKAGE.rglob("*.py") if p.stem not in ("__init__", "__main__")}
STEMS = {path.rsplit("/", 1)[-1]: dotted for path, dotted in MODULES.items()}
# the stages, bottom first: a module imports only from its own stage or the ones before it
STAGES = ["config", "batch", "model", "data", "train", "report"]
CITED = sorted({m.group(0).strip("`") for m in re.finditer(
    r"`(?:" + "|".join(STEMS) + r")\.(?!py`)[A-Za-z_][\w.]*`", DESIGN)})


def module_table() -> dict[str, str]:
    """The "## Modules" block: module path -> its description (continuation lines joined)."""
    block = re.search(r"## Modules\n\n.*?```\n(.*?)```", DESIGN, flags=re.S).group(1)
    entries: dict[str, str] = {}
    for line in block.splitlines():
        head = re.match(r"^((?:\w+/)?\w+)\.py\s+(.*)$", line)
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


def imports() -> dict[str, set[str]]:
    """Each module's own-package imports (dotted names, wherever in the module they are)."""
    edges = {}
    for path, dotted in MODULES.items():
        tree = ast.parse((PACKAGE / f"{path}.py").read_text())
        edges[dotted] = {node.module for node in ast.walk(tree)
                         if isinstance(node, ast.ImportFrom) and node.module
                         and node.module.startswith("mlmkit.") and node.module in
                         MODULES.values()} | \
                        {f"{node.module}.{a.name}" for node in ast.walk(tree)
                         if isinstance(node, ast.ImportFrom) and node.module in
                         ("mlmkit.config", "mlmkit.batch", "mlmkit.model", "mlmkit.data",
                          "mlmkit.train", "mlmkit.report")
                         for a in node.names if f"{node.module}.{a.name}" in MODULES.values()}
    return edges


def test_the_design_doc_cites_code():
    assert len(CITED) > 40  # the contract table cites code, not prose


@pytest.mark.parametrize("name", CITED)
def test_every_cited_name_exists(name):
    module, *attrs = name.split(".")
    obj = importlib.import_module(STEMS[module])
    for attr in attrs:
        assert hasattr(obj, attr), f"docs/design.md cites `{name}`: {obj!r} has no {attr!r}"
        obj = getattr(obj, attr)


def test_the_module_table_lists_the_package():
    assert sorted(module_table()) == sorted(MODULES)
    assert len(STEMS) == len(MODULES), "two modules share a name: citations would be ambiguous"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_the_module_table_names_what_each_module_defines(module):
    described = module_table().get(module, "")
    mod = importlib.import_module(MODULES[module])
    classes = [v for v in vars(mod).values() if isinstance(v, type)]
    missing = [n for n in code_names(described) if n not in STEMS and not hasattr(mod, n)
               and not any(hasattr(c, n) for c in classes)]  # a method, e.g. (read_into)
    assert not missing, f"docs/design.md lists {missing} under {module}.py"


def stage(dotted: str) -> int:
    part = dotted.split(".")[1]
    return STAGES.index(part) if part in STAGES else len(STAGES)  # cli.py: above them all


def test_imports_run_one_way_and_never_in_a_circle():
    edges = imports()
    upward = sorted(f"{a} -> {b}" for a, targets in edges.items() for b in targets
                    if stage(b) > stage(a))
    assert not upward, f"imports that run back up a stage: {upward}"
    # no circle: a topological order exists
    remaining = {a: set(t) - {a} for a, t in edges.items()}
    while remaining:
        free = [a for a, t in remaining.items() if not t & remaining.keys()]
        assert free, f"an import circle among {sorted(remaining)}"
        for a in free:
            del remaining[a]
