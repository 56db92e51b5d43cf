"""Tile helpers shared by the forward and backward kernels.

Everything here is `@triton.jit`; the `EVEN_*` flags are constexpr so the
common case (lengths that are block multiples, power-of-two head dims)
compiles to unmasked loads.
"""

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): exp(x) == exp2(x * LOG2E)
LN2 = tl.constexpr(0.6931471805599453)  # ln(2): turns a base-2 log-sum-exp back into natural log
# The forward rescales its running sums only when a row max grows by more than this (log2 units): until
# then P = exp2(s - stale max) <= 2**8, far from fp16's 65504 and exact to rounding in the fp32 sums.
RESCALE_THRESHOLD = tl.constexpr(8.0)


@triton.jit
def _program_ids(num_row_blocks, FLAT_GRID: tl.constexpr):
    """(row block, batch * head) of this program.

    Grid (row blocks, B * H, ...) as long as B * H fits CUDA's 65,535 on axis 1. Past it (decode at
    B1024 H64, a B4096 H16 batch, thousands of packed sequences) FLAT_GRID puts both on axis 0
    (2**31 - 1 programs), row blocks fastest, so neighbouring programs still share one head's K/V.
    The common case keeps the two-axis grid: the flat decomposition costs triton 3.6's causal dK/dV
    loop 2% in the codegen report.
    """
    if FLAT_GRID:
        pid = tl.program_id(0)
        bh = pid // num_row_blocks
        row_block = pid - bh * num_row_blocks
    else:
        row_block = tl.program_id(0)
        bh = tl.program_id(1)
    return row_block, bh


@triton.jit
def _tile_ptrs(base, start, offs, offs_d, stride):
    """Pointers to rows start + offs (x head dim offs_d) of a slab with row `stride` and unit last stride.

    `start * stride` is taken in 64 bit: on long sequences it can pass 2**31.
    """
    return base + tl.cast(start, tl.int64) * stride + offs[:, None] * stride + offs_d[None, :]


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
def _stream_tile(base, start, offs, offs_d, stride, n_rows, coord_b, coord_h,
                 HEAD_DIM: tl.constexpr, EVEN_ROWS: tl.constexpr, EVEN_D: tl.constexpr, DESC: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows [start, start + BLOCK_R) of an operand a loop streams; rows >= n_rows and columns >= HEAD_DIM read as 0.

    DESC: `base` is a (B, H, S, D) tensor descriptor (TMA on Hopper), read at (coord_b, coord_h,
    start, 0) in one bulk copy; the hardware zero-fills what is out of bounds and no thread
    computes an address. Otherwise `base` points at the head's row 0 and rows are loaded by pointer.
    """
    if DESC:
        tile = base.load([coord_b, coord_h, start, 0]).reshape(BLOCK_R, BLOCK_D)
    else:
        tile = _load_rows(_tile_ptrs(base, start, offs, offs_d, stride), start + offs, n_rows, offs_d, HEAD_DIM,
                          EVEN_ROWS, EVEN_D)
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
def _band_range(start, n_cols, offset, left, right, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Column blocks a row block [start, start + BLOCK_R) needs, in three stages.

    Row r sees column c iff r + offset - left <= c <= r + offset + right (a bound
    is absent when its HAS_ flag is off; causal is right = 0). Returns
    (lo, full_lo, full_hi, hi): columns [full_lo, full_hi) are visible to every
    row and in bounds, so they need no mask; [lo, min(full_lo, hi)) and
    [max(full_lo, full_hi), hi) are the masked edges (the window's left edge, the
    diagonal and the ragged last block). Columns outside [lo, hi) are invisible
    to the whole block and never visited: that is why causal costs half and a
    sliding window costs O(S * window).

    Queries against keys use (offset, left, right); keys against queries (the
    dK/dV pass) use (-offset, right, left) with the flags swapped.
    """
    last_full = (n_cols // BLOCK_C) * BLOCK_C  # blocks from here on stick out of the sequence
    if HAS_LEFT:
        first = tl.maximum(start + offset - left, 0)  # first column the first row sees
        lo = (first // BLOCK_C) * BLOCK_C
        all_from = tl.maximum(start + BLOCK_R - 1 + offset - left, 0)  # first column the last row sees
        full_lo = ((all_from + BLOCK_C - 1) // BLOCK_C) * BLOCK_C
    else:
        lo = 0
        full_lo = 0
    if HAS_RIGHT:
        hi = tl.minimum(tl.maximum(start + BLOCK_R + offset + right, 0), n_cols)
        full_hi = tl.minimum((tl.maximum(start + offset + right + 1, 0) // BLOCK_C) * BLOCK_C, last_full)
    else:
        hi = n_cols
        full_hi = last_full
    return lo, full_lo, full_hi, hi


@triton.jit
def _stage_bounds(lo, full_lo, full_hi, hi, STAGE: tl.constexpr):
    """[start, end) of one stage of the band walk `_band_range` returns (loop it with tl.static_range(3)).

    Stage 0: the masked near edge (a window's left edge); 1: the unmasked middle;
    2: the masked far edge (the causal diagonal / the window's right edge and the
    ragged last block). The stages never overlap and cover [lo, hi).
    """
    if STAGE == 0:
        start = lo
        end = tl.minimum(full_lo, hi)
    elif STAGE == 1:
        start = tl.maximum(full_lo, lo)
        end = tl.minimum(full_hi, hi)
    else:
        start = tl.maximum(tl.maximum(full_lo, full_hi), lo)
        end = hi
    return start, end


@triton.jit
def _tanh(x):
    """tanh to a few ulp in fp32, from exp2 alone (libdevice is not on every backend).

    (1 - e) / (1 + e) with e = exp(-2|x|) loses digits to cancellation near 0, so
    |x| < 0.25 takes the odd Taylor series through x^9 (next term < 1e-8 relative).
    """
    a = tl.abs(x)
    e = tl.exp2(a * (-2.0 * LOG2E))
    far = (1.0 - e) / (1.0 + e)
    a2 = a * a
    near = a * (1.0 + a2 * (-0.3333333333333333 + a2 * (0.13333333333333333 + a2 * (
        -0.05396825396825397 + a2 * 0.021869488536155203))))
    t = tl.where(a < 0.25, near, far)
    return tl.where(x < 0, -t, t)


@triton.jit
def _score_mods(qk, row_idx, col_idx, qk_scale, softcap_log2, alibi_slope, bias_base, stride_biasm, stride_biasn,
                seqlen_q, seqlen_k, offset, left, right,
                SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, BIAS_KIND: tl.constexpr,
                KEY_BOUNDS: tl.constexpr, MASK_LEFT: tl.constexpr, MASK_RIGHT: tl.constexpr):
    """Raw dot products -> base-2 scores, in the documented order.

    s = scale * qk; softcap: s = c * tanh(s / c); ALiBi: s -= slope * |i + offset - j|;
    bias: s += bias (float) or s = -inf where a boolean mask is False; then the
    structural masks (key bounds, window/causal edges) give -inf. `row_idx` and
    `col_idx` are broadcastable index tiles in whatever orientation `qk` has.
    With SOFTCAP the host passes qk_scale = scale / c and softcap_log2 = c * log2(e),
    otherwise qk_scale = scale * log2(e). Returns (s, t) with t = tanh(scale * qk / c)
    for the softcap derivative (t is s itself when SOFTCAP is off).

    A bias broadcast along a dim has stride 0 there, so a (B, 1, 1, Sk)
    key-padding mask costs one small vector load per tile.
    """
    if SOFTCAP:
        t = _tanh(qk * qk_scale)
        s = t * softcap_log2
    else:
        s = qk * qk_scale
        t = s
    if ALIBI:
        s -= (alibi_slope * LOG2E) * tl.abs(row_idx + offset - col_idx).to(tl.float32)
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
    if MASK_LEFT:
        s = tl.where(col_idx >= row_idx + offset - left, s, float("-inf"))
    if MASK_RIGHT:
        s = tl.where(col_idx <= row_idx + offset + right, s, float("-inf"))
    return s, t


@triton.jit
def _dropout_seed(SEED, DROPOUT: tl.constexpr):
    """The call's Philox key, read from device memory; 0 without dropout.

    A device tensor, not a launch argument: the host draws it with torch's generator on the
    device (no host read), so a captured CUDA graph or a compiled step draws a fresh key on
    every replay, and the backward reads the very key its forward used.
    """
    seed = 0
    if DROPOUT:
        seed = tl.load(SEED)
    return seed


@triton.jit
def _dropout_keep(seed, bh, row_idx, col_idx, dropout_p):
    """Bernoulli(1 - dropout_p) keep mask for (batch*head, row, col), from Philox keyed by `seed`.

    The counter is (col, row, batch*head, 0), so forward and both backward passes
    regenerate the same mask in any tile orientation, and no Sq x Sk mask is stored.
    """
    zero = row_idx * 0 + col_idx * 0
    r0, _, _, _ = tl.philox(seed, col_idx + zero, row_idx + zero, bh + zero, zero)
    return tl.uint_to_uniform_float(r0) >= dropout_p
