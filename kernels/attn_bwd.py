"""Attention backward: preprocess, dK/dV pass, dQ pass. No atomics, so bitwise deterministic.

With P = softmax(S), S = scale * Q Kᵀ, and the forward's row log-sum-exp L:
    P    = exp(S - L)              (recomputed per tile, never stored)
    dV   = Pᵀ dO
    dP   = dO Vᵀ
    dS   = P ∘ (dP - Δ),  Δ = rowsum(O ∘ dO) - dL
    dQ   = scale · dS K,  dK = scale · dSᵀ Q
dL is the gradient flowing into the returned LSE (zero when LSE is not used):
∂L_i/∂S_ij = P_ij, so it folds into Δ for free.

With a bias, S also has + bias and dBias = dS (summed over the bias's
broadcast dims). With softcap, S = c tanh(scale Q Kᵀ / c) and the gradient
reaching Q Kᵀ is dS ∘ (1 - tanh²). With dropout (keep mask Z, rate p), the forward used
P ∘ Z / (1 - p): dV = (P ∘ Z)ᵀ dO / (1 - p) and dP = Z ∘ (dO Vᵀ) / (1 - p); Δ is
unchanged because O already carries the dropout.

The dK/dV pass gives each program a block of keys (of one K/V head, looping
over the query heads that share it under GQA) and streams query blocks past
it; the dQ pass gives each program a block of queries and streams key blocks;
the optional dBias pass gives each program one tile of dBias and loops over
everything broadcast onto it. Each output tile is written by exactly one program.
"""

import triton
import triton.language as tl

from .attn_fwd import _seq_bounds
from .tiles import (
    LOG2E,
    _band_range,
    _dropout_keep,
    _dropout_seed,
    _load_row_stat,
    _load_rows,
    _program_ids,
    _score_mods,
    _stage_bounds,
    _store_rows,
    _stream_tile,
    _tile_ptrs,
)


@triton.jit
def _attn_bwd_preprocess(
    O, DO, DLSE, DELTA,
    stride_ob, stride_oh, stride_om,
    stride_dob, stride_doh, stride_dom,
    num_heads, seqlen_q, num_row_blocks,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    HAS_DLSE: tl.constexpr, EVEN_M: tl.constexpr, EVEN_D: tl.constexpr, FLAT_GRID: tl.constexpr,
):
    """DELTA[b, h, i] = sum_d O[b, h, i, d] * dO[b, h, i, d] - dLSE[b, h, i] (float32, contiguous)."""
    pid_m, pid_bh = _program_ids(num_row_blocks, FLAT_GRID)
    b64 = tl.cast(pid_bh // num_heads, tl.int64)
    h64 = tl.cast(pid_bh % num_heads, tl.int64)
    start_m = pid_m * BLOCK_M
    m64 = tl.cast(start_m, tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rows = start_m + offs_m

    o = _load_rows(_tile_ptrs(O + b64 * stride_ob + h64 * stride_oh, m64, offs_m, offs_d, stride_om),
                   rows, seqlen_q, offs_d, HEAD_DIM, EVEN_M, EVEN_D)
    do = _load_rows(_tile_ptrs(DO + b64 * stride_dob + h64 * stride_doh, m64, offs_m, offs_d, stride_dom),
                    rows, seqlen_q, offs_d, HEAD_DIM, EVEN_M, EVEN_D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    row_offs = tl.cast(pid_bh, tl.int64) * seqlen_q + rows
    if HAS_DLSE:
        delta -= _load_row_stat(DLSE + row_offs, rows, seqlen_q, 0.0, EVEN_M)
    if EVEN_M:
        tl.store(DELTA + row_offs, delta)
    else:
        tl.store(DELTA + row_offs, delta, mask=rows < seqlen_q)


@triton.jit
def _lse_log2(lse):
    """Natural LSE -> base 2. A row that saw no key has LSE = -inf; +inf makes its P exactly 0."""
    return tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)


@triton.jit
def _attn_bwd_ds(qk, do, v, lse2, delta, row_idx, col_idx, qk_scale, softcap_log2, alibi_slope,
                 bias_base, stride_biasm, stride_biasn, bh, seed, dropout_p,
                 seqlen_q, seqlen_k, offset, left, right,
                 SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, BIAS_KIND: tl.constexpr, DROPOUT: tl.constexpr,
                 KEY_BOUNDS: tl.constexpr, MASK_LEFT: tl.constexpr, MASK_RIGHT: tl.constexpr,
                 TRANSPOSED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """(P, dS_scores, dS_qk) for one tile from the raw dot products `qk`.

    Orientation: [queries, keys], or [keys, queries] when TRANSPOSED (the dK/dV
    pass), with row_idx / col_idx the matching index tiles and lse2 / delta
    broadcast along the query axis. P includes the dropout scaling (it is what
    multiplies dO into dV); dS_scores is the gradient of the final scores (what a
    bias receives); dS_qk is the gradient reaching scale * Q Kᵀ (softcap folded in).
    Masks go on before exp2, so hidden scores give exactly 0, never an overflow.
    """
    s, t = _score_mods(qk, row_idx, col_idx, qk_scale, softcap_log2, alibi_slope, bias_base, stride_biasm,
                       stride_biasn, seqlen_q, seqlen_k, offset, left, right,
                       SOFTCAP, ALIBI, BIAS_KIND, KEY_BOUNDS, MASK_LEFT, MASK_RIGHT)
    if TRANSPOSED:
        p = tl.exp2(s - lse2[None, :])
        delta_b = tl.broadcast_to(delta[None, :], s.shape)
    else:
        p = tl.exp2(s - lse2[:, None])
        delta_b = tl.broadcast_to(delta[:, None], s.shape)
    # without dropout the dP MMA's accumulator starts at -Δ: dP - Δ comes straight from the tensor cores
    # (and the Δ tile is not live across the MMA); dropout scales dP first
    dp_init = None if DROPOUT else -delta_b
    if TRANSPOSED:
        dp = tl.dot(v, tl.trans(do), dp_init, input_precision=DOT_PRECISION)
    else:
        dp = tl.dot(do, tl.trans(v), dp_init, input_precision=DOT_PRECISION)
    p_out = p
    if DROPOUT:  # row_idx is always the query index, col_idx the key's, whatever the orientation
        keep = _dropout_keep(seed, bh, row_idx, col_idx, dropout_p)
        inv_keep = 1.0 / (1.0 - dropout_p)
        p_out = tl.where(keep, p * inv_keep, 0.0)
        dp = tl.where(keep, dp * inv_keep, 0.0) - delta_b
    ds = p * dp
    ds_qk = ds
    if SOFTCAP:
        ds_qk = ds * (1.0 - t * t)
    return p_out, ds, ds_qk


@triton.jit
def _attn_bwd_dkdv_inner(
    dk, dv, k, v,
    q_base, do_base, lse_base, delta_base, stride_qm, stride_dom, bias_base, stride_biasm, stride_biasn, alibi_slope,
    cols, offs_d, bh, seed, dropout_p,
    lo, hi, seqlen_q, seqlen_k, offset, left, right, qk_scale, softcap_log2, q_b, q_h,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
    BIAS_KIND: tl.constexpr, DROPOUT: tl.constexpr, STREAM_DESC: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    offs_m = tl.arange(0, BLOCK_M)
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        q = _stream_tile(q_base, start_m, offs_m, offs_d, stride_qm, seqlen_q, q_b, q_h, HEAD_DIM, EVEN_M, EVEN_D,
                         STREAM_DESC, BLOCK_M, BLOCK_D)
        do = _stream_tile(do_base, start_m, offs_m, offs_d, stride_dom, seqlen_q, q_b, q_h, HEAD_DIM, EVEN_M, EVEN_D,
                          STREAM_DESC, BLOCK_M, BLOCK_D)
        # rows past seqlen_q read lse = -inf -> +inf -> P = 0: they add nothing
        lse2 = _lse_log2(_load_row_stat(lse_base + rows, rows, seqlen_q, float("-inf"), EVEN_M))
        delta = _load_row_stat(delta_base + rows, rows, seqlen_q, 0.0, EVEN_M)
        # transposed tiles [BLOCK_N, BLOCK_M]: keys are this program's rows; keys past
        # seqlen_k need no mask, their dK/dV rows are never stored
        qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)
        p_t, _, ds_t = _attn_bwd_ds(qk_t, do, v, lse2, delta, rows[None, :], cols[:, None], qk_scale, softcap_log2,
                                    alibi_slope, bias_base, stride_biasm, stride_biasn, bh, seed, dropout_p,
                                    seqlen_q, seqlen_k, offset, left, right, SOFTCAP, ALIBI, BIAS_KIND, DROPOUT,
                                    False, MASKED & HAS_LEFT, MASKED & HAS_RIGHT, True, DOT_PRECISION)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV, BIAS, ALIBI, CU_Q, CU_K, Q_DESC, DO_DESC,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_lseb, stride_lseh,
    stride_biasb, stride_biash, stride_biasm, stride_biasn,
    stride_alibib, stride_alibih,
    num_heads, kv_group, seqlen_q, seqlen_k, offset, window_left, window_right, num_row_blocks,
    qk_scale, softcap_log2, sm_scale, dropout_p, SEED,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI_ON: tl.constexpr,
    BIAS_KIND: tl.constexpr, DROPOUT: tl.constexpr, SEQ_MODE: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    STREAM_DESC: tl.constexpr, MASKED_BLOCK_M: tl.constexpr, FLAT_GRID: tl.constexpr,
):
    """dK, dV for BLOCK_N keys of one (sequence, K/V head), streaming the query blocks that see them.

    Under GQA the kv_group query heads sharing this K/V head are summed here, in
    a fixed order: deterministic, no atomics. Grid: (key blocks, sequences * H_kv), flat on axis 0 with FLAT_GRID.
    """
    pid_n, pid_bhkv = _program_ids(num_row_blocks, FLAT_GRID)
    seed = _dropout_seed(SEED, DROPOUT)
    num_kv_heads = num_heads // kv_group
    off_b = pid_bhkv // num_kv_heads
    off_hkv = pid_bhkv % num_kv_heads
    q_start, k_start, sq, sk, off = _seq_bounds(CU_Q, CU_K, CU_K, off_b, seqlen_q, seqlen_k, offset, SEQ_MODE)
    b64 = tl.cast(off_b, tl.int64)
    hkv64 = tl.cast(off_hkv, tl.int64)
    start_n = pid_n * BLOCK_N
    n64 = tl.cast(k_start + start_n, tl.int64)

    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    cols = start_n + offs_n

    # keys past this sequence load as 0; their dK/dV rows are computed but never stored
    k = _load_rows(_tile_ptrs(K + b64 * stride_kb + hkv64 * stride_kh, n64, offs_n, offs_d, stride_kn),
                   cols, sk, offs_d, HEAD_DIM, EVEN_N, EVEN_D)
    v = _load_rows(_tile_ptrs(V + b64 * stride_vb + hkv64 * stride_vh, n64, offs_n, offs_d, stride_vn),
                   cols, sk, offs_d, HEAD_DIM, EVEN_N, EVEN_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # queries that see these keys, seen from the keys' side: offset and window edges swap
    lo, full_lo, full_hi, hi = _band_range(start_n, sq, -off, window_right, window_left, BLOCK_N, BLOCK_M,
                                           HAS_RIGHT, HAS_LEFT)
    hi = tl.where(start_n < sk, hi, 0)
    for g in range(0, kv_group):
        off_h = off_hkv * kv_group + g
        h64 = tl.cast(off_h, tl.int64)
        bh = off_b * num_heads + off_h
        q_ptrs = Q + b64 * stride_qb + h64 * stride_qh + tl.cast(q_start, tl.int64) * stride_qm
        do_ptrs = DO + b64 * stride_dob + h64 * stride_doh + tl.cast(q_start, tl.int64) * stride_dom
        lse_base = LSE + b64 * stride_lseb + h64 * stride_lseh + q_start
        delta_base = DELTA + b64 * stride_lseb + h64 * stride_lseh + q_start
        bias_base = 0  # absent tensors come as None; nothing reads them when their flag is off
        if BIAS_KIND != 0:
            bias_base = BIAS + b64 * stride_biasb + h64 * stride_biash
        alibi_slope = 0.0
        if ALIBI_ON:
            alibi_slope = tl.load(ALIBI + b64 * stride_alibib + h64 * stride_alibih).to(tl.float32)
        # the queries in three stages, seen from the keys: the masked near edge (only with a right bound,
        # e.g. causal), the unmasked middle (queries that see every key of the block), the masked far edge
        # (the far edge is empty, so not even compiled, when every query block is full and no window bounds it)
        for stage in tl.static_range(0 if HAS_RIGHT else 1, 3 if HAS_LEFT or not EVEN_M else 2):
            stage_lo, stage_hi = _stage_bounds(lo, full_lo, full_hi, hi, stage)
            if STREAM_DESC and stage == 1:  # dense (B, H, Sq, D) descriptors, addressed by coordinates
                q_base = Q_DESC
                do_base = DO_DESC
            else:  # the masked stages step over MASKED_BLOCK_M rows, a box the descriptors do not have
                q_base = q_ptrs
                do_base = do_ptrs
            dk, dv = _attn_bwd_dkdv_inner(
                dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom,
                bias_base, stride_biasm, stride_biasn, alibi_slope, cols, offs_d, bh, seed, dropout_p,
                stage_lo, stage_hi, sq, sk, off, window_left, window_right, qk_scale, softcap_log2, off_b, off_h,
                HEAD_DIM=HEAD_DIM, BLOCK_M=BLOCK_M if stage == 1 else MASKED_BLOCK_M, BLOCK_D=BLOCK_D,
                MASKED=stage != 1, HAS_LEFT=HAS_LEFT,
                HAS_RIGHT=HAS_RIGHT, SOFTCAP=SOFTCAP, ALIBI=ALIBI_ON, BIAS_KIND=BIAS_KIND, DROPOUT=DROPOUT,
                STREAM_DESC=STREAM_DESC & (stage == 1), EVEN_M=EVEN_M, EVEN_D=EVEN_D, DOT_PRECISION=DOT_PRECISION,
            )

    dk *= sm_scale
    _store_rows(_tile_ptrs(DK + b64 * stride_dkb + hkv64 * stride_dkh, k_start + start_n, offs_n, offs_d, stride_dkn),
                dk.to(DK.dtype.element_ty), cols, sk, offs_d, HEAD_DIM, EVEN_N, EVEN_D)
    _store_rows(_tile_ptrs(DV + b64 * stride_dvb + hkv64 * stride_dvh, k_start + start_n, offs_n, offs_d, stride_dvn),
                dv.to(DV.dtype.element_ty), cols, sk, offs_d, HEAD_DIM, EVEN_N, EVEN_D)


@triton.jit
def _attn_bwd_dq_inner(
    dq, q, do, lse2, delta,
    k_base, v_base, stride_kn, stride_vn, bias_base, stride_biasm, stride_biasn, alibi_slope,
    rows, offs_n, offs_d, bh, seed, dropout_p,
    lo, hi, seqlen_q, seqlen_k, offset, left, right, qk_scale, softcap_log2, kv_b, kv_h,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
    BIAS_KIND: tl.constexpr, DROPOUT: tl.constexpr, STREAM_DESC: tl.constexpr, EVEN_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k = _stream_tile(k_base, start_n, offs_n, offs_d, stride_kn, seqlen_k, kv_b, kv_h, HEAD_DIM, not MASKED,
                         EVEN_D, STREAM_DESC, BLOCK_N, BLOCK_D)
        v = _stream_tile(v_base, start_n, offs_n, offs_d, stride_vn, seqlen_k, kv_b, kv_h, HEAD_DIM, not MASKED,
                         EVEN_D, STREAM_DESC, BLOCK_N, BLOCK_D)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        # keys past seqlen_k must go too: their zero scores could overflow exp2, and 0 * inf = NaN
        _, _, ds = _attn_bwd_ds(qk, do, v, lse2, delta, rows[:, None], cols[None, :], qk_scale, softcap_log2,
                                alibi_slope, bias_base, stride_biasm, stride_biasn, bh, seed, dropout_p,
                                seqlen_q, seqlen_k, offset, left, right, SOFTCAP, ALIBI, BIAS_KIND, DROPOUT,
                                MASKED, MASKED & HAS_LEFT, MASKED & HAS_RIGHT, False, DOT_PRECISION)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq(
    Q, K, V, DO, LSE, DELTA, DQ, BIAS, ALIBI, CU_Q, CU_K, K_DESC, V_DESC,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_dqb, stride_dqh, stride_dqm,
    stride_lseb, stride_lseh,
    stride_biasb, stride_biash, stride_biasm, stride_biasn,
    stride_alibib, stride_alibih,
    num_heads, kv_group, seqlen_q, seqlen_k, offset, window_left, window_right, num_row_blocks,
    qk_scale, softcap_log2, sm_scale, dropout_p, SEED,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI_ON: tl.constexpr,
    BIAS_KIND: tl.constexpr, DROPOUT: tl.constexpr, SEQ_MODE: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr, STREAM_DESC: tl.constexpr,
    FLAT_GRID: tl.constexpr,
):
    """dQ for BLOCK_M queries of one (sequence, head), streaming the key blocks they see.

    Grid: (query blocks, sequences * heads), flat on axis 0 with FLAT_GRID.
    """
    pid_m, pid_bh = _program_ids(num_row_blocks, FLAT_GRID)
    seed = _dropout_seed(SEED, DROPOUT)
    off_b = pid_bh // num_heads
    off_h = pid_bh % num_heads
    q_start, k_start, sq, sk, off = _seq_bounds(CU_Q, CU_K, CU_K, off_b, seqlen_q, seqlen_k, offset, SEQ_MODE)
    b64 = tl.cast(off_b, tl.int64)
    h64 = tl.cast(off_h, tl.int64)
    hkv64 = tl.cast(off_h // kv_group, tl.int64)
    start_m = pid_m * BLOCK_M
    m64 = tl.cast(q_start + start_m, tl.int64)

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows = start_m + offs_m

    q = _load_rows(_tile_ptrs(Q + b64 * stride_qb + h64 * stride_qh, m64, offs_m, offs_d, stride_qm),
                   rows, sq, offs_d, HEAD_DIM, EVEN_M, EVEN_D)
    do = _load_rows(_tile_ptrs(DO + b64 * stride_dob + h64 * stride_doh, m64, offs_m, offs_d, stride_dom),
                    rows, sq, offs_d, HEAD_DIM, EVEN_M, EVEN_D)
    row_base = b64 * stride_lseb + h64 * stride_lseh + q_start
    lse2 = _lse_log2(_load_row_stat(LSE + row_base + rows, rows, sq, float("-inf"), EVEN_M))
    delta = _load_row_stat(DELTA + row_base + rows, rows, sq, 0.0, EVEN_M)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    if STREAM_DESC:  # dense (B, H_kv, Sk, D) descriptors, addressed by coordinates
        k_base = K_DESC
        v_base = V_DESC
    else:
        k_base = K + b64 * stride_kb + hkv64 * stride_kh + tl.cast(k_start, tl.int64) * stride_kn
        v_base = V + b64 * stride_vb + hkv64 * stride_vh + tl.cast(k_start, tl.int64) * stride_vn
    bias_base = 0
    if BIAS_KIND != 0:
        bias_base = BIAS + b64 * stride_biasb + h64 * stride_biash
    alibi_slope = 0.0
    if ALIBI_ON:
        alibi_slope = tl.load(ALIBI + b64 * stride_alibib + h64 * stride_alibih).to(tl.float32)
    bh = off_b * num_heads + off_h
    lo, full_lo, full_hi, hi = _band_range(start_m, sk, off, window_left, window_right, BLOCK_M, BLOCK_N,
                                           HAS_LEFT, HAS_RIGHT)
    hi = tl.where(start_m < sq, hi, 0)
    # the keys in three stages: the window's masked left edge (only with a left bound), the unmasked middle,
    # the masked right edge (causal diagonal / window edge, ragged last block)
    for stage in tl.static_range(0 if HAS_LEFT else 1, 3):
        stage_lo, stage_hi = _stage_bounds(lo, full_lo, full_hi, hi, stage)
        dq = _attn_bwd_dq_inner(
            dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, bias_base, stride_biasm, stride_biasn,
            alibi_slope, rows, offs_n, offs_d, bh, seed, dropout_p, stage_lo, stage_hi, sq, sk, off,
            window_left, window_right, qk_scale, softcap_log2, off_b, off_h // kv_group,
            HEAD_DIM=HEAD_DIM, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, MASKED=stage != 1, HAS_LEFT=HAS_LEFT,
            HAS_RIGHT=HAS_RIGHT, SOFTCAP=SOFTCAP, ALIBI=ALIBI_ON, BIAS_KIND=BIAS_KIND, DROPOUT=DROPOUT,
            STREAM_DESC=STREAM_DESC, EVEN_D=EVEN_D, DOT_PRECISION=DOT_PRECISION,
        )

    dq *= sm_scale
    _store_rows(_tile_ptrs(DQ + b64 * stride_dqb + h64 * stride_dqh, m64, offs_m, offs_d, stride_dqm),
                dq.to(DQ.dtype.element_ty), rows, sq, offs_d, HEAD_DIM, EVEN_M, EVEN_D)


@triton.jit
def _attn_bwd_dbias(
    Q, K, V, DO, LSE, DELTA, BIAS, DBIAS, ALIBI,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_biasb, stride_biash, stride_biasm, stride_biasn,
    stride_dbb, stride_dbh, stride_dbm, stride_dbn,
    stride_alibib, stride_alibih,
    batch, num_heads, kv_group, seqlen_q, seqlen_k, offset, window_left, window_right, num_row_blocks,
    num_col_blocks,
    qk_scale, softcap_log2, dropout_p, SEED,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI_ON: tl.constexpr,
    DROPOUT: tl.constexpr,
    BCAST_B: tl.constexpr, BCAST_H: tl.constexpr, BCAST_M: tl.constexpr, BCAST_N: tl.constexpr,
    EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr, FLAT_GRID: tl.constexpr,
):
    """One tile of dBias = dS, summed over the dims the bias broadcasts along (BCAST_*).

    DBIAS is float32 with size 1 on broadcast dims. The grid is (row tiles, column tiles,
    DBIAS's batch*heads), or all three on axis 0 with FLAT_GRID, row tiles fastest; a broadcast dim
    is looped over inside the program, so every element is a fixed-order sum: deterministic. Dense
    layout only.
    """
    if FLAT_GRID:
        pid_m, pid_rest = _program_ids(num_row_blocks, FLAT_GRID)
        pid_n = pid_rest % num_col_blocks
        pid_bh = pid_rest // num_col_blocks
    else:
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_bh = tl.program_id(2)
    seed = _dropout_seed(SEED, DROPOUT)
    out_heads = 1 if BCAST_H else num_heads
    out_b = pid_bh // out_heads
    out_h = pid_bh % out_heads
    b_lo = 0 if BCAST_B else out_b
    b_hi = batch if BCAST_B else out_b + 1
    h_lo = 0 if BCAST_H else out_h
    h_hi = num_heads if BCAST_H else out_h + 1
    m_lo = 0 if BCAST_M else pid_m * BLOCK_M
    m_hi = seqlen_q if BCAST_M else pid_m * BLOCK_M + 1
    n_lo = 0 if BCAST_N else pid_n * BLOCK_N
    n_hi = seqlen_k if BCAST_N else pid_n * BLOCK_N + 1

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for off_b in range(b_lo, b_hi):
        b64 = tl.cast(off_b, tl.int64)
        for off_h in range(h_lo, h_hi):
            h64 = tl.cast(off_h, tl.int64)
            hkv64 = tl.cast(off_h // kv_group, tl.int64)
            bh = off_b * num_heads + off_h
            bias_base = BIAS + b64 * stride_biasb + h64 * stride_biash
            q_base = Q + b64 * stride_qb + h64 * stride_qh
            do_base = DO + b64 * stride_dob + h64 * stride_doh
            k_base = K + b64 * stride_kb + hkv64 * stride_kh
            v_base = V + b64 * stride_vb + hkv64 * stride_vh
            alibi_slope = 0.0
            if ALIBI_ON:
                alibi_slope = tl.load(ALIBI + b64 * stride_alibib + h64 * stride_alibih).to(tl.float32)
            for start_m in range(m_lo, m_hi, BLOCK_M):
                rows = start_m + offs_m
                q = _load_rows(_tile_ptrs(q_base, start_m, offs_m, offs_d, stride_qm),
                               rows, seqlen_q, offs_d, HEAD_DIM, False, EVEN_D)
                do = _load_rows(_tile_ptrs(do_base, start_m, offs_m, offs_d, stride_dom),
                                rows, seqlen_q, offs_d, HEAD_DIM, False, EVEN_D)
                row_offs = tl.cast(bh, tl.int64) * seqlen_q + rows
                lse2 = _lse_log2(_load_row_stat(LSE + row_offs, rows, seqlen_q, float("-inf"), False))
                delta = _load_row_stat(DELTA + row_offs, rows, seqlen_q, 0.0, False)
                for start_n in range(n_lo, n_hi, BLOCK_N):
                    cols = start_n + offs_n
                    k = _load_rows(_tile_ptrs(k_base, start_n, offs_n, offs_d, stride_kn),
                                   cols, seqlen_k, offs_d, HEAD_DIM, False, EVEN_D)
                    v = _load_rows(_tile_ptrs(v_base, start_n, offs_n, offs_d, stride_vn),
                                   cols, seqlen_k, offs_d, HEAD_DIM, False, EVEN_D)
                    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
                    _, ds, _ = _attn_bwd_ds(qk, do, v, lse2, delta, rows[:, None], cols[None, :], qk_scale,
                                            softcap_log2, alibi_slope, bias_base, stride_biasm, stride_biasn, bh,
                                            seed, dropout_p, seqlen_q, seqlen_k, offset, window_left, window_right,
                                            SOFTCAP, ALIBI_ON, 2, DROPOUT, True, HAS_LEFT, HAS_RIGHT, False,
                                            DOT_PRECISION)
                    if BCAST_M:
                        ds = tl.broadcast_to(tl.sum(ds, 0)[None, :], (BLOCK_M, BLOCK_N))
                    if BCAST_N:
                        ds = tl.broadcast_to(tl.sum(ds, 1)[:, None], (BLOCK_M, BLOCK_N))
                    acc += ds

    # with a broadcast row (column) dim every row (column) of acc holds the same sum: store one
    out_rows = (0 if BCAST_M else pid_m * BLOCK_M) + offs_m
    out_cols = (0 if BCAST_N else pid_n * BLOCK_N) + offs_n
    n_rows = 1 if BCAST_M else seqlen_q
    n_cols = 1 if BCAST_N else seqlen_k
    ptrs = (DBIAS + tl.cast(out_b, tl.int64) * stride_dbb + tl.cast(out_h, tl.int64) * stride_dbh
            + tl.cast(out_rows, tl.int64)[:, None] * stride_dbm + out_cols[None, :] * stride_dbn)
    tl.store(ptrs, acc, mask=(out_rows[:, None] < n_rows) & (out_cols[None, :] < n_cols))
