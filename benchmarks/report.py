"""Writing a run: results.json, results.md (TFLOP/s and speed-ups) and PNG plots."""

from __future__ import annotations

import json
import platform
from collections import defaultdict
from pathlib import Path

import torch

BASELINES = ("naive", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "sdpa_math", "flex", "flash_attn")


def environment(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    from flashattn_py import ops

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu ({platform.processor() or platform.machine()})"
        if ops.interpreter_active():
            name += ", Triton interpreter"
    return {"device": name, "torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
            "python": platform.python_version()}


def write_json(path: Path, env: dict, records: list, decode: list[dict] | None = None) -> None:
    data = {"env": env, "records": [r.to_json() for r in records]}
    if decode:
        data["decode"] = decode
    path.write_text(json.dumps(data, indent=1) + "\n")


def _key(r: dict) -> tuple:
    return (r["pass"], r["dtype"], r["causal"], r["head_dim"], r["batch"], r["heads"], r["seqlen_q"], r["seqlen_k"])


def markdown(env: dict, records: list[dict], cpu_note: str | None = None) -> str:
    impls = list(dict.fromkeys(r["impl"] for r in records))
    by_case: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in records:
        by_case[_key(r)][r["impl"]] = r
    lines = [f"# Attention benchmark: {env['device']}", "",
             f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}. "
             "TFLOP/s by FlashAttention's convention (fwd 4·B·H·Sq·Sk·D, halved when causal; bwd 2.5×, "
             "fwd+bwd 3.5×); `do_bench` medians.", ""]
    if cpu_note:
        lines += [f"> **{cpu_note}**", ""]
    ran = {r["impl"] for r in records if r["status"] == "ok"}
    baselines = [b for b in BASELINES if b in ran]
    header = ["pass", "dtype", "causal", "D", "B×H", "S"] + [f"{i} TFLOP/s" for i in impls]
    if "flashattn_py" in impls:
        header += [f"speed-up vs {b}" for b in baselines]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def cell(r: dict | None) -> str:
        if r is None:
            return "–"
        if r["status"] != "ok":
            return r["status"]
        return f"{r['tflops']:.3g}"

    for key in sorted(by_case):
        pass_, dtype, causal, head_dim, batch, heads, sq, sk = key
        row = by_case[key]
        seq = f"{sq}" if sq == sk else f"{sq}×{sk}"
        cells = [pass_, dtype, "yes" if causal else "no", str(head_dim), f"{batch}×{heads}", seq]
        cells += [cell(row.get(i)) for i in impls]
        ours = row.get("flashattn_py")
        if ours is not None:
            for b in baselines:
                other = row.get(b)
                ok = ours["status"] == "ok" and other is not None and other["status"] == "ok"
                cells.append(f"{other['ms'] / ours['ms']:.2f}" if ok else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plots(out_dir: Path, records: list[dict]) -> list[Path]:
    """TFLOP/s vs sequence length per implementation, and peak memory vs sequence length."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    ok = [r for r in records if r["status"] == "ok"]
    groups = sorted({(r["dtype"], r["causal"]) for r in ok})
    passes = [p for p in ("fwd", "bwd", "fwd_bwd") if any(r["pass"] == p for r in ok)]
    head_dims = sorted({r["head_dim"] for r in ok})
    for dtype, causal in groups:
        fig, axes = plt.subplots(len(passes), len(head_dims), squeeze=False,
                                 figsize=(4.5 * len(head_dims), 3.2 * len(passes)))
        for i, pass_ in enumerate(passes):
            for j, head_dim in enumerate(head_dims):
                ax = axes[i][j]
                sel = [r for r in ok if (r["dtype"], r["causal"], r["pass"], r["head_dim"]) ==
                       (dtype, causal, pass_, head_dim)]
                for impl in dict.fromkeys(r["impl"] for r in sel):
                    pts = sorted((r["seqlen_q"], r["tflops"]) for r in sel if r["impl"] == impl)
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
                ax.set_xscale("log", base=2)
                ax.set_title(f"{pass_}, D={head_dim}")
                ax.set_xlabel("sequence length")
                ax.set_ylabel("TFLOP/s")
                ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=7)
        fig.suptitle(f"{dtype}, {'causal' if causal else 'non-causal'}")
        fig.tight_layout()
        path = out_dir / f"tflops_{dtype}_{'causal' if causal else 'full'}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    mem = [r for r in records if r["peak_mem_bytes"] is not None and r["status"] == "ok"]
    if not mem:  # CPU runs: keep the file set the same, say why it is empty
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.text(0.5, 0.5, "peak memory is measured on CUDA devices only", ha="center", va="center")
        ax.set_axis_off()
        path = out_dir / "peak_memory.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(path)
    else:
        pass_ = "fwd_bwd" if any(r["pass"] == "fwd_bwd" for r in mem) else mem[0]["pass"]
        sel = [r for r in mem if r["pass"] == pass_]
        dtype, causal, head_dim = sel[0]["dtype"], sel[0]["causal"], max(r["head_dim"] for r in sel)
        sel = [r for r in sel if (r["dtype"], r["causal"], r["head_dim"]) == (dtype, causal, head_dim)]
        fig, ax = plt.subplots(figsize=(6, 4))
        for impl in dict.fromkeys(r["impl"] for r in sel):
            pts = sorted((r["seqlen_q"], r["peak_mem_bytes"] / 2**20) for r in sel if r["impl"] == impl)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length (B·S = const)")
        ax.set_ylabel("peak memory above inputs, MiB")
        ax.set_title(f"{pass_} peak memory, D={head_dim}, {dtype}, {'causal' if causal else 'non-causal'}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / "peak_memory.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
