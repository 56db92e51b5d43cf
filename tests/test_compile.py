"""torch.compile sees one custom op per attention call: no graph breaks, dynamic lengths, eager-equal results."""

from __future__ import annotations

import copy

import pytest
import torch

import flashattn_py
from flashattn_py import ops
from flashattn_py.models import GPT


def _fn(q, k, v, mask):
    out = flashattn_py.attention(q, k, v, causal="bottom_right", window=(24, 0), softcap=20.0)
    return out + flashattn_py.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def _inputs(S, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, S, 16, generator=gen).to(device).requires_grad_()
    k = torch.randn(2, 2, S + 3, 16, generator=gen).to(device).requires_grad_()
    v = torch.randn(2, 2, S + 3, 16, generator=gen).to(device).requires_grad_()
    mask = (torch.randn(2, 1, 1, S + 3, generator=gen) * 3).to(device).requires_grad_()
    return q, k, v, mask


def test_no_graph_breaks(device):
    explanation = torch._dynamo.explain(_fn)(*_inputs(20, device))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_matches_eager_dynamic(backend, device, triton_ran):
    torch._dynamo.reset()
    compiled = torch.compile(_fn, fullgraph=True, dynamic=True, backend=backend)
    for S in (20, 37):  # a second length reuses the dynamic graph
        inputs = _inputs(S, device, seed=S)
        eager_out = _fn(*inputs)
        eager_grads = torch.autograd.grad(eager_out.sum(), inputs)
        out = compiled(*inputs)
        grads = torch.autograd.grad(out.sum(), inputs)
        torch.testing.assert_close(out, eager_out, atol=1e-5, rtol=1e-5)
        for g, e in zip(grads, eager_grads, strict=True):
            torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)
    triton_ran("attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq", "attn_bwd_dbias")


def test_compiled_models(device):
    torch._dynamo.reset()
    torch.manual_seed(0)
    gpt = GPT(50, d_model=32, n_heads=2, n_layers=2).to(device)
    idx = torch.randint(0, 50, (2, 17), device=device)
    explanation = torch._dynamo.explain(gpt)(idx)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(copy.deepcopy(gpt), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(idx), gpt(idx), atol=1e-5, rtol=1e-5)

    mha = flashattn_py.MultiheadAttention(32, 4, batch_first=True).to(device)
    x = torch.randn(2, 11, 32, device=device)
    kpm = torch.zeros(2, 11, dtype=torch.bool, device=device)
    kpm[1, -3:] = True

    def run(x):
        return mha(x, x, x, key_padding_mask=kpm, need_weights=True)

    explanation = torch._dynamo.explain(run)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    out, weights = torch.compile(run, fullgraph=True, backend="aot_eager")(x)
    ref_out, ref_weights = run(x)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weights, ref_weights, atol=1e-5, rtol=1e-5)


def test_varlen_compiles(device):
    torch._dynamo.reset()
    q = torch.randn(20, 2, 16, device=device, requires_grad=True)
    cu = torch.tensor([0, 7, 20], dtype=torch.int32, device=device)

    def run(q):
        return flashattn_py.attention_varlen(q, q, q, cu, cu, 13, 13, causal=True)

    explanation = torch._dynamo.explain(run)(q)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch.testing.assert_close(torch.compile(run, fullgraph=True, backend="aot_eager")(q), run(q))


@pytest.mark.parametrize("case", ["dense", "gqa_mask", "packed"])
def test_opcheck(case, device):
    gen = torch.Generator().manual_seed(1)

    def t(*shape):
        return torch.randn(*shape, generator=gen).to(device).requires_grad_()

    cu = None
    if case == "packed":
        q, k, v = t(12, 2, 16), t(15, 2, 16), t(15, 2, 16)
        cu_q = torch.tensor([0, 5, 12], dtype=torch.int32, device=device)
        cu = torch.tensor([0, 9, 15], dtype=torch.int32, device=device)
        args = (q, k, v, None, None, cu_q, cu, 0.25, 0, -1, 0, 0.0, 0, 0.0, 1, 7, 9)
    elif case == "gqa_mask":
        q, k, v = t(2, 4, 9, 16), t(2, 2, 11, 16), t(2, 2, 11, 16)
        bias = t(2, 1, 1, 11)
        args = (q, k, v, bias, None, None, None, 0.25, 2, 5, 0, 10.0, int(ops.BiasKind.FLOAT), 0.0, 0, 0, 0)
    else:
        q, k, v = t(1, 2, 10, 16), t(1, 2, 10, 16), t(1, 2, 10, 16)
        args = (q, k, v, None, None, None, None, 0.25, 0, -1, 0, 0.0, 0, 0.0, 0, 0, 0)
    torch.library.opcheck(torch.ops.flashattn_py.attn_fwd.default, args)
    if case == "dense":  # the backward op on its own, with an LSE gradient
        o, lse, seed = torch.ops.flashattn_py.attn_fwd(*args)
        do, dlse = torch.randn_like(o), torch.randn_like(lse)
        bwd_args = (do, q.detach(), k.detach(), v.detach(), o.detach(), lse.detach(), dlse, None, None, None, None,
                    seed, False, *args[7:])
        torch.library.opcheck(torch.ops.flashattn_py.attn_bwd.default, bwd_args)
