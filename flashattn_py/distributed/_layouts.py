"""Sharding layouts: which tokens of the sequence each rank holds, and the shards back to the full tensor.

``"contiguous"`` gives rank r chunk r of P chunks; ``"zigzag"`` gives rank r chunks r
and 2P-1-r of 2P chunks, which balances causal work. Chunk c of n over a sequence
of S tokens has ``S // n + (c < S % n)`` tokens: any length S works, chunks (and
shards) differing by at most one token.
"""

from __future__ import annotations

import numbers
from datetime import timedelta
from typing import Literal

import torch
import torch.distributed as dist

from ._comm import _all_gather_ints, _check_timeout, _host_timeout, _resolve_group, _wait

Layout = Literal["zigzag", "contiguous"]
LAYOUTS: tuple[str, ...] = ("zigzag", "contiguous")


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
      differentiable (meant for evaluation, logging and tests). The lengths are
      read back on the host (a timed wait, `timeout`); the data's wait is timed on
      CPU tensors (gloo) and untimed on CUDA ones (the process group's timeout).
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
    _wait([dist.all_gather(bufs, send, group=group, async_op=True)], _host_timeout(wait_s, x.device))
    return _reassemble([b.narrow(dim, 0, n) for b, n in zip(bufs, lengths, strict=True)], layout, dim)
