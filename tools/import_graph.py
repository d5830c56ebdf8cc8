"""The import graph between mmret's parts, read from the source (nothing is imported).

    python tools/import_graph.py            # part -> parts it imports (module level; lazy in brackets)
    python tools/import_graph.py --modules  # the same per module, with line counts

A part is a sub-package (``mmret.models``, ``mmret.data``, ...) or a top-level module (``mmret.recipe``).
"Module level" imports run when the module is imported; "lazy" ones sit inside a function or under
``if TYPE_CHECKING`` and run only when called (or never). tests/test_architecture.py checks the layering
with these functions.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "mmret"


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the package: dotted name -> file."""
    out = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(module: str, path: Path) -> Iterator[tuple[str, bool]]:
    """(imported mmret module, lazy) for every import statement of ``module``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    lazy_nodes: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) or (
            isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        ):
            lazy_nodes.update(id(n) for n in ast.walk(node) if n is not node or isinstance(node, ast.If))
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
        lazy = id(node) in lazy_nodes
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    yield alias.name, lazy
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, is_package, node)
            if target.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:  # `from mmret.models import qwen2_vl` imports the sub-module
                yield (f"{target}.{alias.name}" if f"{target}.{alias.name}" in _ALL else target), lazy


_ALL = set(modules())


def part(module: str) -> str:
    """The part a module belongs to: ``mmret.<sub-package>`` or the top-level module itself."""
    pieces = module.split(".")
    return ".".join(pieces[:2]) if len(pieces) > 1 else module


def edges(lazy: bool = False) -> dict[str, set[str]]:
    """part -> the other parts it imports (module-level imports only unless ``lazy``)."""
    out: dict[str, set[str]] = {}
    for module, path in modules().items():
        src = part(module)
        out.setdefault(src, set())
        for target, is_lazy in imports(module, path):
            if (lazy or not is_lazy) and part(target) != src:
                out[src].add(part(target))
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The cycles of ``graph`` (each once, from its smallest node), by depth-first search."""
    found: set[tuple[str, ...]] = set()

    def walk(node: str, path: list[str]) -> None:
        for nxt in sorted(graph.get(node, ())):
            if nxt == path[0]:
                i = path.index(min(path))
                found.add(tuple(path[i:] + path[:i]))
            elif nxt not in path and nxt > path[0]:
                walk(nxt, path + [nxt])

    for start in sorted(graph):
        walk(start, [start])
    return [list(c) for c in sorted(found)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modules", action="store_true", help="per module, with line counts")
    args = p.parse_args(argv)
    if args.modules:
        for module, path in modules().items():
            targets = sorted({t for t, _ in imports(module, path)})
            print(f"{len(path.read_text().splitlines()):5d} {module}: {', '.join(targets) or '-'}")
        return 0
    eager, every = edges(), edges(lazy=True)
    for src in sorted(every):
        lazy_only = sorted(every[src] - eager[src])
        extra = f" [{', '.join(lazy_only)}]" if lazy_only else ""
        print(f"{src} -> {', '.join(sorted(eager[src])) or '-'}{extra}")
    found = cycles(eager)
    print("cycles (module level):", found or "none")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
