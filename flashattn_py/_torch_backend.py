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

from dataclasses import replace
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .ops import AttnSpec, SeqLayout

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


def _scores(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None, alibi: torch.Tensor | None,
            spec: AttnSpec, sl: slice) -> torch.Tensor:
    """Scores for query rows `sl`, in the kernels' order: scale, softcap, ALiBi, bias/mask, window."""
    s = torch.matmul(q[:, :, sl], k.transpose(-1, -2)) * spec.scale
    if spec.softcap > 0:
        s = spec.softcap * torch.tanh(s / spec.softcap)
    rows = torch.arange(sl.start, sl.start + s.shape[2], device=q.device)[:, None]
    cols = torch.arange(k.shape[2], device=q.device)[None, :]
    if alibi is not None:  # (H,) or (B, H) slopes
        slopes = alibi.to(s.dtype)[..., None, None]
        s = s - slopes * (rows + spec.offset - cols).abs().to(s.dtype)
    if bias is not None:  # broadcasts over its size-1 dims
        b = bias if bias.shape[2] == 1 else bias[:, :, sl]
        s = s.masked_fill(~b, float("-inf")) if b.dtype == torch.bool else s + b.to(s.dtype)
    if spec.window_left >= 0:
        s = s.masked_fill(cols < rows + spec.offset - spec.window_left, float("-inf"))
    if spec.window_right >= 0:
        s = s.masked_fill(cols > rows + spec.offset + spec.window_right, float("-inf"))
    return s


def _keep(shape: torch.Size, spec: AttnSpec, chunk: int, device: torch.device) -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed((spec.seed * 1_000_003 + chunk) % (2**63))
    return (torch.rand(shape, generator=gen) >= spec.dropout_p).to(device)


def _dense_fwd(q, k, v, bias, alibi, spec):
    B, H, Sq, _ = q.shape
    cdt = _compute_dtype(q.dtype)
    qc, kc, vc = q.to(cdt), _expand_kv(k, H).to(cdt), _expand_kv(v, H).to(cdt)
    o = torch.empty_like(q)  # q's strides, like the kernels' output
    lse = torch.empty(B, H, Sq, device=q.device, dtype=torch.float32)
    chunks = _row_chunks(B * H, Sq, kc.shape[2])
    for i, start in enumerate(chunks):
        sl = slice(start, min(start + chunks.step, Sq))
        s = _scores(qc, kc, bias, alibi, spec, sl)
        lse_c = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - torch.where(torch.isneginf(lse_c), torch.inf, lse_c)[..., None])
        if spec.dropout_p > 0:
            p = p * _keep(p.shape, spec, i, q.device) / (1.0 - spec.dropout_p)
        o[:, :, sl] = torch.matmul(p, vc).to(q.dtype)
        lse[:, :, sl] = lse_c.to(torch.float32)
    return o, lse


def _dense_bwd(do, q, k, v, o, lse, dlse, bias, alibi, need_dbias, spec):
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
        s = _scores(qc, kc, bias, alibi, spec, sl)
        p = torch.exp(s - torch.where(torch.isneginf(lse_c), torch.inf, lse_c)[..., None])
        dp = torch.matmul(doc, vc.transpose(-1, -2))
        if spec.dropout_p > 0:
            keep = _keep(p.shape, spec, i, q.device) / (1.0 - spec.dropout_p)
            dv += torch.matmul((p * keep).transpose(-1, -2), doc)
            dp = dp * keep
        else:
            dv += torch.matmul(p.transpose(-1, -2), doc)
        ds = p * (dp - delta[:, :, sl, None])
        if dbias is not None:
            reduce = [d for d in (0, 1, 3) if bias.shape[d] == 1 and ds.shape[d] > 1]
            g = ds.sum(reduce, keepdim=True) if reduce else ds
            if bias.shape[2] == 1 and Sq > 1:
                dbias += g.sum(2, keepdim=True)
            else:
                dbias[:, :, sl] += g
        if spec.softcap > 0:  # d(c tanh(x / c))/dx = 1 - tanh^2
            raw = torch.matmul(qc[:, :, sl], kc.transpose(-1, -2)) * spec.scale
            ds = ds * (1 - torch.tanh(raw / spec.softcap) ** 2)
        dq[:, :, sl] = (torch.matmul(ds, kc) * spec.scale).to(q.dtype)
        dk += torch.matmul(ds.transpose(-1, -2), qc[:, :, sl]) * spec.scale
    if H_kv != H:  # GQA: each K/V head's gradient is the sum over the query heads it served
        dk = dk.view(B, H_kv, H // H_kv, Sk, -1).sum(2)
        dv = dv.view(B, H_kv, H // H_kv, Sk, -1).sum(2)
    return dq, torch.empty_like(k).copy_(dk), torch.empty_like(v).copy_(dv), dbias  # k's and v's strides


def _sequences(seq: SeqLayout):
    """(index, q slice, k slice, bottom-right offset) per packed sequence."""
    cu_q, cu_k = seq.cu_seqlens_q.tolist(), seq.cu_seqlens_k.tolist()
    for b in range(len(cu_q) - 1):
        sq, sk = cu_q[b + 1] - cu_q[b], cu_k[b + 1] - cu_k[b]
        yield b, slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1]), sk - sq


def _slopes(alibi: torch.Tensor | None, b: int) -> torch.Tensor | None:
    return None if alibi is None else (alibi if alibi.dim() == 1 else alibi[b : b + 1])


def _cache_kv(t: torch.Tensor, seq: SeqLayout, b: int) -> torch.Tensor:
    """The valid keys (or values) of sequence b of a KV cache, as (1, H_kv, L, D)."""
    length = int(seq.seqlens_k[b])
    if seq.block_table is None:
        return t[b : b + 1, :, :length]
    page = t.shape[2]
    pages = seq.block_table[b, : (length + page - 1) // page].long()
    return t[pages].permute(1, 0, 2, 3).reshape(1, t.shape[1], -1, t.shape[3])[:, :, :length]


def attn_fwd(q, k, v, bias, alibi, spec: AttnSpec, seq: SeqLayout):
    if seq.mode == 0:
        return _dense_fwd(q, k, v, bias, alibi, spec)
    if seq.mode == 1:
        o = torch.empty_like(q.transpose(1, 2)[0]).unsqueeze(0).transpose(1, 2)
        lse = torch.empty(q.shape[1], q.shape[2], device=q.device, dtype=torch.float32)
        for b, sq, sk, offset in _sequences(seq):
            o_b, lse_b = _dense_fwd(q[:, :, sq], k[:, :, sk], v[:, :, sk], None, _slopes(alibi, b),
                                    replace(spec, offset=offset))
            o[:, :, sq], lse[:, sq] = o_b, lse_b[0]
        return o, lse
    outs = [_dense_fwd(q[b : b + 1], _cache_kv(k, seq, b), _cache_kv(v, seq, b), None, _slopes(alibi, b),
                       replace(spec, offset=int(seq.seqlens_k[b]) - q.shape[2])) for b in range(q.shape[0])]
    return torch.cat([o for o, _ in outs]), torch.cat([lse for _, lse in outs])


def attn_bwd(do, q, k, v, o, lse, dlse, bias, alibi, need_dbias, spec: AttnSpec, seq: SeqLayout):
    if seq.mode == 0:
        return _dense_bwd(do, q, k, v, o, lse, dlse, bias, alibi, need_dbias, spec)
    dq = torch.zeros_like(q.transpose(1, 2)[0]).unsqueeze(0).transpose(1, 2)
    dk = torch.zeros_like(k.transpose(1, 2)[0]).unsqueeze(0).transpose(1, 2)
    dv = torch.zeros_like(v.transpose(1, 2)[0]).unsqueeze(0).transpose(1, 2)
    for b, sq, sk, offset in _sequences(seq):
        dlse_b = None if dlse is None else dlse[None, :, sq]
        g = _dense_bwd(do[:, :, sq], q[:, :, sq], k[:, :, sk], v[:, :, sk], o[:, :, sq], lse[None, :, sq], dlse_b,
                       None, _slopes(alibi, b), False, replace(spec, offset=offset))
        dq[:, :, sq], dk[:, :, sk], dv[:, :, sk] = g[0], g[1], g[2]
    return dq, dk, dv, None
