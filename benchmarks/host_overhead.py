"""python -m benchmarks --host-overhead: host time per call, in µs, for every public function.

    python -m benchmarks --host-overhead [--out DIR] [--repeats N] [--target sm_90]

Two paths, in one process, on the same threads:
  * GPU path, capture mode: the public call runs the CUDA launch path for a GPU
    target (`virtual_gpu`, fp16 tensors that stand for that GPU's) down to the
    launch, which it records instead of making. Everything a call costs on the
    host but the driver's own launch: validation, custom-op dispatch, autograd,
    config choice, allocation, argument building. `binder` is what Triton's
    `JITFunction.run` (argument binding, specialization, cache lookup) adds per
    launch on top, for the forward kernel's arguments of that call; a launch
    through the planned path does not run it.
  * CPU path, for real: our PyTorch path against torch's own
    `F.scaled_dot_product_attention` on the same tensors.

Tiny shapes (B1 H4 D64), where host time is all there is. Medians of `--repeats`
samples, each the mean of a batch of calls.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("python -m benchmarks --host-overhead times the PyTorch CPU path: run it without TRITON_INTERPRET")

import flashattn_py  # noqa: E402
from flashattn_py import _launch  # noqa: E402

B, H, D = 1, 4, 64


def _median_us(fn: Callable[[], object], repeats: int, budget_s: float = 0.02) -> float:
    """Median over `repeats` samples of the mean time of one call, in µs (each sample about `budget_s` long)."""
    for _ in range(3):
        fn()
    start = time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, 1e-7)
    batch = max(1, min(2000, int(budget_s / once)))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(batch):
            fn()
        samples.append((time.perf_counter() - start) / batch * 1e6)
    return statistics.median(samples)


def _qkv(S: int, dtype: torch.dtype, grad: bool, Sk: int | None = None):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, S, D, generator=g, dtype=torch.float32).to(dtype)
    k = torch.randn(B, H, Sk or S, D, generator=g, dtype=torch.float32).to(dtype)
    v = torch.randn(B, H, Sk or S, D, generator=g, dtype=torch.float32).to(dtype)
    return [t.requires_grad_(grad) for t in (q, k, v)]


def _step(call: Callable[[], torch.Tensor]) -> Callable[[], None]:
    """forward+backward: the call, then the gradient of its output (no graph kept)."""
    def run() -> None:
        out = call()
        out.backward(torch.ones_like(out))
    return run


def cases(S: int, dtype: torch.dtype) -> dict[str, tuple[Callable[[], object], Callable[[], object] | None]]:
    """name -> (forward, forward+backward or None) on fresh tensors of length S."""
    q, k, v = _qkv(S, dtype, grad=False)
    qg, kg, vg = _qkv(S, dtype, grad=True)
    mask = torch.rand(B, 1, S, S, generator=torch.Generator().manual_seed(1)) > 0.2
    mask[..., 0] = True
    lengths = [S // 2, S - S // 2]
    cu = torch.tensor([0, lengths[0], S], dtype=torch.int32)
    packed = [t.transpose(1, 2).reshape(S, H, D).detach() for t in (q, k, v)]
    packed_g = [t.clone().requires_grad_(True) for t in packed]
    cache_len = 4 * S
    k_cache = torch.randn(2, H, cache_len, D).to(dtype)
    v_cache = torch.randn(2, H, cache_len, D).to(dtype)
    q_dec = torch.randn(2, H, 1, D).to(dtype)
    k_new, v_new = torch.randn(2, H, 1, D).to(dtype), torch.randn(2, H, 1, D).to(dtype)
    seqlens = torch.tensor([S, S // 2], dtype=torch.int32)
    page = 16
    pages = cache_len // page
    k_pages = torch.randn(2 * pages, H, page, D).to(dtype)
    v_pages = torch.randn(2 * pages, H, page, D).to(dtype)
    table = torch.arange(2 * pages, dtype=torch.int32).view(2, pages)
    mha = flashattn_py.MultiheadAttention(H * D, H, batch_first=True).to(dtype)
    x = torch.randn(B, S, H * D).to(dtype)
    xg = x.clone().requires_grad_(True)

    def decode(**kw):
        return lambda: flashattn_py.attention_with_kvcache(q_dec, k_cache, v_cache, seqlens, **kw)

    return {
        "attention causal": (lambda: flashattn_py.attention(q, k, v, causal=True),
                             _step(lambda: flashattn_py.attention(qg, kg, vg, causal=True))),
        "attention bool mask": (lambda: flashattn_py.attention(q, k, v, attn_mask=mask),
                                _step(lambda: flashattn_py.attention(qg, kg, vg, attn_mask=mask))),
        "attention dropout": (None, _step(lambda: flashattn_py.attention(qg, kg, vg, causal=True, dropout_p=0.1))),
        "attention_varlen causal": (
            lambda: flashattn_py.attention_varlen(*packed, cu, cu, S, S, causal=True),
            _step(lambda: flashattn_py.attention_varlen(*packed_g, cu, cu, S, S, causal=True))),
        "scaled_dot_product_attention": (
            lambda: flashattn_py.scaled_dot_product_attention(q, k, v, is_causal=True),
            _step(lambda: flashattn_py.scaled_dot_product_attention(qg, kg, vg, is_causal=True))),
        "MultiheadAttention": (lambda: mha(x, x, x, need_weights=False)[0],
                               _step(lambda: mha(xg, xg, xg, need_weights=False)[0])),
        "decode dense": (decode(num_splits=1), None),
        "decode append": (decode(k_new=k_new, v_new=v_new, num_splits=1), None),
        "decode split-K 4": (decode(num_splits=4), None),
        "decode paged": (lambda: flashattn_py.attention_with_kvcache(q_dec, k_pages, v_pages, seqlens,
                                                                     block_table=table, num_splits=1), None),
    }


def _binder_us(target: str, S: int, repeats: int) -> float | None:
    """µs Triton's JITFunction.run spends binding, specializing and looking up the forward kernel (compiled, cached)."""
    q, k, v = _qkv(S, torch.float16, grad=False)
    try:
        with _launch.virtual_gpu(target, compile=True) as records:
            flashattn_py.attention(q, k, v, causal=True)
    except Exception as e:  # noqa: BLE001 - the codegen toolchain may be missing; say so, do not fail the run
        print(f"note: binder not measured ({type(e).__name__}: {e})", file=sys.stderr)
        return None
    record = records[0]
    gpu = _launch._targets.target(target)
    options = dict(grid=record.grid, warmup=True, num_warps=record.config.num_warps,
                   num_stages=record.config.num_stages, **record.args)
    with _launch._targets.stand_in_driver(gpu):
        return _median_us(lambda: record.kernel.run(**options), repeats)


def _cpu_lengths(S: int, repeats: int) -> dict:
    """`attention` causal on the CPU path against torch's own SDPA CPU call, fp32, forward and forward+backward."""
    q, k, v = _qkv(S, torch.float32, grad=False)
    qg, kg, vg = _qkv(S, torch.float32, grad=True)
    entry = dict(S=S)
    entry["ours_fwd_us"] = _median_us(lambda: flashattn_py.attention(q, k, v, causal=True), repeats)
    entry["sdpa_fwd_us"] = _median_us(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), repeats)
    entry["ours_fwd_bwd_us"] = _median_us(_step(lambda: flashattn_py.attention(qg, kg, vg, causal=True)), repeats)
    entry["sdpa_fwd_bwd_us"] = _median_us(
        _step(lambda: F.scaled_dot_product_attention(qg, kg, vg, is_causal=True)), repeats)
    for p in ("fwd", "fwd_bwd"):
        entry[f"ratio_{p}"] = entry[f"sdpa_{p}_us"] / entry[f"ours_{p}_us"]  # >= 1: ours is faster
    return entry


def measure(repeats: int, target: str, lengths=(16, 64, 128)) -> dict:
    rows = []
    with _launch.virtual_gpu(target):
        for name, (fwd, step) in cases(16, torch.float16).items():
            rows.append(dict(path="gpu", target=target, case=name, S=16,
                             fwd_us=_median_us(fwd, repeats) if fwd else None,
                             fwd_bwd_us=_median_us(step, repeats) if step else None))
    for name, (fwd, step) in cases(16, torch.float32).items():  # every public function, for real on the CPU
        rows.append(dict(path="cpu", target="cpu", case=name, S=16,
                         fwd_us=_median_us(fwd, repeats) if fwd else None,
                         fwd_bwd_us=_median_us(step, repeats) if step else None))
    cpu = [_cpu_lengths(S, repeats) for S in lengths]
    return dict(gpu=[r for r in rows if r["path"] == "gpu"], cpu_calls=[r for r in rows if r["path"] == "cpu"],
                cpu=cpu, binder_us=_binder_us(target, 16, repeats), threads=torch.get_num_threads(),
                torch=torch.__version__)


def markdown(result: dict) -> str:
    fmt = (lambda x: "–" if x is None else f"{x:.1f}")
    lines = [f"GPU path up to the launch ({result['gpu'][0]['target']}, capture mode, fp16, B1 H4 D64; "
             "decode B2 cache 64), µs per call", "", "| call | forward | forward+backward |", "|---|---|---|"]
    lines += [f"| {r['case']} | {fmt(r['fwd_us'])} | {fmt(r['fwd_bwd_us'])} |" for r in result["gpu"]]
    lines += ["", f"CPU path, for real (fp32, same shapes, {result['threads']} threads), µs per call", "",
              "| call | forward | forward+backward |", "|---|---|---|"]
    lines += [f"| {r['case']} | {fmt(r['fwd_us'])} | {fmt(r['fwd_bwd_us'])} |" for r in result["cpu_calls"]]
    lines += ["", f"Triton's JITFunction.run per forward launch (binding, specialization, cache lookup; skipped by "
              f"the planned launch): {fmt(result['binder_us'])} µs", "",
              f"CPU path, fp32 causal B1 H4 D64, {result['threads']} threads, µs per call "
              "(ratio = SDPA / ours; >= 1 is faster)", "",
              "| S | ours fwd | SDPA fwd | ratio | ours fwd+bwd | SDPA fwd+bwd | ratio |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {e['S']} | {fmt(e['ours_fwd_us'])} | {fmt(e['sdpa_fwd_us'])} | {e['ratio_fwd']:.2f} | "
              f"{fmt(e['ours_fwd_bwd_us'])} | {fmt(e['sdpa_fwd_bwd_us'])} | {e['ratio_fwd_bwd']:.2f} |"
              for e in result["cpu"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks --host-overhead", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--target", default="sm_90", help="the GPU the capture-mode path stands for")
    parser.add_argument("--out", type=Path, help="directory for host-overhead.json and .md")
    parser.add_argument("--lengths", type=int, nargs="+", default=[16, 64, 128], help="CPU comparison lengths")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    result = measure(args.repeats, args.target, tuple(args.lengths))
    text = markdown(result)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "host-overhead.json").write_text(json.dumps(result, indent=1))
        (args.out / "host-overhead.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
