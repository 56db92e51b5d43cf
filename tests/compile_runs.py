"""Run a compile-check script (aot_compile.py, fit_check.py) in clean subprocesses, one per argument list, in
parallel: compiling is slow and CI has two cores. TRITON_INTERPRET is removed: these compile for real GPUs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_in_parallel(script: str, arg_lists: list[list[str]], timeout: float = 2400) -> str:
    """The scripts' stdout, concatenated; asserts every run exits 0 (showing the tail of its output if not)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    path = Path(__file__).with_name(script)
    runs = [subprocess.Popen([sys.executable, str(path), *args], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=path.parent.parent) for args in arg_lists]
    stdout = ""
    try:
        for run in runs:
            out, err = run.communicate(timeout=timeout)
            assert run.returncode == 0, out[-8000:] + err[-3000:]
            stdout += out
    finally:
        for run in runs:
            run.kill()
    return stdout
