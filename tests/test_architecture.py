"""The shape of the package: no import circle, no private name crossing a module, layers kept apart.

Every `import` statement of every module under lorafit/ counts, also those inside functions (a
lazy import still makes the two modules depend on each other). A package's `__init__` re-exporting
its own submodules is not a dependency of those submodules on the package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "lorafit"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}


def is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def imports(name: str) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every import statement of module `name`."""
    tree = ast.parse(MODULES[name].read_text())
    package = name if is_package(name) else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name.startswith("lorafit")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("lorafit"):
                continue
            names = [a.name for a in node.names]
            submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
            if submodules and len(submodules) == len(names):  # `from lorafit.ops import fused_lora`
                found += [(s, [], node.lineno) for s in submodules]
            else:
                found.append((target, names, node.lineno))
    return found


def graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    for m in MODULES:
        for target, _, _ in imports(m):
            if target not in MODULES:
                continue
            if is_package(m) and target.startswith(m + "."):
                continue  # a package's __init__ re-exporting its own parts
            if target != m:
                edges[m].add(target)
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_walker_sees_the_imports_it_should():
    edges = graph()
    assert "lorafit.errors" in edges["lorafit.config"]
    assert "lorafit.lora.layer" in edges["lorafit.lora.inject"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circle():
    cycle = find_cycle(graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_no_private_name_imported_from_another_module():
    crossings = [f"{m}:{line} takes {n} from {target}"
                 for m in MODULES for target, names, line in imports(m)
                 for n in names if n.startswith("_") and not n.startswith("__")]
    assert not crossings, "\n".join(crossings)


@pytest.mark.parametrize("lower, upper", [
    ("lorafit.ops", "lorafit.quant"),  # kernels take plain tensors; quant may use ops, not the reverse
    ("lorafit.ops", "lorafit.lora"),
    ("lorafit.ops", "lorafit.train"),
    ("lorafit.quant", "lorafit.lora"),
    ("lorafit.quant", "lorafit.train"),
    ("lorafit.lora", "lorafit.train"),
    ("lorafit.lora", "lorafit.serve"),
    ("lorafit.train", "lorafit.serve"),
    ("lorafit.lora", "lorafit.export"),  # export reads models and adapters; nothing below it reads GGUF writers
    ("lorafit.quant", "lorafit.export"),
    ("lorafit.train", "lorafit.export"),
    ("lorafit.serve", "lorafit.export"),
    ("lorafit.merge", "lorafit.export"),
    ("lorafit.train.distributed", "lorafit.train.trainer"),  # the trainer uses DDP / FSDP, not the reverse
    ("lorafit.train.distributed", "lorafit.train.loss"),
    ("lorafit.train.estimate", "lorafit.train.distributed"),  # the estimator stays torch-free
    ("lorafit.train", "lorafit.evaluation"),  # eval scores what training made; training never calls eval
    ("lorafit.serve", "lorafit.evaluation"),
    ("lorafit.lora", "lorafit.evaluation"),
    ("lorafit.card", "lorafit.lora"),  # a card is written from plain values: the ground floor
    ("lorafit.card", "lorafit.train"),
    ("lorafit.lora", "lorafit.verify"),  # verify reads every other room; nothing reads it
    ("lorafit.train", "lorafit.verify"),
    ("lorafit.serve", "lorafit.verify"),
    ("lorafit.export", "lorafit.verify"),
    ("lorafit.fingerprint", "lorafit.train"),  # the fingerprint lives with the adapter files, below training
])
def test_lower_rooms_do_not_import_upper_ones(lower, upper):
    bad = [f"{m} imports {t}" for m, targets in graph().items() if m == lower or m.startswith(lower + ".")
           for t in targets if t == upper or t.startswith(upper + ".")]
    assert not bad, "\n".join(bad)
