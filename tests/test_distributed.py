"""Ring attention (flashattn_py.distributed) on CPU processes over gloo, against single-process attention.

One process group per world size (2, 3, 4) runs every case of that size, so the
whole file pays for three launches. The workers set ``TRITON_INTERPRET=0``
before their first attention call: they run the package's PyTorch CPU path (the
interpreter would take minutes for this many calls); the ring's logic is the
same on every backend. Rank 0 gathers the shards with `unshard_sequence` and
saves them; this process checks them with the project's numerics rule
(tests/numerics.py) against the fp64 reference and PyTorch's same-dtype math.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import math
import os
import sys
import tempfile
import time
import traceback
import zlib
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from numerics import check_against_reference

import flashattn_py.distributed as fd
from flashattn_py import attention, attention_reference
from flashattn_py.distributed import ring_attention, shard_lengths, shard_positions, shard_sequence, unshard_sequence

LAUNCH_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Case:
    name: str
    B: int = 1
    H: int = 2
    H_kv: int = 2
    S: int = 13
    D: int = 8
    dtype: str = "float32"
    causal: bool = False
    window: tuple[int, int] = (-1, -1)
    layout: str = "zigzag"
    backward: str = "auto"
    scale: float | None = None
    with_dlse: bool = False  # also backpropagate a gradient into the LSE
    twice: bool = False  # run again and require bitwise-identical results
    seed: str = ""  # inputs come from this name (default: the case's name)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


def _inputs(case: Case):
    """Full-sequence q, k, v, dO and dLSE, the same on every rank and in this process."""
    gen = torch.Generator().manual_seed(zlib.crc32((case.seed or case.name).encode()))
    q = torch.randn(case.B, case.H, case.S, case.D, generator=gen)
    k = torch.randn(case.B, case.H_kv, case.S, case.D, generator=gen)
    v = torch.randn(case.B, case.H_kv, case.S, case.D, generator=gen)
    do = torch.randn(case.B, case.H, case.S, case.D, generator=gen)
    dlse = torch.randn(case.B, case.H, case.S, generator=gen)
    return [t.to(case.torch_dtype) for t in (q, k, v, do)] + [dlse]


CASES: dict[int, list[Case]] = {
    2: [
        Case("full_fp32", S=13),
        Case("causal_zigzag_fp32", S=13, causal=True, twice=True),
        Case("causal_contiguous_fp32", S=11, causal=True, layout="contiguous"),
        Case("causal_zigzag_fp16", S=14, causal=True, dtype="float16", H=4, H_kv=2),
        Case("full_fp16_gqa", S=9, dtype="float16", H=4, H_kv=1),
        Case("window_zigzag", S=15, window=(3, 2), scale=0.7),
        Case("causal_recompute_dlse", S=13, causal=True, backward="recompute", with_dlse=True, seed="dlse"),
        Case("causal_global_lse_dlse", S=13, causal=True, backward="global_lse", with_dlse=True, seed="dlse"),
        Case("bf16_causal", S=10, causal=True, dtype="bfloat16"),
    ],
    3: [
        Case("causal_zigzag_gqa", S=17, causal=True, H=4, H_kv=2, twice=True),
        Case("causal_contiguous", S=16, causal=True, layout="contiguous"),
        Case("full_fp16", S=11, dtype="float16"),
        Case("causal_window_contiguous", S=19, causal=True, window=(4, -1), layout="contiguous", twice=True),
        Case("recompute_full_gqa", S=10, H=4, H_kv=2, backward="recompute"),
    ],
    4: [
        Case("causal_zigzag", S=21, causal=True, twice=True),
        Case("causal_contiguous_fp16_gqa", S=18, causal=True, dtype="float16", H=4, H_kv=2, layout="contiguous"),
        Case("window_full_zigzag", S=22, window=(2, 5)),
        Case("short_sequence", S=6, causal=True),  # fewer tokens than zigzag chunks: some chunks are empty
    ],
}


# --- the workers ---------------------------------------------------------------------------------------------------
#
# One launch of 4 processes serves every world size: P = 4 is the default group, P = 3 the subgroup of ranks
# [0, 1, 2] and P = 2 the subgroup [1, 3] (so group ranks differ from global ranks, as in real jobs).

WORLD = 4
GROUP_RANKS = {2: [1, 3], 3: [0, 1, 2], 4: [0, 1, 2, 3]}


def _run_case(case: Case, group, rank: int, world: int):
    q, k, v, do, dlse = _inputs(case)
    shard = [shard_sequence(t, rank, world, case.layout).requires_grad_() for t in (q, k, v)]
    do_l = shard_sequence(do, rank, world, case.layout)
    dlse_l = shard_sequence(dlse, rank, world, case.layout)
    kw = dict(causal=case.causal, window=case.window, layout=case.layout, scale=case.scale, group=group)

    def once():
        out, lse = fd._ring_attention(*shard, return_lse=True, backward=case.backward, **kw)
        outs, grads = (out, lse) if case.with_dlse else (out,), (do_l, dlse_l) if case.with_dlse else (do_l,)
        return (out, lse, *torch.autograd.grad(outs, shard, grads))

    local = once()
    result = {"shards": [unshard_sequence(t, group, case.layout) for t in local]}
    if case.twice:
        again = once()
        result["bitwise"] = all(torch.equal(a, b) for a, b in zip(local, again, strict=True))
    return result


def _faults(group, rank: int, world: int) -> dict[str, str]:
    """Each fault on its own; every rank reports the error it got (or 'no error')."""
    q = torch.randn(1, 2, 8, 8)
    found = {}

    def attempt(name, fn):
        try:
            fn()
            found[name] = "no error"
        except (TypeError, ValueError, RuntimeError) as err:
            found[name] = f"{type(err).__name__}: {err}"

    good = shard_sequence(q, rank, world)
    longer = torch.randn(1, 2, good.shape[2] + 1, 8)
    attempt("length", lambda: ring_attention(*(longer if rank == 1 else good,) * 3, causal=True, group=group))
    narrow = torch.randn(1, 2, good.shape[2], 4)
    attempt("head_dim", lambda: ring_attention(*(narrow if rank == 1 else good,) * 3, group=group))
    attempt("invalid", lambda: ring_attention(good[0] if rank == 1 else good, good, good, group=group))
    attempt("options", lambda: ring_attention(good, good, good, causal=rank == 1, group=group))
    attempt("after", lambda: ring_attention(good, good, good, causal=True, group=group))  # the group still works
    return found


@contextlib.contextmanager
def _counting():
    """Count, during the block: shape agreements, collectives, and host reads made by flashattn_py.distributed."""
    import torch.distributed as dist

    import flashattn_py.distributed._agreement as agreement

    counts: collections.Counter = collections.Counter()
    patched = []

    def count(owner, name: str, what: str, ours_only: bool = False) -> None:
        original = getattr(owner, name)

        def counted(*args, **kwargs):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if not ours_only or caller.startswith("flashattn_py.distributed"):
                counts[what] += 1
            return original(*args, **kwargs)

        patched.append((owner, name, original, name in vars(owner)))
        setattr(owner, name, counted)

    count(agreement, "_agree", "agreements")
    for name in ("all_gather", "all_gather_into_tensor", "all_reduce", "broadcast", "barrier"):
        count(dist, name, "collectives")
    for name in ("cpu", "tolist", "item", "__bool__", "__int__", "__float__", "__index__"):
        count(torch.Tensor, name, "host_reads", ours_only=True)
    try:
        yield counts
    finally:
        for owner, name, original, own in reversed(patched):
            if own:
                setattr(owner, name, original)
            else:
                delattr(owner, name)


def _agreement_reuse(group, rank: int, world: int) -> dict:
    """Agreements, collectives and host reads of a sequence of calls (one signature of its own: H 3, D 6)."""

    def call(S: int, *, causal: bool = True, seq_len: int | None = None, restride: bool = False,
             grad: bool = False) -> dict:
        gen = torch.Generator().manual_seed(S)
        full = [torch.randn(1, 3, S, 6, generator=gen) for _ in range(3)]
        shard = [shard_sequence(t, rank, world) for t in full]
        if restride:  # the same values with other strides: not part of the signature
            shard = [t.transpose(2, 3).contiguous().transpose(2, 3) for t in shard]
        shard = [t.requires_grad_(grad) for t in shard]
        with _counting() as counts:
            out = ring_attention(*shard, causal=causal, group=group, seq_len=seq_len)
        full = [t.requires_grad_(grad) for t in full]
        ref = attention(*full, causal=causal)
        ok = torch.allclose(out, shard_sequence(ref, rank, world), atol=1e-5, rtol=1e-5)
        if grad:
            do = torch.randn(out.shape, generator=gen)
            mine = torch.autograd.grad(out, shard, do)
            do_full = unshard_sequence([do] if world == 1 else _gathered(do, group, world), world)
            theirs = torch.autograd.grad(ref, full, do_full)
            ok &= all(torch.allclose(a, shard_sequence(b, rank, world), atol=1e-5, rtol=1e-5)
                      for a, b in zip(mine, theirs, strict=True))
        return {"counts": dict(counts), "ok": bool(ok)}

    return {
        "first": call(12),
        "again": call(12, restride=True),
        "grad": call(12, grad=True),  # needs_grad is part of the signature
        "grad_again": call(12, grad=True),
        "options": call(12, causal=False),
        "options_again": call(12, causal=False),
        "every_shard_longer": call(16),  # 12 -> 16 tokens: shards 6, 6 -> 8, 8
        "back": call(12),  # without seq_len a signature keeps its last agreement only
        "seq_len_8": call(8, seq_len=8),
        "seq_len_9": call(9, seq_len=9),  # shards 4, 4 -> 5, 4: rank 1's is unchanged
        "seq_len_8_again": call(8, seq_len=8),
        "seq_len_9_again": call(9, seq_len=9),
    }


def _gathered(x: torch.Tensor, group, world: int) -> list[torch.Tensor]:
    """Every rank's shard of x (all ranks' shards have equal shapes here)."""
    parts = [torch.empty_like(x) for _ in range(world)]
    torch.distributed.all_gather(parts, x.contiguous(), group=group)
    return parts


def _gpt_training(group, rank: int, world: int) -> dict:
    """The reference GPT on sharded tokens vs one process on the whole batch: losses and gradients per step."""
    import torch.nn.functional as F

    from flashattn_py.models import GPT

    torch.manual_seed(0)
    base = GPT(16, d_model=32, n_heads=4, n_layers=2, max_len=64)
    single = copy.deepcopy(base)
    sharded = fd.context_parallel(copy.deepcopy(base), group, layout="zigzag")
    gen = torch.Generator().manual_seed(1)
    T = 15  # not a multiple of 2 * world
    opt_single = torch.optim.SGD(single.parameters(), lr=0.2)
    opt_sharded = torch.optim.SGD(sharded.parameters(), lr=0.2)
    report = {"loss_single": [], "loss_sharded": [], "max_grad_err": [], "max_grad": []}
    for _ in range(3):
        tokens = torch.randint(0, 16, (2, T + 1), generator=gen)
        idx, tgt = tokens[:, :-1], tokens[:, 1:]
        loss = F.cross_entropy(single(idx).reshape(-1, 16), tgt.reshape(-1))
        opt_single.zero_grad()
        loss.backward()
        idx_l, tgt_l = (shard_sequence(t, rank, world, "zigzag", dim=1) for t in (idx, tgt))
        local = F.cross_entropy(sharded(idx_l).reshape(-1, 16), tgt_l.reshape(-1), reduction="sum") / tgt.numel()
        opt_sharded.zero_grad()
        local.backward()
        fd.all_reduce_gradients(sharded, group)
        total = local.detach().clone()
        torch.distributed.all_reduce(total, group=group)
        report["loss_single"].append(loss.item())
        report["loss_sharded"].append(total.item())
        errs = [(a.grad - b.grad).abs().max().item() for a, b in zip(single.parameters(), sharded.parameters(),
                                                                     strict=True)]
        report["max_grad_err"].append(max(errs))
        report["max_grad"].append(max(p.grad.abs().max().item() for p in single.parameters()))
        opt_single.step()
        opt_sharded.step()
    return report


def _guarded(fn, *args):
    try:
        return fn(*args)
    except Exception:
        return {"error": traceback.format_exc()}


def _worker(rank: int, world: int, store: str, out_dir: str) -> None:
    os.environ["TRITON_INTERPRET"] = "0"  # before the first attention call: the PyTorch CPU path
    torch.set_num_threads(1)
    import torch.distributed as dist

    timeout = timedelta(seconds=60)
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world, timeout=timeout)
    groups = {p: dist.new_group(ranks, timeout=timeout) if p != world else None for p, ranks in GROUP_RANKS.items()}
    results: dict = {}
    for p, ranks in GROUP_RANKS.items():
        if rank in ranks:
            group, me = groups[p], ranks.index(rank)
            res = {"cases": {c.name: _guarded(_run_case, c, group, me, p) for c in CASES[p]}}
            if p == 2:
                res["faults"] = _faults(group, me, p)
                res["gpt"] = _guarded(_gpt_training, group, me, p)
                res["agreement"] = _guarded(_agreement_reuse, group, me, p)
            results[p] = res
        dist.barrier()
    dist.destroy_process_group()
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")


def launch(world: int, target=_worker, args: tuple = (), timeout_s: float = LAUNCH_TIMEOUT_S) -> list[dict]:
    """Run `target(rank, world, store, out_dir, *args)` in `world` spawned processes; their saved results.

    Joins with a deadline and kills every process still alive on failure, so no
    test leaves processes behind.
    """
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = [ctx.Process(target=target, args=(r, world, store, tmp, *args), daemon=True) for r in range(world)]
        try:
            for p in procs:
                p.start()
            deadline = time.monotonic() + timeout_s
            for p in procs:
                p.join(max(0.0, deadline - time.monotonic()))
            alive = [r for r, p in enumerate(procs) if p.is_alive()]
            if alive:
                raise AssertionError(f"ranks {alive} of {world} still running after {timeout_s:.0f} s (killed)")
            codes = [p.exitcode for p in procs]
            if any(codes):
                raise AssertionError(f"worker exit codes {codes} (see the captured stderr)")
            return [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False) for r in range(world)]
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                if p.pid is not None:
                    p.join(5)


_LAUNCHED: list[list[dict]] = []


def results_for(p: int) -> list[dict]:
    """Every group rank's results for world size p (one launch for the whole file)."""
    if not _LAUNCHED:
        _LAUNCHED.append(launch(WORLD))
    return [_LAUNCHED[0][g][p] for g in GROUP_RANKS[p]]


# --- the tests -----------------------------------------------------------------------------------------------------

ALL_CASES = [(w, c) for w, cases in CASES.items() for c in cases]


@pytest.mark.parametrize("world,case", ALL_CASES, ids=[f"P{w}-{c.name}" for w, c in ALL_CASES])
def test_matches_single_process(world: int, case: Case):
    """out, lse, dq, dk, dv of the ring vs one process, by the numerics rule (fp64 reference, same-dtype PyTorch)."""
    res = results_for(world)[0]["cases"][case.name]
    assert "error" not in res, res.get("error")
    q, k, v, do, dlse = _inputs(case)
    out, lse, dq, dk, dv = res["shards"]
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    kw = dict(causal=case.causal, window=case.window, scale=case.scale)
    if case.with_dlse:  # the rule's helpers take dO only: compare with the fp64 reference, at fp32 tolerance
        full64 = [t.detach().double().requires_grad_() for t in full]
        ref_out, ref_lse = attention_reference(*full64, return_lse=True, **kw)
        ref = (ref_out, ref_lse, *torch.autograd.grad((ref_out, ref_lse), full64, (do.double(), dlse.double())))
        for name, ours, theirs in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, dq, dk, dv), ref, strict=True):
            torch.testing.assert_close(ours.double(), theirs, atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
        return
    check_against_reference((out, lse, dq, dk, dv), *full, do, **kw)
    if case.twice:
        assert results_for(world)[0]["cases"][case.name]["bitwise"], "two runs differ"


@pytest.mark.parametrize("world", [2, 3, 4])
def test_deterministic(world: int):
    """Two runs of the same call give bitwise-identical out, lse, dq, dk, dv on every rank."""
    flags = {(g, n): r["bitwise"] for g, res in enumerate(results_for(world)) for n, r in res["cases"].items()
             if "bitwise" in r}
    assert flags and all(flags.values()), flags


def test_backward_formulations_agree():
    """The global-LSE backward (registered op) and the recompute one give the same gradients."""
    cases = results_for(2)[0]["cases"]
    a, b = cases["causal_recompute_dlse"]["shards"], cases["causal_global_lse_dlse"]["shards"]
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


def test_faults_raise_on_every_rank():
    faults = [r["faults"] for r in results_for(2)]  # group ranks 0 and 1
    for rank, found in enumerate(faults):
        assert "ValueError" in found["length"] and "shard lengths" in found["length"], (rank, found["length"])
        assert "ValueError" in found["head_dim"] and "head_dim" in found["head_dim"], (rank, found["head_dim"])
        assert "ValueError" in found["options"] and "causal" in found["options"], (rank, found["options"])
        assert found["after"] == "no error", (rank, found["after"])
    assert "rank(s) [1]" in faults[0]["invalid"], faults[0]["invalid"]
    assert "q must be a 4-D" in faults[1]["invalid"], faults[1]["invalid"]


# how many shape agreements each step of _agreement_reuse makes: once per signature, then none
AGREEMENTS = {"first": 1, "again": 0, "grad": 1, "grad_again": 0, "options": 1, "options_again": 0,
              "every_shard_longer": 1, "back": 1, "seq_len_8": 1, "seq_len_9": 1, "seq_len_8_again": 0,
              "seq_len_9_again": 0}


def test_shape_agreement_once_per_signature():
    """A call of an agreed signature makes no agreement, no collective and no host read; a new one agrees."""
    for rank, res in enumerate(r["agreement"] for r in results_for(2)):
        assert "error" not in res, res.get("error")
        assert list(res) == list(AGREEMENTS)
        for step, expected in AGREEMENTS.items():
            counts, ok = res[step]["counts"], res[step]["ok"]
            assert ok, (rank, step)
            assert counts.get("agreements", 0) == expected, (rank, step, counts)
            if expected:  # the counters see the agreement's collective and its host read
                assert counts.get("collectives", 0) == 1 and counts.get("host_reads", 0) > 0, (rank, step, counts)
            else:
                assert counts.get("collectives", 0) == 0 and counts.get("host_reads", 0) == 0, (rank, step, counts)


def test_gpt_trains_like_one_process():
    """The reference GPT, context-parallel over 2 ranks: the same losses and gradients as one process."""
    for rank, res in enumerate(r["gpt"] for r in results_for(2)):
        assert "error" not in res, res.get("error")
        torch.testing.assert_close(torch.tensor(res["loss_sharded"]), torch.tensor(res["loss_single"]),
                                   atol=1e-5, rtol=1e-5)
        for err, mag in zip(res["max_grad_err"], res["max_grad"], strict=True):
            assert err <= 1e-5 * max(mag, 1.0), (rank, res)
        assert res["loss_single"][-1] < res["loss_single"][0]


# --- the ring's compute on this process's backend (the Triton kernels: interpreted on CPU, real on a GPU) -------

def simulate_ring(q, k, v, do, *, world: int, causal: bool = False, window=(-1, -1), layout: str = "zigzag",
                  backward: str = "auto"):
    """Every rank's ring steps run one after the other in this process, without communication.

    The same per-step functions as `ring_attention` (schedule, block calls, LSE merge,
    block gradients), so the kernels see exactly the views the ring hands them.
    """
    S, scale = q.shape[2], q.shape[3] ** -0.5
    _, _, left, right, _ = fd._check_options(causal, None, True, window, layout, backward)
    sched = fd._schedule(S, world, layout, left, right)
    qs, ks, vs, dos = ([shard_sequence(t.detach(), r, world, layout) for r in range(world)] for t in (q, k, v, do))
    kvs = [torch.stack([a, b]) for a, b in zip(ks, vs, strict=True)]
    outs, lses = [], []
    for r in range(world):
        acc_o = torch.zeros(qs[r].shape, dtype=torch.float32, device=q.device)
        acc_l = torch.full(qs[r].shape[:3], -math.inf, device=q.device)
        for t in range(sched.steps):
            fd._forward_step(qs[r], kvs[(r - t) % world], sched.plans[r][t], acc_o, acc_l, scale)
        outs.append(acc_o.to(q.dtype))
        lses.append(acc_l)
    use_op = fd._use_global_lse(backward)
    dqs, dkvs = [], [torch.zeros(kv.shape, dtype=torch.float32, device=q.device) for kv in kvs]
    for r in range(world):
        delta = None if use_op else fd._delta(outs[r], dos[r], None)
        dq = torch.zeros(qs[r].shape, dtype=torch.float32, device=q.device)
        for t in range(sched.steps):
            src = (r - t) % world
            fd._backward_step(qs[r], kvs[src], outs[r], dos[r], lses[r], None, delta, sched.plans[r][t], scale,
                              use_op, dq, dkvs[src])
        dqs.append(dq.to(q.dtype))
    full = [unshard_sequence(x, world, layout) for x in (outs, lses, dqs)]
    dk = unshard_sequence([d[0].to(k.dtype) for d in dkvs], world, layout)
    dv = unshard_sequence([d[1].to(v.dtype) for d in dkvs], world, layout)
    return (*full, dk, dv)


@pytest.mark.parametrize("world,causal,window,layout,dtype,heads,backward", [
    (2, True, (-1, -1), "zigzag", torch.float16, (2, 1), "global_lse"),
    (3, False, (3, 2), "contiguous", torch.float32, (2, 2), "global_lse"),
    (3, True, (4, -1), "zigzag", torch.float32, (2, 2), "global_lse"),
    (2, True, (-1, -1), "zigzag", torch.float16, (2, 1), "recompute"),
])
def test_ring_steps_on_this_backend(device, triton_ran, world, causal, window, layout, dtype, heads, backward):
    """The ring's block calls and gradients on the device's kernels, by the numerics rule."""
    case = Case("kernels", B=1, H=heads[0], H_kv=heads[1], S=11, D=16)
    q, k, v, do, _ = (t.to(device=device, dtype=dtype) for t in _inputs(case))
    ours = simulate_ring(q, k, v, do, world=world, causal=causal, window=window, layout=layout, backward=backward)
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    check_against_reference(ours, *full, do, causal=causal, window=window)
    triton_ran("attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq")


# --- single-process tests: layouts, schedule, argument checks ----------------------------------------------------

@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shard_roundtrip(layout: str, world: int):
    for S in (1, 5, 13, 16):
        x = torch.arange(S * 3).reshape(1, 3, S, 1).float()
        shards = [shard_sequence(x, r, world, layout) for r in range(world)]
        lengths = [s.shape[2] for s in shards]
        assert lengths == shard_lengths(S, world, layout)
        assert max(lengths) - min(lengths) <= 1
        assert torch.equal(unshard_sequence(shards, world, layout), x)
        pos = torch.cat([shard_positions(S, r, world, layout) for r in range(world)])
        assert torch.equal(pos.sort().values, torch.arange(S))
        for r in range(world):
            assert torch.equal(shards[r][0, 0, :, 0], x[0, 0, shard_positions(S, r, world, layout), 0])


def test_zigzag_layout():
    """Rank r of P holds chunks r and 2P-1-r of 2P."""
    assert shard_positions(8, 0, 2, "zigzag").tolist() == [0, 1, 6, 7]
    assert shard_positions(8, 1, 2, "zigzag").tolist() == [2, 3, 4, 5]
    assert shard_positions(9, 0, 2, "zigzag").tolist() == [0, 1, 2, 7, 8]  # chunks of 3, 2, 2, 2


def _covered(seq_len: int, world: int, layout: str, left: int, right: int) -> tuple[torch.Tensor, list[int]]:
    """How many times the schedule computes each (query, key) cell, and each rank's computed area."""
    sched = fd._schedule(seq_len, world, layout, left, right)
    cover = torch.zeros(seq_len, seq_len, dtype=torch.int64)
    areas = []
    for r in range(world):
        qpos, area = shard_positions(seq_len, r, world, layout), 0
        for t in range(sched.steps):
            kpos = shard_positions(seq_len, (r - t) % world, world, layout)
            for call in sched.plans[r][t]:
                a = torch.arange(call.r1 - call.r0)[:, None]
                b = torch.arange(call.c1 - call.c0)[None, :]
                seen = torch.ones(a.shape[0], b.shape[1], dtype=torch.bool)
                if call.window[0] >= 0:
                    seen &= b >= a - call.window[0]
                if call.window[1] >= 0:
                    seen &= b <= a + call.window[1]
                gi = qpos[call.r0:call.r1, None].expand_as(seen)[seen]
                gj = kpos[None, call.c0:call.c1].expand_as(seen)[seen]
                cover.index_put_((gi, gj), torch.ones_like(gi), accumulate=True)
                area += call.area
        areas.append(area)
    return cover, areas


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_schedule_computes_each_visible_cell_once(layout: str):
    for world, S, (left, right) in [(2, 13, (-1, -1)), (3, 17, (-1, 0)), (4, 23, (3, 0)), (3, 11, (2, 5)),
                                    (4, 6, (-1, 0)), (5, 16, (0, 0)), (4, 19, (-1, 2))]:
        i, j = torch.arange(S)[:, None], torch.arange(S)[None, :]
        visible = torch.ones(S, S, dtype=torch.bool)
        if left >= 0:
            visible &= j >= i - left
        if right >= 0:
            visible &= j <= i + right
        cover, _ = _covered(S, world, layout, left, right)
        assert torch.equal(cover, visible.long()), (world, S, left, right)


def test_schedule_skips():
    """Zigzag balances causal work; blocks nobody sees are not computed; narrow windows cut the ring short."""
    _, zigzag = _covered(64, 4, "zigzag", -1, 0)
    _, contiguous = _covered(64, 4, "contiguous", -1, 0)
    assert len(set(zigzag)) == 1 and sum(zigzag) == sum(contiguous) < 64 * 64
    assert max(contiguous) == 4 * min(contiguous)
    assert fd._schedule(64, 4, "contiguous", 10, 0).steps == 2
    assert fd._schedule(64, 4, "zigzag", -1, 0).steps == 4
    assert all(len(p) == 1 for plans in fd._schedule(64, 4, "zigzag", -1, 0).plans for p in plans)


def test_argument_errors_before_any_communication():
    q = torch.randn(1, 2, 4, 8)
    bad = [(dict(layout="ring"), ValueError, "layout"), (dict(causal="yes"), ValueError, "causal"),
           (dict(window=(1,)), TypeError, "window"), (dict(window=(-2, 0)), ValueError, "window"),
           (dict(scale=math.inf), ValueError, "scale"), (dict(return_lse=1), TypeError, "return_lse"),
           (dict(group="world"), TypeError, "group"), (dict(timeout=-1), ValueError, "timeout"),
           (dict(seq_len=-1), ValueError, "seq_len"), (dict(seq_len=8.0), TypeError, "seq_len"),
           (dict(), ValueError, "group")]  # no process group is initialised in this process
    for kwargs, exc, word in bad:
        with pytest.raises(exc, match=word):
            ring_attention(q, q, q, **kwargs)
    with pytest.raises(ValueError, match="layout"):
        shard_sequence(q, 0, 2, "ring")
    with pytest.raises(ValueError, match="rank"):
        shard_sequence(q, 2, 2)
    with pytest.raises(ValueError, match="shard lengths"):
        unshard_sequence([q, q[:, :, :1]], 2)


def test_single_rank_group_is_plain_attention(tmp_path):
    """A group of one process: ring_attention is attention (the group is initialised here, gloo, world 1)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        q, k, v, _, _ = _inputs(Case("single", S=7, H=2, H_kv=1))
        out, lse = ring_attention(q, k, v, causal=True, return_lse=True, window=(3, -1))
        ref_out, ref_lse = attention(q, k, v, causal=True, return_lse=True, window=(3, 0))
        assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
        assert torch.equal(ring_attention(q, k, v, causal=True, seq_len=7), attention(q, k, v, causal=True))
        with pytest.raises(ValueError, match="seq_len=8"):
            ring_attention(q, k, v, seq_len=8)
    finally:
        dist.destroy_process_group()


def test_waits_untimed_on_cuda():
    """Waits on CUDA tensors pass no timeout (NCCL would block the CPU thread); on CPU tensors they do."""
    from flashattn_py.distributed import _comm

    class Work:
        def __init__(self, done: bool = True):
            self.done, self.calls = done, []

        def wait(self, **kwargs):
            self.calls.append(kwargs)
            return self.done

    limit = timedelta(seconds=5)
    assert _comm._host_timeout(limit, torch.device("cuda", 0)) is None
    assert _comm._host_timeout(limit, torch.device("cpu")) == limit
    work = Work()
    _comm._wait([work, torch.zeros(1)], None)  # a tensor in the list is a send buffer kept alive: skipped
    assert work.calls == [{}]
    work = Work()
    _comm._wait([work], limit)
    assert work.calls == [{"timeout": limit}]
    with pytest.raises(RuntimeError, match="did not finish"):
        _comm._wait([Work(done=False)], limit)


def test_case_names_unique():
    names = [c.name for cases in CASES.values() for c in cases]
    assert len(names) == len(set(names))
