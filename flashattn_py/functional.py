"""Public attention functions: `attention` (ours) and `scaled_dot_product_attention` (PyTorch's contract)."""

from __future__ import annotations

import math
from typing import Literal, overload

import torch

from ._validation import (
    causal_offset,
    check_alibi,
    check_causal,
    check_cu_seqlens,
    check_dropout,
    check_qkv,
    check_scale,
    check_softcap,
    check_window,
)
from .ops import BIAS_BOOL, BIAS_FLOAT, BIAS_NONE, AttnSpec, SeqLayout, attn_fwd, flash_attention

Causal = bool | Literal["top_left", "bottom_right"]


Window = tuple[int, int]


@overload
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: Causal = ...,
              scale: float | None = ..., return_lse: Literal[False] = ..., window: Window = ...,
              alibi_slopes: torch.Tensor | None = ..., softcap: float = ..., attn_mask: torch.Tensor | None = ...,
              dropout_p: float = ...) -> torch.Tensor: ...
@overload
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: Causal = ...,
              scale: float | None = ..., return_lse: Literal[True], window: Window = ...,
              alibi_slopes: torch.Tensor | None = ..., softcap: float = ..., attn_mask: torch.Tensor | None = ...,
              dropout_p: float = ...) -> tuple[torch.Tensor, torch.Tensor]: ...


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: Causal = False,
              scale: float | None = None, return_lse: bool = False, window: Window = (-1, -1),
              alibi_slopes: torch.Tensor | None = None, softcap: float = 0.0,
              attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0):
    """Exact scaled-dot-product attention, ``softmax(scores) v``, fused (no Sq×Sk tensor).

    Scores are ``s = scale · q kᵀ``; then softcap ``s = c · tanh(s / c)`` if
    ``softcap = c > 0``; then ALiBi adds ``-slope_h · |i + off - j|``; then the
    masks (causal, window). ``off`` is the alignment offset: 0 for top-left,
    ``Sk - Sq`` for ``causal="bottom_right"``.

    Args:
        q: ``(B, H, Sq, D)``. k, v: ``(B, H_kv, Sk, D)`` with ``H`` a multiple of
            ``H_kv`` (grouped-query attention: query head h uses K/V head
            ``h // (H / H_kv)``; K/V are never copied). One dtype (float16,
            bfloat16, float32; float64 runs the PyTorch path, for gradcheck and
            references), one device, ``1 <= D <= 256``, any strides with stride 1
            in the last dim (a ``(B, S, H, D).transpose(1, 2)`` view needs no copy).
        causal: ``False``; ``True`` or ``"top_left"``: query i sees keys ``j <= i``
            (``torch.nn.functional.scaled_dot_product_attention``'s ``is_causal``);
            ``"bottom_right"``: keys ``j <= i + Sk - Sq`` (FlashAttention's alignment,
            the one a KV cache needs). The two agree when ``Sq == Sk``.
        scale: multiplies the scores; default ``1 / sqrt(D)``.
        return_lse: also return the row log-sum-exp of the final scores,
            ``(B, H, Sq)`` float32, natural log. It is differentiable.
        window: ``(left, right)``: query i sees keys ``i + off - left <= j <= i + off + right``;
            ``-1`` leaves a side unbounded. Causal forces ``right = 0``. Key blocks
            outside the window are skipped, so the cost is O(S · window).
        alibi_slopes: ``(H,)`` or ``(B, H)`` float32 slopes; the bias is computed
            in the kernel from positions, nothing Sq×Sk is stored.
        softcap: ``c > 0`` caps the scores at ``±c`` smoothly (Gemma 2, Grok); 0 = off.
        attn_mask: boolean (True = takes part) or float (added to the scores after
            ALiBi), broadcastable to ``(B, H, Sq, Sk)`` and read in-kernel with stride 0
            along broadcast dims; a float mask that requires grad gets its gradient.
        dropout_p: dropout on the probabilities (in-kernel Philox; pass 0 in eval).

    Returns:
        ``out`` ``(B, H, Sq, D)`` in q's dtype (and strides when q is dense), or
        ``(out, lse)``. A query row that sees no key (bottom-right with Sq > Sk, a
        window that excludes every key, or Sk = 0) gets output 0, lse ``-inf`` and
        zero gradients, never NaN.

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
    left, right = check_window(window, bool(causal_mode))
    cap = check_softcap(softcap)
    slopes = check_alibi(alibi_slopes, q.shape[0], q.shape[1], q.device)
    bias, bias_kind = _check_mask(attn_mask, q, k.shape[2])
    spec = AttnSpec(scale=sm_scale, offset=causal_offset(causal_mode, q.shape[2], k.shape[2]),
                    window_left=left, window_right=right, softcap=cap, bias_kind=bias_kind,
                    dropout_p=check_dropout(dropout_p))
    out, lse = flash_attention(q, k, v, bias, slopes, spec)
    return (out, lse) if return_lse else out


def _check_mask(attn_mask: object, query: torch.Tensor, seqlen_k: int) -> tuple[torch.Tensor | None, int]:
    """An SDPA-style mask -> (bias tensor (B|1, H|1, L|1, S|1), kind) for the kernels."""
    if attn_mask is None:
        return None, BIAS_NONE
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
    if attn_mask.dtype == torch.bool:
        kind = BIAS_BOOL
    elif attn_mask.dtype == query.dtype:
        kind = BIAS_FLOAT
    else:
        raise TypeError(f"attn_mask must be bool or of query's dtype {query.dtype}, got {attn_mask.dtype}")
    if attn_mask.device != query.device:
        raise ValueError(f"attn_mask must be on query's device {query.device}, got {attn_mask.device}")
    return _mask_as_bias(attn_mask, query, seqlen_k), kind


def attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, *, causal: bool = False,
                     scale: float | None = None, return_lse: bool = False, window: Window = (-1, -1),
                     alibi_slopes: torch.Tensor | None = None, softcap: float = 0.0):
    """Attention over a batch of sequences of different lengths, packed without padding.

    q ``(total_q, H, D)``, k and v ``(total_k, H_kv, D)``; sequence b owns rows
    ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` of q and ``cu_seqlens_k[b]:cu_seqlens_k[b+1]``
    of k and v (int32, ``(B + 1,)``, starting at 0, non-decreasing);
    ``max_seqlen_q``/``max_seqlen_k`` bound the lengths. Each sequence attends only
    to itself; causal masks and windows are bottom-right aligned per sequence
    (``off = Sk_b - Sq_b``). Other options as in `attention` (ALiBi slopes may be
    ``(B, H)`` per sequence). Returns ``(total_q, H, D)`` (and the LSE ``(H, total_q)``).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"{name} must be a 3-D (total_tokens, heads, head_dim) tensor, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    q4, k4, v4 = (t.unsqueeze(0).transpose(1, 2) for t in (q, k, v))  # (1, H, total, D) views, no copies
    check_qkv(q4, k4, v4)
    batch = check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", q.shape[0], max_seqlen_q, q.device)
    if check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", k.shape[0], max_seqlen_k, q.device) != batch:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, got "
                         f"{cu_seqlens_q.numel() - 1} and {cu_seqlens_k.numel() - 1}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool (varlen is bottom-right aligned per sequence), got {causal!r}")
    left, right = check_window(window, causal)
    slopes = check_alibi(alibi_slopes, batch, q.shape[1], q.device)
    spec = AttnSpec(scale=check_scale(scale, q.shape[-1]), window_left=left, window_right=right,
                    softcap=check_softcap(softcap))
    seq = SeqLayout(mode=1, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                    max_seqlen_q=int(max_seqlen_q), max_seqlen_k=int(max_seqlen_k))
    out, lse = flash_attention(q, k, v, None, slopes, spec, seq)  # (total_q, H, D), (H, total_q)
    return (out, lse) if return_lse else out


def _as_4d(t: torch.Tensor) -> torch.Tensor:
    """(..., H, S, D) -> (B, H, S, D), B the product of the leading dims (1 when there are none)."""
    if t.dim() == 4:
        return t
    return t.reshape(-1, *t.shape[-3:]) if t.dim() > 4 else t.unsqueeze(0)


def _mask_as_bias(attn_mask: torch.Tensor, query: torch.Tensor, seqlen_k: int) -> torch.Tensor:
    """A mask broadcastable to (..., H, L, S) as a (B|1, H|1, L|1, S|1) tensor; size-1 dims stay size 1."""
    full = (*query.shape[:-1], seqlen_k)
    try:
        torch.broadcast_shapes(attn_mask.shape, full)
    except RuntimeError:
        raise ValueError(
            f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to (..., L, S) = {full}") from None
    m = attn_mask.reshape((1,) * (len(full) - attn_mask.dim()) + tuple(attn_mask.shape))
    lead = m.shape[:-3]  # batch dims, to be flattened into one
    if len(lead) == 0:
        return m.unsqueeze(0)
    if all(n == 1 for n in lead):
        return m.reshape(1, *m.shape[-3:])
    return m.expand(*full[:-3], *m.shape[-3:]).reshape(-1, *m.shape[-3:])


def scaled_dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: float | None = None,
                                 enable_gqa: bool = False) -> torch.Tensor:
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention``, on our kernels.

    Same signature and semantics: query ``(..., Hq, L, E)``, key/value
    ``(..., H, S, E)`` with any leading batch dims (3-D and 4-D inputs and more);
    ``is_causal`` is top-left (query i sees keys ``j <= i``) and may not be combined
    with ``attn_mask``; ``attn_mask`` is boolean (True = takes part) or a float
    bias added to the scores (query's dtype), broadcastable to ``(..., L, S)`` and
    never expanded in memory (broadcast dims are read with stride 0); a float
    mask that requires grad receives its gradient. ``dropout_p`` applies dropout
    to the attention probabilities always (as PyTorch's does; pass 0 in eval).
    ``enable_gqa`` lets ``Hq`` be a multiple of ``H`` without copying K/V.
    Rows that every mask entry hides return 0 (as PyTorch does). The value head
    dim must equal the query's (``Ev == E``), at most 256.
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() < 3:
            raise ValueError(f"{name} must have at least 3 dims (..., heads, seqlen, head_dim), got {tuple(t.shape)}")
    if not (query.shape[:-3] == key.shape[:-3] == value.shape[:-3]):
        raise ValueError(
            f"query, key and value must share their batch dims, got {tuple(query.shape)}, {tuple(key.shape)}, "
            f"{tuple(value.shape)}")
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
    if is_causal and attn_mask is not None:
        raise ValueError("attn_mask and is_causal=True cannot be used together (as in PyTorch)")
    if not isinstance(enable_gqa, bool):
        raise TypeError(f"enable_gqa must be a bool, got {type(enable_gqa).__name__}")
    dropout = check_dropout(dropout_p)

    # PyTorch accepts any strides; our kernels want a unit last stride
    q4, k4, v4 = (_as_4d(t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous())
                  for t in (query, key, value))
    check_qkv(q4, k4, v4, allow_gqa=enable_gqa)
    sm_scale = check_scale(scale, query.shape[-1]) if scale is not None else 1.0 / math.sqrt(query.shape[-1])

    bias, bias_kind = _check_mask(attn_mask, query, key.shape[-2])

    spec = AttnSpec(scale=sm_scale, window_right=0 if is_causal else -1, bias_kind=bias_kind, dropout_p=dropout)
    out, _ = flash_attention(q4, k4, v4, bias, None, spec)
    return out.reshape(*query.shape[:-1], out.shape[-1])


def _append_to_cache(cache: torch.Tensor, new: torch.Tensor, cache_seqlens: torch.Tensor,
                     block_table: torch.Tensor | None) -> None:
    """Write new (B, H_kv, S_new, D) at positions cache_seqlens[b] + t of sequence b, in place."""
    B, _, S_new, _ = new.shape
    pos = cache_seqlens.long()[:, None] + torch.arange(S_new, device=new.device)  # (B, S_new)
    rows = new.permute(0, 2, 1, 3)  # (B, S_new, H_kv, D), matching the advanced-index result layout
    if block_table is None:
        cache[torch.arange(B, device=new.device)[:, None], :, pos] = rows
    else:
        page_size = cache.shape[2]
        pages = block_table.long().gather(1, pos // page_size)  # (B, S_new)
        cache[pages, :, pos % page_size] = rows


def _auto_splits(q: torch.Tensor, batch_heads: int, cache_len: int) -> int:
    """Enough splits of the keys to fill the GPU's multiprocessors, each at least 256 keys long."""
    if not q.is_cuda:
        return 1
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    return max(1, min(sms // max(batch_heads, 1), cache_len // 256, 64))


def attention_with_kvcache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           cache_seqlens: torch.Tensor, *, k_new: torch.Tensor | None = None,
                           v_new: torch.Tensor | None = None, causal: bool = True, scale: float | None = None,
                           window: Window = (-1, -1), alibi_slopes: torch.Tensor | None = None,
                           softcap: float = 0.0, block_table: torch.Tensor | None = None,
                           num_splits: int = 0) -> torch.Tensor:
    """Decoding attention over a KV cache (forward only), appending new keys and values in place.

    q ``(B, H, Sq, D)``; caches ``(B, H_kv, S_max, D)``, or paged ``(num_pages, H_kv,
    page_size, D)`` with ``block_table`` ``(B, max_pages)`` int32 naming sequence b's
    pages in order; ``cache_seqlens`` ``(B,)`` int32 = tokens already in the cache.
    ``k_new``/``v_new`` ``(B, H_kv, S_new, D)`` are written at positions
    ``cache_seqlens[b] .. + S_new`` first, then q attends to the
    ``cache_seqlens[b] + S_new`` valid keys of its sequence, bottom-right aligned
    (query i is at position ``Sk_b - Sq + i``). ``num_splits`` splits each
    sequence's keys across programs (flash-decoding) and merges the partial
    results by their log-sum-exp; 0 picks it from the GPU's multiprocessor count.
    Window, ALiBi, softcap and scale as in `attention`. Returns ``(B, H, Sq, D)``.
    """
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must have one shape, got {tuple(k_cache.shape)} and "
                         f"{tuple(v_cache.shape)}")
    B, H, Sq, D = q.shape
    H_kv = k_cache.shape[1]
    if block_table is not None:
        if not isinstance(block_table, torch.Tensor) or block_table.dtype != torch.int32 or block_table.dim() != 2 \
                or block_table.shape[0] != B:
            raise ValueError(f"block_table must be an int32 ({B}, max_pages) tensor")
        capacity = block_table.shape[1] * k_cache.shape[2]
        view = (q, k_cache[:1].expand(B, -1, -1, -1), v_cache[:1].expand(B, -1, -1, -1))
        check_qkv(*view)
    else:
        capacity = k_cache.shape[2]
        check_qkv(q, k_cache, v_cache)
    if not isinstance(cache_seqlens, torch.Tensor) or cache_seqlens.dtype != torch.int32 \
            or tuple(cache_seqlens.shape) != (B,):
        raise ValueError(f"cache_seqlens must be an int32 tensor of shape ({B},)")
    if (k_new is None) != (v_new is None):
        raise ValueError("k_new and v_new must be given together")
    S_new = 0
    if k_new is not None:
        if k_new.shape != v_new.shape or k_new.dim() != 4 or k_new.shape[:2] != (B, H_kv) or k_new.shape[3] != D:
            raise ValueError(f"k_new and v_new must be ({B}, {H_kv}, S_new, {D}), got {tuple(k_new.shape)} and "
                             f"{tuple(v_new.shape)}")
        if k_new.dtype != k_cache.dtype or k_new.device != k_cache.device:
            raise TypeError("k_new and v_new must match the cache's dtype and device")
        S_new = k_new.shape[2]
    lengths = cache_seqlens.tolist()  # one host sync, to refuse an overflowing cache before writing into it
    if min(lengths, default=0) < 0 or max(lengths, default=0) + S_new > capacity:
        raise ValueError(f"the cache holds {capacity} tokens per sequence; cache_seqlens {lengths[:8]} + "
                         f"{S_new} new tokens does not fit")
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 0:
        raise ValueError(f"num_splits must be an int >= 0 (0 = automatic), got {num_splits!r}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool (decoding is bottom-right aligned), got {causal!r}")
    left, right = check_window(window, causal)
    slopes = check_alibi(alibi_slopes, B, H, q.device)
    spec = AttnSpec(scale=check_scale(scale, D), window_left=left, window_right=right,
                    softcap=check_softcap(softcap))

    if k_new is not None:
        _append_to_cache(k_cache, k_new, cache_seqlens, block_table)
        _append_to_cache(v_cache, v_new, cache_seqlens, block_table)
    seqlens_k = (cache_seqlens + S_new).to(torch.int32)
    splits = num_splits or _auto_splits(q, B * H, capacity)
    seq = SeqLayout(mode=2, seqlens_k=seqlens_k, block_table=block_table)
    with torch.no_grad():
        out, _ = attn_fwd(q, k_cache, v_cache, None, slopes, spec, seq, splits)
    return out
