"""Writing a run: results.json, results.md (TFLOP/s or times, speed-ups, memory) and PNG plots."""

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
        name = f"cpu ({_cpu_model() or platform.processor() or platform.machine()})"
        if ops.interpreter_active():
            name += ", Triton interpreter"
    return {"device": name, "torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
            "python": platform.python_version(), "threads": torch.get_num_threads()}


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def write_json(path: Path, env: dict, records: list, decode: list[dict] | None = None,
               mha: list[dict] | None = None) -> None:
    data = {"env": env, "records": [r.to_json() for r in records]}
    if decode:
        data["decode"] = decode
    if mha:
        data["mha"] = mha
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
    records = [r for r in records if not r.get("variant")]  # feature variants have their own table
    ok = [r for r in records if r["status"] == "ok" and r["tflops"] is not None]
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
        ax.text(0.5, 0.5, "peak memory was not measured in this run", ha="center", va="center")
        ax.set_axis_off()
        path = out_dir / "peak_memory.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(path)
    else:
        pass_ = "fwd_bwd" if any(r["pass"] == "fwd_bwd" for r in mem) else mem[0]["pass"]
        sel = [r for r in mem if r["pass"] == pass_]
        # the (dtype, causal, D, heads) series with the most sequence lengths (GPU: every one; CPU: the B·H = 2 one)
        groups: dict[tuple, set] = defaultdict(set)
        for r in sel:
            groups[(r["dtype"], r["causal"], r["head_dim"], r["heads"])].add(r["seqlen_q"])
        dtype, causal, head_dim, heads = max(groups, key=lambda g: (len(groups[g]), g[2], not g[1]))
        sel = [r for r in sel if (r["dtype"], r["causal"], r["head_dim"], r["heads"]) == (dtype, causal, head_dim,
                                                                                          heads)]
        fig, ax = plt.subplots(figsize=(6, 4))
        for impl in dict.fromkeys(r["impl"] for r in sel):
            pts = sorted((r["seqlen_q"], r["peak_mem_bytes"] / 2**20) for r in sel if r["impl"] == impl)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length" + (" (B·S = const)" if len({r["batch"] for r in sel}) > 1 else ""))
        ax.set_ylabel("peak memory above inputs, MiB")
        ax.set_title(f"{pass_} peak memory, H={heads} D={head_dim}, {dtype}, {'causal' if causal else 'non-causal'}",
                     fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / "peak_memory.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


# --- CPU run -------------------------------------------------------------------------------------------------------

CPU_BASELINES = ("sdpa", "naive")


def _mib(b: int | None) -> str:
    return "–" if b is None else f"{b / 2**20:.1f}"


def _ms(r: dict | None) -> str:
    if r is None:
        return "–"
    return f"{r['ms']:.4g}" if r["status"] == "ok" else r["status"]


def _ratio(ours: dict | None, other: dict | None) -> str:
    if ours is None or other is None or ours["status"] != "ok" or other["status"] != "ok":
        return "–"
    return f"{other['ms'] / ours['ms']:.2f}"


def _span(values: list[int]) -> str:
    if not values:
        return "?"
    return str(values[0]) if values[0] == values[-1] else f"{values[0]}–{values[-1]}"


def cpu_markdown(env: dict, records: list[dict], mha: list[dict] | None = None) -> str:
    """The CPU run: times (ms), speed-ups (their time ÷ ours), peak memory, feature variants, MultiheadAttention."""
    impls = list(dict.fromkeys(r["impl"] for r in records))
    by_case: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in records:
        by_case[(r.get("variant", ""), *_key(r))][r["impl"]] = r
    reps = sorted({r["repeats"] for r in records if r.get("repeats")})
    lines = [f"# Attention benchmark: {env['device']}, {env.get('threads', '?')} threads", "",
             f"torch {env['torch']}, triton {env['triton']}. CPU tensors run flashattn_py's PyTorch path "
             "(no Triton). Times: wall-clock medians of "
             f"{_span(reps)} calls after a warm-up call, the implementations interleaved "
             "call by call; bwd is the backward half of each fwd+bwd call. Speed-up = their time ÷ ours "
             "(> 1: flashattn_py is faster). Peak memory: the process's peak resident set during one call above "
             "the resident set before it (Linux VmHWM, reset per call): everything the call touched, inputs "
             "excluded. `naive` is `flashattn_py.reference` (full S×S matrices), `sdpa` is "
             "`torch.nn.functional.scaled_dot_product_attention` (torch's fused CPU kernel).", ""]
    ours_name = "flashattn_py"
    baselines = [b for b in CPU_BASELINES if b in impls]
    header = ["pass", "dtype", "causal", "D", "B×H", "S"] + [f"{i} ms" for i in impls]
    header += [f"vs {b}" for b in baselines] + [f"{i} TFLOP/s" for i in impls if i == ours_name]
    plain = sorted(k for k in by_case if not k[0])
    if plain:
        lines += ["## Attention", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for key in plain:
            _, pass_, dtype, causal, head_dim, batch, heads, sq, sk = key
            row = by_case[key]
            cells = [pass_, dtype, "yes" if causal else "no", str(head_dim), f"{batch}×{heads}",
                     f"{sq}" if sq == sk else f"{sq}×{sk}"]
            cells += [_ms(row.get(i)) for i in impls] + [_ratio(row.get(ours_name), row.get(b)) for b in baselines]
            ours = row.get(ours_name)
            cells.append(f"{ours['tflops']:.3g}" if ours and ours["status"] == "ok" else "–")
            lines.append("| " + " | ".join(cells) + " |")
        mem_rows = [k for k in plain if k[1] == "fwd_bwd"]
        if any(r.get("peak_mem_bytes") is not None for k in mem_rows for r in by_case[k].values()):
            lines += ["", "## Peak memory of fwd+bwd (MiB above the inputs)", "",
                      "| dtype | causal | D | B×H | S | " + " | ".join(impls) + " |",
                      "|" + "---|" * (5 + len(impls))]
            for key in sorted(mem_rows, key=lambda k: (k[2], k[3], k[4], k[5], k[6], k[7])):
                _, _, dtype, causal, head_dim, batch, heads, sq, _ = key
                row = by_case[key]
                cells = [dtype, "yes" if causal else "no", str(head_dim), f"{batch}×{heads}", str(sq)]
                cells += [_mib(row[i].get("peak_mem_bytes")) if i in row and row[i]["status"] == "ok"
                          else (row[i]["status"] if i in row else "–") for i in impls]
                lines.append("| " + " | ".join(cells) + " |")
    variants = sorted(k for k in by_case if k[0])
    if variants:
        lines += ["", "## Feature variants (causal), against the masked naive path and SDPA with a dense mask", "",
                  "| variant | pass | dtype | D | B×H | Sq×Sk | " + " | ".join(f"{i} ms" for i in impls) + " | "
                  + " | ".join(f"vs {b}" for b in baselines) + " | peak MiB (" + " / ".join(impls) + ") |",
                  "|" + "---|" * (6 + len(impls) + len(baselines) + 1)]
        for key in variants:
            variant, pass_, dtype, _, head_dim, batch, heads, sq, sk = key
            row = by_case[key]
            cells = [variant, pass_, dtype, str(head_dim), f"{batch}×{heads}", f"{sq}×{sk}"]
            cells += [_ms(row.get(i)) for i in impls] + [_ratio(row.get(ours_name), row.get(b)) for b in baselines]
            cells.append(" / ".join(_mib(row[i].get("peak_mem_bytes")) if i in row else "–" for i in impls))
            lines.append("| " + " | ".join(cells) + " |")
    if mha:
        E, H, B, S = (mha[0][k] for k in ("embed_dim", "heads", "batch", "seqlen"))
        lines += ["", f"## nn.MultiheadAttention (E={E}, {H} heads, B={B}, S={S}, batch_first, key_padding_mask)", "",
                  "train = forward + backward of a step; eval = inference-mode forward (torch takes its native fast "
                  "path there).", "",
                  "| mode | flashattn_py ms | torch ms | speed-up | max abs diff | peak MiB (ours / torch) |",
                  "|---|---|---|---|---|---|"]
        for mode in dict.fromkeys(r["mode"] for r in mha):
            rows = {r["impl"]: r for r in mha if r["mode"] == mode}
            ours, theirs = rows.get("flashattn_py"), rows.get("torch")
            lines.append(f"| {mode} | {_ms(ours)} | {_ms(theirs)} | {_ratio(ours, theirs)} | "
                         f"{ours['max_abs_diff']:.2e} | {_mib(ours['peak_mem_bytes'])} / "
                         f"{_mib(theirs['peak_mem_bytes'])} |")
    return "\n".join(lines) + "\n"


def smoke_markdown(env: dict, records: list[dict], note: str) -> str:
    """The interpreter smoke run: correctness only (no timings)."""
    lines = [f"# Interpreter smoke run: {env['device']}", "", f"> **{note}**", "",
             "| pass | dtype | causal | D | B×H | S | status | max abs err vs fp32 reference |",
             "|---|---|---|---|---|---|---|---|"]
    for r in records:
        err = f"{r['max_abs_err']:.2e}" if r.get("max_abs_err") is not None else "–"
        lines.append(f"| {r['pass']} | {r['dtype']} | {'yes' if r['causal'] else 'no'} | {r['head_dim']} | "
                     f"{r['batch']}×{r['heads']} | {r['seqlen_q']} | {r['status']} | {err} |")
    return "\n".join(lines) + "\n"
