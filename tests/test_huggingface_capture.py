"""Hugging Face masks without host reads: the band is recognized from transformers' mask functions, not mask values.

A CUDA graph cannot capture a device -> host read (``.item()``, ``bool(t)``,
``torch.equal``...), and each one is a sync. Here every such read made from
flashattn_py's frames (and from transformers' mask code while our mask builder runs
it) fails the test, while the models still match eager attention and the kernels
still get the band as flags plus a ``(B, 1, 1, S)`` key-padding row.
"""

from __future__ import annotations

import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
masking_utils = pytest.importorskip("transformers.masking_utils")

from test_huggingface import _pair as _model_pair  # noqa: E402

import flashattn_py.integrations.huggingface as fa_hf  # noqa: E402

_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")
_in_builder = [False]


def _forbidden(frame) -> str | None:
    caller = frame.f_globals.get("__name__", "")
    if caller.startswith("flashattn_py") or (_in_builder[0] and caller.startswith("transformers.masking_utils")):
        return caller
    return None


@pytest.fixture
def no_host_reads(monkeypatch):
    """Tensor -> host conversions from flashattn_py (or from transformers' mask code inside our builder) raise.

    The values count as unreadable, as while a CUDA graph captures (where a read would fail): the builder then
    switches off sdpa_mask's own reading shortcuts."""
    monkeypatch.setattr(fa_hf, "values_unreadable", lambda t: True)
    for name in _READS:
        original = getattr(torch.Tensor, name)

        def trapped(self, *args, _name=name, _original=original, **kwargs):
            caller = _forbidden(sys._getframe(1))
            if caller is not None:
                raise AssertionError(f"host read: Tensor.{_name} called from {caller}")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, trapped)
    equal = torch.equal

    def trapped_equal(*args, **kwargs):
        caller = _forbidden(sys._getframe(1))
        if caller is not None:
            raise AssertionError(f"host read: torch.equal called from {caller}")
        return equal(*args, **kwargs)

    monkeypatch.setattr(torch, "equal", trapped_equal)
    builder = fa_hf.mask_interface

    def traced_builder(*args, **kwargs):
        _in_builder[0] = True
        try:
            return builder(*args, **kwargs)
        finally:
            _in_builder[0] = False

    impl = fa_hf.register()
    monkeypatch.setitem(masking_utils.AttentionMaskInterface._global_mapping, impl, builder)  # restored afterwards
    monkeypatch.setattr(fa_hf, "mask_interface", traced_builder)  # what register() (called again by tests) adds
    fa_hf.register()


@pytest.fixture
def kernel_calls(monkeypatch):
    """What `attention_forward` hands to the kernels: (q_len, kv_len, offset, window, mask shape, mask dtype)."""
    calls = []
    original = fa_hf._attention_at_offset

    def spy(q, k, v, **kwargs):
        mask = kwargs.get("attn_mask")
        calls.append((q.shape[2], k.shape[2], kwargs["offset"], tuple(kwargs["window"]),
                      None if mask is None else tuple(mask.shape), None if mask is None else mask.dtype))
        return original(q, k, v, **kwargs)

    monkeypatch.setattr(fa_hf, "_attention_at_offset", spy)
    return calls


def _pair(config):
    """test_huggingface's eager / fa_py model pair (same weights), in eval mode."""
    eager, ours = _model_pair(config)
    return eager.eval(), ours.eval()


_SMALL = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=48, max_position_embeddings=64)
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**_SMALL),
    "mistral_sliding": lambda: transformers.MistralConfig(**_SMALL, sliding_window=4),
    "gemma2_alternating": lambda: transformers.Gemma2Config(**_SMALL, head_dim=8, sliding_window=4),
}
W = 4  # the sliding configs' window


def _padded(seed=1, B=2, S=11):
    ids = torch.randint(1, 100, (B, S), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(B, S, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    return ids, mask


@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_and_generate_make_no_host_read(name, no_host_reads):
    eager, ours = _pair(CONFIGS[name]())
    ids, mask = _padded()
    valid = mask.bool()
    kwargs = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref = eager(input_ids=ids, attention_mask=mask).logits
        refs = [eager.generate(ids, **kwargs, **cache) for cache in ({}, {"cache_implementation": "static"})]
        got = ours(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(got[valid], ref[valid], atol=2e-5, rtol=1e-4)
        for cache, tokens in zip(({}, {"cache_implementation": "static"}), refs, strict=True):
            assert torch.equal(ours.generate(ids, **kwargs, **cache), tokens)


def test_gradients_make_no_host_read_in_the_integration(no_host_reads):
    eager, ours = _pair(CONFIGS["mistral_sliding"]())
    ids, mask = _padded()
    valid = mask.bool()
    grads = []
    for model in (eager, ours):
        model.train()
        loss = model(input_ids=ids, attention_mask=mask).logits[valid].logsumexp(-1).mean()
        grads.append(torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad]))
    for g_ours, g_eager in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(g_ours, g_eager, atol=2e-5, rtol=1e-4)


# --- the fast path is taken: band as kernel flags, padding as a (B, 1, 1, S) row ----------------------------------

@pytest.mark.parametrize("name", list(CONFIGS))
def test_padded_band_reaches_the_kernels_as_flags(name, kernel_calls, no_host_reads):
    eager, ours = _pair(CONFIGS[name]())
    ids, mask = _padded()
    B, S = ids.shape
    with torch.no_grad():
        got = ours(input_ids=ids, attention_mask=mask).logits
        ref = eager(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got[mask.bool()], ref[mask.bool()], atol=2e-5, rtol=1e-4)
    windows = {"llama": [(-1, 0)] * 2, "mistral_sliding": [(W - 1, 0)] * 2,
               "gemma2_alternating": [(W - 1, 0), (-1, 0)]}[name]  # Gemma 2: sliding, then full layers
    assert kernel_calls == [(S, S, 0, w, (B, 1, 1, S), torch.bool) for w in windows]


def test_decoding_steps_run_the_band_at_the_cache_offset(kernel_calls, no_host_reads):
    eager, ours = _pair(CONFIGS["mistral_sliding"]())
    ids, mask = _padded(S=7)
    kwargs = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(ours.generate(ids, **kwargs), eager.generate(ids, **kwargs))
    decode = [c for c in kernel_calls if c[0] == 1]
    assert len(decode) == 4 * 2  # 4 decoding steps, 2 layers
    for _, kv_len, offset, window, shape, _ in decode:  # the sliding cache keeps w - 1 past keys + the new one
        assert (kv_len, offset, window, shape) == (W, W - 1, (W - 1, 0), (2, 1, 1, W))


def test_unpadded_batch_runs_the_causal_flag_without_a_mask(kernel_calls, no_host_reads):
    _, ours = _pair(CONFIGS["llama"]())
    with torch.no_grad():
        ours(input_ids=torch.randint(1, 100, (2, 9)))
    assert kernel_calls == [(9, 9, 0, (-1, 0), None, None)] * 2


# --- the builder itself: tags agree with the mask's values; everything else is dense ------------------------------

def _build(mask_function, q_len=6, kv_len=9, q_offset=5, kv_offset=2, padding=True, **extra):
    attention_mask = None
    if padding:
        attention_mask = torch.ones(2, kv_offset + kv_len - 1, dtype=torch.bool)  # one short: padded as sdpa does
        attention_mask[1, :4] = False
    _in_builder[0] = True  # under `no_host_reads`, transformers' mask code called from here is trapped too
    try:
        return fa_hf.mask_interface(batch_size=2, q_length=q_len, kv_length=kv_len, q_offset=q_offset,
                                    kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                                    device="cpu", **extra)
    finally:
        _in_builder[0] = False


def _from_tag(mask):
    """The dense mask the tag stands for: band at its offset AND the padding row."""
    _, offset, left, right, keep = mask._fa_py_band
    q_len, kv_len = mask.shape[-2:]
    i = torch.arange(q_len)[:, None] + offset
    j = torch.arange(kv_len)[None, :]
    band = torch.ones(q_len, kv_len, dtype=torch.bool)
    if right >= 0:
        band &= j <= i + right
    if left >= 0:
        band &= j >= i - left
    band = band[None, None]
    return (band & keep if keep is not None else band).expand(mask.shape)


BANDS = {
    "causal": (lambda: masking_utils.causal_mask_function, (-1, 0)),
    "bidirectional": (lambda: masking_utils.bidirectional_mask_function, (-1, -1)),
    "sliding_causal": (lambda: masking_utils.sliding_window_causal_mask_function(3), (2, 0)),
    "sliding_bidirectional": (lambda: masking_utils.sliding_window_bidirectional_mask_function(2), (2, 2)),
    "nested_and": (lambda: masking_utils.and_masks(masking_utils.causal_mask_function,
                                                   masking_utils.sliding_window_overlay(5),
                                                   masking_utils.sliding_window_overlay(4)), (3, 0)),
}


@pytest.mark.parametrize("name", list(BANDS))
@pytest.mark.parametrize("padding", [True, False])
@pytest.mark.parametrize("offsets", [(0, 0), (5, 2), (3, 0)])
def test_recognized_band_is_exactly_the_mask(name, padding, offsets):
    factory, window = BANDS[name]
    mask = _build(factory(), q_offset=offsets[0], kv_offset=offsets[1], padding=padding,
                  allow_is_causal_skip=False, local_size=3)
    assert mask._fa_py_band[1] == offsets[0] - offsets[1] and mask._fa_py_band[2:4] == window
    assert (mask._fa_py_band[4] is None) == (not padding)
    assert torch.equal(mask, _from_tag(mask))


def _checkerboard(batch_idx, head_idx, q_idx, kv_idx):
    return (q_idx - kv_idx) % 2 == 0


def _first_key(batch_idx, head_idx, q_idx, kv_idx):
    return kv_idx == 0


NOT_BANDS = {
    "user_function": lambda: _checkerboard,
    "causal_and_user": lambda: masking_utils.and_masks(masking_utils.causal_mask_function, _checkerboard),
    "window_or_first_key": lambda: masking_utils.or_masks(masking_utils.sliding_window_causal_mask_function(2),
                                                          _first_key),
    "chunked": lambda: masking_utils.chunked_causal_mask_function(3, torch.zeros(2, dtype=torch.long)),
    "tensor_window": lambda: masking_utils.sliding_window_causal_mask_function(torch.tensor(3)),
}


@pytest.mark.parametrize("name", list(NOT_BANDS))
def test_other_mask_functions_stay_dense(name, no_host_reads):
    mask = _build(NOT_BANDS[name](), q_offset=0, kv_offset=0)
    assert isinstance(mask, torch.Tensor) and mask.shape == (2, 1, 6, 9)
    assert not hasattr(mask, "_fa_py_band")


def test_band_confirmation_catches_a_changed_function(monkeypatch):
    """A transformers whose sliding overlay meant something else (same code object) is not taken for a window."""
    monkeypatch.setattr(fa_hf, "_confirmed", {})
    overlay = masking_utils.sliding_window_overlay(3)
    assert fa_hf._function_band(overlay) == (2, -1)

    def off_by_one(batch_idx, head_idx, q_idx, kv_idx):
        return kv_idx >= q_idx - 3
    monkeypatch.setattr(fa_hf, "_leaf", lambda fn: (("sliding", 3), 2, -1))  # claims the band, evaluates wrongly
    monkeypatch.setattr(fa_hf, "_confirmed", {})
    assert fa_hf._function_band(off_by_one) is None


def test_tensor_offset_is_not_read_and_stays_dense(no_host_reads):
    """A static cache's q_offset is a tensor: the band's offset would need a read, so the mask stays dense."""
    for q_len in (1, 6):  # decoding, and a prefill continuing a static cache
        mask = _build(masking_utils.causal_mask_function, q_len=q_len, q_offset=torch.tensor(2), kv_offset=0)
        assert not hasattr(mask, "_fa_py_band")
        assert torch.equal(mask, _build(masking_utils.causal_mask_function, q_len=q_len, q_offset=2, kv_offset=0))


def test_custom_mask_function_falls_back_to_dense_and_matches_eager(kernel_calls, no_host_reads):
    """A mask transformers composes with a model's own function (here an and_mask_function) runs densely, exactly."""
    impl = fa_hf.register()
    config = transformers.LlamaConfig(**_SMALL)
    embeds = torch.randn(2, 8, 32)
    padding = torch.ones(2, 8, dtype=torch.long)
    padding[0, :2] = 0
    q, k, v = torch.randn(2, 4, 8, 8), torch.randn(2, 2, 8, 8), torch.randn(2, 2, 8, 8)
    outs = []
    for attn in ("eager", impl):
        config._attn_implementation = attn
        mask = masking_utils.create_causal_mask(config, embeds, padding, cache=None,
                                                and_mask_function=_checkerboard)
        forward = (transformers.models.llama.modeling_llama.eager_attention_forward if attn == "eager"
                   else fa_hf.attention_forward)
        module = torch.nn.Module()
        module.num_key_value_groups, module.training, module.is_causal = 2, False, True
        outs.append(forward(module, q, k, v, mask, scaling=0.3)[0])
    valid = padding.bool()
    torch.testing.assert_close(outs[1][valid], outs[0][valid], atol=2e-6, rtol=1e-5)
    assert kernel_calls == [(8, 8, 0, (-1, -1), (2, 1, 8, 8), torch.bool)]  # the dense mask, no band


# --- packed batches: max_length as ints, tensors read only where legal -------------------------------------------

def test_varlen_max_length_tensors_unreadable_use_the_packed_length(monkeypatch):
    q, k = torch.randn(1, 4, 16, 8), torch.randn(1, 2, 16, 8)
    cu = torch.tensor([0, 5, 13, 16], dtype=torch.int32)
    common = dict(scaling=0.3, cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    ref, _ = fa_hf.attention_forward(torch.nn.Module(), q, k, k, None, max_length_q=8, max_length_k=8, **common)
    got, _ = fa_hf.attention_forward(torch.nn.Module(), q, k, k, None, max_length_q=torch.tensor(8),
                                     max_length_k=torch.tensor(8), **common)  # eager, readable: read
    torch.testing.assert_close(got, ref, atol=0, rtol=0)
    seen = []
    original = fa_hf.attention_varlen

    def varlen(*args, **kwargs):
        seen.append(args[5:7])
        return original(*args, **kwargs)

    monkeypatch.setattr(fa_hf, "attention_varlen", varlen)
    monkeypatch.setattr(fa_hf, "values_unreadable", lambda t: True)  # as under compile / capture / FakeTensorMode
    got, _ = fa_hf.attention_forward(torch.nn.Module(), q, k, k, None, max_length_q=torch.tensor(8),
                                     max_length_k=torch.tensor(8), **common)
    assert seen == [(16, 16)]
    torch.testing.assert_close(got, ref, atol=2e-6, rtol=1e-5)


def test_packed_mask_is_not_compared_where_unreadable(monkeypatch, kernel_calls):
    """cu_seq_lens with a mask: compared (a read) only in eager code; elsewhere the mask runs densely."""
    q, k = torch.randn(1, 4, 13, 8), torch.randn(1, 2, 13, 8)
    cu = torch.tensor([0, 5, 13], dtype=torch.int32)
    seq = torch.cat([torch.zeros(5, dtype=torch.long), torch.ones(8, dtype=torch.long)])
    pos = torch.arange(13) - torch.tensor([0] * 5 + [5] * 8)
    mask = ((seq[:, None] == seq[None, :]) & (pos[None, :] <= pos[:, None]))[None, None]
    packed = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=8, max_length_k=8)
    ref, _ = fa_hf.attention_forward(torch.nn.Module(), q, k, k, mask, **packed)  # eager: compared, varlen
    assert kernel_calls == []
    monkeypatch.setattr(fa_hf, "values_unreadable", lambda t: True)
    monkeypatch.setattr(fa_hf, "_packing_matches", lambda *a: pytest.fail("compared an unreadable mask"))
    got, _ = fa_hf.attention_forward(torch.nn.Module(), q, k, k, mask, **packed)
    assert kernel_calls == [(13, 13, 0, (-1, -1), (1, 1, 13, 13), torch.bool)]
    torch.testing.assert_close(got, ref, atol=2e-6, rtol=1e-5)


# --- torch.compile: no graph break from flashattn_py's host reads --------------------------------------------------

def _graph_breaks():
    from torch._dynamo.utils import counters

    return dict(counters["graph_break"])


def test_compiled_static_cache_generate_matches_eager():
    eager, ours = _pair(CONFIGS["llama"]())
    ids, mask = _padded(S=7)
    kwargs = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0,
                  cache_implementation="static")
    torch._dynamo.reset()
    with torch.no_grad():
        ref = eager.generate(ids, **kwargs)
        ours.forward = torch.compile(ours.forward, backend="eager", fullgraph=False)
        before = _graph_breaks()
        got = ours.generate(ids, **kwargs)
    assert torch.equal(got, ref)
    after = _graph_breaks()
    new = {reason: n for reason, n in after.items() if n != before.get(reason, 0)}
    ours_breaks = [r for r in new if "flashattn_py" in r or "huggingface.py" in r or "item" in r.lower()]
    assert not ours_breaks, new


def test_eager_all_ones_padding_keeps_sdpas_shortcut():
    """Readable values (eager, no capture): sdpa_mask may read an all-ones attention_mask and return None, so no
    (B, 1, L, S) mask is built; our own code still reads nothing."""
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2)
    embeds = torch.randn(2, 9, 32)
    ones = torch.ones(2, 9, dtype=torch.long)
    config._attn_implementation = fa_hf.register()
    mask = masking_utils.create_causal_mask(config, embeds, ones, cache=None)
    assert mask is None
    padded = ones.clone()
    padded[0, :3] = 0
    mask = masking_utils.create_causal_mask(config, embeds, padded, cache=None)
    assert mask is not None and mask.shape == (2, 1, 9, 9)
