"""The ring: forward and backward passes of K/V (and dK/dV) around the group, and `ring_attention`.

See the package's docstring for the algorithm; the block schedule comes from
`_schedule`, every rank's shard length from the shape agreement (`_agreement`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Literal, overload

import torch
import torch.distributed as dist

from ..functional import attention
from ._agreement import _agreed_lengths, _check_options, _check_seq_len, _check_tensors
from ._comm import _check_timeout, _host_timeout, _resolve_group, _wait
from ._layouts import Layout
from ._schedule import _Call, _Schedule, _schedule

Causal = bool | Literal["top_left", "bottom_right"]
_INF = math.inf


@dataclass
class _Ring:
    """Point-to-point traffic within `group`; ranks are group ranks.

    `timeout` bounds every wait, or is None: untimed waits (CUDA tensors), which only
    order the current stream after the transfer and leave the CPU thread free; the
    process group's own timeout (NCCL's watchdog) then bounds a stuck transfer.
    """

    group: dist.ProcessGroup
    timeout: timedelta | None
    rank: int = 0
    world: int = 1
    stats: dict | None = None

    def __post_init__(self):
        self.rank, self.world = dist.get_rank(self.group), dist.get_world_size(self.group)

    def start(self, sends: list[tuple[torch.Tensor, int]], recvs: list[tuple[torch.Tensor, int]]) -> list:
        """Post isends/irecvs to/from group ranks (taken mod world); empty tensors are not sent."""
        ops = [dist.P2POp(dist.isend, t, dist.get_global_rank(self.group, p % self.world), self.group)
               for t, p in sends if t.numel()]
        ops += [dist.P2POp(dist.irecv, t, dist.get_global_rank(self.group, p % self.world), self.group)
                for t, p in recvs if t.numel()]
        if self.stats is not None:
            self.stats["bytes_sent"] = self.stats.get("bytes_sent", 0) + sum(
                t.numel() * t.element_size() for t, _ in sends)
        return dist.batch_isend_irecv(ops) if ops else []

    def wait(self, works: list) -> None:
        _wait(works, self.timeout)


@dataclass
class _Config:
    ring: _Ring
    schedule: _Schedule
    scale: float
    backward: str
    mode: str = "full"  # benchmarks only: "comm_only" (no attention) or "compute_only" (no exchange)
    stats: dict | None = field(default=None)


def _merge(acc_o: torch.Tensor, acc_l: torch.Tensor, o: torch.Tensor, lse: torch.Tensor) -> None:
    """acc <- the exact softmax merge of acc and (o, lse), in place, fp32; -inf rows get weight 0, never NaN."""
    new = torch.logaddexp(acc_l, lse)
    base = torch.where(torch.isneginf(new), 0.0, new)
    acc_o.mul_(torch.exp(acc_l - base)[..., None]).add_(o.float() * torch.exp(lse - base)[..., None])
    acc_l.copy_(new)


def _attend(qs: torch.Tensor, ks: torch.Tensor, vs: torch.Tensor, call: _Call,
            scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`attention` on one call's rows and cols (already sliced), with the call's causal mask or window."""
    if call.causal:
        return attention(qs, ks, vs, causal=True, scale=scale, return_lse=True)
    return attention(qs, ks, vs, scale=scale, window=call.window, return_lse=True)


def _kv_buffer(like: torch.Tensor, length: int) -> torch.Tensor:
    B, H_kv, _, D = like.shape[1:]
    return like.new_empty((2, B, H_kv, length, D))


def _forward_step(q: torch.Tensor, kv: torch.Tensor, calls: tuple[_Call, ...], acc_o: torch.Tensor,
                  acc_l: torch.Tensor, scale: float) -> None:
    """Attention of the local queries to one visiting K/V shard (2, B, H_kv, S_src, D), merged into acc in place."""
    for call in calls:
        cols = slice(call.c0, call.c1)
        o, lse = _attend(q[:, :, call.r0:call.r1], kv[0][:, :, cols], kv[1][:, :, cols], call, scale)
        _merge(acc_o[:, :, call.r0:call.r1], acc_l[:, :, call.r0:call.r1], o, lse)


def _ring_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: _Config):
    ring, sched = cfg.ring, cfg.schedule
    r, P, T = ring.rank, ring.world, sched.steps
    kv = torch.stack([k, v])  # (2, B, H_kv, S_local, D), one message per step
    acc_o = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    acc_l = torch.full(q.shape[:3], -_INF, dtype=torch.float32, device=q.device)
    for t in range(T):
        works, nxt = [], None
        if t + 1 < T:
            nxt = _kv_buffer(kv, sched.lengths[(r - t - 1) % P])
            if cfg.mode != "compute_only":  # the next block is in flight while this one computes
                works = ring.start([(kv, r + 1)], [(nxt, r - 1)])
        if cfg.mode != "comm_only":
            _forward_step(q, kv, sched.plans[r][t], acc_o, acc_l, cfg.scale)
        ring.wait(works)
        if nxt is not None:
            kv = nxt if cfg.mode != "compute_only" else kv
    if cfg.stats is not None:
        cfg.stats["forward_buffer_bytes"] = 2 * kv.nbytes + acc_o.nbytes + acc_l.nbytes
    return acc_o.to(q.dtype), acc_l


# the registered backward op takes O and the LSE as inputs: handed the final O and L, it gives each block's exact
# share of the whole attention's gradient. Filled by argument name, so a reordered schema still works; any
# argument we do not know makes us fall back to the recompute formulation.
_OP_FIXED = {"bias": None, "alibi": None, "cu_seqlens_q": None, "cu_seqlens_k": None, "need_dbias": False,
             "offset": 0, "softcap": 0.0, "bias_kind": 0, "dropout_p": 0.0, "seq_mode": 0, "max_seqlen_q": 0,
             "max_seqlen_k": 0}
_OP_PER_CALL = frozenset({"do", "q", "k", "v", "o", "lse", "dlse", "seed", "scale", "window_left", "window_right"})


@functools.lru_cache(maxsize=1)
def global_lse_backward_available() -> bool:
    """Whether the ``"global_lse"`` backward can run: ``flashattn_py::attn_bwd`` exists with the known arguments."""
    try:
        schema = torch.ops.flashattn_py.attn_bwd.default._schema
    except (AttributeError, RuntimeError):
        return False
    names = {a.name for a in schema.arguments}
    return _OP_PER_CALL <= names and names <= (_OP_PER_CALL | _OP_FIXED.keys()) and len(schema.returns) >= 3


def _block_grads_global_lse(q, kv, out, do, lse, dlse, call: _Call, scale: float):
    rows, cols = slice(call.r0, call.r1), slice(call.c0, call.c1)
    dq, dk, dv, *_ = torch.ops.flashattn_py.attn_bwd(
        do=do[:, :, rows], q=q[:, :, rows], k=kv[0][:, :, cols], v=kv[1][:, :, cols], o=out[:, :, rows],
        lse=lse[:, :, rows].contiguous(), dlse=None if dlse is None else dlse[:, :, rows].contiguous(),
        seed=torch.zeros((), dtype=torch.int64), scale=scale, window_left=call.window[0],
        window_right=call.window[1], **_OP_FIXED)
    return dq, dk, dv


def _block_grads_recompute(q, kv, do, lse, delta, call: _Call, scale: float):
    rows, cols = slice(call.r0, call.r1), slice(call.c0, call.c1)
    with torch.enable_grad():
        qs = q[:, :, rows].detach().requires_grad_()
        ks = kv[0][:, :, cols].detach().requires_grad_()
        vs = kv[1][:, :, cols].detach().requires_grad_()
        o_t, lse_t = _attend(qs, ks, vs, call, scale)
    final = lse[:, :, rows]
    w = torch.exp(lse_t.detach() - torch.where(torch.isneginf(final), 0.0, final))  # 0 where lse_t = -inf
    g_o = (w[..., None] * do[:, :, rows].float()).to(o_t.dtype)
    g_lse = (o_t.detach().float() * g_o.float()).sum(-1) - w * delta[:, :, rows]
    return torch.autograd.grad((o_t, lse_t), (qs, ks, vs), (g_o, g_lse))


def _use_global_lse(backward: str) -> bool:
    return backward == "global_lse" or (backward == "auto" and global_lse_backward_available())


def _delta(out: torch.Tensor, do: torch.Tensor, dlse: torch.Tensor | None) -> torch.Tensor:
    """Delta = rowsum(O dO) - dL, fp32 (B, H, S_local)."""
    delta = (out.float() * do.float()).sum(-1)
    return delta if dlse is None else delta - dlse


def _backward_step(q, kv, out, do, lse, dlse, delta, calls: tuple[_Call, ...], scale: float, use_op: bool,
                   dq: torch.Tensor, dkv: torch.Tensor) -> None:
    """Add the local queries' gradient share for one visiting shard: dq (local, fp32), dkv (2, B, H_kv, S_src, D)."""
    for call in calls:
        if use_op:
            g = _block_grads_global_lse(q, kv, out, do, lse, dlse, call, scale)
        else:
            g = _block_grads_recompute(q, kv, do, lse, delta, call, scale)
        dq[:, :, call.r0:call.r1] += g[0].float()
        dkv[0, :, :, call.c0:call.c1] += g[1].float()
        dkv[1, :, :, call.c0:call.c1] += g[2].float()


def _ring_backward(q, k, v, out, lse, do, dlse, cfg: _Config):
    ring, sched = cfg.ring, cfg.schedule
    r, P, T = ring.rank, ring.world, sched.steps
    use_op = _use_global_lse(cfg.backward)
    do = torch.zeros_like(out) if do is None else do.contiguous()
    delta = None if use_op else _delta(out, do, dlse)
    kv = torch.stack([k.detach(), v.detach()])
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    exchange = cfg.mode != "compute_only"

    def grad_buffer(length: int) -> torch.Tensor:  # fp32 (2, B, H_kv, length, D): dK and dV of one shard
        return torch.zeros((2, k.shape[0], k.shape[1], length, k.shape[3]), dtype=torch.float32, device=k.device)

    acc_in, acc_works = None, []  # the visiting block's dK/dV accumulated by the ranks before us, and its receive
    for t in range(T):
        kv_works, nxt = [], None
        if t + 1 < T:  # K/V of the next block travel while we compute
            nxt = _kv_buffer(kv, sched.lengths[(r - t - 1) % P])
            if exchange:
                kv_works = ring.start([(kv, r + 1)], [(nxt, r - 1)])
        calls = sched.plans[r][t] if cfg.mode != "comm_only" else ()
        mine = grad_buffer(sched.lengths[(r - t) % P]) if calls or acc_in is None else None
        _backward_step(q, kv, out, do, lse, dlse, delta, calls, cfg.scale, use_op, dq, mine)
        ring.wait(acc_works)  # its transfer overlapped our compute
        # a fixed order: the owner's share first, then each rank's in ring order
        acc = mine if acc_in is None else (acc_in if mine is None else acc_in.add_(mine))
        ring.wait(kv_works)
        acc_in, acc_works = None, []
        if t + 1 < T:
            acc_in = grad_buffer(sched.lengths[(r - t - 1) % P])
            if exchange:  # passed on now, needed by the next rank only after its own compute
                acc_works = ring.start([(acc, r + 1)], [(acc_in, r - 1)])
                acc_works.append(acc)  # keep the send buffer alive until waited
                kv = nxt
    # the last block's accumulator goes home, to its owner r - (T - 1); ours comes from r + (T - 1)
    if T > 1 and exchange:
        home = torch.empty((2, *k.shape), dtype=torch.float32, device=k.device)
        ring.wait(ring.start([(acc, r - (T - 1))], [(home, r + (T - 1))]))
        acc = home
    if cfg.stats is not None:
        cfg.stats["backward_buffer_bytes"] = 2 * kv.nbytes + dq.nbytes + 3 * acc.nbytes
    return dq.to(q.dtype), acc[0].to(k.dtype), acc[1].to(v.dtype)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: _Config):
        out, lse = _ring_forward(q, k, v, cfg)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.cfg = cfg
        return out, lse

    @staticmethod
    def backward(ctx, do: torch.Tensor | None, dlse: torch.Tensor | None):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _ring_backward(q, k, v, out, lse, do, dlse, ctx.cfg)
        return dq, dk, dv, None


@overload
def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group: dist.ProcessGroup | None = ...,
                   causal: Causal = ..., scale: float | None = ..., return_lse: Literal[False] = ...,
                   window: tuple[int, int] = ..., layout: Layout = ..., seq_len: int | None = ...,
                   timeout: timedelta | float | None = ...) -> torch.Tensor: ...
@overload
def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group: dist.ProcessGroup | None = ...,
                   causal: Causal = ..., scale: float | None = ..., return_lse: Literal[True],
                   window: tuple[int, int] = ..., layout: Layout = ..., seq_len: int | None = ...,
                   timeout: timedelta | float | None = ...) -> tuple[torch.Tensor, torch.Tensor]: ...


def ring_attention(q, k, v, *, group=None, causal=False, scale=None, return_lse=False, window=(-1, -1),
                   layout="zigzag", seq_len=None, timeout=None):
    """Exact attention over a sequence sharded along its length across a process group (ring attention).

    Every rank of `group` calls this with its shard; the result is, row for row,
    ``flashattn_py.attention`` of the whole sequence (same masks, LSE, gradients).

    Args:
        q: this rank's query shard ``(B, H, S_local, D)``. k, v: its key/value shard
            ``(B, H_kv, S_local, D)``, ``H`` a multiple of ``H_kv`` (grouped-query
            attention). One dtype (float16, bfloat16, float32, float64) and device
            (CUDA with NCCL, CPU with gloo), ``1 <= D <= 256``. q, k and v are shards
            of one sequence of ``S = Σ S_local`` tokens, laid out by `layout` (see
            `shard_sequence`): every rank's ``S_local`` must be the one the layout gives.
        group: the context-parallel process group (None = the default group).
        causal: query at global position i sees keys ``j <= i``. q and k cover the
            same sequence, so ``True``, ``"top_left"`` and ``"bottom_right"`` coincide.
        scale: multiplies the scores; default ``1 / sqrt(D)``.
        return_lse: also return this rank's rows of the log-sum-exp ``(B, H, S_local)``
            float32, natural log, differentiable.
        window: ``(left, right)`` in global positions: query i sees keys
            ``i - left <= j <= i + right``; -1 = unbounded; causal forces ``right = 0``.
            Ring steps outside every rank's window are not run.
        layout: ``"zigzag"`` (rank r holds chunks r and 2P-1-r of 2P: balanced causal
            work) or ``"contiguous"`` (chunk r of P).
        seq_len: the whole sequence's length S, the same on every rank (optional).
            Pass it when S varies between calls: it makes the remembered shape
            agreement safe for any change of S (see *Shape agreement* below).
        timeout: limit (``timedelta`` or seconds; default `DEFAULT_TIMEOUT`) for the
            shape agreement, and for every wait of the ring on CPU tensors (gloo).
            On CUDA tensors (NCCL) the ring's waits are untimed: a timed NCCL wait
            blocks the CPU thread until the transfer ends, an untimed one only makes
            the current stream wait for it; the process group's own timeout (NCCL's
            watchdog, ``init_process_group(timeout=...)``) bounds a stuck ring.

    Returns:
        ``out`` ``(B, H, S_local, D)`` in q's dtype, or ``(out, lse)``. A row that sees
        no key (impossible for plain causal self-attention, since a query sees
        itself) gets output 0 and lse ``-inf``, never NaN.

    Raises:
        TypeError / ValueError naming the argument, before any communication, for
        bad options (on the calling rank). Invalid or disagreeing tensors (a shard
        of the wrong length, different heads, dtype, options, ...) raise ValueError
        on every rank, after one small all_gather of shapes and before the ring, on
        the first call of a signature (below).

    Shape agreement:
        The first call of a *signature* on a group makes one small all_gather of
        every rank's shapes and options, read back on the host, that checks the
        shards against each other (the errors above). The signature is what every
        rank of a correct program has in common: batch, heads, KV heads, head dim,
        dtype, device type, causal, window, layout, scale, whether gradients are
        needed, and `seq_len`; strides and values do not count. The agreed shard
        lengths are remembered per process group (64 signatures, least recently used
        dropped), and a later call whose signature was agreed, and whose local
        length is this rank's agreed one, runs the ring at once: no collective and
        no host read before it. Without `seq_len` a signature remembers only its
        last agreement (a call of another S agrees anew and replaces it); with
        `seq_len` each S is remembered on its own.

        Contract: every rank of `group` calls `ring_attention` (and its backward)
        in the same order with the same signature, as with any collective. Then
        every rank reuses or agrees alike, and a reused agreement is exactly the
        shards' layout, with one exception: without `seq_len`, a change of S that
        leaves some rank's shard length unchanged (8 -> 9 tokens over 2 ranks,
        zigzag: shards 4, 4 -> 5, 4). No rank can see that locally: rank 1 would
        run the ring of the old agreement while rank 0 agrees anew, and both wait
        until `timeout` (gloo) or the process group's timeout (NCCL) ends them with
        an error. So pass `seq_len` whenever S varies (or vary S only by multiples
        of the layout's chunk count, 2P for zigzag and P for contiguous, which
        changes every shard). Likewise, a later call whose shard or options differ
        on some ranks only (a program error) is not caught: like mismatched
        collectives it stalls until those timeouts, or, if the shapes still match,
        computes with each rank's own options.
    """
    return _ring_attention(q, k, v, group=group, causal=causal, scale=scale, return_lse=return_lse, window=window,
                           layout=layout, seq_len=seq_len, timeout=timeout)


def _ring_attention(q, k, v, *, group=None, causal=False, scale=None, return_lse=False, window=(-1, -1),
                    layout="zigzag", seq_len=None, timeout=None, backward="auto", mode="full", stats=None):
    """`ring_attention` with the knobs the tests and benchmarks use (`backward`, `mode`, `stats`)."""
    is_causal, scale, left, right, layout = _check_options(causal, scale, return_lse, window, layout, backward)
    seq_len = _check_seq_len(seq_len)
    wait_s = _check_timeout(timeout)
    group = _resolve_group(group)
    try:
        _check_tensors(q, k, v)
        local_error = None
    except (TypeError, ValueError) as err:
        local_error = err
    world = dist.get_world_size(group)
    if world == 1:
        if local_error is not None:
            raise local_error
        if seq_len is not None and seq_len != q.shape[2]:
            raise ValueError(f"ring_attention: seq_len={seq_len}, but the only rank's shard holds {q.shape[2]} "
                             f"tokens (dim 2)")
        return attention(q, k, v, causal=is_causal, scale=scale, window=(left, right), return_lse=return_lse)
    sm_scale = scale if scale is not None else (1.0 / math.sqrt(q.shape[3]) if local_error is None else 0.0)
    needs_grad = torch.is_grad_enabled() and local_error is None and any(t.requires_grad for t in (q, k, v))
    options = dict(causal=is_causal, left=left, right=right, layout=layout, scale=sm_scale, needs_grad=needs_grad)
    lengths = _agreed_lengths(q, k, v, local_error, options, group, wait_s, seq_len)
    if q.stride(-1) != 1 and q.shape[-1] > 1:
        q = q.contiguous()
    sched = _schedule(sum(lengths), world, layout, left, right)
    ring = _Ring(group, _host_timeout(wait_s, q.device), stats=stats)  # untimed on CUDA: NCCL's watchdog owns it
    cfg = _Config(ring, sched, sm_scale, backward, mode, stats)
    out, lse = _RingAttention.apply(q, k, v, cfg)
    return (out, lse) if return_lse else out
