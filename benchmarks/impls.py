"""The implementations the suite compares, each a factory: (causal) -> f(q, k, v) -> out.

All take and return (B, H, S, D) tensors and use top-left causal alignment with
Sq == Sk (where every convention agrees). A factory raises `Unsupported` when
the implementation cannot run here at all (package missing, no GPU).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

import flashattn_py
from flashattn_py.reference import attention_reference

AttnFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class Unsupported(Exception):
    """The implementation does not run on this machine or for this case."""


def _flashattn_py(causal: bool) -> AttnFn:
    return lambda q, k, v: flashattn_py.attention(q, k, v, causal=causal)


def _naive(causal: bool) -> AttnFn:
    return lambda q, k, v: attention_reference(q, k, v, causal=causal)


def _sdpa(backend_name: str) -> Callable[[bool], AttnFn]:
    def factory(causal: bool) -> AttnFn:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, backend_name, None)
        if backend is None:
            raise Unsupported(f"this torch has no SDPBackend.{backend_name}")

        def run(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        return run

    return factory


_flex_compiled: dict[str, Callable] = {}
_flex_masks: dict[tuple, object] = {}  # block masks per (Sq, Sk, device), built once, outside later timings


def _flex(causal: bool) -> AttnFn:
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as err:
        raise Unsupported("this torch has no FlexAttention") from err
    if "fn" not in _flex_compiled:
        _flex_compiled["fn"] = torch.compile(flex_attention, dynamic=False)
    compiled = _flex_compiled["fn"]

    def causal_mask(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    def run(q, k, v):
        block_mask = None
        if causal:
            key = (q.shape[-2], k.shape[-2], q.device)
            if key not in _flex_masks:
                _flex_masks[key] = create_block_mask(causal_mask, None, None, q.shape[-2], k.shape[-2],
                                                     device=q.device)
            block_mask = _flex_masks[key]
        return compiled(q, k, v, block_mask=block_mask)

    return run



def _flash_attn(causal: bool) -> AttnFn:
    try:
        from flash_attn import flash_attn_func
    except ImportError as err:
        raise Unsupported("flash_attn is not installed") from err
    # flash_attn takes (B, S, H, D): transposed views, no copies of ours
    return lambda q, k, v: flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           causal=causal).transpose(1, 2)


IMPLEMENTATIONS: dict[str, Callable[[bool], AttnFn]] = {
    "flashattn_py": _flashattn_py,
    "naive": _naive,
    "sdpa_flash": _sdpa("FLASH_ATTENTION"),
    "sdpa_efficient": _sdpa("EFFICIENT_ATTENTION"),
    "sdpa_cudnn": _sdpa("CUDNN_ATTENTION"),
    "sdpa_math": _sdpa("MATH"),
    "flex": _flex,
    "flash_attn": _flash_attn,
}
