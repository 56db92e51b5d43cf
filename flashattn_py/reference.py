"""Naive attention: ``softmax(scale · q kᵀ) v`` with the full score matrix in memory.

The tests' oracle and the benchmarks' baseline. Same signature and semantics as
``flashattn_py.attention`` (causal alignments, LSE, rows that see no key give 0
and -inf with zero gradients), computed in the dtype of its inputs: hand it
float64 copies for a high-precision reference, or the inputs' own dtype for
"PyTorch's own math in that dtype".
"""

from __future__ import annotations

import math

import torch

from ._validation import causal_offset, check_causal


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool | str = False,
                        scale: float | None = None, return_lse: bool = False,
                        attn_mask: torch.Tensor | None = None):
    """Naive attention on ``(B, H, S, D)`` tensors; see ``flashattn_py.attention`` for the semantics.

    k and v may have fewer heads than q (grouped-query attention). ``attn_mask``
    (broadcastable to ``(B, H, Sq, Sk)``) is boolean, True = takes part, or a float
    bias added to the scaled scores, as in ``scaled_dot_product_attention``.
    """
    causal_mode = check_causal(causal)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if k.shape[-3] != q.shape[-3]:  # GQA: query head h reads K/V head h // group
        group = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(group, dim=-3), v.repeat_interleave(group, dim=-3)
    seqlen_q, seqlen_k = q.shape[-2], k.shape[-2]
    offset = causal_offset(causal_mode, seqlen_q, seqlen_k)
    rows = torch.arange(seqlen_q, device=q.device)[:, None]  # (Sq, 1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, H, Sq, Sk)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    if causal_mode:
        cols = torch.arange(seqlen_k, device=q.device)[None, :]
        scores = scores.masked_fill(cols > rows + offset, float("-inf"))
    # rows that see no key (bottom-right with Sq > Sk, Sk == 0, or masked out): softmax would give 0/0
    if attn_mask is not None:
        row_empty = torch.isneginf(scores).all(dim=-1, keepdim=True)
    else:
        row_empty = (rows + offset < 0) if causal_mode else torch.zeros_like(rows, dtype=torch.bool)
        row_empty = row_empty | (seqlen_k == 0)
    scores = scores.masked_fill(row_empty, 0.0)
    probs = torch.softmax(scores, dim=-1).masked_fill(row_empty, 0.0)
    out = torch.matmul(probs, v)
    if not return_lse:
        return out
    lse = torch.logsumexp(scores, dim=-1, keepdim=True).masked_fill(row_empty, float("-inf"))
    return out, lse.squeeze(-1)
