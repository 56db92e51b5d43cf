"""The package's layers import one way, and the kernels load from an install and from a plain checkout."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "flashattn_py"

# module -> the package modules it may import (its own layer and the ones below)
ALLOWED = {
    "_contract": set(),
    "_targets": set(),
    "_config": {"_targets"},
    "_interpreter": set(),
    "_launch": {"_config", "_contract", "_interpreter", "_targets", "kernels"},
    "_torch_backend": {"_contract", "_cpu_fused"},
    "_cpu_fused": {"_contract"},
    "ops": {"_contract", "_launch", "_torch_backend", "_interpreter"},
}


def _package_imports(path: Path) -> set[str]:
    """First component of every flashattn_py-relative import in a module (`from . import x`, `from .x import y`)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("flashattn_py."):
            found.add(node.module.split(".")[1])
    return found


@pytest.mark.parametrize("module", sorted(ALLOWED))
def test_imports_go_one_way(module):
    path = PKG / f"{module}.py"
    if not path.exists():
        pytest.skip(f"{module}.py is not in this tree")
    extra = _package_imports(path) - ALLOWED[module]
    assert not extra, f"flashattn_py.{module} imports {sorted(extra)}, a layer above it"


def test_kernels_contain_only_jit_code():
    for path in (ROOT / "kernels").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, ast.FunctionDef):
                decorators = [ast.unparse(d) for d in node.decorator_list]
                assert "triton.jit" in decorators, f"{path.name}:{node.name} is not @triton.jit"
            assert not isinstance(node, ast.ClassDef), f"{path.name} defines a class"


def test_kernels_load_from_a_plain_checkout(tmp_path):
    """Without the installed package-dir mapping, `flashattn_py.kernels` is the checkout's top-level kernels/."""
    script = (
        "import sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"
        "import flashattn_py._launch as launch\n"
        "kernels = launch._get_kernels()\n"
        "import flashattn_py.kernels\n"
        "assert flashattn_py.kernels is kernels, 'two copies of the kernels'\n"
        f"assert kernels.__file__.startswith({str(ROOT / 'kernels')!r}), kernels.__file__\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    pytest.importorskip("triton")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stdout + result.stderr
