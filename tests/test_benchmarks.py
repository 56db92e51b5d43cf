"""The benchmark suite runs end to end here and writes its files in the documented format.

Without a GPU, `python -m benchmarks` times the PyTorch CPU path; it must run in a
process where the kernels were not built for the interpreter (conftest.py sets
TRITON_INTERPRET=1 for this session), so that run is a subprocess. The interpreter
smoke run (`--interpret`) runs in-process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import benchmarks.__main__ as bench_main
from benchmarks.__main__ import main
from benchmarks.suite import Case, peak_rss_delta, visible_scores

ROOT = Path(__file__).resolve().parent.parent
RECORD_KEYS = {"impl", "pass", "batch", "heads", "seqlen_q", "seqlen_k", "head_dim", "causal", "dtype", "ms",
               "tflops", "peak_mem_bytes", "status"}
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU suite runs where there is no GPU")


@cpu_only
def test_cpu_suite_times_the_pytorch_path(tmp_path):
    pytest.importorskip("matplotlib")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_INTERPRET"] = "1"  # ignored by the CPU suite (it says so): the timings are the PyTorch path's
    cmd = [sys.executable, "-m", "benchmarks", "--quick", "--seqlen", "256", "--repeats", "1", "--out", str(tmp_path)]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "TRITON_INTERPRET ignored" in run.stderr
    data = json.loads((tmp_path / "results.json").read_text())
    assert "Triton interpreter" not in data["env"]["device"] and data["env"]["threads"] >= 1
    records = data["records"]
    plain = [r for r in records if not r["variant"]]
    assert {(r["impl"], r["pass"], r["causal"]) for r in plain} == {
        (i, p, c) for i in ("flashattn_py", "sdpa", "naive") for p in ("fwd", "bwd", "fwd_bwd") for c in (False, True)}
    for r in plain:
        assert RECORD_KEYS <= set(r) and r["status"] == "ok", r
        assert r["ms"] > 0 and r["tflops"] > 0 and 1 <= r["repeats"] <= 6  # extra rounds, 2 forwards each
        assert r["max_abs_err"] < 1e-4  # every implementation agrees with the float64 reference
        if r["pass"] != "bwd":
            assert r["peak_mem_bytes"] is not None and r["peak_mem_bytes"] >= 0
    variants = {(r["variant"], r["impl"]): r for r in records if r["variant"] and r["pass"] == "fwd"}
    assert {v for v, _ in variants} == {"window", "alibi", "softcap", "bottom_right"}
    assert variants["softcap", "sdpa"]["status"] == "unsupported"  # torch SDPA has no softcap
    assert all(r["status"] == "ok" for (v, i), r in variants.items() if (v, i) != ("softcap", "sdpa"))
    assert {(r["impl"], r["mode"]) for r in data["mha"]} == {
        (i, m) for i in ("flashattn_py", "torch") for m in ("train", "eval")}
    assert all(r["max_abs_diff"] < 1e-4 for r in data["mha"])
    assert {r["paged"] for r in data["decode"]} == {False, True}
    assert all(r["status"] == "ok" and r["gbps"] > 0 for r in data["decode"])
    md = (tmp_path / "results.md").read_text()
    for text in ("vs sdpa", "vs naive", "Peak memory of fwd+bwd", "Feature variants", "MultiheadAttention",
                 "fraction of copy"):
        assert text in md
    assert "mean nothing" not in md
    assert (tmp_path / "tflops_float32_full.png").stat().st_size > 0
    assert (tmp_path / "peak_memory.png").stat().st_size > 0


@cpu_only
def test_interpreter_smoke_run_has_no_timings(tmp_path):
    rc = main(["--interpret", "--head-dim", "32", "--out", str(tmp_path)])
    assert rc == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert "Triton interpreter" in data["env"]["device"]
    assert data["records"] and all(r["status"] == "ok" and r["ms"] is None for r in data["records"])
    assert all(r["max_abs_err"] < 1e-2 for r in data["records"])
    assert all(r["ms"] is None and r["status"] == "ok" for r in data["decode"])
    md = (tmp_path / "results.md").read_text()
    assert "No timings" in md and " ms" not in md


@cpu_only
def test_cpu_suite_refuses_an_interpreted_process(tmp_path, capsys):
    """In a process whose kernels were built for the interpreter, the CPU timings cannot be the PyTorch path's."""
    from flashattn_py import ops

    if not ops.interpreter_active():
        pytest.skip("the interpreter is not active in this session")
    assert main(["--quick", "--out", str(tmp_path)]) == 2
    assert "fresh process" in capsys.readouterr().err


def test_host_overhead_reports_every_public_function(tmp_path):
    """`--host-overhead` runs end to end (a subprocess: it times the PyTorch path, not the interpreter)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "benchmarks", "--host-overhead", "--repeats", "1", "--lengths", "16",
           "--out", str(tmp_path)]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    data = json.loads((tmp_path / "host-overhead.json").read_text())
    calls = {"attention causal", "attention bool mask", "attention dropout", "attention_varlen causal",
             "scaled_dot_product_attention", "MultiheadAttention", "decode dense", "decode append",
             "decode split-K 4", "decode paged"}
    for path in ("gpu", "cpu_calls"):
        assert {r["case"] for r in data[path]} == calls
        for r in data[path]:
            timed = [r[p] for p in ("fwd_us", "fwd_bwd_us") if r[p] is not None]
            assert timed and all(t > 0 for t in timed), r
    assert [e["S"] for e in data["cpu"]] == [16] and data["cpu"][0]["ratio_fwd"] > 0
    assert "forward+backward" in (tmp_path / "host-overhead.md").read_text()


@pytest.mark.parametrize("flag, module", [("--codegen", "codegen"), ("--context-parallel", "context_parallel"),
                                          ("--host-overhead", "host_overhead")])
def test_subcommands_are_imported_lazily(flag, module, monkeypatch):
    seen = {}
    fake = types.ModuleType(f"benchmarks.{module}")
    fake.main = lambda argv: seen.setdefault("argv", argv) and 7
    monkeypatch.setitem(sys.modules, f"benchmarks.{module}", fake)
    assert bench_main.main(["--out", "x", flag, "--arch", "sm_90"]) == 7
    assert seen["argv"] == ["--out", "x", "--arch", "sm_90"]


def test_peak_memory_sees_torch_allocations():
    peak = peak_rss_delta(lambda: torch.ones(16 * 2**20 // 4).add_(1))
    if peak is None:
        pytest.skip("no /proc/self/clear_refs here")
    assert 15 * 2**20 < peak < 64 * 2**20


def test_flop_convention():
    full = Case(2, 16, 1024, 1024, 128, False, "float16")
    assert full.flops("fwd") == 4 * 2 * 16 * 1024 * 1024 * 128
    assert Case(2, 16, 1024, 1024, 128, True, "float16").flops("fwd") == full.flops("fwd") / 2
    assert full.flops("bwd") == 2.5 * full.flops("fwd") and full.flops("fwd_bwd") == 3.5 * full.flops("fwd")
    # variants count the scores a row sees: a causal window of 256 keys to the left sees up to 257
    window = Case(1, 1, 1024, 1024, 64, True, "float32", "window")
    assert visible_scores(window) == sum(min(i, 256) + 1 for i in range(1024))
    assert visible_scores(Case(1, 1, 256, 1024, 64, True, "float32", "bottom_right")) == sum(
        768 + i + 1 for i in range(256))
