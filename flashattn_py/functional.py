"""Public attention functions: `attention` (ours) and `scaled_dot_product_attention` (PyTorch's contract)."""

from __future__ import annotations

import math
from typing import Literal, overload

import torch

from . import _config
from ._contract import AttnSpec, BiasKind, SeqLayout, SeqMode
from ._validation import (
    InputError,
    InputTypeError,
    causal_offset,
    check_alibi,
    check_causal,
    check_cu_seqlens,
    check_dropout,
    check_kvcache,
    check_qkv,
    check_scale,
    check_softcap,
    check_window,
)
from .ops import decode_attention, flash_attention, multiprocessors

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
            A ``torch.nn.attention.bias.CausalBias`` (``causal_upper_left`` /
            ``causal_lower_right``) means ``causal="top_left"`` / ``"bottom_right"``
            (then ``causal`` must be False).
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
    variant = _causal_bias_variant(attn_mask, q.shape[2], k.shape[2])
    if variant is not None:  # torch.nn.attention.bias.CausalBias: our causal, in its alignment
        if causal_mode:
            raise InputError(f"attn_mask is a CausalBias ({variant}); it cannot be combined with causal={causal!r}: "
                             f"pass one of them")
        causal_mode, attn_mask = variant, None
    sm_scale = check_scale(scale, q.shape[-1])
    if not isinstance(return_lse, bool):
        raise InputTypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    left, right = check_window(window, bool(causal_mode))
    cap = check_softcap(softcap)
    slopes = check_alibi(alibi_slopes, q.shape[0], q.shape[1], q.device)
    bias, bias_kind = _check_mask(attn_mask, q, k.shape[2])
    spec = AttnSpec(scale=sm_scale, offset=causal_offset(causal_mode, q.shape[2], k.shape[2]),
                    window_left=left, window_right=right, softcap=cap, bias_kind=bias_kind,
                    dropout_p=check_dropout(dropout_p))
    out, lse = flash_attention(q, k, v, bias, slopes, spec)
    return (out, lse) if return_lse else out


def _attention_at_offset(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, offset: int, window: Window,
                         scale: float | None = None, softcap: float = 0.0, attn_mask: torch.Tensor | None = None,
                         dropout_p: float = 0.0) -> torch.Tensor:
    """`attention` with query i placed at key position ``i + offset`` (any int) and the band ``window`` around it.

    Query i sees key j iff ``i + offset - left <= j <= i + offset + right`` (-1 = unbounded;
    ``(-1, 0)`` is causal). `attention`'s causal modes are ``offset`` 0 and ``Sk - Sq``;
    integrations whose caches hold queries elsewhere (a static KV cache) need any
    offset. Keys outside the band are skipped block-wise, as in `attention`.
    """
    check_qkv(q, k, v)
    if isinstance(offset, bool) or not isinstance(offset, int):
        raise InputTypeError(f"offset must be an int, got {type(offset).__name__}")
    left, right = check_window(window, False)
    bias, bias_kind = _check_mask(attn_mask, q, k.shape[2])
    spec = AttnSpec(scale=check_scale(scale, q.shape[-1]), offset=offset, window_left=left, window_right=right,
                    softcap=check_softcap(softcap), bias_kind=bias_kind, dropout_p=check_dropout(dropout_p))
    out, _ = flash_attention(q, k, v, bias, None, spec)
    return out


def _causal_bias_variant(attn_mask: object, seqlen_q: int, seqlen_k: int) -> str | None:
    """'top_left' / 'bottom_right' for a ``torch.nn.attention.bias.CausalBias`` of these lengths, else None.

    A CausalBias is a tensor subclass whose storage holds nothing meaningful
    (torch's SDPA intercepts it through ``__torch_function__``), so it must never
    be read as a mask.
    """
    if not isinstance(attn_mask, torch.Tensor) or type(attn_mask) is torch.Tensor:
        return None
    try:
        from torch.nn.attention.bias import CausalBias, CausalVariant
    except ImportError:  # torch without CausalBias
        return None
    if not isinstance(attn_mask, CausalBias):
        return None
    if (attn_mask.seq_len_q, attn_mask.seq_len_kv) != (seqlen_q, seqlen_k):
        raise InputError(f"attn_mask is a CausalBias for (L, S) = {(attn_mask.seq_len_q, attn_mask.seq_len_kv)}, "
                         f"but query and key have (L, S) = {(seqlen_q, seqlen_k)}")
    if attn_mask.variant == CausalVariant.UPPER_LEFT:
        return "top_left"
    if attn_mask.variant == CausalVariant.LOWER_RIGHT:
        return "bottom_right"
    raise InputError(f"CausalBias.variant must be a CausalVariant, got {attn_mask.variant!r}")


def _check_mask(attn_mask: object, query: torch.Tensor, seqlen_k: int) -> tuple[torch.Tensor | None, BiasKind]:
    """An SDPA-style mask -> (bias tensor (B|1, H|1, L|1, S|1), kind) for the kernels."""
    if attn_mask is None:
        return None, BiasKind.NONE
    if not isinstance(attn_mask, torch.Tensor):
        raise InputTypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
    if attn_mask.dtype == torch.bool:
        kind = BiasKind.BOOL
    elif attn_mask.dtype == query.dtype:
        kind = BiasKind.FLOAT
    else:
        raise InputTypeError(f"attn_mask must be bool or of query's dtype {query.dtype}, got {attn_mask.dtype}")
    if attn_mask.device != query.device:
        raise InputError(f"attn_mask must be on query's device {query.device}, got {attn_mask.device}")
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
            raise InputError(f"{name} must be a 3-D (total_tokens, heads, head_dim) tensor, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    q4, k4, v4 = (t.unsqueeze(0).transpose(1, 2) for t in (q, k, v))  # (1, H, total, D) views, no copies
    check_qkv(q4, k4, v4)
    batch = check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", q.shape[0], max_seqlen_q, q.device)
    if check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", k.shape[0], max_seqlen_k, q.device) != batch:
        raise InputError(f"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, got "
                         f"{cu_seqlens_q.numel() - 1} and {cu_seqlens_k.numel() - 1}")
    if not isinstance(return_lse, bool):
        raise InputTypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    if not isinstance(causal, bool):
        raise InputTypeError(f"causal must be a bool (varlen is bottom-right aligned per sequence), got {causal!r}")
    left, right = check_window(window, causal)
    slopes = check_alibi(alibi_slopes, batch, q.shape[1], q.device)
    spec = AttnSpec(scale=check_scale(scale, q.shape[-1]), window_left=left, window_right=right,
                    softcap=check_softcap(softcap))
    seq = SeqLayout(mode=SeqMode.PACKED, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                    max_seqlen_q=int(max_seqlen_q), max_seqlen_k=int(max_seqlen_k))
    out, lse = flash_attention(q, k, v, None, slopes, spec, seq)  # (total_q, H, D), (H, total_q)
    return (out, lse) if return_lse else out


def _flatten_batch_dims(t: torch.Tensor) -> torch.Tensor:
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
        raise InputError(
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
    dim must equal the query's (``Ev == E``), at most 256. ``attn_mask`` may also be
    a ``torch.nn.attention.bias.CausalBias``: ``causal_upper_left(L, S)`` runs our
    top-left causal, ``causal_lower_right(L, S)`` the bottom-right one (both with
    block skipping; not combinable with ``is_causal=True``, as in PyTorch).

    Invalid input raises `InputError` (a ValueError) or `InputTypeError` (a
    TypeError); both are also RuntimeErrors, which is what PyTorch's SDPA raises.
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise InputTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() < 3:
            raise InputError(f"{name} must have at least 3 dims (..., heads, seqlen, head_dim), got {tuple(t.shape)}")
    if not (query.shape[:-3] == key.shape[:-3] == value.shape[:-3]):
        raise InputError(
            f"query, key and value must share their batch dims, got {tuple(query.shape)}, {tuple(key.shape)}, "
            f"{tuple(value.shape)}")
    if not isinstance(is_causal, bool):
        raise InputTypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
    variant = _causal_bias_variant(attn_mask, query.shape[-2], key.shape[-2])
    if variant is not None:  # torch.nn.attention.bias.causal_upper_left / causal_lower_right
        if is_causal:
            raise InputError("CausalBias should not be used with causal=True (attn_mask is a CausalBias and "
                             "is_causal=True; as in PyTorch)")
        attn_mask = None
    if is_causal and attn_mask is not None:
        raise InputError("attn_mask and is_causal=True cannot be used together (as in PyTorch)")
    if not isinstance(enable_gqa, bool):
        raise InputTypeError(f"enable_gqa must be a bool, got {type(enable_gqa).__name__}")
    dropout = check_dropout(dropout_p)

    # PyTorch accepts any strides; our kernels want a unit last stride
    q4, k4, v4 = (_flatten_batch_dims(t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous())
                  for t in (query, key, value))
    check_qkv(q4, k4, v4, allow_gqa=enable_gqa)
    sm_scale = check_scale(scale, query.shape[-1]) if scale is not None else 1.0 / math.sqrt(query.shape[-1])

    bias, bias_kind = _check_mask(attn_mask, query, key.shape[-2])

    causal_mode = variant or ("top_left" if is_causal else False)
    spec = AttnSpec(scale=sm_scale, offset=causal_offset(causal_mode, query.shape[-2], key.shape[-2]),
                    window_right=0 if causal_mode else -1, bias_kind=bias_kind, dropout_p=dropout)
    out, _ = flash_attention(q4, k4, v4, bias, None, spec)
    return out.reshape(*query.shape[:-1], out.shape[-1])


def _append_to_cache(cache: torch.Tensor, new: torch.Tensor, cache_seqlens: torch.Tensor,
                     block_table: torch.Tensor | None, fits: torch.Tensor | None) -> None:
    """Write new (B, H_kv, S_new, D) at positions cache_seqlens[b] + t of sequence b, in place.

    With ``fits`` (B,) bool, a sequence that does not fit is left as it was: its rows go to
    positions 0 .. S_new - 1 (always inside the cache), carrying the values already there.
    Decided on the device, so the write never leaves the cache and nothing is read back.
    """
    B, _, S_new, _ = new.shape
    base = cache_seqlens if fits is None else torch.where(fits, cache_seqlens, 0)
    pos = base.long().unsqueeze(1) + torch.arange(S_new, device=new.device)  # (B, S_new)
    rows = new.permute(0, 2, 1, 3)  # (B, S_new, H_kv, D), matching the advanced-index result layout
    if block_table is None:
        index = [torch.arange(B, device=new.device).unsqueeze(1), None, pos]
    else:
        page_size = cache.shape[2]
        index = [block_table.long().gather(1, pos // page_size), None, pos % page_size]  # (B, S_new) each
    # aten's index / index_put_ rather than cache[...]: Python indexing of FakeTensorMode's CUDA tensors needs CUDA
    if fits is not None:
        rows = torch.where(fits.view(B, 1, 1, 1), rows, torch.ops.aten.index(cache, index))
    torch.ops.aten.index_put_(cache, index, rows)


def _auto_splits(q: torch.Tensor, batch_heads: int, cache_len: int) -> int:
    """Split-K factor for a decoding call (1 off the GPU); the rule lives in `_config.auto_splits`."""
    sms = multiprocessors(q)
    return 1 if sms == 1 else _config.auto_splits(sms, batch_heads, cache_len)


def attention_with_kvcache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           cache_seqlens: torch.Tensor, *, k_new: torch.Tensor | None = None,
                           v_new: torch.Tensor | None = None, causal: bool = True, scale: float | None = None,
                           window: Window = (-1, -1), alibi_slopes: torch.Tensor | None = None,
                           softcap: float = 0.0, block_table: torch.Tensor | None = None,
                           num_splits: int = 0, overflow: torch.Tensor | None = None) -> torch.Tensor:
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

    **Overflow, and CUDA graphs.** The call makes no host read and no host-side decision
    from tensor values on a GPU, so it can be captured in a CUDA graph and compiled
    without graph breaks. A sequence does not fit when ``cache_seqlens[b] < 0`` or
    ``cache_seqlens[b] + S_new`` exceeds the capacity (``S_max``, or ``max_pages *
    page_size``). Such a sequence is guarded on the device: nothing is written into its
    cache and its output rows are 0 (never NaN). It is reported:

    * with ``overflow``, a ``(B,)`` bool tensor on q's device: ``overflow[b]`` is set
      True for each such sequence (OR-ed in, never cleared, so one read after many
      steps suffices) and nothing is raised;
    * without it, on the CPU path, by a `ValueError` before anything is written
      (reading host memory costs no sync); on a GPU, by a device-side assertion
      (``torch._assert_async``): the error surfaces at the next synchronisation and,
      as any device-side assert, leaves the CUDA context unusable. Pass ``overflow``
      where a failure must be recoverable, and read it when convenient.

    ``S_new`` larger than the capacity is refused from shapes alone.
    """
    capacity, S_new, lengths_checked = check_kvcache(q, k_cache, v_cache, cache_seqlens, k_new, v_new,
                                                     block_table, num_splits, causal, overflow)
    B, H, _, D = q.shape
    left, right = check_window(window, causal)
    slopes = check_alibi(alibi_slopes, B, H, q.device)
    spec = AttnSpec(scale=check_scale(scale, D), window_left=left, window_right=right,
                    softcap=check_softcap(softcap))

    fits = None  # None: every sequence is known to fit
    if not lengths_checked:  # decided on the device: no read, capturable
        fits = (cache_seqlens >= 0) & (cache_seqlens <= capacity - S_new)
        if overflow is not None:
            overflow.logical_or_(fits.logical_not())  # not `~`: FakeTensorMode has no CUDA kernel for it
        else:
            torch._assert_async(fits.all(), "attention_with_kvcache: cache_seqlens + S_new exceeds the cache's "
                                "capacity (or is negative) for some sequence; pass overflow= to be told instead")
    if k_new is not None:
        _append_to_cache(k_cache, k_new, cache_seqlens, block_table, fits)
        _append_to_cache(v_cache, v_new, cache_seqlens, block_table, fits)
    seqlens_k = cache_seqlens + S_new
    if fits is not None:
        seqlens_k = torch.where(fits, seqlens_k, 0)  # no keys: the kernel writes zero rows
    seqlens_k = seqlens_k.to(torch.int32)
    splits = num_splits or _auto_splits(q, B * H, capacity)
    return decode_attention(q, k_cache, v_cache, seqlens_k, block_table, slopes, spec, splits)
