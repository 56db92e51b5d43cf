"""Public attention functions."""

from __future__ import annotations

from typing import Literal, overload

import torch

from ._validation import causal_offset, check_causal, check_qkv, check_scale
from .ops import FlashAttnFunction

Causal = bool | Literal["top_left", "bottom_right"]


@overload
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: Causal = ...,
              scale: float | None = ..., return_lse: Literal[False] = ...) -> torch.Tensor: ...
@overload
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: Causal = ...,
              scale: float | None = ..., return_lse: Literal[True]) -> tuple[torch.Tensor, torch.Tensor]: ...


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: Causal = False,
              scale: float | None = None, return_lse: bool = False):
    """Exact scaled-dot-product attention, ``softmax(scale · q kᵀ) v``, fused (no Sq×Sk tensor).

    Args:
        q: ``(B, H, Sq, D)``. k, v: ``(B, H, Sk, D)``. One dtype (float16, bfloat16,
            float32; float64 runs the PyTorch path, for gradcheck and references),
            one device, ``1 <= D <= 256``, any strides with stride 1 in the last dim
            (a ``(B, S, H, D).transpose(1, 2)`` view needs no copy).
        causal: ``False``; ``True`` or ``"top_left"``: query i sees keys ``j <= i``
            (``torch.nn.functional.scaled_dot_product_attention``'s ``is_causal``);
            ``"bottom_right"``: keys ``j <= i + Sk - Sq`` (FlashAttention's alignment,
            the one a KV cache needs). The two agree when ``Sq == Sk``.
        scale: multiplies the scores; default ``1 / sqrt(D)``.
        return_lse: also return the row log-sum-exp of the scaled, masked scores,
            ``(B, H, Sq)`` float32, natural log. It is differentiable.

    Returns:
        ``out`` ``(B, H, Sq, D)`` in q's dtype (and strides when q is dense), or
        ``(out, lse)``. A query row that sees no key (bottom-right with Sq > Sk, or
        Sk = 0) gets output 0, lse ``-inf`` and zero gradients, never NaN.

    CUDA tensors run the Triton kernels; CPU tensors run them through Triton's
    interpreter when ``TRITON_INTERPRET=1`` was set before the first call, and a
    PyTorch implementation of the same algorithm otherwise. Accumulation is
    float32; float32 inputs multiply in IEEE precision unless
    ``torch.backends.cuda.matmul.allow_tf32`` is set. Backward is deterministic.
    """
    check_qkv(q, k, v)
    causal_mode = check_causal(causal)
    sm_scale = check_scale(scale, q.shape[-1])
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    offset = causal_offset(causal_mode, q.shape[2], k.shape[2])
    out, lse = FlashAttnFunction.apply(q, k, v, sm_scale, bool(causal_mode), offset)
    return (out, lse) if return_lse else out
