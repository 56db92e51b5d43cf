"""Under TRITON_INTERPRET=1 the library itself keeps bf16 right (Triton's interpreter multiplies bf16 bit patterns)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import flashattn_py
from flashattn_py import _interpreter, ops

ROOT = Path(__file__).resolve().parent.parent
needs_interpreter = pytest.mark.skipif(not ops.uses_triton(torch.empty(1)),
                                       reason="the kernels do not run through the interpreter here")


def test_user_process_gets_right_bf16():
    """A plain user script (no test fixtures, nothing patched by hand) under the interpreter: bf16 matches fp64."""
    pytest.importorskip("triton")
    script = (
        "import torch, flashattn_py\n"
        "from flashattn_py import ops\n"
        "g = torch.Generator().manual_seed(0)\n"
        "q, k, v = (torch.randn(1, 2, 40, 32, generator=g) for _ in range(3))\n"
        "out = flashattn_py.attention(*(t.bfloat16() for t in (q, k, v)), causal=True)\n"
        "ref = flashattn_py.attention_reference(*(t.double() for t in (q, k, v)), causal=True)\n"
        "assert ops.launch_counts['attn_fwd'] == 1, 'the interpreted kernels did not run'\n"
        "print((out.double() - ref).abs().max().item())\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert float(result.stdout.strip().splitlines()[-1]) < 2e-2  # bf16 rounding; the unpatched interpreter is ~1e9


@needs_interpreter
def test_bf16_refused_when_the_interpreter_cannot_be_corrected(monkeypatch):
    monkeypatch.setattr(_interpreter, "bf16_dot_exact", False)
    q = torch.randn(1, 1, 8, 16, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="bfloat16.*TRITON_INTERPRET"):
        flashattn_py.attention(q, q, q)
    flashattn_py.attention(q.half(), q.half(), q.half())  # other dtypes are unaffected


@needs_interpreter
def test_correction_is_active():
    assert _interpreter.bf16_dot_exact
