"""The reference Transformer: its attention backends agree, and it trains the same on each."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from flashattn_py.models import BACKENDS, GPT, Seq2SeqTransformer, SinusoidalPositionalEncoding, set_attention_backend


def _outputs_and_grads(model, inputs):
    out = model(*inputs)
    grads = torch.autograd.grad(out.pow(2).mean(), list(model.parameters()))
    return out, grads


@pytest.mark.parametrize("kind", ["seq2seq", "gpt"])
def test_backends_agree(kind, triton_ran):
    torch.manual_seed(0)
    src, tgt = torch.randint(0, 20, (2, 11)), torch.randint(0, 20, (2, 9))
    if kind == "seq2seq":
        base = Seq2SeqTransformer(20, d_model=32, n_heads=2, n_layers=1, d_ff=48)
        pad = torch.zeros(2, 11, dtype=torch.bool)
        pad[1, -4:] = True  # the second source is 7 tokens long
        inputs = (src, tgt, pad)
    else:
        base = GPT(20, d_model=32, n_heads=2, n_layers=2)
        inputs = (tgt,)
    results = {b: _outputs_and_grads(set_attention_backend(copy.deepcopy(base), b), inputs) for b in BACKENDS}
    out_ref, grads_ref = results["naive"]
    for backend in ("flash", "sdpa"):
        out, grads = results[backend]
        torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-4)
        for g, r in zip(grads, grads_ref, strict=True):
            torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)
    triton_ran("attn_fwd", "attn_bwd_dq")


def test_training_curves_match():
    """A few optimiser steps on a toy reversal task give the same losses with flash and naive attention."""
    torch.manual_seed(1)
    base = Seq2SeqTransformer(12, d_model=32, n_heads=2, n_layers=1, d_ff=32)
    gen = torch.Generator().manual_seed(2)
    data = [torch.randint(1, 12, (8, 6), generator=gen) for _ in range(4)]
    curves = {}
    for backend in ("flash", "naive"):
        model = set_attention_backend(copy.deepcopy(base), backend)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        losses = []
        for src in data:
            tgt = src.flip(1)
            tgt_in = torch.cat([torch.zeros(8, 1, dtype=torch.long), tgt[:, :-1]], dim=1)
            loss = F.cross_entropy(model(src, tgt_in).reshape(-1, 12), tgt.reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        curves[backend] = losses
    assert curves["flash"][-1] < curves["flash"][0]
    torch.testing.assert_close(torch.tensor(curves["flash"]), torch.tensor(curves["naive"]), atol=1e-5, rtol=1e-5)


def test_positional_encoding():
    pe = SinusoidalPositionalEncoding(8, max_len=16)
    x = torch.zeros(1, 5, 8)
    y = pe(x)
    assert torch.allclose(y[0, 0], torch.tensor([0.0, 1.0] * 4))  # sin 0, cos 0
    assert torch.allclose(y[0, 3, 0], torch.sin(torch.tensor(3.0)))


def test_bad_backend():
    with pytest.raises(ValueError, match="backend"):
        set_attention_backend(GPT(10), "fast")
