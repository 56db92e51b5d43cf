"""Test set-up: pick the device, run the real kernels on CPU through Triton's interpreter.

Without a GPU, TRITON_INTERPRET=1 is set here, before flashattn_py's kernels are
first imported, so CPU tests exercise the Triton kernels (set TRITON_INTERPRET=0
yourself to test the PyTorch backend instead). The interpreter's bf16 `tl.dot`
multiplies raw bit patterns (triton #11584); it is patched here -- and only
here -- to widen bf16 operands to fp32 first, exactly, so bf16 is testable on CPU.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _patch_interpreter_bf16_dot() -> None:
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    builder = interpreter.InterpreterBuilder
    if getattr(builder, "_flashattn_py_bf16_patch", False):
        return
    create_dot = builder.create_dot

    def widen(h):
        if h.dtype.scalar == tl.bfloat16:  # bf16 is held as uint16 bit patterns: shift into fp32, exactly
            return interpreter.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
        return h

    def create_dot_bf16(self, a, b, d, input_precision, max_num_imprecise_acc):
        return create_dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    builder.create_dot = create_dot_bf16
    builder._flashattn_py_bf16_patch = True


if os.environ.get("TRITON_INTERPRET") == "1":
    _patch_interpreter_bf16_dot()

from flashattn_py import ops  # noqa: E402  (after TRITON_INTERPRET is settled)

DEVICE = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device() -> torch.device:
    return DEVICE


@pytest.fixture
def triton_ran():
    """Yields a checker: after the test body, call it to assert every Triton kernel of a pass launched.

    Fails when the device would not run the Triton kernels at all, so a test
    that claims to test the kernels cannot silently test the torch backend.
    """
    before = ops.launch_counts.copy()

    def check(*names: str) -> None:
        assert ops.uses_triton(torch.empty(1, device=DEVICE)), (
            "the Triton kernels are not in use on this device (TRITON_INTERPRET=0 on a CPU-only machine?)")
        for name in names:
            assert ops.launch_counts[name] > before[name], f"Triton kernel {name} did not launch"

    return check
