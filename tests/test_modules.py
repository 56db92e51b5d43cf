"""MultiheadAttention and replace_attention against torch.nn on the same weights and inputs (fp32)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import flashattn_py
from flashattn_py import ops

E, H, N, L, S = 32, 4, 2, 7, 9

CONFIGS = [dict(), dict(batch_first=True), dict(add_bias_kv=True), dict(add_zero_attn=True),
           dict(kdim=24, vdim=20), dict(bias=False), dict(add_bias_kv=True, add_zero_attn=True, batch_first=True)]


def _pair(**kwargs):
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(E, H, **kwargs)
    ours = flashattn_py.MultiheadAttention(E, H, **kwargs)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def _inputs(batch_first=False, kdim=E, vdim=E, batched=True, seed=1):
    gen = torch.Generator().manual_seed(seed)

    def t(n, length, e):
        if not batched:
            return torch.randn(length, e, generator=gen)
        return torch.randn(n, length, e, generator=gen) if batch_first else torch.randn(length, n, e, generator=gen)

    return t(N, L, E).requires_grad_(), t(N, S, kdim).requires_grad_(), t(N, S, vdim).requires_grad_()


def _masks(kind: str, float_masks=False):
    gen = torch.Generator().manual_seed(2)
    kpm = torch.rand(N, S, generator=gen) > 0.7
    kpm[:, 0] = False  # every row keeps a key (PyTorch's weights path gives NaN otherwise)
    am = torch.rand(L, S, generator=gen) > 0.8
    am[:, 0] = False
    am3 = torch.randn(N * H, L, S, generator=gen)
    if float_masks:
        kpm = torch.zeros(N, S).masked_fill(kpm, float("-inf"))
        am = torch.zeros(L, S).masked_fill(am, float("-inf")) + torch.randn(L, S, generator=gen)
    return {"none": {}, "kpm": {"key_padding_mask": kpm}, "attn": {"attn_mask": am},
            "both": {"attn_mask": am, "key_padding_mask": kpm}, "attn3d": {"attn_mask": am3},
            "per_head": {"average_attn_weights": False}}[kind]


def _compare(ref, ours, inputs, **kwargs):
    out_r, w_r = ref(*inputs, **kwargs)
    grads_r = torch.autograd.grad(out_r.sum(), [*inputs, *ref.parameters()])
    out_o, w_o = ours(*inputs, **kwargs)
    grads_o = torch.autograd.grad(out_o.sum(), [*inputs, *ours.parameters()])
    torch.testing.assert_close(out_o, out_r, atol=1e-5, rtol=1e-4)
    if w_r is None:
        assert w_o is None
    else:
        torch.testing.assert_close(w_o, w_r, atol=1e-5, rtol=1e-4)
    for g_o, g_r in zip(grads_o, grads_r, strict=True):
        torch.testing.assert_close(g_o, g_r, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("masks", ["none", "kpm", "attn", "both", "attn3d", "per_head"])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(c) or "default")
def test_matches_torch(config, masks, triton_ran):
    ref, ours = _pair(**config)
    inputs = _inputs(config.get("batch_first", False), config.get("kdim", E), config.get("vdim", E))
    _compare(ref, ours, inputs, **_masks(masks))
    triton_ran("attn_fwd", "attn_bwd_dq")


@pytest.mark.parametrize("masks", ["kpm", "attn", "both"])
def test_float_masks_and_no_weights(masks):
    ref, ours = _pair()
    _compare(ref, ours, _inputs(), need_weights=False, **_masks(masks, float_masks=True))


def test_unbatched():
    ref, ours = _pair()
    inputs = _inputs(batched=False)
    kpm = torch.zeros(S, dtype=torch.bool)
    kpm[3] = True
    for kwargs in ({}, {"key_padding_mask": kpm}, {"average_attn_weights": False}):
        _compare(ref, ours, inputs, **kwargs)


def test_is_causal():
    ref, ours = _pair(batch_first=True)
    q = torch.randn(N, L, E, requires_grad=True)
    causal = nn.Transformer.generate_square_subsequent_mask(L)
    before = ops.launch_counts["attn_fwd"]
    for need_weights in (False, True):
        _compare(ref, ours, (q, q, q), attn_mask=causal, is_causal=True, need_weights=need_weights)
    assert ops.launch_counts["attn_fwd"] > before
    with pytest.raises(RuntimeError, match="Need attn_mask"):
        ours(q, q, q, is_causal=True)


def test_fully_masked_row_gives_zero():
    _, ours = _pair()
    q, k, v = _inputs()
    kpm = torch.zeros(N, S, dtype=torch.bool)
    kpm[0] = True  # batch 0 sees no key at all
    out, _ = ours(q, k, v, key_padding_mask=kpm, need_weights=False)
    assert torch.isfinite(out).all()
    # attention output is 0 there, so the block output is the out-projection's bias
    torch.testing.assert_close(out[:, 0], ours.out_proj.bias.expand(L, E))


def test_dropout_only_in_training():
    _, ours = _pair(dropout=0.5)
    q, k, v = _inputs()
    ours.eval()
    assert torch.equal(ours(q, k, v)[0], ours(q, k, v)[0])
    ours.train()
    assert not torch.equal(ours(q, k, v, need_weights=False)[0], ours(q, k, v, need_weights=False)[0])


def test_state_dict_round_trip():
    for config in CONFIGS:
        ref, ours = _pair(**config)
        assert list(ours.state_dict()) == list(ref.state_dict())
        back = nn.MultiheadAttention(E, H, **config)
        back.load_state_dict(ours.state_dict(), strict=True)
        for a, b in zip(back.state_dict().values(), ref.state_dict().values(), strict=True):
            assert torch.equal(a, b)


def test_bad_masks():
    _, ours = _pair()
    q, k, v = _inputs()
    with pytest.raises(ValueError, match="attn_mask"):
        ours(q, k, v, attn_mask=torch.zeros(L, S + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="key_padding_mask"):
        ours(q, k, v, key_padding_mask=torch.zeros(N, S + 1, dtype=torch.bool))


def _encoder_decoder():
    torch.manual_seed(3)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(E, H, 64, dropout=0.0, batch_first=True), 2,
                                enable_nested_tensor=False)
    dec = nn.TransformerDecoder(nn.TransformerDecoderLayer(E, H, 64, dropout=0.0, batch_first=True), 2)
    return nn.ModuleDict({"enc": enc, "dec": dec})


def _run(model, src, tgt, src_kpm):
    mem = model["enc"](src, src_key_padding_mask=src_kpm)
    causal = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1])
    return model["dec"](tgt, mem, tgt_mask=causal, tgt_is_causal=True, memory_key_padding_mask=src_kpm)


def test_replace_attention_transformer(triton_ran):
    ref = _encoder_decoder()
    ours = _encoder_decoder()
    params_before = [id(p) for p in ours.parameters()]
    assert flashattn_py.replace_attention(ours) is ours
    assert [id(p) for p in ours.parameters()] == params_before  # weights kept, in place
    mhas = [m for m in ours.modules() if isinstance(m, nn.MultiheadAttention)]
    assert len(mhas) == 6 and all(type(m) is flashattn_py.MultiheadAttention for m in mhas)
    src = torch.randn(N, S, E, requires_grad=True)
    tgt = torch.randn(N, L, E)
    src_kpm = torch.zeros(N, S, dtype=torch.bool)
    src_kpm[1, -3:] = True
    out_r = _run(ref, src, tgt, src_kpm)
    out_o = _run(ours, src, tgt, src_kpm)
    torch.testing.assert_close(out_o, out_r, atol=1e-5, rtol=1e-4)
    g_r = torch.autograd.grad(out_r.sum(), [src, *ref.parameters()])
    g_o = torch.autograd.grad(out_o.sum(), [src, *ours.parameters()])
    for a, b in zip(g_o, g_r, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    triton_ran("attn_fwd", "attn_bwd_dkdv")


def test_replace_attention_inference_fast_path():
    """In eval under no_grad PyTorch's encoder fast path skips the module; disabling it runs ours."""
    ref, ours = _encoder_decoder(), flashattn_py.replace_attention(_encoder_decoder())
    ref.eval()
    ours.eval()
    src = torch.randn(N, S, E)
    tgt = torch.randn(N, L, E)
    kpm = torch.zeros(N, S, dtype=torch.bool)
    previous = torch.backends.mha.get_fastpath_enabled()
    try:
        torch.backends.mha.set_fastpath_enabled(False)
        before = ops.launch_counts["attn_fwd"]
        with torch.no_grad():
            out_o = _run(ours, src, tgt, kpm)
            out_r = _run(ref, src, tgt, kpm)
        assert ops.launch_counts["attn_fwd"] >= before + 6  # 2 encoder + 4 decoder attentions
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)
    torch.testing.assert_close(out_o, out_r, atol=1e-5, rtol=1e-4)
