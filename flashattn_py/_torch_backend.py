"""PyTorch backend: the same forward/backward contract as the Triton kernels, in plain torch.

Used for CPU tensors when Triton's interpreter is off (and for any tensor when
Triton is not installed). It computes in float32 (float64 stays float64),
walks the queries in chunks so no full Sq x Sk score matrix is held when the
problem is large, and returns exactly what the kernels return: O in the input
dtype and the natural-log LSE in float32, with O = 0 and LSE = -inf on rows
that see no key.
"""

from __future__ import annotations

import torch

# Upper bound on the elements of one chunk's score tile (B * H * rows * Sk).
_CHUNK_ELEMENTS = 1 << 24


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _row_chunks(batch_heads: int, seqlen_q: int, seqlen_k: int) -> range:
    rows = max(1, _CHUNK_ELEMENTS // max(1, batch_heads * seqlen_k))
    return range(0, seqlen_q, rows)


def _visible(rows: torch.Tensor, seqlen_k: int, causal_offset: int) -> torch.Tensor:
    """[len(rows), Sk] bool: query i sees key j iff j <= i + causal_offset."""
    cols = torch.arange(seqlen_k, device=rows.device)
    return cols[None, :] <= rows[:, None] + causal_offset


def _probs(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, scale: float,
           rows: torch.Tensor, causal: bool, causal_offset: int) -> torch.Tensor:
    """P = exp(scale * q kᵀ - lse), 0 where masked or where the row saw no key."""
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    lse_safe = torch.where(torch.isneginf(lse), torch.inf, lse)  # empty row -> P = 0
    p = torch.exp(s - lse_safe[..., None])
    if causal:
        p = p.masked_fill(~_visible(rows, k.shape[-2], causal_offset), 0.0)
    return p


def attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
             causal: bool, causal_offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    B, H, Sq, _ = q.shape
    Sk = k.shape[-2]
    cdt = _compute_dtype(q.dtype)
    kc, vc = k.to(cdt), v.to(cdt)
    o = torch.empty_like(q)
    lse = torch.empty(B, H, Sq, device=q.device, dtype=torch.float32)
    chunks = _row_chunks(B * H, Sq, Sk)
    for start in chunks:
        sl = slice(start, min(start + chunks.step, Sq))
        s = torch.matmul(q[:, :, sl].to(cdt), kc.transpose(-1, -2)) * scale
        if causal:
            rows = torch.arange(sl.start, sl.stop, device=q.device)
            s = s.masked_fill(~_visible(rows, Sk, causal_offset), float("-inf"))
        lse_c = torch.logsumexp(s, dim=-1)
        lse_safe = torch.where(torch.isneginf(lse_c), torch.inf, lse_c)
        o[:, :, sl] = torch.matmul(torch.exp(s - lse_safe[..., None]), vc).to(q.dtype)
        lse[:, :, sl] = lse_c.to(torch.float32)
    return o, lse


def attn_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             o: torch.Tensor, lse: torch.Tensor, dlse: torch.Tensor | None, scale: float,
             causal: bool, causal_offset: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, H, Sq, _ = q.shape
    Sk = k.shape[-2]
    cdt = _compute_dtype(q.dtype)
    kc, vc = k.to(cdt), v.to(cdt)
    delta = (o.to(cdt) * do.to(cdt)).sum(-1)
    if dlse is not None:
        delta = delta - dlse.to(cdt)
    dq = torch.empty_like(q)
    dk = torch.zeros(k.shape, device=k.device, dtype=cdt)
    dv = torch.zeros(v.shape, device=v.device, dtype=cdt)
    chunks = _row_chunks(B * H, Sq, Sk)
    for start in chunks:
        sl = slice(start, min(start + chunks.step, Sq))
        rows = torch.arange(sl.start, sl.stop, device=q.device)
        qc, doc = q[:, :, sl].to(cdt), do[:, :, sl].to(cdt)
        p = _probs(qc, kc, lse[:, :, sl].to(cdt), scale, rows, causal, causal_offset)
        dv += torch.matmul(p.transpose(-1, -2), doc)
        ds = p * (torch.matmul(doc, vc.transpose(-1, -2)) - delta[:, :, sl, None])
        dq[:, :, sl] = (torch.matmul(ds, kc) * scale).to(q.dtype)
        dk += torch.matmul(ds.transpose(-1, -2), qc) * scale
    return dq, dk.to(k.dtype), dv.to(v.dtype)
