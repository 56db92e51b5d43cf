"""Tile helpers shared by the forward and backward kernels.

Everything here is `@triton.jit`; the `EVEN_*` flags are constexpr so the
common case (lengths that are block multiples, power-of-two head dims)
compiles to unmasked loads.
"""

import triton
import triton.language as tl

LOG2E: tl.constexpr = 1.4426950408889634  # log2(e): exp(x) == exp2(x * LOG2E)
LN2: tl.constexpr = 0.6931471805599453  # ln(2): turns a base-2 log-sum-exp back into natural log


@triton.jit
def _load_rows(ptrs, rows, n_rows, offs_d, HEAD_DIM: tl.constexpr, EVEN_ROWS: tl.constexpr, EVEN_D: tl.constexpr):
    """Load a [rows, BLOCK_D] tile; rows >= n_rows and columns >= HEAD_DIM read as 0."""
    if EVEN_ROWS:
        if EVEN_D:
            tile = tl.load(ptrs)
        else:
            tile = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    else:
        if EVEN_D:
            tile = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
        else:
            tile = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    return tile


@triton.jit
def _store_rows(ptrs, tile, rows, n_rows, offs_d,
                HEAD_DIM: tl.constexpr, EVEN_ROWS: tl.constexpr, EVEN_D: tl.constexpr):
    """Store a [rows, BLOCK_D] tile, skipping rows >= n_rows and columns >= HEAD_DIM."""
    if EVEN_ROWS:
        if EVEN_D:
            tl.store(ptrs, tile)
        else:
            tl.store(ptrs, tile, mask=offs_d[None, :] < HEAD_DIM)
    else:
        if EVEN_D:
            tl.store(ptrs, tile, mask=rows[:, None] < n_rows)
        else:
            tl.store(ptrs, tile, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _load_row_stat(ptrs, rows, n_rows, other, EVEN_ROWS: tl.constexpr):
    """Load a per-row fp32 statistic (lse, delta); rows >= n_rows read as `other`."""
    if EVEN_ROWS:
        stat = tl.load(ptrs)
    else:
        stat = tl.load(ptrs, mask=rows < n_rows, other=other)
    return stat


@triton.jit
def _key_range(start_m, seqlen_k, causal_offset, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """Key blocks a query block [start_m, start_m + BLOCK_M) needs, split in two stages.

    Returns (full_end, hi): keys [0, full_end) are visible to every row of the
    block and in bounds, so they need no mask; keys [full_end, hi) need the
    causal and/or key-bound mask. Keys >= hi are invisible to the whole block
    and are skipped, which is what makes causal attention cost half.
    Query i sees key j iff j <= i + causal_offset.
    """
    last_full = (seqlen_k // BLOCK_N) * BLOCK_N  # blocks past this one stick out of the sequence
    if CAUSAL:
        # a key block [n, n + BLOCK_N) is fully visible iff n + BLOCK_N - 1 <= start_m + causal_offset
        full_end = (tl.maximum(start_m + causal_offset + 1, 0) // BLOCK_N) * BLOCK_N
        full_end = tl.minimum(full_end, last_full)
        hi = tl.minimum(tl.maximum(start_m + BLOCK_M + causal_offset, 0), seqlen_k)
    else:
        full_end = last_full
        hi = seqlen_k
    return full_end, hi


@triton.jit
def _query_range(start_n, seqlen_q, causal_offset, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Causal query blocks a key block [start_n, start_n + BLOCK_N) receives gradient from.

    Returns (lo, mid): query blocks in [lo, mid) straddle the diagonal and need
    the causal mask; blocks in [mid, seqlen_q) see every key of the block.
    Queries below lo see none of these keys and are skipped.
    """
    first_row = tl.maximum(start_n - causal_offset, 0)  # first query that sees key start_n
    lo = (first_row // BLOCK_M) * BLOCK_M
    full_row = tl.maximum(start_n + BLOCK_N - 1 - causal_offset, 0)  # first query that sees the whole block
    mid = tl.minimum(((full_row + BLOCK_M - 1) // BLOCK_M) * BLOCK_M, seqlen_q)
    return lo, mid
