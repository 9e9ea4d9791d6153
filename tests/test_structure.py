"""The architecture, checked: the optimizers reach kernels only through the registry's
one entry point (``Kernel.launch``) and name no backend; no backend imports another's
code."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "adamkit"
BACKEND_NAMES = {"reference", "numba", "triton"}


def _trees(folder: Path) -> list[tuple[Path, ast.Module]]:
    return [(f, ast.parse(f.read_text(), str(f))) for f in sorted(folder.rglob("*.py"))]


def test_the_optimizers_launch_kernels_only_through_kernel_launch_and_name_no_backend() -> None:
    problems = []
    for path, tree in _trees(PACKAGE / "optim"):
        where = path.relative_to(PACKAGE.parent)
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("fn", "tables")
            ):
                problems.append(f"{where}:{node.lineno}: calls a kernel's .{node.func.attr} (use kernel.launch)")
            if (
                isinstance(node, ast.ImportFrom)
                and node.module
                and any(part in node.module.split(".") for part in ("cpu", "cuda", "reference"))
            ):
                problems.append(f"{where}:{node.lineno}: imports {node.module}")
            if isinstance(node, ast.Compare):
                named = [c.value for c in ast.walk(node) if isinstance(c, ast.Constant) and c.value in BACKEND_NAMES]
                if named:
                    problems.append(f"{where}:{node.lineno}: compares with backend {named[0]!r}")
            if isinstance(node, ast.Call) and any(
                isinstance(a, ast.Constant) and a.value in BACKEND_NAMES for a in node.args
            ):
                problems.append(f"{where}:{node.lineno}: passes backend name to {ast.unparse(node.func)}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("backend,others", [("cpu", ("cuda",)), ("cuda", ("cpu",))])
def test_no_backend_imports_another(backend: str, others: tuple[str, ...]) -> None:
    problems = []
    for path, tree in _trees(PACKAGE / "kernels" / backend):
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                if any(o in node.module.split(".") for o in others):
                    problems.append(f"{path.name}:{node.lineno}: imports {node.module}")
            if isinstance(node, ast.Import):
                problems += [f"{path.name}:{node.lineno}: imports {a.name}" for a in node.names
                             if any(f"kernels.{o}" in a.name for o in others)]  # fmt: skip
    assert not problems, "\n".join(problems)
