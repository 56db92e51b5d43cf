"""What a GPU would do, seen without one: the launches of virtual GPUs (`_launch.virtual_gpu`).

Each test runs the CUDA launch path for a GPU of some kind on this CPU-only
machine: FakeTensorMode's CUDA tensors (whose values do not exist, so any host
read raises) or CPU tensors, with the target's configs, descriptors, grids and
multiprocessor count. Shared-memory fit per target is compiled in
tests/test_fit.py; here: grids, host reads, the config cache, split-K, devices,
ROCm, and the memory the kernels must write.
"""

from __future__ import annotations

import inspect
import types

import pytest
import torch
from numerics import make_qkv
from torch._subclasses.fake_tensor import FakeTensorMode

import flashattn_py
from flashattn_py import _config, _launch, _targets
from flashattn_py._contract import AttnSpec
from flashattn_py._launch import virtual_gpu

NVIDIA = ["sm_80", "sm_86", "sm_89", "sm_90", "sm_100", "sm_120"]


def _within_cuda_limits(records) -> None:
    assert records, "nothing was launched"
    for r in records:
        assert 0 < r.grid[0] <= _targets.MAX_GRID_X, (r.name, r.grid)
        assert all(0 < n <= _targets.MAX_GRID_YZ for n in r.grid[1:]), (r.name, r.grid)


def _rand(*shape, dtype=torch.float16, device="cuda", requires_grad=False):
    return torch.randn(*shape, dtype=dtype, device=device, requires_grad=requires_grad)


def _cu(lengths, device):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


# --- host reads: none between the public functions and the launch ---------------------------------------------------

@pytest.mark.parametrize("target", NVIDIA)
def test_cuda_path_reads_nothing_on_the_host(target):
    """FakeTensorMode CUDA tensors hold no values: a .item(), .tolist(), data_ptr() or sync raises.

    attention, scaled_dot_product_attention (float mask) and attention_varlen forward, and the backward
    op on the forward's outputs, run down to the launch on the target."""
    with FakeTensorMode(allow_non_fake_inputs=False), virtual_gpu(target) as records:
        q, k, v = (_rand(2, 8, 200, 128) for _ in range(3))
        out, lse = flashattn_py.attention(q, k, v, causal=True, return_lse=True)
        mask = _rand(2, 1, 1, 200)
        flashattn_py.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        cu = torch.tensor([0, 7, 137, 138], dtype=torch.int32, device="cuda")
        qp, kp, vp = (_rand(150, 8, 64, dtype=torch.bfloat16) for _ in range(3))
        flashattn_py.attention_varlen(qp, kp, vp, cu, cu, 130, 130, causal=True)
        spec = AttnSpec(scale=128 ** -0.5, window_right=0)
        flashattn_py.ops.attn_bwd(torch.randn_like(out), q, k, v, out, lse, None, None, None, False, spec)
    _within_cuda_limits(records)
    names = [r.name for r in records]
    assert names.count("attn_fwd") == 3 and "attn_bwd_dq" in names and "attn_bwd_dkdv" in names


def test_autograd_path_reads_nothing_on_the_host():
    """The same through autograd (fake CPU tensors: CPU-only torch cannot build autograd edges for fake
    CUDA ones; on a virtual GPU they take the CUDA path all the same)."""
    with FakeTensorMode(allow_non_fake_inputs=False), virtual_gpu("sm_90") as records:
        q, k, v = (_rand(2, 8, 200, 128, device="cpu", requires_grad=True) for _ in range(3))
        flashattn_py.attention(q, k, v, causal=True).sum().backward()
        mask = _rand(2, 1, 1, 200, device="cpu", requires_grad=True)
        flashattn_py.scaled_dot_product_attention(q, k, v, attn_mask=mask).sum().backward()
        cu = torch.tensor([0, 7, 137, 138], dtype=torch.int32)
        qp, kp, vp = (_rand(150, 8, 64, device="cpu", requires_grad=True) for _ in range(3))
        flashattn_py.attention_varlen(qp, kp, vp, cu, cu, 130, 130).sum().backward()
    names = [r.name for r in records]
    assert names.count("attn_bwd_dkdv") == 3 and names.count("attn_bwd_dbias") == 1
    _within_cuda_limits(records)


# --- grids: B * H never on an axis limited to 65,535 -----------------------------------------------------------------

def _decode_b1024_h64():
    q = _rand(1024, 64, 1, 128, dtype=torch.bfloat16)
    cache = _rand(1024, 8, 256, 128, dtype=torch.bfloat16)
    lens = torch.full((1024,), 200, dtype=torch.int32, device="cuda")
    flashattn_py.attention_with_kvcache(q, cache, cache, lens)


def _bert_b4096_h16():
    q, k, v = (_rand(4096, 16, 128, 64) for _ in range(3))
    out, lse = flashattn_py.attention(q, k, v, return_lse=True)
    flashattn_py.ops.attn_bwd(out, q, k, v, out, lse, None, None, None, False, AttnSpec(scale=0.125))


def _varlen_4096_sequences():
    cu = torch.arange(0, 4097 * 32, 32, dtype=torch.int32, device="cuda")
    q, k, v = (_rand(4096 * 32, 16, 64) for _ in range(3))
    flashattn_py.attention_varlen(q, k, v, cu, cu, 32, 32, causal=True)


def _dbias_per_head():
    q, k, v = (_rand(512, 160, 64, 64) for _ in range(3))  # dBias of a (B, H, L, S) bias: B * H = 81,920
    bias = _rand(512, 160, 64, 64)
    out, lse = flashattn_py.attention(q, k, v, attn_mask=bias, return_lse=True)
    flashattn_py.ops.attn_bwd(out, q, k, v, out, lse, None, bias, None, True,
                              AttnSpec(scale=0.125, bias_kind=flashattn_py.ops.BiasKind.FLOAT))


@pytest.mark.parametrize("case", [_decode_b1024_h64, _bert_b4096_h16, _varlen_4096_sequences, _dbias_per_head],
                         ids=lambda f: f.__name__.strip("_"))
def test_grids_stay_within_cuda_limits(case):
    """B * H above 65,535 (decode at B1024 H64, a BERT batch B4096 H16, 4,096 packed sequences x 16 heads, a
    per-head dBias): every launch's axes 1 and 2 stay within 65,535 and axis 0 covers every program."""
    with FakeTensorMode(), virtual_gpu("sm_90") as records:
        case()
    _within_cuda_limits(records)
    for r in records:
        if r.name in ("attn_fwd", "attn_bwd_dq", "attn_bwd_preprocess", "attn_bwd_dkdv"):
            heads = r.args["num_heads"] // (r.args["kv_group"] if r.name == "attn_bwd_dkdv" else 1)
            assert r.grid[0] % r.args["num_row_blocks"] == 0 and r.grid[0] // r.args["num_row_blocks"] >= heads


# --- the config cache: keyed on everything that changes the compiled kernel -------------------------------------------

def _fwd_config(call) -> _config.KernelConfig:
    with FakeTensorMode(), virtual_gpu("sm_90") as records:
        call()
    return [r.config for r in records if r.name == "attn_fwd"][-1]


def test_masked_call_after_unmasked_gets_its_own_config():
    """An unmasked D=128 call must not hand its 128x128 tile to a later masked one (295 KB with the bias tile,
    over sm_90's 227 KB), nor the masked call's smaller tile to later unmasked calls."""
    def shapes():
        return [_rand(2, 8, 256, 128) for _ in range(3)], _rand(2, 1, 1, 256)

    def unmasked():
        (q, k, v), _ = shapes()
        flashattn_py.attention(q, k, v)

    def masked():
        (q, k, v), mask = shapes()
        flashattn_py.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    alone = {"unmasked": _fwd_config(unmasked), "masked": _fwd_config(masked)}
    assert alone["unmasked"] != alone["masked"]
    assert _fwd_config(lambda: (unmasked(), masked())) == alone["masked"]
    assert _fwd_config(lambda: (masked(), unmasked())) == alone["unmasked"]


def test_config_key_covers_every_constexpr():
    """Changing any constexpr of a launch (bias kind, dropout, score modifiers, descriptors, decode, ...) or its
    GPU changes the config cache's key."""
    with FakeTensorMode(), virtual_gpu("sm_90") as records:
        q, k, v = (_rand(2, 8, 256, 128, requires_grad=False) for _ in range(3))
        flashattn_py.attention(q, k, v, causal=True)
    record = records[0]
    params = inspect.signature(getattr(record.kernel, "fn", record.kernel)).parameters.values()
    constexprs = [p.name for p in params if "constexpr" in str(p.annotation)]
    assert len(constexprs) > 15
    def key(args, target=record.target):
        return _launch._config_key(record.name, record.kernel, target, args)

    base = key(record.args)
    assert base != key(record.args, _targets.TARGETS["sm_100"])
    for name in constexprs:
        value = record.args[name]
        # + 16 keeps what Triton specializes a runtime int on (== 1, % 16): only the value differs
        changed = (not value) if isinstance(value, bool) else value + 16 if isinstance(value, int) else f"{value}x"
        assert base != key({**record.args, name: changed}), name


# --- split-K decoding ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("target", NVIDIA)
def test_default_split_k_decode_on_every_target(target):
    """num_splits=0 splits B1 H32 by the target's multiprocessors; every split starts on a key block of the
    config that runs, and the splits cover the cache."""
    gpu = _targets.TARGETS[target]
    with FakeTensorMode(), virtual_gpu(target) as records:
        q = _rand(1, 32, 1, 128, dtype=torch.bfloat16)
        cache = _rand(1, 8, 4096, 128, dtype=torch.bfloat16)
        flashattn_py.attention_with_kvcache(q, cache, cache, torch.tensor([4000], dtype=torch.int32, device="cuda"))
    (record,) = records
    splits = _config.auto_splits(gpu.multiprocessors, 32, 4096)
    assert splits > 1 and record.grid[-1] == splits and not record.args["FLAT_GRID"]
    assert record.args["split_len"] % record.config.block_n == 0 and record.args["split_len"] * splits >= 4096
    assert record.config == _config.decode_configs(128, 2, gpu)[0]


def test_split_k_tries_every_decode_config(monkeypatch):
    """When the first decode configs do not fit, the next one runs, with a split length of its own block."""
    table = _config.decode_configs(128, 2, _targets.TARGETS["sm_89"])
    too_big = table[0].block_n
    fitting = next(c for c in table if c.block_n != too_big)
    compiled_for = []

    def fake_compile(kernel, grid, args, cfg, gpu, virtual):
        compiled_for.append(cfg)
        shared = gpu.max_shared + 1 if cfg.block_n == too_big else gpu.max_shared
        return types.SimpleNamespace(metadata=types.SimpleNamespace(shared=shared))

    monkeypatch.setattr(_launch, "_compile", fake_compile)
    with FakeTensorMode(), virtual_gpu("sm_89", compile=True) as records:
        q = _rand(1, 32, 1, 128, dtype=torch.bfloat16)
        cache = _rand(1, 8, 4096, 128, dtype=torch.bfloat16)
        flashattn_py.attention_with_kvcache(q, cache, cache, torch.tensor([4000], dtype=torch.int32, device="cuda"),
                                            num_splits=3)
    (record,) = records
    assert compiled_for[:table.index(fitting) + 1] == table[:table.index(fitting) + 1]
    assert record.config == fitting and record.refused == tuple(table[:table.index(fitting)])
    per_split = -(-4096 // 3)
    assert record.args["split_len"] == -(-per_split // fitting.block_n) * fitting.block_n


# --- devices, descriptors, ROCm -----------------------------------------------------------------------------------

def test_expanded_kv_keeps_pointers():
    """K/V expanded along the batch (stride 0) never go into a TMA descriptor."""
    with FakeTensorMode(), virtual_gpu("sm_90") as records:
        q = _rand(4, 8, 256, 128)
        k, v = (_rand(1, 8, 256, 128).expand(4, -1, -1, -1) for _ in range(2))
        flashattn_py.attention(q, k, v)
        flashattn_py.attention(q, *(_rand(4, 8, 256, 128) for _ in range(2)))
    assert [r.args["STREAM_DESC"] for r in records] == [False, True]


def test_rocm_is_not_hopper(monkeypatch):
    """ROCm torch reports MI300 as is_cuda with capability (9, 4): it must get AMD's target, no TMA, and
    configs for its 64 KB of LDS."""
    props = types.SimpleNamespace(gcnArchName="gfx942:sramecc+:xnack-", multi_processor_count=304,
                                  shared_memory_per_block_optin=65536, name="AMD Instinct MI300X", major=9, minor=4)
    monkeypatch.setattr(torch.version, "hip", "6.2.0", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    _targets._device_target.cache_clear()
    try:
        gpu = _targets.device_target(torch.device("cuda", 0))
    finally:
        _targets._device_target.cache_clear()
    assert (gpu.vendor, gpu.name, gpu.tma, gpu.warp_size) == ("amd", "gfx942", False, 64)
    with FakeTensorMode(), virtual_gpu(gpu) as records:
        q, k, v = (_rand(2, 8, 256, 128) for _ in range(3))
        flashattn_py.attention(q, k, v)
    assert records[0].args["STREAM_DESC"] is False
    assert records[0].config != _config.fwd_configs(128, 2, _targets.TARGETS["sm_90"])[0]


def test_unknown_target_is_refused():
    with pytest.raises(ValueError, match="sm_90"):
        with virtual_gpu("sm_99"):
            pass


# --- memory the kernels must write: varlen tails ----------------------------------------------------------------------

def test_varlen_padded_tail_is_zero(device, triton_ran):
    """A packed buffer padded past cu_seqlens[-1]: those rows get output 0, LSE -inf and zero gradients (the
    allocations are poisoned with NaN, so a row left unwritten shows)."""
    lengths, total = [5, 17, 9], 40
    gen = torch.Generator().manual_seed(3)
    q, k, v, do = (torch.randn(total, 2, 16, generator=gen).to(device) for _ in range(4))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    cu = _cu(lengths, device)
    with _launch.poison_allocations():
        out, lse = flashattn_py.attention_varlen(q, k, v, cu, cu, 17, 17, causal=True, return_lse=True)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)
    end = sum(lengths)
    for name, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert not t.isnan().any(), name
        assert torch.equal(t[end:], torch.zeros_like(t[end:])), name
    assert torch.isneginf(lse[:, end:]).all()
    ref = flashattn_py.attention_varlen(q[:end], k[:end], v[:end], cu, cu, 17, 17, causal=True)
    torch.testing.assert_close(out[:end], ref, atol=0, rtol=0)
    triton_ran("attn_fwd", "attn_bwd_dq")


def test_poisoned_allocations_show_unwritten_rows(device):
    """The poison works: an allocation the kernels never touch reads NaN."""
    q = torch.empty(3, 4, device=device)
    with _launch.poison_allocations():
        assert _launch._empty_like(q).isnan().all() and _launch._empty((2, 2), q).isnan().all()
    assert not _launch._poison


@pytest.mark.parametrize("dtype", [torch.float16])
def test_split_k_with_poison_matches(dtype, device, triton_ran):
    """Forced splits, some of them empty for a short sequence, under poisoned memory: every split writes."""
    q, k, v, _ = make_qkv(2, 4, 1, 96, 32, dtype, device, seed=4)
    lens = torch.tensor([96, 7], dtype=torch.int32, device=device)
    out = flashattn_py.attention_with_kvcache(q.detach(), k.detach(), v.detach(), lens, num_splits=5)
    for b, n in enumerate((96, 7)):
        ref = flashattn_py.attention_reference(q[b:b + 1].double(), k[b:b + 1, :, :n].double(),
                                               v[b:b + 1, :, :n].double(), causal="bottom_right")
        torch.testing.assert_close(out[b:b + 1].double(), ref, atol=2e-3, rtol=2e-3)
    triton_ran("attn_fwd")


@pytest.mark.parametrize("target", [*NVIDIA, "gfx942", "gfx950"])
def test_no_launch_site_has_a_single_candidate(target):
    """A config the GPU refuses always has a smaller one behind it: every candidate list has two or more."""
    gpu = _targets.TARGETS[target]
    for block_d in (16, 32, 64, 128, 256):
        for elem in (2, 4):
            assert len(_config.decode_configs(block_d, elem, gpu)) >= 2
            for heavy in (False, True):
                for kind in ("fwd", "dkdv", "dq"):
                    for desc in (False, True):
                        assert len(_config.candidates(kind, block_d, elem, gpu, desc, heavy)) >= 2, (kind, block_d)
    assert len(_config.PREPROCESS) >= 2


def test_shared_memory_limit_from_tritons_driver(monkeypatch):
    """torch before 2.6 has no shared_memory_per_block_optin: the limit comes from Triton's driver (what its
    loader enforces), never from a 48 KB fallback that would refuse every large tile without a word."""
    props = types.SimpleNamespace(multi_processor_count=132, name="NVIDIA H100", major=9, minor=0)  # torch 2.4's
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    monkeypatch.setattr(_targets, "_triton_device_properties",
                        lambda index: {"max_shared_mem": 232448, "multiprocessor_count": 132})
    _targets._device_target.cache_clear()
    try:
        gpu = _targets.device_target(torch.device("cuda", 0))
    finally:
        _targets._device_target.cache_clear()
    assert (gpu.max_shared, gpu.tma, gpu.capability) == (232448, True, (9, 0))
    assert _config.fwd_configs(128, 2, gpu) == _config.fwd_configs(128, 2, _targets.TARGETS["sm_90"])


def test_dropout_on_fake_tensors():
    """Dropout's Philox key is drawn on q's device and handed to every kernel as a tensor, never read on the host
    (a CUDA graph replays the draw, so each replay gets a fresh mask); the backward takes the forward's key."""
    with FakeTensorMode(allow_non_fake_inputs=False), virtual_gpu("sm_90") as records:
        # fake CPU tensors (the virtual GPU's): autograd over fake CUDA tensors needs a CUDA build of torch
        q, k, v = (_rand(2, 8, 200, 64, device="cpu", requires_grad=True) for _ in range(3))
        flashattn_py.scaled_dot_product_attention(q, k, v, dropout_p=0.1).sum().backward()
    passes = [r for r in records if r.name != "attn_bwd_preprocess"]
    assert {r.name for r in passes} == {"attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq"}
    assert all(r.args["DROPOUT"] for r in passes)
    seeds = [r.args["SEED"] for r in passes]
    assert all(isinstance(s, torch.Tensor) and s.device == q.device and s.dtype == torch.int64
               and tuple(s.shape) == (1,) for s in seeds), seeds
    assert all(s is seeds[0] for s in seeds)  # one key: the backward recomputes the forward's mask


def _every_pass(device):
    """Forward + backward of attention (GQA, causal), SDPA with a float mask's gradient (the dBias pass),
    varlen and split-K decode: every kernel and grid layout, small enough for the interpreter."""
    gen = torch.Generator().manual_seed(5)

    def rand(*shape, grad=True):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=torch.float16).requires_grad_(grad)

    q, k, v, do = rand(2, 4, 37, 32), rand(2, 2, 45, 32), rand(2, 2, 45, 32), rand(2, 4, 37, 32, grad=False)
    out = flashattn_py.attention(q, k, v, causal="bottom_right")
    results = [out, *torch.autograd.grad(out, (q, k, v), do)]
    mask = rand(2, 4, 37, 45)
    out = flashattn_py.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                    attn_mask=mask)
    results += [out, *torch.autograd.grad(out, (q, mask), do)]
    cu = torch.tensor([0, 5, 30, 31], dtype=torch.int32, device=device)
    qp, kp, vp = (rand(40, 2, 16) for _ in range(3))
    out = flashattn_py.attention_varlen(qp, kp, vp, cu, cu, 25, 25, causal=True)
    results += [out, *torch.autograd.grad(out.sum(), (qp, kp, vp))]
    lens = torch.tensor([40, 3], dtype=torch.int32, device=device)
    results.append(flashattn_py.attention_with_kvcache(q.detach()[:, :, :2], k.detach(), v.detach(), lens,
                                                       num_splits=3))
    return results


def test_flat_grids_compute_the_same(device, triton_ran, monkeypatch):
    """The flat grid (B * H on axis 0, taken past 65,535) gives bit-identical results to the two-axis one in
    every pass; forced here on small problems by lowering the threshold."""
    two_axis = _every_pass(device)
    monkeypatch.setattr(_launch, "FLAT_GRID_ABOVE", 0)
    with virtual_gpu("sm_90") as records:  # the flag the launcher sets, seen in the launches it would make
        _every_pass(device)
    assert records and all(r.args["FLAT_GRID"] for r in records)
    flat = _every_pass(device)
    for i, (a, b) in enumerate(zip(two_axis, flat, strict=True)):
        assert torch.equal(a, b), i
    triton_ran("attn_fwd", "attn_bwd_preprocess", "attn_bwd_dkdv", "attn_bwd_dq", "attn_bwd_dbias")
