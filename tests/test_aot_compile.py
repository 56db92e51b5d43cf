"""The kernels compile for sm_90 / sm_80 / sm_100 with tensor-core MMAs, as a launch would: on CPU, bundled ptxas."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import codegen_sass as cs


@pytest.mark.skipif(not cs.has_bundled_toolchain(), reason="this Triton has no bundled NVIDIA toolchain")
def test_kernels_compile_with_tensor_cores():
    """sm_90 (every feature variant and one dense variant per config table) and, in parallel on the other
    core, sm_80 and sm_100 on the dense ones: compiling is slow on CI's 2 cores; `--full` covers the grid."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("aot_compile.py")
    runs = [subprocess.Popen([sys.executable, str(script), *extra], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=script.parent.parent)
            for extra in (["--arch", "sm_90"], ["--arch", "sm_80", "sm_100", "--dense-only"])]
    stdout = ""
    try:
        for run in runs:
            out, err = run.communicate(timeout=2400)
            assert run.returncode == 0, out[-6000:] + err[-3000:]
            stdout += out
    finally:
        for run in runs:
            run.kill()
    per_arch = {arch: stdout.count(f"ok   {arch} ") for arch in ("sm_90", "sm_80", "sm_100")}
    assert per_arch["sm_90"] >= 25 and per_arch["sm_80"] >= 10, (per_arch, stdout)
    assert per_arch["sm_100"] >= 10 or "skip sm_100" in stdout, (per_arch, stdout)
