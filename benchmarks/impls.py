"""The implementations the suite compares.

GPU: each a factory ``(causal) -> f(q, k, v) -> out`` (`IMPLEMENTATIONS`): (B, H, S, D)
tensors, top-left causal alignment with Sq == Sk (where every convention agrees).
CPU: each a factory ``(variant, causal, heads) -> f(q, k, v) -> out`` (`CPU_IMPLEMENTATIONS`)
that also knows the feature variants (sliding window, ALiBi, softcap, bottom-right
causal); PyTorch's SDPA gets those as the dense mask a user would build.
A factory raises `Unsupported` when the implementation cannot run here at all
(package missing, no GPU) or cannot express the case.
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


def _sdpa_default(causal: bool) -> AttnFn:
    """PyTorch's own choice of kernel (on CPU: its fused flash-attention kernel)."""
    return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)


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
    "sdpa": _sdpa_default,
    "sdpa_flash": _sdpa("FLASH_ATTENTION"),
    "sdpa_efficient": _sdpa("EFFICIENT_ATTENTION"),
    "sdpa_cudnn": _sdpa("CUDNN_ATTENTION"),
    "sdpa_math": _sdpa("MATH"),
    "flex": _flex,
    "flash_attn": _flash_attn,
}


# --- CPU: the same three implementations, feature variants included ------------------------------------------------

WINDOW = 256
SOFTCAP = 30.0
VARIANTS = ("", "window", "alibi", "softcap", "bottom_right")


def alibi_slopes(heads: int) -> torch.Tensor:
    """The ALiBi paper's geometric slopes 2^(-8 (h + 1) / H)."""
    return torch.tensor([2.0 ** (-8.0 * (h + 1) / heads) for h in range(heads)])


def variant_kwargs(variant: str, causal: bool, heads: int) -> dict:
    """`flashattn_py.attention` / `attention_reference` keyword arguments of a variant."""
    if variant == "":
        return {"causal": causal}
    if variant == "window":  # a sliding window of WINDOW keys to the left (causal: none to the right)
        return {"causal": causal, "window": (WINDOW, 0 if causal else WINDOW)}
    if variant == "alibi":
        return {"causal": causal, "alibi_slopes": alibi_slopes(heads)}
    if variant == "softcap":
        return {"causal": causal, "softcap": SOFTCAP}
    if variant == "bottom_right":
        return {"causal": "bottom_right"}
    raise ValueError(f"unknown variant {variant!r}")


def _dense_sdpa_mask(variant: str, causal: bool, heads: int, sq: int, sk: int, dtype: torch.dtype,
                     ) -> torch.Tensor | None:
    """The dense (.., Sq, Sk) mask a PyTorch user passes SDPA for a variant (built once, outside the timings)."""
    from flashattn_py.reference import reference_scores

    kwargs = variant_kwargs(variant, causal, heads)
    zeros = torch.zeros(1, heads if variant == "alibi" else 1, sq, 1)
    scores = reference_scores(zeros, torch.zeros(1, zeros.shape[1], sk, 1), scale=1.0, **kwargs)[0]
    if variant == "alibi":  # a float bias (causal part included as -inf), in q's dtype
        return scores.to(dtype)
    return ~torch.isneginf(scores)  # (1, Sq, Sk) bool, True = takes part


def _cpu_flashattn_py(case) -> AttnFn:
    kwargs = variant_kwargs(case.variant, case.causal, case.heads)
    return lambda q, k, v: flashattn_py.attention(q, k, v, **kwargs)


def _cpu_naive(case) -> AttnFn:
    kwargs = variant_kwargs(case.variant, case.causal, case.heads)
    return lambda q, k, v: attention_reference(q, k, v, **kwargs)


def _cpu_sdpa(case) -> AttnFn:
    if case.variant == "":
        return _sdpa_default(case.causal)
    if case.variant == "softcap":
        raise Unsupported("torch SDPA has no softcap")
    # the dense mask is an input (built here, outside the timed and measured calls), as a user would hold it
    mask = _dense_sdpa_mask(case.variant, case.causal, case.heads, case.seqlen_q, case.seqlen_k, case.torch_dtype)
    return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


# factories (case) -> f(q, k, v); `case` is a `suite.Case` (variant, causal, heads, seqlen_q/k, torch_dtype)
CPU_IMPLEMENTATIONS: dict[str, Callable[[object], AttnFn]] = {
    "flashattn_py": _cpu_flashattn_py,
    "sdpa": _cpu_sdpa,
    "naive": _cpu_naive,
}
