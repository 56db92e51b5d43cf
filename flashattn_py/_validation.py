"""Input checks shared by the public functions. Every check runs before any kernel launch."""

from __future__ import annotations

import math
import numbers

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_HEAD_DIM = 256

CausalArg = bool | str


def check_qkv(q: object, k: object, v: object, allow_gqa: bool = True) -> None:
    """q (B, H, Sq, D), k and v (B, H_kv, Sk, D), H a multiple of H_kv: one dtype and device, last dim contiguous."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (batch, heads, seqlen, head_dim), got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.shape[0] != k.shape[0] or q.shape[0] != v.shape[0]:
        raise ValueError(
            f"q, k and v must have the same batch (dim 0), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"k and v must have the same number of heads (dim 1), got {k.shape[1]} and {v.shape[1]}")
    if not allow_gqa and q.shape[1] != k.shape[1]:
        raise ValueError(
            f"q, k and v must have the same number of heads (dim 1) unless enable_gqa=True, got {q.shape[1]}, "
            f"{k.shape[1]}, {v.shape[1]}")
    if (q.shape[1] % k.shape[1] != 0) if k.shape[1] else q.shape[1] != 0:
        raise ValueError(
            f"q's heads (dim 1) must be a multiple of k's and v's heads (grouped-query attention), got "
            f"{q.shape[1]} and {k.shape[1]}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v must have the same sequence length (dim 2), got {k.shape[2]} and {v.shape[2]}")
    head_dim = q.shape[3]
    if k.shape[3] != head_dim or v.shape[3] != head_dim:
        raise ValueError(
            f"q, k and v must have the same head_dim (dim 3), got {head_dim}, {k.shape[3]}, {v.shape[3]}")
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim (dim 3) must be in 1..{MAX_HEAD_DIM}, got {head_dim}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if head_dim > 1 and t.stride(3) != 1:
            raise ValueError(
                f"{name} must have stride 1 in its last dim (got strides {t.stride()}); "
                f"call .contiguous() on it first")


def check_causal(causal: object) -> bool | str:
    """False | True | 'top_left' | 'bottom_right' -> False, 'top_left' or 'bottom_right'."""
    if isinstance(causal, bool):
        return "top_left" if causal else False
    if isinstance(causal, str):
        if causal in ("top_left", "bottom_right"):
            return causal
        raise ValueError(f"causal must be a bool, 'top_left' or 'bottom_right', got {causal!r}")
    raise TypeError(f"causal must be a bool, 'top_left' or 'bottom_right', got {type(causal).__name__}")


def check_scale(scale: object, head_dim: int) -> float:
    """None -> 1/sqrt(head_dim); otherwise a finite real number."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return float(scale)


def causal_offset(causal: bool | str, seqlen_q: int, seqlen_k: int) -> int:
    """Query i sees key j iff j <= i + offset: 0 for top-left, Sk - Sq for bottom-right."""
    return seqlen_k - seqlen_q if causal == "bottom_right" else 0


def check_dropout(dropout_p: object) -> float:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p must be a float, got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    return float(dropout_p)
