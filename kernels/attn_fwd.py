"""Attention forward: tiled online softmax, writes O and the row log-sum-exp.

One program computes BLOCK_M query rows of one (batch, head) against all the
key blocks that row block can see. Scores live in the base-2 domain
(`scale * log2(e)` is folded into one multiply) so the softmax uses `exp2`.
The causal band is walked in two stages: key blocks left of the diagonal need
no mask, the few on the diagonal (and the ragged tail block) are masked, and
blocks right of the diagonal are never visited.

Optional features are constexpr-specialised and cost nothing when off:
grouped K/V heads (GQA: query head h reads K/V head h // kv_group), a bias or
boolean mask tile loaded per block through broadcast strides, and dropout
regenerated from a Philox seed.
"""

import triton
import triton.language as tl

from .tiles import LN2, _dropout_keep, _key_range, _load_rows, _score_mods, _store_rows


@triton.jit
def _attn_fwd_inner(
    acc, l_i, m_i, q,
    k_base, v_base, stride_kn, stride_vn, bias_base, stride_biasm, stride_biasn,
    rows, offs_n, offs_d, bh, seed, dropout_p,
    lo, hi, seqlen_q, seqlen_k, causal_offset, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, BIAS_KIND: tl.constexpr, DROPOUT: tl.constexpr,
    EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        n64 = tl.cast(start_n, tl.int64)  # 64-bit: start_n * stride can pass 2**31 on long sequences
        k = _load_rows(k_base + n64 * stride_kn + offs_n[:, None] * stride_kn + offs_d[None, :],
                       cols, seqlen_k, offs_d, HEAD_DIM, not MASKED, EVEN_D)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        qk = _score_mods(qk, rows[:, None], cols[None, :], bias_base, stride_biasm, stride_biasn,
                         seqlen_q, seqlen_k, causal_offset, BIAS_KIND, MASKED, MASKED and CAUSAL)
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        if MASKED or BIAS_KIND != 0:
            # a row that has seen no key yet keeps m = -inf; shift by 0 so exp2 gives 0, not NaN
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_shift = m_new
        p = tl.exp2(qk - m_shift[:, None])
        alpha = tl.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)  # the normaliser counts dropped entries too
        if DROPOUT:
            p = tl.where(_dropout_keep(seed, bh, rows[:, None], cols[None, :], dropout_p), p, 0.0)
        v = _load_rows(v_base + n64 * stride_vn + offs_n[:, None] * stride_vn + offs_d[None, :],
                       cols, seqlen_k, offs_d, HEAD_DIM, not MASKED, EVEN_D)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(
    Q, K, V, O, LSE, BIAS,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_biasb, stride_biash, stride_biasm, stride_biasn,
    num_heads, kv_group, seqlen_q, seqlen_k, causal_offset, qk_scale, dropout_p, seed,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, BIAS_KIND: tl.constexpr, DROPOUT: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """O[b, h] = softmax(scale * Q Kᵀ + bias, masked) V; LSE[b, h] = natural log-sum-exp of those scores.

    qk_scale is scale * log2(e). Rows that see no key get O = 0 and LSE = -inf.
    LSE is a contiguous (B, H, Sq) float32 tensor. With dropout, O is
    (P ∘ keep) V / (1 - dropout_p) and LSE is that of the undropped P.
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = pid_bh // num_heads
    off_h = pid_bh % num_heads
    start_m = pid_m * BLOCK_M

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows = start_m + offs_m

    # 64-bit base offsets: B*H*S*D can pass 2**31
    b64 = tl.cast(off_b, tl.int64)
    h64 = tl.cast(off_h, tl.int64)
    hkv64 = tl.cast(off_h // kv_group, tl.int64)
    m64 = tl.cast(start_m, tl.int64)
    q_ptrs = Q + b64 * stride_qb + h64 * stride_qh + m64 * stride_qm + offs_m[:, None] * stride_qm + offs_d[None, :]
    k_base = K + b64 * stride_kb + hkv64 * stride_kh
    v_base = V + b64 * stride_vb + hkv64 * stride_vh
    bias_base = BIAS + b64 * stride_biasb + h64 * stride_biash

    q = _load_rows(q_ptrs, rows, seqlen_q, offs_d, HEAD_DIM, EVEN_M, EVEN_D)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    full_end, hi = _key_range(start_m, seqlen_k, causal_offset, BLOCK_M, BLOCK_N, CAUSAL)
    # stage 1: key blocks every row sees in full -- no structural mask
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, bias_base, stride_biasm, stride_biasn,
        rows, offs_n, offs_d, pid_bh, seed, dropout_p,
        0, full_end, seqlen_q, seqlen_k, causal_offset, qk_scale,
        HEAD_DIM, BLOCK_N, False, CAUSAL, BIAS_KIND, DROPOUT, EVEN_D, DOT_PRECISION,
    )
    # stage 2: the diagonal band and the ragged last block -- masked
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, bias_base, stride_biasm, stride_biasn,
        rows, offs_n, offs_d, pid_bh, seed, dropout_p,
        full_end, hi, seqlen_q, seqlen_k, causal_offset, qk_scale,
        HEAD_DIM, BLOCK_N, True, CAUSAL, BIAS_KIND, DROPOUT, EVEN_D, DOT_PRECISION,
    )

    # a row that saw no key has l = 0: output 0 and lse = -inf rather than 0/0
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * LN2)
    if DROPOUT:
        l_safe = l_safe * (1.0 - dropout_p)
    acc = acc / l_safe[:, None]

    o_ptrs = O + b64 * stride_ob + h64 * stride_oh + m64 * stride_om + offs_m[:, None] * stride_om + offs_d[None, :]
    _store_rows(o_ptrs, acc.to(O.dtype.element_ty), rows, seqlen_q, offs_d, HEAD_DIM, EVEN_M, EVEN_D)
    lse_ptrs = LSE + tl.cast(pid_bh, tl.int64) * seqlen_q + rows
    if EVEN_M:
        tl.store(lse_ptrs, lse)
    else:
        tl.store(lse_ptrs, lse, mask=rows < seqlen_q)
