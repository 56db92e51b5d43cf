"""PyTorch backend: the same forward/backward contract as the Triton kernels, in plain torch.

Used for CPU tensors when Triton's interpreter is off, for float64, and for any
tensor when Triton is not installed. It computes in float32 (float64 stays
float64), walks the queries in chunks so no full Sq x Sk score matrix is held
when the problem is large, and returns exactly what the kernels return: O in
the input dtype and the natural-log LSE in float32, with O = 0 and LSE = -inf on
rows that see no key. Dropout draws its keep mask from torch's CPU
generator seeded per chunk from the call's seed, so backward regenerates the
forward's mask; the stream differs from the kernels' (same distribution).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .ops import AttnSpec

# Upper bound on the elements of one chunk's score tile (B * H * rows * Sk).
_CHUNK_ELEMENTS = 1 << 24


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _row_chunks(batch_heads: int, seqlen_q: int, seqlen_k: int) -> range:
    rows = max(1, _CHUNK_ELEMENTS // max(1, batch_heads * seqlen_k))
    return range(0, seqlen_q, rows)


def _expand_kv(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, H_kv, S, D) -> (B, H, S, D): each K/V head serves H / H_kv query heads (GQA)."""
    B, H_kv, S, D = t.shape
    if H_kv == heads:
        return t
    return t[:, :, None].expand(B, H_kv, heads // H_kv, S, D).reshape(B, heads, S, D)


def _scores(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None, spec: AttnSpec, sl: slice) -> torch.Tensor:
    """Masked scores for query rows `sl`: scale q kᵀ + bias, -inf where hidden."""
    s = torch.matmul(q[:, :, sl], k.transpose(-1, -2)) * spec.scale
    if bias is not None:  # broadcasts over its size-1 dims
        b = bias if bias.shape[2] == 1 else bias[:, :, sl]
        if b.dtype == torch.bool:
            s = s.masked_fill(~b, float("-inf"))
        else:
            s = s + b.to(s.dtype)
    if spec.causal:
        rows = torch.arange(sl.start, sl.start + s.shape[2], device=q.device)
        cols = torch.arange(k.shape[2], device=q.device)
        s = s.masked_fill(cols[None, :] > rows[:, None] + spec.causal_offset, float("-inf"))
    return s


def _keep(shape: torch.Size, spec: AttnSpec, chunk: int, device: torch.device) -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed((spec.seed * 1_000_003 + chunk) % (2**63))
    return (torch.rand(shape, generator=gen) >= spec.dropout_p).to(device)


def attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
             spec: AttnSpec) -> tuple[torch.Tensor, torch.Tensor]:
    B, H, Sq, _ = q.shape
    cdt = _compute_dtype(q.dtype)
    qc, kc, vc = q.to(cdt), _expand_kv(k, H).to(cdt), _expand_kv(v, H).to(cdt)
    o = torch.empty_like(q)
    lse = torch.empty(B, H, Sq, device=q.device, dtype=torch.float32)
    chunks = _row_chunks(B * H, Sq, kc.shape[2])
    for i, start in enumerate(chunks):
        sl = slice(start, min(start + chunks.step, Sq))
        s = _scores(qc, kc, bias, spec, sl)
        lse_c = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - torch.where(torch.isneginf(lse_c), torch.inf, lse_c)[..., None])
        if spec.dropout_p > 0:
            p = p * _keep(p.shape, spec, i, q.device) / (1.0 - spec.dropout_p)
        o[:, :, sl] = torch.matmul(p, vc).to(q.dtype)
        lse[:, :, sl] = lse_c.to(torch.float32)
    return o, lse


def attn_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
             lse: torch.Tensor, dlse: torch.Tensor | None, bias: torch.Tensor | None, need_dbias: bool,
             spec: AttnSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    B, H, Sq, _ = q.shape
    H_kv, Sk = k.shape[1], k.shape[2]
    cdt = _compute_dtype(q.dtype)
    qc, kc, vc = q.to(cdt), _expand_kv(k, H).to(cdt), _expand_kv(v, H).to(cdt)
    delta = (o.to(cdt) * do.to(cdt)).sum(-1)
    if dlse is not None:
        delta = delta - dlse.to(cdt)
    dq = torch.empty_like(q)
    dk = torch.zeros(B, H, Sk, q.shape[3], device=q.device, dtype=cdt)
    dv = torch.zeros_like(dk)
    dbias = torch.zeros(bias.shape, device=q.device, dtype=cdt) if need_dbias else None
    chunks = _row_chunks(B * H, Sq, Sk)
    for i, start in enumerate(chunks):
        sl = slice(start, min(start + chunks.step, Sq))
        doc = do[:, :, sl].to(cdt)
        lse_c = lse[:, :, sl].to(cdt)
        p = torch.exp(_scores(qc, kc, bias, spec, sl) - torch.where(torch.isneginf(lse_c), torch.inf, lse_c)[..., None])
        dp = torch.matmul(doc, vc.transpose(-1, -2))
        if spec.dropout_p > 0:
            keep = _keep(p.shape, spec, i, q.device) / (1.0 - spec.dropout_p)
            dv += torch.matmul((p * keep).transpose(-1, -2), doc)
            dp = dp * keep
        else:
            dv += torch.matmul(p.transpose(-1, -2), doc)
        ds = p * (dp - delta[:, :, sl, None])
        dq[:, :, sl] = (torch.matmul(ds, kc) * spec.scale).to(q.dtype)
        dk += torch.matmul(ds.transpose(-1, -2), qc[:, :, sl]) * spec.scale
        if dbias is not None:
            reduce = [d for d in (0, 1, 3) if bias.shape[d] == 1 and ds.shape[d] > 1]
            g = ds.sum(reduce, keepdim=True) if reduce else ds
            if bias.shape[2] == 1 and Sq > 1:
                dbias += g.sum(2, keepdim=True)
            else:
                dbias[:, :, sl] += g
    if H_kv != H:  # GQA: each K/V head's gradient is the sum over the query heads it served
        dk = dk.view(B, H_kv, H // H_kv, Sk, -1).sum(2)
        dv = dv.view(B, H_kv, H // H_kv, Sk, -1).sum(2)
    return dq, dk.to(k.dtype), dv.to(v.dtype), dbias
