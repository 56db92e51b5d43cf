"""PyTorch backend: the same forward/backward contract as the Triton kernels, in plain torch.

Used for CPU tensors when Triton's interpreter is off, for float64, and for any
tensor when Triton is not installed. It returns exactly what the kernels return:
O in the input dtype (with q's strides when q is dense), the natural-log LSE in
float32, O = 0 and LSE = -inf on rows that see no key, dq/dk/dv like q/k/v and
dbias of the bias's shape.

Two paths, chosen per dense (sub)problem; `path_counts` records which ran:
  * "fused": PyTorch's own fused CPU attention kernel (`_cpu_fused`), wherever it
    computes our contract exactly: no band or top-left causal, bool or float masks,
    GQA, no ALiBi/softcap/dropout; in the backward also no dbias and a zero dLSE.
    It is the kernel `F.scaled_dot_product_attention` runs on CPU.
  * "blocked": the kernels' algorithm in torch ops, for everything else. Query
    blocks x key blocks, key blocks outside the visible band skipped as the kernels
    skip them (causal visits about half the tiles, a window O(S * w)), online
    softmax in float32 (float64 stays float64), one bounded score tile at a time.
    The backward recomputes P from the LSE per tile (FlashAttention-2). Dropout
    draws each tile's keep mask from torch's CPU generator seeded from the call's
    seed and the tile's position, so the backward regenerates the forward's mask;
    the stream differs from the kernels' (same distribution).
Packed (varlen) and KV-cache calls run one dense subproblem per sequence.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, replace

import torch

from . import _cpu_fused
from ._contract import AttnSpec, SeqLayout, SeqMode

# Which path ran, per dense (sub)problem: "fused"/"blocked" (fwd and bwd together), "<path>_fwd", "<path>_bwd",
# and "tiles_fwd"/"tiles_bwd": score tiles the blocked path computed (tests check the band skipping with them).
path_counts: Counter[str] = Counter()

# Blocked path tile shape and the bound on one score tile's elements (batch * heads * rows * keys); the tile
# shrinks (and batches split) to stay under it. Measured on 2 AMD EPYC cores (AVX-512), fp32, B1 H4 S2k D64,
# window 256 and ALiBi causal, among 64..512 x 256..1024: single-threaded all within ~15% (per-element passes
# dominate, not the matmuls); 256 x 512 is as fast as the best there and has the fewest tiles, i.e. the fewest
# parallel regions, which is what matters when the cores are shared (every op's thread team waits for its
# slowest thread). An fp32 tile of 4 heads is 2 MiB.
_BLOCK_M = 256
_BLOCK_N = 512
_CHUNK_ELEMENTS = 1 << 21

_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class _Plan:
    block_m: int
    block_n: int
    batch_step: int


def _plan(B: int, H: int, Sq: int, Sk: int) -> _Plan:
    """Tile sizes for one call: the same in forward and backward (dropout masks are keyed by tile)."""
    bm, bn = max(1, min(_BLOCK_M, Sq)), max(1, min(_BLOCK_N, Sk))
    while H * bm * bn > _CHUNK_ELEMENTS and (bm > 1 or bn > 1):
        if bn >= bm:
            bn = (bn + 1) // 2
        else:
            bm = (bm + 1) // 2
    return _Plan(bm, bn, max(1, min(B, _CHUNK_ELEMENTS // (H * bm * bn))))


def _key_range(spec: AttnSpec, r0: int, r1: int, Sk: int) -> tuple[int, int]:
    """Keys [lo, hi) that some query row in [r0, r1) sees: the union of the rows' bands."""
    lo = 0 if spec.window_left < 0 else max(0, r0 + spec.offset - spec.window_left)
    hi = Sk if spec.window_right < 0 else min(Sk, r1 + spec.offset + spec.window_right)
    return lo, hi


def _keep_mask(spec: AttnSpec, b0: int, r0: int, c0: int, shape: torch.Size) -> torch.Tensor:
    """A tile's dropout keep mask, from a generator keyed by the call's seed and the tile's position."""
    key = ((spec.seed * 1_000_003 + b0) * 1_000_033 + r0) * 1_000_037 + c0
    gen = torch.Generator(device="cpu").manual_seed(key % (2**63))
    return torch.rand(shape, generator=gen) >= spec.dropout_p


def _contiguous(t: torch.Tensor, dtype: torch.dtype, copy: bool) -> torch.Tensor:
    """`t` as a contiguous tensor of `dtype` in one pass (a fresh one when `copy`)."""
    if not copy and t.dtype == dtype and t.is_contiguous():
        return t
    return torch.empty(t.shape, dtype=dtype).copy_(t)


class _Tiles:
    """What both passes share for one dense call: the tiling, and the score modifiers applied per tile.

    Scores live in base 2 (s2 = log2(e) * s, with log2(e) * scale folded into q), as in the
    kernels: `exp2` is 2-3x cheaper than `exp` on CPU. Tiles are 3-D (Bg * H_kv, G * rows,
    keys) so each matmul is one bmm and GQA needs no copy of K/V (the G query heads of a
    K/V head are stacked as rows); the modifiers view them as (Bg, H_kv, G, rows, keys).
    """

    def __init__(self, q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None, alibi: torch.Tensor | None,
                 spec: AttnSpec, cdt: torch.dtype) -> None:
        B, H, self.Sq, self.D = q.shape
        self.B, self.H = B, H
        self.H_kv, self.Sk = k.shape[1], k.shape[2]
        self.G = H // self.H_kv
        self.spec, self.cdt = spec, cdt
        self.plan = _plan(B, H, self.Sq, self.Sk)
        self.q_scale = spec.scale * _LOG2E
        self.bias = None
        if bias is not None:  # (B|1, H_kv|1, G|1, Sq|1, Sk|1); a bool mask as "hidden", for masked_fill
            b = bias.unsqueeze(2) if bias.shape[1] == 1 else bias.unflatten(1, (self.H_kv, self.G))
            self.bias = ~b if b.dtype == torch.bool else b
        self.slopes = None
        if alibi is not None:  # s2 += -log2(e) * slope * |i + off - j|, slopes as (B|1, H_kv, G, 1, 1)
            a = alibi.to(cdt) * -_LOG2E
            self.slopes = a.view(1 if a.dim() == 1 else a.shape[0], self.H_kv, self.G, 1, 1)
        self._cache: dict[tuple, torch.Tensor] = {}  # band masks and ALiBi distances by relative position

    def kv(self, t: torch.Tensor) -> torch.Tensor:
        """K or V in the compute dtype as (B * H_kv, Sk, D): one copy at most (of O(S * D) size)."""
        return _contiguous(t, self.cdt, copy=False).view(self.B * self.H_kv, self.Sk, self.D)

    def q_rows(self, t: torch.Tensor, b0: int, b1: int, r0: int, r1: int, scale: float | None) -> torch.Tensor:
        """Rows r0:r1 of q, dO or O in the compute dtype as (Bg * H_kv, G * rows, D), optionally scaled (a copy)."""
        x = _contiguous(t[b0:b1, :, r0:r1], self.cdt, copy=True)
        if scale is not None:
            x.mul_(scale)
        return x.view((b1 - b0) * self.H_kv, self.G * (r1 - r0), self.D)

    def rows(self, t: torch.Tensor, b0: int, b1: int, r0: int, r1: int) -> torch.Tensor:
        """A (B, H, Sq) row statistic's block as (Bg * H_kv, G * rows), in the compute dtype."""
        return t[b0:b1, :, r0:r1].to(self.cdt).reshape((b1 - b0) * self.H_kv, self.G * (r1 - r0))

    def _relative(self, kind: str, rows: int, d: int, cols: int) -> torch.Tensor:
        """A (rows, cols) tensor that depends on key - (query + offset) = d + j - i only: cached per call."""
        key = (kind, rows, d, cols)
        t = self._cache.get(key)
        if t is None:
            rel = torch.arange(d, d + cols)[None, :] - torch.arange(rows)[:, None]  # j - (i + off)
            if kind == "dist":
                t = rel.abs().to(self.cdt)
            else:
                t = torch.zeros(rows, cols, dtype=torch.bool)
                if self.spec.window_left >= 0:
                    t |= rel < -self.spec.window_left
                if self.spec.window_right >= 0:
                    t |= rel > self.spec.window_right
            self._cache[key] = t
        return t

    def modify(self, s: torch.Tensor, b0: int, b1: int, r0: int, r1: int, c0: int, c1: int,
               want_tanh: bool = False) -> torch.Tensor | None:
        """Base-2 scores -> final base-2 scores, in place, in the kernels' order: softcap, ALiBi, bias, band.

        Returns tanh(s / c) when softcapped and `want_tanh` (the backward's chain rule needs it).
        """
        spec = self.spec
        rows, cols = r1 - r0, c1 - c0
        t = None
        if spec.softcap > 0:  # s = c * tanh(s / c), in base 2: s2 = (c log2 e) tanh(s2 / (c log2 e))
            cap = spec.softcap * _LOG2E
            s.div_(cap).tanh_()
            t = s.clone() if want_tanh else None
            s.mul_(cap)
        s5 = s.view(b1 - b0, self.H_kv, self.G, rows, cols)
        d = c0 - r0 - spec.offset
        if self.slopes is not None:
            sl = self.slopes if self.slopes.shape[0] == 1 else self.slopes[b0:b1]
            s5.addcmul_(sl, self._relative("dist", rows, d, cols))
        if self.bias is not None:
            bb = self.bias
            bb = bb[b0:b1] if bb.shape[0] > 1 else bb
            bb = bb[:, :, :, r0:r1] if bb.shape[3] > 1 else bb
            bb = bb[..., c0:c1] if bb.shape[4] > 1 else bb
            if bb.dtype == torch.bool:
                s5.masked_fill_(bb, float("-inf"))
            else:
                s5.add_(bb, alpha=_LOG2E)
        # the band: only the key columns that some row of the block does not see are filled (a fill, not an
        # additive -inf, so a NaN score there is hidden like any other, as in the kernels)
        a, e = self._band_cut(r0, r1, c0, c1)
        if a < e:
            s5[..., a:e].masked_fill_(self._relative("band", rows, d + a, e - a), float("-inf"))
        return t

    def _band_cut(self, r0: int, r1: int, c0: int, c1: int) -> tuple[int, int]:
        """Tile columns [a, e) (relative to c0) holding every key some row of [r0, r1) does not see."""
        off, left, right = self.spec.offset, self.spec.window_left, self.spec.window_right
        cols = c1 - c0
        lo_all = r1 - 1 + off - left if left >= 0 else -(2**62)  # keys >= lo_all: no row's left bound hides them
        hi_all = r0 + off + right if right >= 0 else 2**62  # keys <= hi_all: no row's right bound hides them
        left_cut = min(cols, max(0, lo_all - c0))  # columns [0, left_cut) are cut on the left for some row
        right_cut = max(0, min(cols, hi_all + 1 - c0))  # columns [right_cut, cols) are cut on the right
        if left_cut > 0 and right_cut < cols:
            return 0, cols
        if left_cut > 0:
            return 0, left_cut
        return right_cut, cols

    def blocks(self):
        """(b0, b1, r0, r1, key chunks) per query block: the band's keys only, in chunks of block_n."""
        p = self.plan
        for b0 in range(0, self.B, p.batch_step):
            b1 = min(self.B, b0 + p.batch_step)
            for r0 in range(0, self.Sq, p.block_m):
                r1 = min(self.Sq, r0 + p.block_m)
                lo, hi = _key_range(self.spec, r0, r1, self.Sk)
                yield b0, b1, r0, r1, [(c0, min(hi, c0 + p.block_n)) for c0 in range(lo, hi, p.block_n)]


def _blocked_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                 alibi: torch.Tensor | None, spec: AttnSpec) -> tuple[torch.Tensor, torch.Tensor]:
    B, H, Sq, D = q.shape
    cdt = _compute_dtype(q.dtype)
    tiles = _Tiles(q, k, bias, alibi, spec, cdt)
    kc, vc = tiles.kv(k), tiles.kv(v)
    H_kv = tiles.H_kv
    o = torch.empty_like(q)  # q's strides, like the kernels' output
    lse = torch.empty(B, H, Sq, dtype=torch.float32)
    out_scale = 1.0 / (1.0 - spec.dropout_p)
    for b0, b1, r0, r1, chunks in tiles.blocks():
        Bg, rows = b1 - b0, r1 - r0
        if not chunks:  # no row of this block sees a key
            o[b0:b1, :, r0:r1] = 0
            lse[b0:b1, :, r0:r1] = float("-inf")
            continue
        qg = tiles.q_rows(q, b0, b1, r0, r1, tiles.q_scale)
        heads = slice(b0 * H_kv, b1 * H_kv)
        m = denom = acc = m_use = None
        for c0, c1 in chunks:
            path_counts["tiles_fwd"] += 1
            s = torch.bmm(qg, kc[heads, c0:c1].transpose(1, 2))  # (Bg * H_kv, G * rows, keys), base 2
            tiles.modify(s, b0, b1, r0, r1, c0, c1)
            # online softmax: running max m, sum denom and unnormalised output acc, in the compute dtype
            m_new = s.amax(-1) if m is None else torch.maximum(m, s.amax(-1))
            m_use = m_new.masked_fill(torch.isneginf(m_new), 0.0)  # rows with no key yet: exp2(-inf - 0) = 0
            p = s.sub_(m_use[..., None]).exp2_()
            row_sum = p.sum(-1)
            if spec.dropout_p > 0:
                p.mul_(_keep_mask(spec, b0, r0, c0, p.shape))
            if m is None:
                denom, acc = row_sum, torch.bmm(p, vc[heads, c0:c1])
            else:
                alpha = torch.exp2(m - m_use)
                denom.mul_(alpha).add_(row_sum)
                acc.mul_(alpha[..., None]).baddbmm_(p, vc[heads, c0:c1])
            m = m_new
        inv = denom.reciprocal().masked_fill_(denom == 0, 0.0)  # rows that saw no key: O = 0
        if spec.dropout_p > 0:
            inv.mul_(out_scale)
        o[b0:b1, :, r0:r1] = acc.mul_(inv[..., None]).view(Bg, H, rows, D)
        # natural-log LSE; log2(0) = -inf on empty rows
        lse[b0:b1, :, r0:r1] = m_use.add_(torch.log2(denom)).mul_(_LN2).view(Bg, H, rows)
    return o, lse


def _blocked_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                 lse: torch.Tensor, dlse: torch.Tensor | None, bias: torch.Tensor | None,
                 alibi: torch.Tensor | None, need_dbias: bool, spec: AttnSpec,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    B, H, Sq, D = q.shape
    cdt = _compute_dtype(q.dtype)
    tiles = _Tiles(q, k, bias, alibi, spec, cdt)
    kc, vc = tiles.kv(k), tiles.kv(v)
    H_kv, G, Sk = tiles.H_kv, tiles.G, tiles.Sk
    dq = torch.empty_like(q)
    dk = torch.zeros(B * H_kv, Sk, D, dtype=cdt)  # accumulates dS^T (log2(e) scale q): rescaled at the end
    dv = torch.zeros_like(dk)
    dbias = torch.zeros(bias.shape, dtype=cdt) if need_dbias else None
    # base-2 LSE; -inf marks rows that see no key: +inf makes their P = exp2(s2 - lse2) exactly 0
    lse2 = torch.where(torch.isneginf(lse), float("inf"), lse * _LOG2E)
    keep_scale = 1.0 / (1.0 - spec.dropout_p)
    for b0, b1, r0, r1, chunks in tiles.blocks():
        Bg, rows = b1 - b0, r1 - r0
        if not chunks:
            dq[b0:b1, :, r0:r1] = 0
            continue
        heads = slice(b0 * H_kv, b1 * H_kv)
        qg = tiles.q_rows(q, b0, b1, r0, r1, tiles.q_scale)
        dog = tiles.q_rows(do, b0, b1, r0, r1, None)
        delta = (tiles.q_rows(o, b0, b1, r0, r1, None) * dog).sum(-1)  # rowsum(dO * O); O holds the dropout
        if dlse is not None:  # the LSE's own gradient: dS += dlse * P
            delta.sub_(tiles.rows(dlse, b0, b1, r0, r1))
        lse_b = tiles.rows(lse2, b0, b1, r0, r1)
        dq_acc = torch.zeros_like(qg)
        for c0, c1 in chunks:
            path_counts["tiles_bwd"] += 1
            k_c, v_c = kc[heads, c0:c1], vc[heads, c0:c1]
            s = torch.bmm(qg, k_c.transpose(1, 2))
            t = tiles.modify(s, b0, b1, r0, r1, c0, c1, want_tanh=True)
            p = s.sub_(lse_b[..., None]).exp2_()
            dp = torch.bmm(dog, v_c.transpose(1, 2))
            if spec.dropout_p > 0:
                keep = _keep_mask(spec, b0, r0, c0, p.shape)
                dv[heads, c0:c1].baddbmm_((p * keep).mul_(keep_scale).transpose(1, 2), dog)
                dp.mul_(keep).mul_(keep_scale)
            else:
                dv[heads, c0:c1].baddbmm_(p.transpose(1, 2), dog)
            ds = dp.sub_(delta[..., None]).mul_(p)  # dS = P * (dP - delta), w.r.t. the natural-log scores
            if dbias is not None:
                _add_dbias(dbias, ds.view(Bg, H_kv, G, rows, c1 - c0), b0, b1, r0, r1, c0, c1)
            if t is not None:  # through the softcap: d(c tanh(x / c))/dx = 1 - tanh^2
                ds.mul_(t.mul_(t).neg_().add_(1.0))
            dq_acc.baddbmm_(ds, k_c)
            dk[heads, c0:c1].baddbmm_(ds.transpose(1, 2), qg)
        dq[b0:b1, :, r0:r1] = dq_acc.mul_(spec.scale).view(Bg, H, rows, D)
    dk.mul_(_LN2)  # qg held log2(e) * scale * q
    dk, dv = dk.view(B, H_kv, Sk, D), dv.view(B, H_kv, Sk, D)
    return dq, torch.empty_like(k).copy_(dk), torch.empty_like(v).copy_(dv), dbias  # k's and v's strides


def _add_dbias(dbias: torch.Tensor, ds5: torch.Tensor, b0: int, b1: int, r0: int, r1: int, c0: int,
               c1: int) -> None:
    """dbias += dS summed over the bias's broadcast dims (dS as (Bg, H_kv, G, rows, keys))."""
    Bb, Hb, Sqb, Skb = dbias.shape
    dims = [d for d, kept in ((0, Bb > 1), (1, Hb > 1), (2, Hb > 1), (3, Sqb > 1), (4, Skb > 1)) if not kept]
    g = ds5.sum(dims, keepdim=True) if dims else ds5
    g = g.flatten(1, 2)  # (Bg|1, H|1, rows|1, keys|1)
    whole = slice(None)
    dbias[slice(b0, b1) if Bb > 1 else whole, :, slice(r0, r1) if Sqb > 1 else whole,
          slice(c0, c1) if Skb > 1 else whole] += g


# --- dispatch per dense (sub)problem ------------------------------------------------------------------------------

def _dense_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
               alibi: torch.Tensor | None, spec: AttnSpec) -> tuple[torch.Tensor, torch.Tensor]:
    B, H, Sq, _ = q.shape
    if B * H * Sq == 0 or k.shape[2] == 0:  # empty: the fused op would crash the process on these (SIGFPE)
        return torch.zeros_like(q), torch.full((B, H, Sq), float("-inf"), dtype=torch.float32)
    flag = _cpu_fused.causal_flag(q, k, bias, alibi, spec)
    if flag is not None:
        path_counts["fused"] += 1
        path_counts["fused_fwd"] += 1
        return _cpu_fused.fwd(q, k, v, bias, spec, flag)
    path_counts["blocked"] += 1
    path_counts["blocked_fwd"] += 1
    return _blocked_fwd(q, k, v, bias, alibi, spec)


def _dense_bwd(do, q, k, v, o, lse, dlse, bias, alibi, need_dbias, spec):
    B, H, Sq, _ = q.shape
    if B * H * Sq == 0 or k.shape[2] == 0:  # empty (the fused op would crash the process: SIGFPE)
        dbias = torch.zeros(bias.shape, dtype=_compute_dtype(q.dtype)) if need_dbias else None
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), dbias
    # the op has no dbias output and no LSE gradient: those calls take the blocked path (dlse arrives as zeros
    # whenever the LSE was not used, so test its values: count_nonzero counts NaN, as any() does, at half its cost)
    flag = None if need_dbias else _cpu_fused.causal_flag(q, k, bias, alibi, spec)
    if flag is not None and dlse is not None and bool(dlse.count_nonzero()):
        flag = None
    if flag is not None:
        path_counts["fused"] += 1
        path_counts["fused_bwd"] += 1
        return (*_cpu_fused.bwd(do, q, k, v, o, lse, bias, spec, flag), None)
    path_counts["blocked"] += 1
    path_counts["blocked_bwd"] += 1
    return _blocked_bwd(do, q, k, v, o, lse, dlse, bias, alibi, need_dbias, spec)


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


def attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
             alibi: torch.Tensor | None, spec: AttnSpec, seq: SeqLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward: O like q and the float32 LSE ((B, H, Sq), or (H, total) when packed)."""
    if seq.mode == SeqMode.DENSE:
        return _dense_fwd(q, k, v, bias, alibi, spec)
    if seq.mode == SeqMode.PACKED:
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


def attn_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
             lse: torch.Tensor, dlse: torch.Tensor | None, bias: torch.Tensor | None, alibi: torch.Tensor | None,
             need_dbias: bool, spec: AttnSpec, seq: SeqLayout,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Backward: dq, dk, dv like q, k, v, and dbias (float32; float64 for float64) when asked."""
    if seq.mode == SeqMode.DENSE:
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
