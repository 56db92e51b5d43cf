"""Context parallelism: exact ring attention over ``torch.distributed``.

A long sequence is split along its length over the ranks of a process group; each
rank holds a shard ``(B, H, S_local, D)`` of q, k and v. `ring_attention` computes
exactly the attention of the whole sequence, each rank getting the rows of its own
queries, by passing the K/V shards around the ring of ranks:

* **Forward.** At step ``t`` rank ``r`` holds the K/V shard of rank ``(r - t) mod P``
  and already sends it on to ``r + 1`` (``batch_isend_irecv``) while it computes
  ``attention(q_local, visiting K/V, return_lse=True)`` on the blocks that the
  causal mask / window let it see. The partial outputs merge exactly by their
  log-sum-exp, in fp32 (``O = Σ_t exp(lse_t - L) O_t``, ``L = logsumexp_t lse_t``;
  rows that have seen no key yet carry lse ``-inf`` and weight 0, never NaN).
* **Backward** (a custom ``torch.autograd.Function``, a second ring). K/V travel
  again, now with fp32 dK/dV accumulators; each rank adds the gradient of its own
  queries' attention to the visiting block and passes both on; after the last
  step the accumulators go home, so every rank ends with the gradients of its own
  K/V, and dQ accumulates locally. The accumulator of a block is summed in ring
  order starting at its owner, dQ in step order: the result is deterministic.
  The per-block gradient is the exact one of the whole attention: with the final
  ``L`` and ``Delta = rowsum(O · dO) - dL``, block ``(i, j)`` has
  ``P_ij = exp(S_ij - L_i)`` and ``dS_ij = P_ij (dO_i V_jᵀ - Delta_i)``. Two ways to
  compute it, both exact; the first whenever `global_lse_backward_available()`:

  - ``"global_lse"`` (default when available): the package's registered backward op
    ``flashattn_py::attn_bwd`` takes O, LSE and dLSE as inputs, so it is handed the
    *final* O and L: one backward kernel per block, no recomputation of the forward.
    This is FlashAttention's own backward, block by block.
  - ``"recompute"`` (fallback, public API only): re-run ``attention`` on the block
    under ``torch.enable_grad()`` (giving ``O_t``, ``lse_t``) and backpropagate
    ``dO_t = w dO`` and ``dlse_t = rowsum(O_t · dO_t) - w (Delta)`` with
    ``w = exp(lse_t - L)``: the block's own backward then uses
    ``P_t w = P`` and ``Delta_t' = w Delta``, i.e. the same ``dS``. It costs one extra
    forward per block (about 1.4x the backward's matmuls).

* **Skipping.** Each (query chunk, key chunk) pair is classified from global
  positions as empty, fully visible or banded; a step computes only the bounding
  boxes of what is visible (merged into as few `attention` calls as an exact band
  allows), never a computed-and-masked block. Ring steps that no rank needs (a
  window narrower than the ring) are not run at all: the ring stops early and
  the gradient accumulators are sent straight home.

Layouts (`shard_sequence`): ``"contiguous"`` gives rank r chunk r of P chunks;
``"zigzag"`` gives rank r chunks r and 2P-1-r of 2P chunks, which balances causal
work (every ring step then costs each rank half a block). Chunk c of n over a
sequence of S tokens has ``S // n + (c < S % n)`` tokens: lengths that are not a
multiple of n work, chunks differing by at most one token (shards too).

Backends: NCCL for CUDA tensors, gloo for CPU tensors (where `attention` runs its
PyTorch path, or the Triton interpreter under ``TRITON_INTERPRET=1``). Every wait
has a timeout. Before the ring, one small ``all_gather`` of each rank's shapes
and options makes a rank whose shard disagrees (or whose inputs are invalid)
raise a clear error on every rank instead of a hang. All ranks must call
`ring_attention` (and its backward) in the same order, as with any collective.
"""

from __future__ import annotations

import functools
import math
import numbers
import struct
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Literal, overload

import torch
import torch.distributed as dist
from torch import nn

from ._validation import InputError, InputTypeError, check_causal, check_scale, check_window
from .functional import attention

Layout = Literal["zigzag", "contiguous"]
Causal = bool | Literal["top_left", "bottom_right"]
LAYOUTS: tuple[str, ...] = ("zigzag", "contiguous")
DEFAULT_TIMEOUT = timedelta(seconds=300)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_MAX_HEAD_DIM = 256
_INF = math.inf

__all__ = ["LAYOUTS", "DEFAULT_TIMEOUT", "ring_attention", "shard_sequence", "unshard_sequence", "shard_positions",
           "shard_lengths", "context_parallel", "all_reduce_gradients"]


# --- layouts -------------------------------------------------------------------------------------------------------

def _check_layout(layout: object) -> str:
    if not isinstance(layout, str):
        raise TypeError(f"layout must be one of {LAYOUTS}, got {type(layout).__name__}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return layout


def _check_int(value: object, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


def _chunk_bounds(seq_len: int, n: int) -> list[tuple[int, int]]:
    """(start, length) of the n chunks of a sequence: lengths S // n, plus one for the first S % n chunks."""
    base, rem = divmod(seq_len, n)
    bounds, start = [], 0
    for c in range(n):
        length = base + (c < rem)
        bounds.append((start, length))
        start += length
    return bounds


def _chunk_ids(rank: int, world_size: int, layout: str) -> tuple[int, ...]:
    return (rank, 2 * world_size - 1 - rank) if layout == "zigzag" else (rank,)


def _chunks(seq_len: int, rank: int, world_size: int, layout: str) -> tuple[tuple[int, int, int], ...]:
    """(global start, length, local start) of each chunk rank `rank` holds, in shard order."""
    bounds = _chunk_bounds(seq_len, 2 * world_size if layout == "zigzag" else world_size)
    out, local = [], 0
    for c in _chunk_ids(rank, world_size, layout):
        start, length = bounds[c]
        out.append((start, length, local))
        local += length
    return tuple(out)


def shard_lengths(seq_len: int, world_size: int, layout: Layout = "zigzag") -> list[int]:
    """The shard length of each rank for a sequence of `seq_len` tokens (they differ by at most one)."""
    seq_len, world_size = _check_int(seq_len, "seq_len", 0), _check_int(world_size, "world_size", 1)
    layout = _check_layout(layout)
    return [sum(c[1] for c in _chunks(seq_len, r, world_size, layout)) for r in range(world_size)]


def shard_positions(seq_len: int, rank: int, world_size: int, layout: Layout = "zigzag",
                    device: torch.device | str | None = None) -> torch.Tensor:
    """Global positions (int64, ``(S_local,)``) of the tokens rank `rank` holds, in shard order."""
    seq_len, world_size = _check_int(seq_len, "seq_len", 0), _check_int(world_size, "world_size", 1)
    rank = _check_rank(rank, world_size)
    chunks = _chunks(seq_len, rank, world_size, _check_layout(layout))
    return torch.cat([torch.arange(s, s + n, device=device) for s, n, _ in chunks])


def _check_rank(rank: object, world_size: int) -> int:
    rank = _check_int(rank, "rank", 0)
    if rank >= world_size:
        raise ValueError(f"rank must be in 0..{world_size - 1} (world_size {world_size}), got {rank}")
    return rank


def _check_dim(x: torch.Tensor, dim: object) -> int:
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
        raise TypeError(f"dim must be an int, got {type(dim).__name__}")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim must be in [{-x.dim()}, {x.dim() - 1}] for a {x.dim()}-D tensor, got {dim}")
    return int(dim) % x.dim()


def shard_sequence(x: torch.Tensor, rank: int, world_size: int, layout: Layout = "zigzag",
                   dim: int = 2) -> torch.Tensor:
    """Rank `rank`'s shard of the full tensor `x` along its sequence dim `dim` (differentiable, contiguous).

    ``"contiguous"``: chunk ``rank`` of ``world_size`` chunks. ``"zigzag"``: chunks
    ``rank`` and ``2·world_size - 1 - rank`` of ``2·world_size``, concatenated in that
    order. Chunk c of n has ``S // n + (c < S % n)`` tokens, so any length S works.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    world_size = _check_int(world_size, "world_size", 1)
    rank = _check_rank(rank, world_size)
    layout = _check_layout(layout)
    dim = _check_dim(x, dim)
    parts = [x.narrow(dim, s, n) for s, n, _ in _chunks(x.shape[dim], rank, world_size, layout)]
    return torch.cat(parts, dim=dim) if len(parts) > 1 else parts[0].contiguous()


def _reassemble(shards: list[torch.Tensor], layout: str, dim: int) -> torch.Tensor:
    world = len(shards)
    seq_len = sum(t.shape[dim] for t in shards)
    expected = shard_lengths(seq_len, world, layout)
    got = [t.shape[dim] for t in shards]
    if got != expected:
        raise ValueError(f"shard lengths {got} along dim {dim} are not the {layout} layout of {seq_len} tokens "
                         f"over {world} ranks (expected {expected})")
    pieces: dict[int, torch.Tensor] = {}
    for r, t in enumerate(shards):
        for c, (_, n, local) in zip(_chunk_ids(r, world, layout), _chunks(seq_len, r, world, layout), strict=True):
            pieces[c] = t.narrow(dim, local, n)
    return torch.cat([pieces[c] for c in sorted(pieces)], dim=dim)


def unshard_sequence(x: torch.Tensor | list[torch.Tensor] | tuple[torch.Tensor, ...],
                     group_or_world: dist.ProcessGroup | int | None = None, layout: Layout = "zigzag",
                     dim: int = 2, *, timeout: timedelta | float | None = None) -> torch.Tensor:
    """The full tensor from shards: the inverse of `shard_sequence`.

    * ``x`` a list/tuple of every rank's shard (rank order): reassembled locally, no
      communication; ``group_or_world`` may be the world size (checked) or None.
    * ``x`` this rank's shard: gathered over the process group ``group_or_world``
      (None = the default group) with ``all_gather`` (shards of unequal lengths are
      padded for the transfer), every rank returning the full tensor. Not
      differentiable (meant for evaluation, logging and tests).
    """
    layout = _check_layout(layout)
    if isinstance(x, (list, tuple)):
        if not x or not all(isinstance(t, torch.Tensor) for t in x):
            raise TypeError("x must be a tensor or a non-empty list of tensors (one shard per rank)")
        if group_or_world is not None and not isinstance(group_or_world, int):
            raise TypeError("group_or_world must be the world size (an int) or None when x is a list of shards")
        if group_or_world is not None and group_or_world != len(x):
            raise ValueError(f"group_or_world says {group_or_world} ranks but x holds {len(x)} shards")
        dim = _check_dim(x[0], dim)
        return _reassemble(list(x), layout, dim)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor or a list of shards, got {type(x).__name__}")
    dim = _check_dim(x, dim)
    group = _resolve_group(group_or_world, "group_or_world")
    wait_s = _check_timeout(timeout)
    world = dist.get_world_size(group)
    lengths = _all_gather_ints([x.shape[dim]], group, x.device, wait_s)[:, 0].tolist()
    longest = max(lengths)
    pad = list(x.shape)
    pad[dim] = longest - x.shape[dim]
    send = torch.cat([x.detach(), x.new_zeros(pad)], dim=dim).contiguous()
    bufs = [torch.empty_like(send) for _ in range(world)]
    _wait([dist.all_gather(bufs, send, group=group, async_op=True)], wait_s)
    return _reassemble([b.narrow(dim, 0, n) for b, n in zip(bufs, lengths, strict=True)], layout, dim)


# --- the schedule: which blocks each rank computes at each ring step ---------------------------------------------

@dataclass(frozen=True)
class _Call:
    """One `attention` call: local query rows [r0, r1) against visiting key cols [c0, c1)."""

    r0: int
    r1: int
    c0: int
    c1: int
    window: tuple[int, int]  # (left, right) relative to row r0 / col c0 (top-left), -1 = unbounded

    @property
    def causal(self) -> bool:
        return self.window == (-1, 0)

    @property
    def area(self) -> int:
        return (self.r1 - self.r0) * (self.c1 - self.c0)


def _intersect(lo: float, hi: float, m: float, big: float) -> tuple[float, float] | None:
    a, b = max(lo, m), min(hi, big)
    return (a, b) if a <= b else None


def _group_call(pairs: list[tuple[tuple[int, int], tuple[int, int], float, float]]) -> tuple[bool, _Call | None]:
    """Whether one band (b - a in [lo, hi], local coordinates) covers exactly what every pair sees.

    pairs: ((row0, row1), (col0, col1), lo, hi). Returns (valid, call or None if nothing is visible).
    """
    rows = (min(p[0][0] for p in pairs), max(p[0][1] for p in pairs))
    cols = (min(p[1][0] for p in pairs), max(p[1][1] for p in pairs))
    wanted = []
    for (a0, a1), (b0, b1), lo, hi in pairs:
        m, big = b0 - (a1 - 1), (b1 - 1) - a0  # the range of b - a over the pair's rectangle
        wanted.append((m, big, _intersect(lo, hi, m, big)))
    seen = [w[2] for w in wanted if w[2] is not None]
    if not seen:
        return True, None
    for lo in [-_INF, *sorted({s[0] for s in seen})]:
        for hi in [_INF, *sorted({s[1] for s in seen})]:
            if all(_intersect(lo, hi, m, big) == want for m, big, want in wanted):
                return True, _bounding_call(rows, cols, lo, hi)
    return False, None


def _bounding_call(rows: tuple[int, int], cols: tuple[int, int], lo: float, hi: float) -> _Call | None:
    """The call over the bounding box of the band b - a in [lo, hi] inside rows x cols (None if empty)."""
    (a0, a1), (b0, b1) = rows, cols
    r0, r1 = max(a0, b0 - hi), min(a1, b1 - lo)
    c0, c1 = max(b0, a0 + lo), min(b1, a1 + hi)
    if r0 >= r1 or c0 >= c1:
        return None
    r0, r1, c0, c1 = int(r0), int(r1), int(c0), int(c1)
    shift = c0 - r0  # b' - a' = (b - a) - shift in the call's own coordinates
    left = -1 if lo == -_INF or shift - lo >= r1 - r0 - 1 else int(shift - lo)
    right = -1 if hi == _INF or hi - shift >= c1 - c0 - 1 else int(hi - shift)
    return _Call(r0, r1, c0, c1, (left, right))


def _plan(q_chunks, k_chunks, left: int, right: int) -> tuple[_Call, ...]:
    """The calls for this rank's queries (q_chunks) against one visiting shard (k_chunks)."""
    lo_w = -_INF if left < 0 else -left
    hi_w = _INF if right < 0 else right
    pairs = {}
    for i, (gq, lq, sq) in enumerate(q_chunks):
        for j, (gk, lk, sk) in enumerate(k_chunks):
            if lq and lk:  # global j - i in [-left, right]  <=>  local b - a in [sigma - left, sigma + right]
                sigma = (gq - sq) - (gk - sk)
                pairs[i, j] = ((sq, sq + lq), (sk, sk + lk), sigma + lo_w, sigma + hi_w)
    if not pairs:
        return ()
    candidates = [[list(pairs)],  # everything in one call
                  [[p for p in pairs if p[0] == i] for i in range(len(q_chunks))],  # per query chunk
                  [[p for p in pairs if p[1] == j] for j in range(len(k_chunks))],  # per key chunk
                  [[p] for p in pairs]]  # per pair: always exact
    best = None
    for partition in candidates:
        calls, valid = [], True
        for keys in (g for g in partition if g):
            ok, call = _group_call([pairs[p] for p in keys])
            if not ok:
                valid = False
                break
            if call is not None:
                calls.append(call)
        if valid and (best is None or len(calls) < len(best)):
            best = calls
    return tuple(best)


@dataclass(frozen=True)
class _Schedule:
    steps: int  # ring steps actually run (1..P); steps no rank needs are cut off
    lengths: tuple[int, ...]  # shard length per rank
    plans: tuple[tuple[tuple[_Call, ...], ...], ...]  # plans[rank][step]


@functools.lru_cache(maxsize=256)
def _schedule(seq_len: int, world: int, layout: str, left: int, right: int) -> _Schedule:
    chunks = [_chunks(seq_len, r, world, layout) for r in range(world)]
    plans = tuple(tuple(_plan(chunks[r], chunks[(r - t) % world], left, right) for t in range(world))
                  for r in range(world))
    needed = [t for t in range(world) if any(plans[r][t] for r in range(world))]
    steps = max(needed, default=0) + 1
    lengths = tuple(sum(c[1] for c in ch) for ch in chunks)
    return _Schedule(steps, lengths, tuple(p[:steps] for p in plans))


# --- validation and the shape agreement --------------------------------------------------------------------------

def _check_timeout(timeout: object) -> timedelta:
    if timeout is None:
        return DEFAULT_TIMEOUT
    if isinstance(timeout, timedelta):
        seconds = timeout.total_seconds()
    elif isinstance(timeout, numbers.Real) and not isinstance(timeout, bool):
        seconds = float(timeout)
    else:
        raise TypeError(f"timeout must be a datetime.timedelta, a number of seconds or None, got "
                        f"{type(timeout).__name__}")
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"timeout must be positive and finite, got {timeout!r}")
    return timedelta(seconds=seconds)


def _resolve_group(group: object, name: str = "group") -> dist.ProcessGroup:
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"{name} must be a torch.distributed.ProcessGroup or None, got {type(group).__name__}")
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(f"{name}: torch.distributed is not initialized; call torch.distributed.init_process_group "
                         f"first (gloo for CPU tensors, nccl for CUDA tensors)")
    group = dist.group.WORLD if group is None else group
    if dist.get_rank(group) < 0:
        raise ValueError(f"{name}: this process is not a member of the process group")
    return group


def _check_options(causal: object, scale: object, return_lse: object, window: object,
                   layout: object, backward: object) -> tuple[bool, float | None, int, int, str]:
    # q and k are shards of one sequence: both causal alignments coincide
    is_causal = bool(check_causal(causal))
    scale = None if scale is None else check_scale(scale, 1)
    if not isinstance(return_lse, bool):
        raise InputTypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    left, right = check_window(window, is_causal)
    if backward not in ("auto", "global_lse", "recompute"):
        raise InputError(f"backward must be 'auto', 'global_lse' or 'recompute', got {backward!r}")
    return is_causal, scale, left, right, _check_layout(layout)


def _check_tensors(q: object, k: object, v: object) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D shard (batch, heads, seqlen_local, head_dim), got shape "
                             f"{tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.device.type not in ("cpu", "cuda"):
        raise ValueError(f"q must be a CPU (gloo) or CUDA (nccl) tensor, got device {q.device}")
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(f"q, k and v must have the same batch (dim 0), got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"k and v must have the same number of heads (dim 1), got {k.shape[1]} and {v.shape[1]}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"q's heads (dim 1) must be a multiple of k's and v's heads (grouped-query attention), got "
                         f"{q.shape[1]} and {k.shape[1]}")
    if not (q.shape[2] == k.shape[2] == v.shape[2]):
        raise ValueError(f"q, k and v must be shards of one sequence: the same local length (dim 2), got "
                         f"{q.shape[2]}, {k.shape[2]}, {v.shape[2]}")
    if not (q.shape[3] == k.shape[3] == v.shape[3]):
        raise ValueError(f"q, k and v must have the same head_dim (dim 3), got {q.shape[3]}, {k.shape[3]}, "
                         f"{v.shape[3]}")
    if not 1 <= q.shape[3] <= _MAX_HEAD_DIM:
        raise ValueError(f"head_dim (dim 3) must be in 1..{_MAX_HEAD_DIM}, got {q.shape[3]}")


def _wait(works: list, timeout: timedelta) -> None:
    for work in works:
        if isinstance(work, torch.Tensor):  # a send buffer kept alive with its work
            continue
        if work.wait(timeout=timeout) is False:
            raise RuntimeError(f"ring_attention: a torch.distributed operation did not finish within {timeout}")


def _meta_device(group: dist.ProcessGroup, device: torch.device) -> torch.device:
    if "nccl" in str(dist.get_backend(group)).lower():
        return device if device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_gather_ints(values: list[int], group: dist.ProcessGroup, device: torch.device,
                     timeout: timedelta) -> torch.Tensor:
    """(world, len(values)) int64 table of every rank's values, on the CPU."""
    dev = _meta_device(group, device)
    mine = torch.tensor(values, dtype=torch.int64, device=dev)
    table = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    _wait([dist.all_gather(table, mine, group=group, async_op=True)], timeout)
    return torch.stack(table).cpu()


_META = ("ok", "batch", "heads", "heads_kv", "seqlen_local", "head_dim", "dtype", "device", "causal",
         "window_left", "window_right", "layout", "scale", "needs_grad")
_SHAPE_FIELDS = ("batch", "heads", "heads_kv", "head_dim", "dtype", "device")


def _agree(q, k, v, local_error: Exception | None, options: dict, group, timeout) -> list[int]:
    """All-gather every rank's shapes and options; raise the same clear error on every rank if they disagree.

    Returns the shard length of every rank.
    """
    if local_error is None:
        scale_bits = struct.unpack("<q", struct.pack("<d", options["scale"]))[0]
        row = [1, q.shape[0], q.shape[1], k.shape[1], q.shape[2], q.shape[3], _DTYPES.index(q.dtype),
               int(q.device.type == "cuda"), int(options["causal"]), options["left"], options["right"],
               LAYOUTS.index(options["layout"]), scale_bits, int(options["needs_grad"])]
        device = q.device
    else:
        row = [0] * len(_META)
        device = q.device if isinstance(q, torch.Tensor) else torch.device("cpu")
    table = _all_gather_ints(row, group, device, timeout)
    bad = [r for r in range(table.shape[0]) if table[r, 0] == 0]
    if bad:
        if local_error is not None:
            raise local_error
        raise ValueError(f"ring_attention: rank(s) {bad} of the group rejected their inputs (the error is raised "
                         f"there); no ring step was started")
    differ = [name for i, name in enumerate(_META) if (table[:, i] != table[0, i]).any() and name != "seqlen_local"]
    if differ:
        shown = [n for n in _META[1:] if n in differ or n in ("seqlen_local",)]
        rows = "; ".join(f"rank {r}: " + ", ".join(f"{n}={_decode(n, int(table[r, _META.index(n)]))}"
                                                   for n in shown) for r in range(table.shape[0]))
        what = "shapes" if any(n in _SHAPE_FIELDS for n in differ) else "options"
        raise ValueError(f"ring_attention: the ranks' shard {what} disagree ({', '.join(differ)}): {rows}")
    lengths = table[:, _META.index("seqlen_local")].tolist()
    expected = shard_lengths(sum(lengths), len(lengths), options["layout"])
    if lengths != expected:
        raise ValueError(f"ring_attention: the shard lengths (dim 2) {lengths} are not the {options['layout']} "
                         f"layout of a sequence of {sum(lengths)} tokens, which has shards {expected}; shard the "
                         f"sequence with shard_sequence(x, rank, world_size, layout={options['layout']!r})")
    return lengths


def _decode(name: str, value: int) -> str:
    if name == "dtype":
        return str(_DTYPES[value]).replace("torch.", "")
    if name == "layout":
        return LAYOUTS[value]
    if name == "device":
        return "cuda" if value else "cpu"
    if name == "scale":
        return f"{struct.unpack('<d', struct.pack('<q', value))[0]:.6g}"
    if name in ("causal", "needs_grad"):
        return str(bool(value))
    return str(value)


# --- the ring ------------------------------------------------------------------------------------------------------

@dataclass
class _Ring:
    """Point-to-point traffic within `group`, with timeouts; ranks are group ranks."""

    group: dist.ProcessGroup
    timeout: timedelta
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
                   window: tuple[int, int] = ..., layout: Layout = ...,
                   timeout: timedelta | float | None = ...) -> torch.Tensor: ...
@overload
def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group: dist.ProcessGroup | None = ...,
                   causal: Causal = ..., scale: float | None = ..., return_lse: Literal[True],
                   window: tuple[int, int] = ..., layout: Layout = ...,
                   timeout: timedelta | float | None = ...) -> tuple[torch.Tensor, torch.Tensor]: ...


def ring_attention(q, k, v, *, group=None, causal=False, scale=None, return_lse=False, window=(-1, -1),
                   layout="zigzag", timeout=None):
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
        timeout: limit for every wait on the group (``timedelta`` or seconds; default
            `DEFAULT_TIMEOUT`). On NCCL the process group's own timeout applies too.

    Returns:
        ``out`` ``(B, H, S_local, D)`` in q's dtype, or ``(out, lse)``. A row that sees
        no key (impossible for plain causal self-attention, since a query sees
        itself) gets output 0 and lse ``-inf``, never NaN.

    Raises:
        TypeError / ValueError naming the argument, before any communication, for
        bad options (on the calling rank). Invalid or disagreeing tensors (a shard
        of the wrong length, different heads, dtype, options, ...) raise ValueError
        on every rank, after one small all_gather of shapes and before the ring.
    """
    return _ring_attention(q, k, v, group=group, causal=causal, scale=scale, return_lse=return_lse, window=window,
                           layout=layout, timeout=timeout)


def _ring_attention(q, k, v, *, group=None, causal=False, scale=None, return_lse=False, window=(-1, -1),
                    layout="zigzag", timeout=None, backward="auto", mode="full", stats=None):
    """`ring_attention` with the knobs the tests and benchmarks use (`backward`, `mode`, `stats`)."""
    is_causal, scale, left, right, layout = _check_options(causal, scale, return_lse, window, layout, backward)
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
        return attention(q, k, v, causal=is_causal, scale=scale, window=(left, right), return_lse=return_lse)
    sm_scale = scale if scale is not None else (1.0 / math.sqrt(q.shape[3]) if local_error is None else 0.0)
    needs_grad = torch.is_grad_enabled() and local_error is None and any(t.requires_grad for t in (q, k, v))
    options = dict(causal=is_causal, left=left, right=right, layout=layout, scale=sm_scale, needs_grad=needs_grad)
    lengths = _agree(q, k, v, local_error, options, group, wait_s)
    if q.stride(-1) != 1 and q.shape[-1] > 1:
        q = q.contiguous()
    sched = _schedule(sum(lengths), world, layout, left, right)
    cfg = _Config(_Ring(group, wait_s, stats=stats), sched, sm_scale, backward, mode, stats)
    out, lse = _RingAttention.apply(q, k, v, cfg)
    return (out, lse) if return_lse else out


# --- the reference Transformer under context parallelism -----------------------------------------------------------

def all_reduce_gradients(module: nn.Module, group: dist.ProcessGroup | None = None, *,
                         timeout: timedelta | float | None = None) -> None:
    """Sum every parameter's ``.grad`` over `group` (each rank holds its tokens' share of the gradient)."""
    group = _resolve_group(group)
    wait_s = _check_timeout(timeout)
    works = [dist.all_reduce(p.grad, group=group, async_op=True) for p in module.parameters() if p.grad is not None]
    _wait(works, wait_s)


@functools.cache
def _model_classes():
    """Subclasses of the reference Transformer's self-attention and positional encoding that shard the sequence."""
    from . import models

    # the reference's attention layer (AttentionLayer; MultiHeadAttention before the rename)
    layer_cls = getattr(models, "AttentionLayer", None) or models.MultiHeadAttention

    class RingSelfAttention(layer_cls):
        """Self-attention over the context-parallel group's whole sequence (`ring_attention`)."""

        cp_group: dist.ProcessGroup | None
        cp_layout: str

        def forward(self, x, context=None, causal=False, key_padding_mask=None):
            if context is not None or key_padding_mask is not None:
                raise ValueError("context parallelism covers self-attention without key_padding_mask only")
            if self.training and self.dropout > 0:
                raise ValueError("ring_attention has no attention dropout; set the model's dropout to 0")
            B, T, C = x.shape
            H = self.n_heads
            q, k, v = (proj(x).view(B, T, H, C // H).transpose(1, 2) for proj in (self.q_proj, self.k_proj,
                                                                                   self.v_proj))
            y = ring_attention(q, k, v, group=self.cp_group, causal=causal, layout=self.cp_layout)
            return self.out_proj(y.transpose(1, 2).reshape(B, T, C))

    class ShardedPositionalEncoding(models.SinusoidalPositionalEncoding):
        """Adds the encodings of the shard's global positions (the sequence length is all-gathered)."""

        cp_group: dist.ProcessGroup | None
        cp_layout: str

        def forward(self, x):
            group = _resolve_group(self.cp_group)
            lengths = _all_gather_ints([x.shape[1]], group, x.device, DEFAULT_TIMEOUT)[:, 0].tolist()
            pos = shard_positions(sum(lengths), dist.get_rank(group), len(lengths), self.cp_layout, x.device)
            return x + self.pe[pos].to(x.dtype)

    return layer_cls, models.SinusoidalPositionalEncoding, RingSelfAttention, ShardedPositionalEncoding


def context_parallel(model: nn.Module, group: dist.ProcessGroup | None = None, *,
                     layout: Layout = "zigzag") -> nn.Module:
    """Run a reference Transformer (`flashattn_py.models`, e.g. ``GPT``) context-parallel over `group`, in place.

    Every self-attention layer (``models.AttentionLayer``) computes `ring_attention` over the
    group and every `SinusoidalPositionalEncoding` adds the encodings of the
    shard's global positions; the parameters are untouched. Feed each rank its
    shard of the tokens, ``shard_sequence(idx, rank, world, layout, dim=1)``, take
    the loss as the sum over local tokens divided by the global token count, and
    call `all_reduce_gradients` after ``backward()``: loss and gradients are then
    those of one process on the whole sequence. Returns the model.
    """
    layout = _check_layout(layout)
    _resolve_group(group)
    layer_cls, encoding_cls, ring_cls, pe_cls = _model_classes()
    for m in model.modules():
        if type(m) in (layer_cls, ring_cls):
            m.__class__ = ring_cls
        elif type(m) in (encoding_cls, pe_cls):
            m.__class__ = pe_cls
        else:
            continue
        m.cp_group, m.cp_layout = group, layout
    return model
