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


@pytest.mark.parametrize("paged", [False, True])
def test_opcheck_decode(paged, device):
    """flashattn_py::attn_decode, the KV-cache call's op: schema, fake and dispatch consistent."""
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(2, 4, 1, 16, generator=gen).to(device)
    shape = (6, 2, 4, 16) if paged else (2, 2, 12, 16)
    k, v = (torch.randn(*shape, generator=gen).to(device) for _ in range(2))
    table = torch.tensor([[5, 0, 3], [1, 4, 2]], dtype=torch.int32, device=device) if paged else None
    seqlens = torch.tensor([7, 12], dtype=torch.int32, device=device)
    scalars = (0.25, -1, 0, 0, 0.0, 0, 0.0, int(ops.SeqMode.DENSE), 0, 0)
    torch.library.opcheck(torch.ops.flashattn_py.attn_decode.default, (q, k, v, seqlens, table, None, *scalars, 2))


def test_eager_route_is_the_custom_op(monkeypatch, device):
    """Plain eager calls skip the dispatcher; outputs and gradients are bit for bit the custom op's."""

    def run():
        torch.manual_seed(0)
        q, k, v, mask = (t.detach().requires_grad_() for t in _inputs(13, device, seed=4))
        out, lse = flashattn_py.attention(q, k, v, causal=True, attn_mask=mask, return_lse=True)
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(device)
        grads = torch.autograd.grad((out * weights).sum() + lse.sum(), (q, k, v, mask))
        dropped = flashattn_py.scaled_dot_product_attention(q, k, v, dropout_p=0.3, enable_gqa=True)
        return out, lse, dropped, *grads

    routes = []
    real_route = ops._eager_route
    monkeypatch.setattr(ops, "_eager_route", lambda *t: routes.append(real_route(*t)) or routes[-1])
    eager = run()
    assert routes and all(routes)
    monkeypatch.setattr(ops, "_eager_route", lambda *t: False)
    via_op = run()
    for a, b in zip(eager, via_op, strict=True):
        assert torch.equal(a, b)


def test_custom_op_taken_where_it_is_observed():
    """A dispatch mode, FakeTensorMode or a functorch transform sees the custom op, not the eager route."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    q = torch.randn(1, 2, 8, 16)
    with Seen() as seen:
        flashattn_py.attention(q, q, q, causal=True)
    assert "flashattn_py.attn_fwd.default" in seen.ops
    with Seen():
        assert not ops._eager_route(q, q, q)
    assert ops._eager_route(q, q, q, None)
    with FakeTensorMode():
        fake = torch.randn(1, 2, 8, 16)
        assert not ops._eager_route(fake, fake, fake)
        assert flashattn_py.attention(fake, fake, fake).shape == fake.shape
    routes = []
    batched = torch.func.vmap(lambda x: (routes.append(ops._eager_route(x)), x)[1])(torch.randn(3, 2))
    assert routes == [False] and batched.shape == (3, 2)
