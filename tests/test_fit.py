"""Every launch of the representative set fits its GPU on the first config choice, for each NVIDIA target.

Compiled for real (bundled ptxas) on CPU by tests/fit_check.py in clean subprocesses, the targets split
over CI's two cores. What it proves per launch: the config the launcher picks for that GPU fits its
shared memory without a fallback, and the grid stays within CUDA's limits.
"""

from __future__ import annotations

import pytest
from compile_runs import run_in_parallel

from benchmarks import codegen_sass as cs

HALVES = (["sm_90", "sm_86", "sm_120"], ["sm_80", "sm_89", "sm_100"])


@pytest.mark.skipif(not cs.has_bundled_toolchain(), reason="this Triton has no bundled NVIDIA toolchain")
def test_every_target_fits_on_first_choice():
    stdout = run_in_parallel("fit_check.py", [["--target", *half] for half in HALVES])
    for target in (t for half in HALVES for t in half):
        assert stdout.count(f"ok   {target:6s} ") >= 46 or f"skip {target}" in stdout, (target, stdout[-4000:])
