"""Every launch of the representative set fits its GPU on the first config choice, for each NVIDIA target.

Compiled for real (bundled ptxas) on CPU by tests/fit_check.py in clean subprocesses, the targets split
over CI's two cores. What it proves per launch: the config the launcher picks for that GPU fits its
shared memory without a fallback, and the grid stays within CUDA's limits.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import codegen_sass as cs

HALVES = (["sm_90", "sm_86", "sm_120"], ["sm_80", "sm_89", "sm_100"])


@pytest.mark.skipif(not cs.has_bundled_toolchain(), reason="this Triton has no bundled NVIDIA toolchain")
def test_every_target_fits_on_first_choice():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("fit_check.py")
    runs = [subprocess.Popen([sys.executable, str(script), "--target", *half], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=script.parent.parent) for half in HALVES]
    stdout = ""
    try:
        for run in runs:
            out, err = run.communicate(timeout=2400)
            assert run.returncode == 0, out[-8000:] + err[-3000:]
            stdout += out
    finally:
        for run in runs:
            run.kill()
    for target in (t for half in HALVES for t in half):
        assert stdout.count(f"ok   {target:6s} ") >= 40 or f"skip {target}" in stdout, (target, stdout[-4000:])
