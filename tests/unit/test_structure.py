"""The rules of Postier's structure (docs/architecture.md), held for every module.

No import circle (an import inside a function counts as much as one at the top), no
module over 600 lines, no function over 80 lines, and the SDK's client imports no server
code: a workstation or an application that only sends must not need the server's parts.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from functools import cache
from pathlib import Path

import postier

PACKAGE = Path(postier.__file__).parent
MODULE_LINES = 600
FUNCTION_LINES = 80


def _name(path: Path) -> str:
    parts = ["postier", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def _files() -> dict[str, Path]:
    return {_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if "migrations" not in p.parts}


@cache
def _modules() -> dict[str, ast.Module]:
    return {m: ast.parse(p.read_text(), str(p)) for m, p in _files().items()}


def _imports(module: str) -> set[str]:
    """The Postier modules ``module`` imports, wherever the import statement is."""
    known = _modules()
    is_package = _files()[module].name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(known[module]):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                if f"{base}.{alias.name}" in known:
                    found.add(f"{base}.{alias.name}")
                elif base in known:
                    found.add(base)
    found.discard(module)
    return found


def _reach(start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        for nxt in _imports(todo.pop()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_no_module_imports_one_that_imports_it_back() -> None:
    # A package's __init__ importing its own modules is not a circle of concepts.
    circles = sorted(
        f"{m} <-> {o}" for m in _modules() for o in _imports(m)
        if m < o and m in _reach(o) and not o.startswith(m + ".") and not m.startswith(o + ".")
    )
    assert not circles, "import circles (direct or not):\n" + "\n".join(circles)


def test_no_module_over_600_lines() -> None:
    lines = {m: len(p.read_text().splitlines()) for m, p in _files().items()}
    long = sorted(f"{m}: {n} lines" for m, n in lines.items() if n > MODULE_LINES)
    assert not long, f"modules over {MODULE_LINES} lines:\n" + "\n".join(long)


def test_no_function_over_80_lines() -> None:
    long = sorted(
        f"{m}.{node.name}: {node.end_lineno - node.lineno + 1} lines"
        for m, tree in _modules().items() for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno is not None and node.end_lineno - node.lineno + 1 > FUNCTION_LINES
    )
    assert not long, f"functions over {FUNCTION_LINES} lines:\n" + "\n".join(long)


def test_the_sdk_imports_no_server_code() -> None:
    # What an application that only sends loads: the public face and the client.
    code = ("import sys, postier; postier.Client; postier.send; "
            "print(' '.join(sorted(m for m in sys.modules if m.startswith('postier.'))))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True).stdout.split()
    server_side = ("postier.core", "postier.server", "postier.store", "postier.ops",
                   "postier.delivery", "postier.cli")
    reached = [m for m in loaded if m.startswith(server_side)]
    assert not reached, "using the SDK loads server code:\n" + "\n".join(reached)
