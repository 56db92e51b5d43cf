"""Context-parallel (ring attention) benchmark on CPU processes over gloo.

    python -m benchmarks.context_parallel --out bench-out          # P = 1, 2, 4; about a minute on 2 cores
    python -m benchmarks.context_parallel --worlds 2 --seq-len 8192 --heads 16 --out bench-out

For each world size P it spawns P processes (gloo, one sequence of ``--seq-len``
tokens sharded over them, zigzag layout) and times, per rank, the attention
forward and a forward+backward step in three modes:

* ``comm_only``: the ring's exchanges alone (K/V forward; K/V and dK/dV backward);
* ``compute_only``: the ring's attention calls alone (each rank reuses its own shard);
* ``full``: both, the next block's exchange in flight while the current one computes.

The fraction of the exchange hidden behind compute is
``(t_comm + t_compute - t_full) / t_comm`` (clamped to [0, 1]); step times are the
slowest rank's medians. Per-rank memory is counted from the tensors the run
holds (q, k, v, out, lse shards and their gradients, plus the ring's buffers:
two K/V shards in flight, the fp32 accumulators) and falls as 1/P.

On CPU the workers use the package's PyTorch path (``TRITON_INTERPRET=0``: the
interpreter would time the interpreter). CPU compute is slow next to loopback
communication, so most of the exchange hides; the GPU estimate is in the
markdown's model section (formulas in the README).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch

MODES = ("comm_only", "compute_only", "full")


def crossover_tokens(bandwidth: float, flops: float, heads: int, heads_kv: int, bytes_per_el: int,
                     causal_zigzag: bool) -> float:
    """Per-GPU tokens S_local above which one ring step's K/V exchange hides behind its forward compute.

    Step compute 4·B·H·S_local²·D FLOPs (2·B·H·S_local²·D causal with zigzag: every
    step is half a block) at `flops` FLOP/s against 2·B·H_kv·S_local·D·bytes over a
    link of `bandwidth` bytes/s per direction.
    """
    per_step = 2.0 if causal_zigzag else 4.0
    return 2.0 * heads_kv * bytes_per_el * flops / (per_step * heads * bandwidth)


def gpu_model() -> list[dict]:
    """The README's estimate: 8×H100 over NVLink, and 2 nodes over 400 Gb/s InfiniBand (per GPU), bf16, D = 128."""
    rows = []
    for link, bw in (("NVLink 4 (450 GB/s per direction)", 450e9), ("InfiniBand 400 Gb/s (50 GB/s)", 50e9)):
        for heads, heads_kv in ((32, 32), (32, 8)):
            for causal in (False, True):
                rows.append({"link": link, "bandwidth_Bps": bw, "flops": 400e12, "heads": heads,
                             "heads_kv": heads_kv, "causal_zigzag": causal,
                             "min_tokens_per_gpu": crossover_tokens(bw, 400e12, heads, heads_kv, 2, causal)})
    return rows


def _worker(rank: int, world: int, store: str, out_dir: str, cfg: dict) -> None:
    os.environ["TRITON_INTERPRET"] = "0"  # the PyTorch CPU path: the interpreter would time itself
    torch.set_num_threads(max(1, cfg["threads"] // world))
    import torch.distributed as dist

    from flashattn_py.distributed import _ring_attention, shard_sequence

    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world,
                            timeout=timedelta(seconds=300))
    dtype = getattr(torch, cfg["dtype"])
    gen = torch.Generator().manual_seed(0)
    B, H, H_kv, S, D = cfg["batch"], cfg["heads"], cfg["heads_kv"], cfg["seq_len"], cfg["head_dim"]
    full = [torch.randn(B, h, S, D, generator=gen).to(dtype) for h in (H, H_kv, H_kv, H)]
    q, k, v, do = (shard_sequence(t, rank, world, cfg["layout"]) for t in full)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    stats: dict = {}

    def timed(mode: str, backward: bool) -> float:
        dist.barrier()
        start = time.perf_counter()
        out = _ring_attention(q, k, v, causal=cfg["causal"], layout=cfg["layout"], mode=mode, stats=stats)
        if backward:
            torch.autograd.grad(out, (q, k, v), do)
        elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the step takes as long as its slowest rank
        return elapsed.item() * 1e3

    modes = MODES if world > 1 else ("full",)
    timed("full", True)  # warm-up
    times: dict = {f"{m}_{p}": [] for m in modes for p in ("fwd", "step")}
    for _ in range(cfg["repeats"]):
        for m in modes:
            times[f"{m}_fwd"].append(timed(m, False))
            times[f"{m}_step"].append(timed(m, True))
    out = _ring_attention(q, k, v, causal=cfg["causal"], layout=cfg["layout"], stats=stats)
    shard_bytes = sum(t.nbytes for t in (q, k, v, out)) + q.shape[0] * q.shape[1] * q.shape[2] * 4  # + lse
    if rank == 0:
        result = {"world": world, "tokens_per_rank": q.shape[2],
                  "ms": {name: statistics.median(vals) for name, vals in times.items()},
                  "bytes": {"shards": shard_bytes, "grads": sum(t.nbytes for t in (q, k, v)),
                            "forward_ring_buffers": stats.get("forward_buffer_bytes", 0),
                            "backward_ring_buffers": stats.get("backward_buffer_bytes", 0)}}
        (Path(out_dir) / "result.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def _launch(world: int, cfg: dict, timeout_s: float = 600.0) -> dict:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_worker, args=(r, world, os.path.join(tmp, "store"), tmp, cfg), daemon=True)
                 for r in range(world)]
        try:
            for p in procs:
                p.start()
            deadline = time.monotonic() + timeout_s
            for p in procs:
                p.join(max(0.0, deadline - time.monotonic()))
            if any(p.is_alive() or p.exitcode for p in procs):
                raise RuntimeError(f"world {world}: workers failed or timed out (exit codes "
                                   f"{[p.exitcode for p in procs]})")
            return json.loads((Path(tmp) / "result.json").read_text())
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                if p.pid is not None:
                    p.join(5)


def _hidden(ms: dict, kind: str) -> float | None:
    comm, compute, full = (ms.get(f"{m}_{kind}") for m in MODES)
    if comm is None or comm <= 0:
        return None
    return min(1.0, max(0.0, (comm + compute - full) / comm))


def markdown(data: dict) -> str:
    cfg = data["config"]
    lines = [f"# Context parallelism (ring attention): {data['env']['device']}", "",
             f"One sequence of {cfg['seq_len']} tokens, B={cfg['batch']}, H={cfg['heads']}, H_kv={cfg['heads_kv']}, "
             f"D={cfg['head_dim']}, {cfg['dtype']}, causal={cfg['causal']}, layout {cfg['layout']}; gloo over "
             f"loopback, {cfg['threads']} CPU threads shared by the ranks; medians of {cfg['repeats']} "
             f"(slowest rank). torch {data['env']['torch']}.", "",
             "> CPU figures: attention runs the PyTorch CPU path and gloo copies over loopback on the same cores, so "
             "with fewer cores than ranks compute and transfers compete and the hidden fraction is noisy; it shows "
             "the method, the GPU estimate is the model below.", "",
             "| P | tokens/rank | fwd ms | step ms (fwd+bwd) | comm alone fwd / step | compute alone fwd / step | "
             "hidden fwd | hidden step |",
             "|---|---|---|---|---|---|---|---|"]
    for r in data["results"]:
        ms = r["ms"]

        def pair(mode, ms=ms):
            return f"{ms[f'{mode}_fwd']:.1f} / {ms[f'{mode}_step']:.1f}" if f"{mode}_fwd" in ms else "–"

        hid = [r.get("hidden_fwd"), r.get("hidden_step")]
        lines.append(f"| {r['world']} | {r['tokens_per_rank']} | {ms['full_fwd']:.1f} | {ms['full_step']:.1f} | "
                     f"{pair('comm_only')} | {pair('compute_only')} | "
                     + " | ".join("–" if h is None else f"{100 * h:.0f}%" for h in hid) + " |")
    base = data["results"][0]
    lines += ["", "Per-rank memory (bytes; ring buffers = two K/V shards in flight + fp32 accumulators):", "",
              "| P | shards q,k,v,out,lse | grads dq,dk,dv | shards+grads vs P=1 | fwd ring buffers | "
              "bwd ring buffers | total |",
              "|---|---|---|---|---|---|---|"]
    base_bytes = base["bytes"]["shards"] + base["bytes"]["grads"]
    for r in data["results"]:
        b = r["bytes"]
        lines.append(f"| {r['world']} | {b['shards']:,} | {b['grads']:,} | "
                     f"{(b['shards'] + b['grads']) / base_bytes:.3f} | {b['forward_ring_buffers']:,} | "
                     f"{b['backward_ring_buffers']:,} | {b['total']:,} |")
    lines += ["", "## Model: when does the exchange hide behind compute on GPUs (an estimate, not a measurement)", "",
              "Per ring step a rank sends and receives one K/V shard, 2·B·H_kv·S_local·D·bytes, and computes "
              "4·B·H·S_local²·D FLOPs (2·B·H·S_local²·D causal with zigzag). Hidden when S_local ≥ "
              "(H_kv/H)·bytes·R/(2·BW) (full) or (H_kv/H)·bytes·R/BW (causal zigzag); bf16, R = 400 TFLOP/s "
              "achieved forward (assumed), latency ignored.", "",
              "| link | H / H_kv | causal (zigzag) | min tokens per GPU |", "|---|---|---|---|"]
    for m in data["model"]:
        lines.append(f"| {m['link']} | {m['heads']} / {m['heads_kv']} | {m['causal_zigzag']} | "
                     f"{m['min_tokens_per_gpu']:,.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.context_parallel", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench-out"), help="directory for the json and md")
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4], help="world sizes (default 1 2 4)")
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens of the whole sequence (default 2048)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--heads-kv", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--causal", choices=["yes", "no"], default="yes")
    parser.add_argument("--layout", choices=["zigzag", "contiguous"], default="zigzag")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads shared by the ranks")
    args = parser.parse_args(argv)
    cfg = dict(seq_len=args.seq_len, batch=args.batch, heads=args.heads, heads_kv=args.heads_kv,
               head_dim=args.head_dim, dtype=args.dtype, causal=args.causal == "yes", layout=args.layout,
               repeats=args.repeats, threads=args.threads)
    results = []
    for world in args.worlds:
        if args.seq_len % (2 * world if args.layout == "zigzag" else world):
            parser.error(f"--seq-len must divide into the layout's chunks for world {world} (compute_only reuses "
                         f"each rank's own shard, so every shard must have one length)")
        started = time.perf_counter()
        r = _launch(world, cfg)
        r["hidden_fwd"], r["hidden_step"] = _hidden(r["ms"], "fwd"), _hidden(r["ms"], "step")
        r["bytes"]["total"] = sum(r["bytes"].values())
        results.append(r)
        print(f"P={world}: step {r['ms']['full_step']:.1f} ms, fwd {r['ms']['full_fwd']:.1f} ms, "
              f"{r['bytes']['total']:,} bytes per rank ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    env = {"device": f"cpu ({platform.processor() or platform.machine()}), gloo", "torch": torch.__version__,
           "python": platform.python_version()}
    data = {"env": env, "config": cfg, "results": results, "model": gpu_model()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "context_parallel.json").write_text(json.dumps(data, indent=1) + "\n")
    text = markdown(data)
    (args.out / "context_parallel.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
