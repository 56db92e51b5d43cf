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


@triton.jit
def _score_mods(s, row_idx, col_idx, bias_base, stride_biasm, stride_biasn, seqlen_q, seqlen_k, causal_offset,
                BIAS_KIND: tl.constexpr, KEY_BOUNDS: tl.constexpr, CAUSAL_MASK: tl.constexpr):
    """Apply the bias / mask and the structural masks to a tile of base-2 scores.

    `row_idx` and `col_idx` are broadcastable index tiles (query rows and key
    columns) in whatever orientation `s` has. BIAS_KIND: 0 none, 1 boolean mask
    (nonzero = take part), 2 additive float bias in natural-log units. A bias
    broadcast along a dim has stride 0 there, so a (B, 1, 1, Sk) key-padding
    mask costs one small vector load per tile. Hidden entries become -inf.
    """
    if BIAS_KIND != 0:
        ptrs = bias_base + tl.cast(row_idx, tl.int64) * stride_biasm + tl.cast(col_idx, tl.int64) * stride_biasn
        in_bounds = (row_idx < seqlen_q) & (col_idx < seqlen_k)
        if BIAS_KIND == 1:
            keep = tl.load(ptrs, mask=in_bounds, other=0) != 0
            s = tl.where(keep, s, float("-inf"))
        else:
            s += tl.load(ptrs, mask=in_bounds, other=0.0).to(tl.float32) * LOG2E
    if KEY_BOUNDS:
        s = tl.where(col_idx < seqlen_k, s, float("-inf"))
    if CAUSAL_MASK:
        s = tl.where(col_idx <= row_idx + causal_offset, s, float("-inf"))
    return s


@triton.jit
def _dropout_keep(seed, bh, row_idx, col_idx, dropout_p):
    """Bernoulli(1 - dropout_p) keep mask for (batch*head, row, col), from Philox keyed by `seed`.

    The counter is (col, row, batch*head, 0), so forward and both backward passes
    regenerate the same mask in any tile orientation, and no Sq x Sk mask is stored.
    """
    zero = row_idx * 0 + col_idx * 0
    r0, _, _, _ = tl.philox(seed, col_idx + zero, row_idx + zero, bh + zero, zero)
    return tl.uint_to_uniform_float(r0) >= dropout_p
