"""Naive attention: ``softmax(scores) v`` with the full score matrix in memory.

The tests' oracle and the benchmarks' baseline. Same semantics as
``flashattn_py.attention`` (causal alignments, windows, ALiBi, softcap, GQA, LSE,
rows that see no key give 0 and -inf with zero gradients), plus an SDPA-style
``attn_mask``, computed in the dtype of its inputs: hand it float64 copies for a
high-precision reference, or the inputs' own dtype for "PyTorch's own math in
that dtype".
"""

from __future__ import annotations

import math

import torch

from ._validation import causal_offset, check_causal


def reference_scores(q: torch.Tensor, k: torch.Tensor, *, causal: bool | str = False, scale: float | None = None,
                     attn_mask: torch.Tensor | None = None, window: tuple[int, int] = (-1, -1),
                     alibi_slopes: torch.Tensor | None = None, softcap: float = 0.0,
                     offset: int | None = None) -> torch.Tensor:
    """The final scores (B, H, Sq, Sk), -inf where hidden: scale, softcap, ALiBi, mask, causal/window.

    `offset` overrides the alignment the `causal` argument implies (varlen and KV-cache
    calls are bottom-right aligned per sequence even without causality).
    """
    causal_mode = check_causal(causal)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if k.shape[-3] != q.shape[-3]:  # GQA: query head h reads K/V head h // group
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
    seqlen_q, seqlen_k = q.shape[-2], k.shape[-2]
    if offset is None:
        offset = causal_offset(causal_mode, seqlen_q, seqlen_k)
    rows = torch.arange(seqlen_q, device=q.device)[:, None]  # (Sq, 1)
    cols = torch.arange(seqlen_k, device=q.device)[None, :]  # (1, Sk)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, H, Sq, Sk)
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    if alibi_slopes is not None:
        scores = scores - alibi_slopes.to(scores.dtype)[..., None, None] * (rows + offset - cols).abs()
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool \
            else scores + attn_mask
    left, right = window
    if causal_mode:
        right = 0 if right == -1 else min(right, 0)
    if right >= 0:
        scores = scores.masked_fill(cols > rows + offset + right, float("-inf"))
    if left >= 0:
        scores = scores.masked_fill(cols < rows + offset - left, float("-inf"))
    return scores


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool | str = False,
                        scale: float | None = None, return_lse: bool = False,
                        attn_mask: torch.Tensor | None = None, window: tuple[int, int] = (-1, -1),
                        alibi_slopes: torch.Tensor | None = None, softcap: float = 0.0, offset: int | None = None):
    """Naive attention on ``(B, H, S, D)`` tensors; see ``flashattn_py.attention`` for the semantics.

    k and v may have fewer heads than q (grouped-query attention). ``attn_mask``
    (broadcastable to ``(B, H, Sq, Sk)``) is boolean, True = takes part, or a float
    bias added to the scores, as in ``scaled_dot_product_attention``.
    """
    scores = reference_scores(q, k, causal=causal, scale=scale, attn_mask=attn_mask, window=window,
                              alibi_slopes=alibi_slopes, softcap=softcap, offset=offset)
    if v.shape[-3] != q.shape[-3]:
        v = v.repeat_interleave(q.shape[-3] // v.shape[-3], dim=-3)
    # rows that see no key (bottom-right with Sq > Sk, Sk == 0, masks, windows): softmax would give 0/0
    simple = attn_mask is None and window == (-1, -1) and offset is None and check_causal(causal) != "bottom_right"
    if simple:  # only top-left causal or nothing: a row is empty only when there are no keys
        row_empty = torch.full((scores.shape[-2], 1), scores.shape[-1] == 0, device=q.device)
    else:
        row_empty = torch.isneginf(scores).all(dim=-1, keepdim=True)
    scores = scores.masked_fill(row_empty, 0.0)
    probs = torch.softmax(scores, dim=-1).masked_fill(row_empty, 0.0)
    out = torch.matmul(probs, v)
    if not return_lse:
        return out
    lse = torch.logsumexp(scores, dim=-1, keepdim=True).masked_fill(row_empty, float("-inf"))
    return out, lse.squeeze(-1)
