"""The kernels compile for sm_90 / sm_80 / sm_100 / sm_120 with tensor-core MMAs, as a launch would (bundled ptxas)."""

from __future__ import annotations

import pytest
from compile_runs import run_in_parallel

from benchmarks import codegen_sass as cs


@pytest.mark.skipif(not cs.has_bundled_toolchain(), reason="this Triton has no bundled NVIDIA toolchain")
def test_kernels_compile_with_tensor_cores():
    """sm_90 (every feature variant and one dense variant per config table) and, in parallel on the other
    core, sm_80, sm_100 and sm_120 (TMA with mma.sync: a path of its own) on the dense ones: compiling is slow on
    CI's 2 cores; `--full` covers the grid. sm_86 / sm_89 compile as sm_80 does (same ptxas, same lowering)."""
    stdout = run_in_parallel("aot_compile.py", [["--arch", "sm_90"], ["--arch", "sm_80", "sm_100", "sm_120",
                                                                      "--dense-only"]])
    per_arch = {arch: stdout.count(f"ok   {arch} ") for arch in ("sm_90", "sm_80", "sm_100", "sm_120")}
    assert per_arch["sm_90"] >= 25 and per_arch["sm_80"] >= 10, (per_arch, stdout)
    for arch in ("sm_100", "sm_120"):
        assert per_arch[arch] >= 10 or f"skip {arch}" in stdout, (per_arch, stdout)
