"""Attention forward: tiled online softmax, writes O and the row log-sum-exp.

One program computes BLOCK_M query rows of one (sequence, head) against the key
blocks that row block can see. Scores live in the base-2 domain (`scale *
log2(e)` folded into one multiply) so the softmax uses `exp2`. The band of
visible keys is walked in three stages: the masked left edge of a sliding
window, the unmasked middle, and the masked right edge (the causal diagonal and
the ragged last block); blocks outside the band are never visited. In the
unmasked middle the accumulator is rescaled only when a row maximum grows by
more than 2**8 (RESCALE_THRESHOLD); the running max may lag behind until then,
which changes nothing in O or LSE.

Optional features are constexpr-specialised and cost nothing when off:
grouped K/V heads (GQA: query head h reads K/V head h // kv_group), sliding
window / causal edges, softcap, ALiBi, a bias or boolean mask tile loaded per
block through broadcast strides, dropout regenerated from a Philox seed,
packed variable-length sequences (SEQ_MODE 1, cu_seqlens), per-sequence key
lengths over a KV cache (SEQ_MODE 2), a paged KV cache (PAGED, block table),
and split-K over the keys (flash-decoding: each split writes a partial O and LSE
that the host merges by their LSE).
"""

import triton
import triton.language as tl

from .tiles import (
    LN2,
    RESCALE_THRESHOLD,
    _band_range,
    _dropout_keep,
    _dropout_seed,
    _load_rows,
    _program_ids,
    _score_mods,
    _stage_bounds,
    _store_rows,
    _stream_tile,
    _tile_ptrs,
)


@triton.jit
def _kv_tile(base, start_n, offs_n, offs_d, stride_n, seqlen_k, table_row, stride_table, stride_page, page_size,
             kv_b, kv_h, HEAD_DIM: tl.constexpr, EVEN_ROWS: tl.constexpr, EVEN_D: tl.constexpr, PAGED: tl.constexpr,
             DESC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """K or V rows [start_n, start_n + BLOCK_N) of one head; rows >= seqlen_k read as 0.

    DESC: `base` is a (B, H_kv, Sk, D) tensor descriptor (TMA on Hopper), read at
    (kv_b, kv_h, start_n, 0); see `_stream_tile`.
    PAGED: row j lives in page table_row[j // page_size] at slot j % page_size
    (`base` is then the head's offset inside a page and `stride_page` a page's stride).
    """
    if PAGED:
        cols = start_n + offs_n
        page = tl.load(table_row + (cols // page_size) * stride_table, mask=cols < seqlen_k, other=0)
        ptrs = (base + tl.cast(page, tl.int64)[:, None] * stride_page + (cols % page_size)[:, None] * stride_n
                + offs_d[None, :])
        tile = _load_rows(ptrs, cols, seqlen_k, offs_d, HEAD_DIM, False, EVEN_D)
    else:
        tile = _stream_tile(base, start_n, offs_n, offs_d, stride_n, seqlen_k, kv_b, kv_h, HEAD_DIM, EVEN_ROWS,
                            EVEN_D, DESC, BLOCK_N, BLOCK_D)
    return tile


@triton.jit
def _attn_fwd_inner(
    acc, l_i, m_i, q,
    k_base, v_base, stride_kn, stride_vn, table_row, stride_table, stride_kpage, stride_vpage, page_size,
    bias_base, stride_biasm, stride_biasn, alibi_slope,
    rows, offs_n, offs_d, bh, seed, dropout_p,
    lo, hi, seqlen_q, seqlen_k, offset, left, right, qk_scale, softcap_log2, kv_b, kv_h,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
    BIAS_KIND: tl.constexpr, DROPOUT: tl.constexpr, PAGED: tl.constexpr, STREAM_DESC: tl.constexpr,
    EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr, FOLD_SCALE: tl.constexpr, NEG_SCALE: tl.constexpr,
):
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k = _kv_tile(k_base, start_n, offs_n, offs_d, stride_kn, seqlen_k, table_row, stride_table, stride_kpage,
                     page_size, kv_b, kv_h, HEAD_DIM, not MASKED, EVEN_D, PAGED, STREAM_DESC, BLOCK_N, BLOCK_D)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if FOLD_SCALE:
            # unmasked tile, no score modifier: the row max is taken on the raw products and the scale
            # rides in the exp2's argument as one FMA per score (for scale < 0 the max is the scaled min)
            if NEG_SCALE:
                m_tile = tl.min(qk, 1) * qk_scale
            else:
                m_tile = tl.max(qk, 1) * qk_scale
            # rescale only when some row's max grows by more than RESCALE_THRESHOLD (FlashAttention-4):
            # otherwise the stale max stays the reference, P runs up to 2**8 and O = acc / l is unchanged.
            # The test is block-uniform, so most tiles skip the accumulator's multiplies; NaN rescales too.
            if not (tl.max(m_tile - m_i, 0) <= RESCALE_THRESHOLD):
                m_new = tl.maximum(m_i, m_tile)
                alpha = tl.exp2(m_i - m_new)
                acc = acc * alpha[:, None]
                l_i = l_i * alpha
                m_i = m_new
            p = tl.exp2(qk * qk_scale - m_i[:, None])
            l_i += tl.sum(p, 1)
        else:
            s, _ = _score_mods(qk, rows[:, None], cols[None, :], qk_scale, softcap_log2, alibi_slope,
                               bias_base, stride_biasm, stride_biasn, seqlen_q, seqlen_k, offset, left, right,
                               SOFTCAP, ALIBI, BIAS_KIND, MASKED, MASKED & HAS_LEFT, MASKED & HAS_RIGHT)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            if MASKED or BIAS_KIND != 0:
                # a row that has seen no key yet keeps m = -inf; shift by 0 so exp2 gives 0, not NaN
                m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            else:
                m_shift = m_new
            p = tl.exp2(s - m_shift[:, None])
            alpha = tl.exp2(m_i - m_shift)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            m_i = m_new
        if DROPOUT:  # the normaliser above counts dropped entries too
            p = tl.where(_dropout_keep(seed, bh, rows[:, None], cols[None, :], dropout_p), p, 0.0)
        v = _kv_tile(v_base, start_n, offs_n, offs_d, stride_vn, seqlen_k, table_row, stride_table, stride_vpage,
                     page_size, kv_b, kv_h, HEAD_DIM, not MASKED, EVEN_D, PAGED, STREAM_DESC, BLOCK_N, BLOCK_D)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, l_i, m_i


@triton.jit
def _seq_bounds(CU_Q, CU_K, SEQLENS_K, off_b, seqlen_q, seqlen_k, offset, SEQ_MODE: tl.constexpr):
    """(q_start, k_start, this sequence's Sq, Sk, alignment offset).

    SEQ_MODE 0: one dense batch, offset as given. 1: packed sequences, from
    cu_seqlens, bottom-right aligned per sequence. 2: dense queries over a KV
    cache whose length per sequence is SEQLENS_K[b], bottom-right aligned.
    """
    if SEQ_MODE == 1:
        q_start = tl.load(CU_Q + off_b)
        k_start = tl.load(CU_K + off_b)
        sq = tl.load(CU_Q + off_b + 1) - q_start
        sk = tl.load(CU_K + off_b + 1) - k_start
        off = sk - sq
    elif SEQ_MODE == 2:
        q_start = 0
        k_start = 0
        sq = seqlen_q
        sk = tl.load(SEQLENS_K + off_b)
        off = sk - sq
    else:
        q_start = 0
        k_start = 0
        sq = seqlen_q
        sk = seqlen_k
        off = offset
    return q_start, k_start, sq, sk, off


@triton.jit
def _attn_fwd(
    Q, K, V, O, LSE, BIAS, ALIBI, CU_Q, CU_K, SEQLENS_K, BLOCK_TABLE, K_DESC, V_DESC,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_os, stride_ob, stride_oh, stride_om,
    stride_lses, stride_lseb, stride_lseh,
    stride_biasb, stride_biash, stride_biasm, stride_biasn,
    stride_alibib, stride_alibih,
    stride_tableb, stride_tablep,
    num_heads, kv_group, seqlen_q, seqlen_k, offset, window_left, window_right,
    qk_scale, softcap_log2, dropout_p, SEED, page_size, split_len, num_row_blocks,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI_ON: tl.constexpr,
    BIAS_KIND: tl.constexpr, DROPOUT: tl.constexpr, SEQ_MODE: tl.constexpr, PAGED: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    PLAIN_SCORES: tl.constexpr, NEG_SCALE: tl.constexpr, STREAM_DESC: tl.constexpr, FLAT_GRID: tl.constexpr,
):
    """O = softmax(scores) V and LSE = natural log-sum-exp of the scores, per query row.

    Grid: (query blocks, sequences * heads, splits), or (query blocks * sequences * heads, splits)
    with FLAT_GRID (`_program_ids`). Query i sees key j iff
    i + offset - window_left <= j <= i + offset + window_right (absent bounds when
    HAS_LEFT / HAS_RIGHT are off; causal is window_right = 0). Rows that see no
    key get O = 0 and LSE = -inf. With dropout, O is (P ∘ keep) V / (1 - p) and
    LSE is that of the undropped P. Split s covers keys [s * split_len, (s + 1) * split_len).
    """
    pid_m, pid_bh = _program_ids(num_row_blocks, FLAT_GRID)
    seed = _dropout_seed(SEED, DROPOUT)
    if FLAT_GRID:
        pid_s = tl.program_id(1)
    else:
        pid_s = tl.program_id(2)
    off_b = pid_bh // num_heads
    off_h = pid_bh % num_heads
    start_m = pid_m * BLOCK_M
    q_start, k_start, sq, sk, off = _seq_bounds(CU_Q, CU_K, SEQLENS_K, off_b, seqlen_q, seqlen_k, offset, SEQ_MODE)

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows = start_m + offs_m

    # 64-bit base offsets: B*H*S*D can pass 2**31
    b64 = tl.cast(off_b, tl.int64)
    h64 = tl.cast(off_h, tl.int64)
    hkv64 = tl.cast(off_h // kv_group, tl.int64)
    m64 = tl.cast(q_start + start_m, tl.int64)
    q = _load_rows(_tile_ptrs(Q + b64 * stride_qb + h64 * stride_qh, m64, offs_m, offs_d, stride_qm),
                   rows, sq, offs_d, HEAD_DIM, EVEN_M, EVEN_D)
    if STREAM_DESC:  # dense (B, H_kv, Sk, D) descriptors, addressed by coordinates
        k_base = K_DESC
        v_base = V_DESC
    elif PAGED:  # K/V heads inside a page; pages come from this sequence's row of the block table
        k_base = K + hkv64 * stride_kh
        v_base = V + hkv64 * stride_vh
    else:
        k_base = K + b64 * stride_kb + hkv64 * stride_kh + tl.cast(k_start, tl.int64) * stride_kn
        v_base = V + b64 * stride_vb + hkv64 * stride_vh + tl.cast(k_start, tl.int64) * stride_vn
    table_row = 0  # absent tensors come as None; nothing reads them when their flag is off
    if PAGED:
        table_row = BLOCK_TABLE + b64 * stride_tableb
    bias_base = 0
    if BIAS_KIND != 0:
        bias_base = BIAS + b64 * stride_biasb + h64 * stride_biash
    alibi_slope = 0.0
    if ALIBI_ON:
        alibi_slope = tl.load(ALIBI + b64 * stride_alibib + h64 * stride_alibih).to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    lo, full_lo, full_hi, hi = _band_range(start_m, sk, off, window_left, window_right, BLOCK_M, BLOCK_N,
                                           HAS_LEFT, HAS_RIGHT)
    # this split's keys; a query block past this sequence's end does nothing
    lo = tl.maximum(lo, pid_s * split_len)
    hi = tl.minimum(hi, pid_s * split_len + split_len)
    hi = tl.where(start_m < sq, hi, 0)
    # the band in three stages: the window's masked left edge (only with a left bound), the unmasked middle,
    # and the masked right edge (causal diagonal / window edge, ragged last block)
    for stage in tl.static_range(0 if HAS_LEFT else 1, 3):
        stage_lo, stage_hi = _stage_bounds(lo, full_lo, full_hi, hi, stage)
        acc, l_i, m_i = _attn_fwd_inner(
            acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, table_row, stride_tablep, stride_kb, stride_vb,
            page_size, bias_base, stride_biasm, stride_biasn, alibi_slope, rows, offs_n, offs_d, pid_bh, seed,
            dropout_p, stage_lo, stage_hi, sq, sk, off, window_left, window_right, qk_scale, softcap_log2,
            off_b, off_h // kv_group,
            HEAD_DIM=HEAD_DIM, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, MASKED=stage != 1, HAS_LEFT=HAS_LEFT,
            HAS_RIGHT=HAS_RIGHT, SOFTCAP=SOFTCAP, ALIBI=ALIBI_ON, BIAS_KIND=BIAS_KIND, DROPOUT=DROPOUT,
            PAGED=PAGED, STREAM_DESC=STREAM_DESC, EVEN_D=EVEN_D,
            DOT_PRECISION=DOT_PRECISION, FOLD_SCALE=PLAIN_SCORES & (stage == 1), NEG_SCALE=NEG_SCALE,
        )

    # a row that saw no key has l = 0: output 0 and lse = -inf rather than 0/0
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * LN2)
    if DROPOUT:
        l_safe = l_safe * (1.0 - dropout_p)
    acc = acc / l_safe[:, None]

    s64 = tl.cast(pid_s, tl.int64)
    o_ptrs = _tile_ptrs(O + s64 * stride_os + b64 * stride_ob + h64 * stride_oh, m64, offs_m, offs_d, stride_om)
    _store_rows(o_ptrs, acc.to(O.dtype.element_ty), rows, sq, offs_d, HEAD_DIM, EVEN_M, EVEN_D)
    lse_ptrs = LSE + s64 * stride_lses + b64 * stride_lseb + h64 * stride_lseh + q_start + rows
    if EVEN_M:
        tl.store(lse_ptrs, lse)
    else:
        tl.store(lse_ptrs, lse, mask=rows < sq)
