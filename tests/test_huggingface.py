"""Hugging Face models on our attention: logits and gradients match attn_implementation="eager"."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

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
