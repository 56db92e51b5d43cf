"""benchmarks.gpu_check without a GPU: its plan, every benchmark call in capture mode, its CLI and its report.

The benchmark cases of the plan are built and called on CPU tensors (FakeTensorMode's at the real
shapes, real CPU tensors at tiny ones) inside ``_launch.virtual_gpu("sm_90")``, which records the
launches an H100 would make instead of running them: each case must reach the kernels it times.
The test selections run as they would on a GPU, where every `gpu` test is skipped.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from benchmarks import gpu_check
from flashattn_py import _config, _launch, _targets

ROOT = Path(__file__).resolve().parent.parent
PLAN = gpu_check.plan()
QUICK = gpu_check.plan(quick=True)
OURS = [s for s in gpu_check.bench_steps(PLAN) if s.impl == "flashattn_py"]
KERNELS = {"fwd": ["attn_fwd"], "decode": ["attn_fwd"],
           "fwd_bwd": ["attn_fwd", "attn_bwd_preprocess", "attn_bwd_dkdv", "attn_bwd_dq"]}
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks what happens without a GPU")


def _virtual_h100():
    virtual_gpu = getattr(_launch, "virtual_gpu", None)
    if virtual_gpu is None:  # older launch layer: its capture entry point (triton_fwd / triton_bwd only)
        return _launch.capture_launches(capability=(9, 0))
    return virtual_gpu("sm_90")


def _check_records(step, records) -> None:
    assert [r.name for r in records] == KERNELS[step.pass_], step.name
    for r in records:
        assert 0 < r.grid[0] <= _targets.MAX_GRID_X and all(0 < n <= _targets.MAX_GRID_YZ for n in r.grid[1:]), \
            (r.name, r.grid)
        if getattr(r, "target", None) is not None:
            assert r.target.name == "sm_90"
    fwd = records[0]
    if isinstance(step, gpu_check.DecodeCase):
        sms = _targets.TARGETS["sm_90"].multiprocessors
        splits = _config.auto_splits(sms, step.batch * step.heads, step.cache_len)
        assert splits > 1 and fwd.grid[-1] == splits, "the decode case must time split-K, the default"
        assert fwd.args["kv_group"] == step.heads // step.heads_kv
    else:
        case = step.case
        assert (fwd.args["num_heads"], fwd.args["seqlen_q"], fwd.args["seqlen_k"], fwd.args["HEAD_DIM"]) == (
            case.heads, case.seqlen_q, case.seqlen_k, case.head_dim)
        programs = fwd.grid[0] * (1 if fwd.args["FLAT_GRID"] else fwd.grid[1])
        assert programs == fwd.args["num_row_blocks"] * case.batch * case.heads
        assert (fwd.args["window_right"] == 0) == case.causal
        assert fwd.args["STREAM_DESC"], "bf16 dense inputs on sm_90 stream K/V through TMA descriptors"


# --- the plan ---------------------------------------------------------------------------------------------------------

def test_plan_has_the_standard_benchmark():
    attn = [s for s in PLAN if isinstance(s, gpu_check.AttnCase)]
    got = {(s.impl, s.pass_, s.case.seqlen_q, s.case.head_dim, s.case.causal) for s in attn}
    want = {(i, p, s, d, c) for i in ("flashattn_py", "sdpa_flash", "sdpa_cudnn") for p in ("fwd", "fwd_bwd")
            for s in (1024, 4096, 8192) for d in (64, 128) for c in (False, True)}
    assert got == want and len(attn) == len(want)
    for s in attn:
        assert s.case.dtype == "bfloat16" and s.case.heads * s.case.head_dim == 2048
        assert s.case.batch * s.case.seqlen_q == 16384  # ANCHORS.md's standard (B, S) pairs
    decode = [s for s in PLAN if isinstance(s, gpu_check.DecodeCase)]
    assert any((d.batch, d.heads, d.heads_kv, d.head_dim, d.cache_len, d.dtype) == (1, 32, 32, 128, 8192, "bfloat16")
               for d in decode)
    assert isinstance(PLAN[0], gpu_check.TestStep)
    names = [s.name for s in PLAN]
    assert len(names) == len(set(names))
    assert set(map(str, QUICK)) <= set(map(str, PLAN)) and len(QUICK) < len(PLAN)


def test_flops_follow_the_flashattention_convention():
    step = next(s for s in PLAN if isinstance(s, gpu_check.AttnCase) and s.case.causal and s.pass_ == "fwd_bwd")
    c = step.case
    assert step.describe()["flops"] == 3.5 * 4 * c.batch * c.heads * c.seqlen_q * c.seqlen_k * c.head_dim / 2


def test_test_selections_cover_test_gpu_once():
    """The -k selections of the full plan together select every test of tests/test_gpu.py, each once."""
    def collect(*args):
        run = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu",
                              "-p", "no:cacheprovider", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
        return [line for line in run.stdout.splitlines() if "::" in line]

    every = collect("tests/test_gpu.py")
    chosen = [t for s in PLAN if isinstance(s, gpu_check.TestStep) for t in collect(*s.args)]
    assert len(every) > 60 and sorted(chosen) == sorted(every)


# --- capture mode: every benchmark call reaches the kernels ---------------------------------------------------------

@pytest.mark.parametrize("step", OURS, ids=lambda s: s.name.replace(" ", "-"))
def test_benchmark_case_launches_at_its_real_shape(step):
    """FakeTensorMode's CPU tensors at the benchmark's own shapes: no memory, every launch recorded."""
    with FakeTensorMode(), _virtual_h100() as records:
        step.build(torch.device("cpu"))()
    _check_records(step, records)


def _tiny(step):
    if isinstance(step, gpu_check.DecodeCase):
        return dataclasses.replace(step, cache_len=1024)
    return step.with_case(batch=1, seqlen_q=256, seqlen_k=256)


@pytest.mark.parametrize("step", [s for s in OURS if isinstance(s, gpu_check.DecodeCase)
                                  or (s.case.seqlen_q == 8192)], ids=lambda s: s.name.replace(" ", "-"))
def test_benchmark_case_launches_on_cpu_tensors(step):
    """Real CPU tensors (tiny shapes): the public call goes through the custom op to the launch layer."""
    tiny = _tiny(step)
    with _virtual_h100() as records:
        tiny.build(torch.device("cpu"))()
    _check_records(tiny, records)


def test_run_bench_step_records_figures_and_refusals():
    """Timed cases get TFLOP/s or GB/s from their own FLOPs and bytes; an SDPA backend that cannot run is
    recorded as unavailable with its reason; a case of ours that raises is an error."""
    cpu = torch.device("cpu")
    fwd = _tiny(next(s for s in OURS if s.pass_ == "fwd"))
    decode = _tiny(next(s for s in OURS if s.pass_ == "decode"))
    with _virtual_h100():
        r_fwd = gpu_check.run_bench_step(fwd, cpu, time_fn=lambda call: 2.0, check=False)
        r_dec = gpu_check.run_bench_step(decode, cpu, time_fn=lambda call: 0.5, check=False)
    assert r_fwd["status"] == "ok" and r_fwd["ms"] == 2.0 and r_fwd["pass"] == "fwd"
    assert r_fwd["tflops"] == pytest.approx(fwd.case.flops("fwd") / 2e-3 / 1e12)
    assert r_dec["status"] == "ok" and r_dec["gbps"] == pytest.approx(decode.cache_bytes() / 0.5e-3 / 1e9)
    cudnn = next(s for s in PLAN if isinstance(s, gpu_check.AttnCase) and s.impl == "sdpa_cudnn")
    r_cudnn = gpu_check.run_bench_step(cudnn.with_case(batch=1, heads=2, seqlen_q=64, seqlen_k=64), cpu,
                                       time_fn=lambda call: 1.0)
    assert r_cudnn["status"] == "unavailable" and r_cudnn["message"], r_cudnn
    r_bad = gpu_check.run_bench_step(fwd.with_case(head_dim=512), cpu, time_fn=lambda call: 1.0)
    assert r_bad["status"] == "error" and "head" in r_bad["message"].lower(), r_bad

    data = {"schema": gpu_check.SCHEMA, "status": "failed", "started": "now", "quick": False, "wall_s": 1.0,
            "env": gpu_check.environment(), "tests": [], "bench": [r_fwd, r_dec, r_cudnn, r_bad]}
    md = gpu_check.markdown(data)
    assert "| fwd | bfloat16 | no | 128 | 1×16 | 256 | " in md and "unavailable" in md and "Decode" in md
    json.dumps(data, default=str)


def test_run_end_to_end_on_a_virtual_gpu(tmp_path):
    """`run` over a small plan of every kind of step (the CPU standing in for the GPU, launches recorded):
    gpu_check.json and gpu_check.md hold each step's record."""
    (tmp_path / "test_one.py").write_text("import pytest\n\n@pytest.mark.gpu\ndef test_ok():\n    pass\n")
    fwd = _tiny(next(s for s in OURS if s.pass_ == "fwd"))
    cudnn = next(s for s in PLAN if isinstance(s, gpu_check.AttnCase) and s.impl == "sdpa_cudnn")
    steps = [gpu_check.TestStep("one test", (str(tmp_path / "test_one.py"),), 60.0), gpu_check.CopyStep(),
             _tiny(next(s for s in OURS if s.pass_ == "decode")), fwd,
             cudnn.with_case(batch=1, heads=2, seqlen_q=64, seqlen_k=64)]
    with _virtual_h100():
        rc = gpu_check.run(steps, tmp_path / "out", budget_s=120, device=torch.device("cpu"))
    data = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert rc == 0 and data["status"] == "passed", data
    assert [t["id"].split("::")[1] for t in data["tests"][0]["tests"]] == ["test_ok"]
    assert [r["kind"] for r in data["bench"]] == ["copy", "decode", "attention", "attention"]
    assert [r["status"] for r in data["bench"]] == ["ok", "ok", "ok", "unavailable"]
    assert data["bench"][1]["fraction_of_copy"] > 0
    md = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "| one test | passed | 1 |" in md and "## Decode" in md and "## Not measured" in md


# --- test selections: JUnit XML, and the -v log of a selection cut short -------------------------------------------

def test_test_step_reads_junit(tmp_path):
    step = next(s for s in PLAN if isinstance(s, gpu_check.TestStep))
    record = gpu_check.run_test_step(step, tmp_path)
    assert record["rc"] == 0 and not record["timed_out"], record.get("log_tail")
    tests = record["tests"]
    assert len(tests) > 10 and all(t["id"].startswith("tests/test_gpu.py::") for t in tests)
    if not torch.cuda.is_available():
        assert {t["outcome"] for t in tests} == {"skipped"} and "CUDA" in tests[0]["message"]
    assert (tmp_path / f"tests-{step.slug}.xml").exists() and (tmp_path / f"tests-{step.slug}.log").exists()


def test_junit_failures_keep_their_text(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text('<?xml version="1.0"?><testsuites><testsuite name="pytest">'
                   '<testcase classname="tests.test_gpu" name="test_a[1-2]" time="1.25"/>'
                   '<testcase classname="tests.test_gpu" name="test_b" time="0.5">'
                   '<failure message="AssertionError: out: max error 1e-1">Traceback ... assert</failure></testcase>'
                   '<testcase classname="tests.test_gpu" name="test_c" time="0"><skipped message="needs 2 GPUs"/>'
                   '</testcase></testsuite></testsuites>')
    a, b, c = gpu_check.parse_junit(xml)
    assert a == {"id": "tests/test_gpu.py::test_a[1-2]", "outcome": "passed", "duration_s": 1.25, "message": None,
                 "text": None}
    assert b["outcome"] == "failed" and b["message"].startswith("AssertionError") and "Traceback" in b["text"]
    assert c["outcome"] == "skipped" and c["message"] == "needs 2 GPUs" and c["text"] is None


def test_verbose_log_of_a_killed_selection():
    log = ("============ test session starts ============\n"
           "tests/test_gpu.py::test_sdpa_masks_low_precision[(1000, 1100)-float16] PASSED        [  1%]\n"
           "tests/test_gpu.py::test_b FAILED                                   [  2%]\n"
           "tests/test_gpu.py::test_c SKIPPED (needs 2 GPUs)                   [  3%]\n"
           "tests/test_gpu.py::test_large[1024-1024-64-False-float16] ")
    tests = gpu_check.parse_verbose_log(log)
    assert [(t["id"].split("::")[1], t["outcome"]) for t in tests] == [
        ("test_sdpa_masks_low_precision[(1000, 1100)-float16]", "passed"), ("test_b", "failed"),
        ("test_c", "skipped"), ("test_large[1024-1024-64-False-float16]", "timeout")]


def test_test_step_timeout_keeps_results_so_far(tmp_path):
    (tmp_path / "test_slow.py").write_text(
        "import time\nimport pytest\n\n@pytest.mark.gpu\ndef test_fast():\n    pass\n\n"
        "@pytest.mark.gpu\ndef test_slow():\n    time.sleep(120)\n")
    step = gpu_check.TestStep("slow selection", (str(tmp_path / "test_slow.py"),), 8.0)
    t0 = time.monotonic()
    record = gpu_check.run_test_step(step, tmp_path)
    assert time.monotonic() - t0 < 40
    assert record["timed_out"] and record["status"] == "timeout"
    assert [(t["id"].split("::")[1], t["outcome"]) for t in record["tests"]] == [("test_fast", "passed"),
                                                                                ("test_slow", "timeout")]


# --- the command line -------------------------------------------------------------------------------------------------

def _cli(*args, timeout=120):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_cli_help_and_list():
    run = _cli("--help")
    assert run.returncode == 0 and "--out" in run.stdout and "--quick" in run.stdout
    run = _cli("--list", "--quick")
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [line for line in run.stdout.splitlines() if line.strip()]
    assert len(run.stdout.splitlines()) == len(QUICK) and "sdpa_cudnn" in run.stdout


@no_cuda
def test_cli_without_a_gpu_says_so(tmp_path):
    t0 = time.monotonic()
    run = _cli("--out", str(tmp_path / "out"), timeout=60)
    assert time.monotonic() - t0 < 60
    assert run.returncode == 2, run.stdout + run.stderr
    assert "no CUDA GPU" in run.stderr
    data = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert data["schema"] == gpu_check.SCHEMA and data["status"] == "no_gpu" and "no CUDA GPU" in data["message"]
    assert data["env"]["torch"] == torch.__version__ and data["tests"] == [] and data["bench"] == []
    assert "no_gpu" in (tmp_path / "out" / "gpu_check.md").read_text()
