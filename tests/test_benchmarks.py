"""The benchmark suite runs end to end here and writes its files in the documented format."""

from __future__ import annotations

import json

import pytest

from benchmarks.__main__ import main
from benchmarks.suite import Case

RECORD_KEYS = {"impl", "pass", "batch", "heads", "seqlen_q", "seqlen_k", "head_dim", "causal", "dtype", "ms",
               "tflops", "peak_mem_bytes", "status"}


def test_quick_run_writes_json_markdown_and_plots(tmp_path):
    pytest.importorskip("matplotlib")
    rc = main(["--quick", "--impl", "flashattn_py", "naive", "sdpa_math", "--pass", "fwd", "fwd_bwd",
               "--head-dim", "32", "--out", str(tmp_path)])
    assert rc == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert set(data["env"]) >= {"device", "torch", "triton", "cuda"}
    records = data["records"]
    assert {(r["impl"], r["pass"], r["causal"]) for r in records} == {
        (i, p, c) for i in ("flashattn_py", "naive", "sdpa_math") for p in ("fwd", "fwd_bwd") for c in (False, True)}
    for r in records:
        assert RECORD_KEYS <= set(r)
        assert r["pass"] in ("fwd", "bwd", "fwd_bwd") and r["dtype"] in ("float16", "bfloat16", "float32")
        assert r["status"] == "ok", r
        assert r["ms"] > 0 and r["tflops"] > 0
        assert r["max_abs_err"] < 1e-2  # every implementation agrees with the fp32 reference
    decode = data["decode"]
    assert {r["paged"] for r in decode} == {False, True}
    assert all(r["status"] == "ok" and r["gbps"] > 0 and r["copy_gbps"] > 0 for r in decode)
    md = (tmp_path / "results.md").read_text()
    assert "speed-up vs naive" in md and "mean nothing" in md and "fraction of copy" in md
    assert (tmp_path / "tflops_float16_full.png").stat().st_size > 0
    assert (tmp_path / "peak_memory.png").exists()


def test_flop_convention():
    full = Case(2, 16, 1024, 1024, 128, False, "float16")
    assert full.flops("fwd") == 4 * 2 * 16 * 1024 * 1024 * 128
    assert Case(2, 16, 1024, 1024, 128, True, "float16").flops("fwd") == full.flops("fwd") / 2
    assert full.flops("bwd") == 2.5 * full.flops("fwd") and full.flops("fwd_bwd") == 3.5 * full.flops("fwd")
