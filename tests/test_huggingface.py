"""Hugging Face models on our attention: logits and gradients match attn_implementation="eager"."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import flashattn_py  # noqa: E402
import flashattn_py.integrations.huggingface as fa_hf  # noqa: E402
from flashattn_py import ops  # noqa: E402


def _pair(config):
    impl = fa_hf.register()
    torch.manual_seed(0)
    eager = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="eager")
    ours = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=impl)
    ours.load_state_dict(eager.state_dict())
    return eager, ours


def _compare(eager, ours):
    ids = torch.randint(0, 100, (2, 21), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 21, dtype=torch.long)
    mask[1, :6] = 0  # left padding, as a tokenizer gives for batched generation
    valid = mask.bool()
    before = ops.launch_counts["attn_fwd"]
    results = []
    for model in (eager, ours):
        model.train()  # dropout is 0 in these configs; train() keeps autograd paths honest
        logits = model(input_ids=ids, attention_mask=mask).logits
        loss = logits[valid].logsumexp(-1).mean()
        grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
        results.append((logits[valid], grads))
    torch.testing.assert_close(results[1][0], results[0][0], atol=2e-5, rtol=1e-4)
    for g_ours, g_eager in zip(results[1][1], results[0][1], strict=True):
        torch.testing.assert_close(g_ours, g_eager, atol=2e-5, rtol=1e-4)
    if ops.uses_triton(torch.empty(1)):
        assert ops.launch_counts["attn_fwd"] > before  # our kernels ran


def test_llama_gqa_with_padding():
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=96, max_position_embeddings=64)
    _compare(*_pair(config))


def test_mistral_sliding_window():
    config = transformers.MistralConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=1, intermediate_size=96, max_position_embeddings=64,
                                        sliding_window=5)
    _compare(*_pair(config))


def test_generate_matches_eager():
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=96, max_position_embeddings=64)
    eager, ours = _pair(config)
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, :2] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(ours.generate(ids, **kwargs), eager.generate(ids, **kwargs))


# --- T5: the relative position bias arrives as `position_bias` ------------------------------------------------------

def test_t5_position_bias_and_its_gradient():
    """T5's relative attention bias is added to the scores and gets its gradient (encoder, decoder, cross)."""
    config = transformers.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=48, num_layers=1, num_heads=4,
                                   relative_attention_num_buckets=8, dropout_rate=0.0, decoder_start_token_id=0)
    impl = fa_hf.register()
    torch.manual_seed(0)
    eager = transformers.AutoModelForSeq2SeqLM.from_config(copy.deepcopy(config), attn_implementation="eager")
    ours = transformers.AutoModelForSeq2SeqLM.from_config(copy.deepcopy(config), attn_implementation=impl)
    ours.load_state_dict(eager.state_dict())
    ids = torch.randint(1, 100, (2, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, 8:] = 0  # right padding, as T5's tokenizer pads
    dec = torch.randint(1, 100, (2, 6), generator=torch.Generator().manual_seed(2))
    before = ops.launch_counts["attn_bwd_dbias"]
    results = []
    for model in (eager, ours):
        model.train()
        logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        params = [p for p in model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(logits.logsumexp(-1).mean(), params)
        named = dict(zip([n for n, p in model.named_parameters() if p.requires_grad], grads, strict=True))
        results.append((logits, grads, [g for n, g in named.items() if "relative_attention_bias" in n]))
    torch.testing.assert_close(results[1][0], results[0][0], atol=2e-5, rtol=1e-4)
    for g_ours, g_eager in zip(results[1][1], results[0][1], strict=True):
        torch.testing.assert_close(g_ours, g_eager, atol=2e-5, rtol=1e-4)
    assert len(results[1][2]) == 2 and all(g.abs().sum() > 0 for g in results[1][2])  # encoder and decoder biases
    if ops.uses_triton(torch.empty(1)):
        assert ops.launch_counts["attn_bwd_dbias"] > before  # the bias gradient came from our kernels


# --- masks at kernel speed: transformers' dense causal / sliding-window masks run as kernel flags ------------------

def _count_dots(monkeypatch):
    from triton.runtime import interpreter

    calls = []
    create_dot = interpreter.InterpreterBuilder.create_dot

    def counting(self, *args, **kwargs):
        calls.append(1)
        return create_dot(self, *args, **kwargs)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", counting)
    return calls


def test_sliding_window_model_skips_blocks(monkeypatch):
    """A Mistral-style model with a sliding window and a padded batch does the window's O(S·w) tile products."""
    if not ops.uses_triton(torch.empty(1)) or torch.cuda.is_available():
        pytest.skip("counts the interpreter's tl.dot calls")
    S, w = 128, 8
    config = transformers.MistralConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                        num_key_value_heads=1, intermediate_size=48, max_position_embeddings=256,
                                        sliding_window=w)
    eager, ours = _pair(config)
    ids = torch.randint(0, 100, (2, S), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, S, dtype=torch.long)
    mask[1, :5] = 0
    calls = _count_dots(monkeypatch)
    with torch.no_grad():
        logits = ours(input_ids=ids, attention_mask=mask).logits
        model_dots = len(calls)
        q, k = torch.randn(2, 2, S, 16), torch.randn(2, 1, S, 16)
        calls.clear()
        flashattn_py.attention(q, k, k, causal=True, window=(w - 1, 0))
        window_dots = len(calls)
        calls.clear()
        flashattn_py.attention(q, k, k)
        full_dots = len(calls)
        ref = eager(input_ids=ids, attention_mask=mask).logits
    assert model_dots == window_dots < 0.4 * full_dots, (model_dots, window_dots, full_dots)
    torch.testing.assert_close(logits[mask.bool()], ref[mask.bool()], atol=2e-5, rtol=1e-4)


def test_sliding_window_padding_sides_and_generate():
    config = transformers.MistralConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64,
                                        sliding_window=4)
    eager, ours = _pair(config)
    ids = torch.randint(1, 100, (2, 9), generator=torch.Generator().manual_seed(3))
    for side in ("left", "right"):
        mask = torch.ones(2, 9, dtype=torch.long)
        mask[0, :3] = 0 if side == "left" else 1
        mask[0, -3:] = 0 if side == "right" else 1
        with torch.no_grad():
            got, ref = (m(input_ids=ids, attention_mask=mask).logits for m in (ours, eager))
        torch.testing.assert_close(got[mask.bool()], ref[mask.bool()], atol=2e-5, rtol=1e-4)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :3] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():  # the window binds while decoding: 9 + 5 tokens, w = 4; a static cache has spare slots
        for cache in ({}, {"cache_implementation": "static"}):
            assert torch.equal(ours.generate(ids, **kwargs, **cache), eager.generate(ids, **kwargs, **cache))


# --- packed batches and keywords ------------------------------------------------------------------------------------

class _Module(torch.nn.Module):
    is_causal = True


def _heads(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_cu_seq_lens_run_varlen():
    """Padding-free batches (cu_seq_lens_q/k, max_length_q/k) attend within each sequence, as HF's flash path."""
    lengths = [5, 8, 3]
    q, k, v = _heads(1, 4, 16, 8, seed=4), _heads(1, 2, 16, 8, seed=5), _heads(1, 2, 16, 8, seed=6)
    cu = torch.tensor([0, 5, 13, 16], dtype=torch.int32)
    out, _ = fa_hf.attention_forward(_Module(), q, k, v, None, scaling=0.3, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                                     max_length_q=8, max_length_k=8, position_ids=None)
    start = 0
    for n in lengths:
        sl = slice(start, start + n)
        ref = torch.nn.functional.scaled_dot_product_attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], is_causal=True,
                                                               scale=0.3, enable_gqa=True)
        torch.testing.assert_close(out[:, sl], ref.transpose(1, 2), atol=2e-6, rtol=1e-5)
        start += n
    with pytest.raises(ValueError, match="must be given together"):
        fa_hf.attention_forward(_Module(), q, k, v, None, cu_seq_lens_q=cu)


def test_packed_sequences_match_separate_runs():
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64)
    eager, ours = _pair(config)
    ids = torch.randint(1, 100, (1, 13), generator=torch.Generator().manual_seed(7))
    position_ids = torch.cat([torch.arange(5), torch.arange(8)])[None]
    cu = torch.tensor([0, 5, 13], dtype=torch.int32)
    packed = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=8, max_length_k=8)
    with torch.no_grad():
        ref = torch.cat([eager(input_ids=ids[:, :5]).logits, eager(input_ids=ids[:, 5:]).logits], 1)
        for kwargs in ({}, packed):  # the mask built from position_ids, or cu_seq_lens (checked against that mask)
            got = ours(input_ids=ids, position_ids=position_ids, use_cache=False, **kwargs).logits
            torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)


def test_keywords_are_used_ignored_or_refused():
    q, k = _heads(1, 2, 6, 8, seed=8), _heads(1, 2, 6, 8, seed=9)
    plain, _ = fa_hf.attention_forward(_Module(), q, k, k, None)
    with pytest.warns(UserWarning, match="does not return attention weights"):
        fa_hf._warned_output_attentions = False
        ignored, _ = fa_hf.attention_forward(_Module(), q, k, k, None, output_attentions=True, use_cache=True,
                                             position_ids=torch.arange(6)[None], cache_position=torch.arange(6),
                                             some_future_flag=None)
    assert torch.equal(ignored, plain)
    assert set(fa_hf.IGNORED_KWARGS) >= {"position_ids", "output_attentions", "use_cache", "cache_position"}
    with pytest.raises(TypeError, match="'foo'"):
        fa_hf.attention_forward(_Module(), q, k, k, None, foo=1)
    with pytest.raises(TypeError, match="s_aux"):
        fa_hf.attention_forward(_Module(), q, k, k, None, s_aux=torch.zeros(2))
    with pytest.raises(RuntimeError, match="head masks"):  # InputTypeError: a TypeError and a RuntimeError
        fa_hf.attention_forward(_Module(), q, k, k, None, head_mask=torch.ones(2))


def test_registered_name():
    impl = fa_hf.register()
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                      intermediate_size=48)
    if int(transformers.__version__.split(".")[0]) < 5:
        assert impl == "flashattn_py"
        transformers.AutoModelForCausalLM.from_config(config, attn_implementation="fa_py")
        return
    assert impl == "fa_py"
    with pytest.raises(ValueError, match='attn_implementation="fa_py"'):
        transformers.AutoModelForCausalLM.from_config(config, attn_implementation="flashattn_py")
    with pytest.raises(ValueError, match="contain"):
        fa_hf.register("my_flash_attention")
    transformers.AutoModelForCausalLM.from_config(config, attn_implementation=impl)  # still fine
