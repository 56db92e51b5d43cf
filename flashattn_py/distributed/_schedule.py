"""The block schedule: which blocks each rank computes at each ring step.

Each (query chunk, key chunk) pair is classified from global positions as empty,
fully visible or banded; a step computes only the bounding boxes of what is
visible, merged into as few `attention` calls as an exact band allows, never a
computed-and-masked block. Ring steps that no rank needs (a window narrower than
the ring) are cut off.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from ._layouts import _chunks

_INF = math.inf


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
