"""Where the library runs Triton's CPU interpreter, it makes the interpreter's arithmetic right first.

The interpreter's bf16 ``tl.dot`` multiplies the raw uint16 bit patterns it
stores bf16 in (triton #11584), so every bf16 result would be off by ~1e9. The
kernels stay as they are; instead the interpreter's dot builder widens bf16
operands to fp32 first, which is exact (bf16 is the top half of an fp32). If
this Triton's interpreter internals are not what the fix expects, bf16 under
the interpreter is refused with an error (see `check_dtype`), never computed wrong.
"""

from __future__ import annotations

import torch

_PATCH_FLAG = "_flashattn_py_bf16_patch"
bf16_dot_exact = False


def make_bf16_dot_exact() -> bool:
    """Patch the interpreter's `create_dot` to widen bf16 operands exactly; returns whether bf16 is safe."""
    global bf16_dot_exact
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter

        builder = interpreter.InterpreterBuilder
        create_dot = builder.create_dot
        tensor_handle = interpreter.TensorHandle
    except (ImportError, AttributeError):
        return False
    if getattr(builder, _PATCH_FLAG, False):
        bf16_dot_exact = True
        return True

    def widen(h):
        if h.dtype.scalar == tl.bfloat16:  # bf16 is held as uint16 bit patterns: shift into fp32, exactly
            return tensor_handle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
        return h

    def create_dot_bf16(self, a, b, d, *args, **kwargs):
        return create_dot(self, widen(a), widen(b), d, *args, **kwargs)

    builder.create_dot = create_dot_bf16
    setattr(builder, _PATCH_FLAG, True)
    bf16_dot_exact = _self_test()
    return bf16_dot_exact


def _self_test() -> bool:
    """Run one tiny bf16 dot through the patched interpreter and compare with torch."""
    try:
        import triton
        import triton.language as tl

        def dot16(A, B, C):
            offs = tl.arange(0, 16)
            a = tl.load(A + offs[:, None] * 16 + offs[None, :])
            b = tl.load(B + offs[:, None] * 16 + offs[None, :])
            tl.store(C + offs[:, None] * 16 + offs[None, :], tl.dot(a, b))

        kernel = triton.jit(dot16)  # TRITON_INTERPRET=1 is set, or we would not be here
        with torch.utils._python_dispatch._disable_current_modes():  # real tensors, even under FakeTensorMode
            return _run_self_test(kernel)
    except Exception:  # noqa: BLE001 - any failure means: do not trust bf16 here
        return False


def _run_self_test(kernel) -> bool:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(16, 16, generator=gen).to(torch.bfloat16)
    b = torch.randn(16, 16, generator=gen).to(torch.bfloat16)
    c = torch.empty(16, 16, dtype=torch.float32)
    kernel[(1,)](a, b, c)
    return bool(torch.allclose(c, a.float() @ b.float(), rtol=1e-5, atol=1e-5))


def check_dtype(dtype: torch.dtype) -> None:
    """Refuse what the interpreter would compute wrong."""
    if dtype == torch.bfloat16 and not bf16_dot_exact:
        raise TypeError(
            "bfloat16 inputs cannot run under TRITON_INTERPRET=1 with this Triton: its interpreter's bf16 "
            "tl.dot is wrong (triton #11584) and flashattn_py could not correct it. Use float16/float32, or "
            "unset TRITON_INTERPRET to take the PyTorch CPU path.")
