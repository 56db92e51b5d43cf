"""The kernels compile for Hopper with tensor-core MMAs: checked on CPU with Triton's bundled ptxas."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def _has_nvidia_backend() -> bool:
    try:
        import triton
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except ImportError:
        return False
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    return (bin_dir / "ptxas").exists() and (bin_dir / "nvdisasm").exists()


@pytest.mark.skipif(not _has_nvidia_backend(), reason="this Triton has no bundled NVIDIA toolchain")
def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    script = Path(__file__).with_name("aot_compile.py")
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert result.stdout.count("ok ") >= 15, result.stdout
