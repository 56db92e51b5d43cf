"""python -m benchmarks.codegen: what the kernels compile to, per launch, without a GPU.

    python -m benchmarks.codegen --out codegen-out                  # sm_90, every variant
    python -m benchmarks.codegen --arch sm_80 --dtype fp16 --head-dim 128 --causal false --out DIR
    python -m benchmarks.codegen --pass fwd --variants dense --dump DIR/sass --out DIR

Each kernel variant is compiled exactly as a launch on the target GPU would
compile it: the launch layer's own arguments and config (`_launch.capture_launches`
records them instead of launching), then Triton's own `JITFunction.run(...,
warmup=True)` under a stand-in driver whose target is the chosen GPU, so the
JIT binder derives the signature, the constexprs and the specialization
attributes (16-byte aligned pointers, ints divisible by 16, ints equal to 1 and
None arguments folded to constants) from the arguments, as `kernel[grid](...)`
does on a GPU. CPU tensors from `torch.empty` are 64-byte aligned, like CUDA
allocations, so they specialize the same.

From each cubin (bundled `nvdisasm` / `cuobjdump`): registers, spills, shared
memory, and the hot loop (see `codegen_sass.HOT_LOOP_RULE`) with its MMAs,
tensor-core waits, async copies, fences, and warp-instructions per 1K scores.
Writes OUT/codegen.json (a stable interface) and OUT/codegen.md. TRITON_INTERPRET
must be unset (0).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from flashattn_py._targets import TARGETS as _TARGETS

from . import codegen_sass as sass_tools

# triton 3.9 warns that its fp-fusion default will change; the report compiles with the default a launch gets
warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION is unset")

ARCHS = {"sm_80": 80, "sm_86": 86, "sm_89": 89, "sm_90": 90, "sm_100": 100, "sm_120": 120}
# per-SM figures of the model: dense fp16/bf16 tensor FLOP per clock with fp32 accumulate (what the kernels
# use) and shared memory a block may use (the opt-in maximum: a launch is refused above it; from the launch
# layer's targets, as are the SM counts). A100 / H100 / B200 class: 2048 / 4096 / 8192. The consumer parts (GA10x
# RTX 3090, AD10x RTX 4090, GB20x RTX 5090) have 1024 FLOP/clk/SM of fp16 with fp16 accumulate, and GeForce
# cards run fp32 accumulate at half that: 512 (e.g. RTX 4090: 165 dense TFLOPS = 128 SMs x 2.52 GHz x 512;
# RTX 3090 71, RTX 5090 210 by the same count). The professional boards of the same chips (A10/A40, L40S,
# RTX PRO 6000) run fp32 accumulate at the full 1024, so read their issue:tensor ratio as twice the figure here.
TENSOR_FLOP_PER_CLOCK = {80: 2048, 86: 512, 89: 512, 90: 4096, 100: 8192, 120: 512}
MAX_SHARED = {int(name[3:]): t.max_shared for name, t in _TARGETS.items() if name in ARCHS}  # flashattn_py._targets
ISSUE_PER_CLOCK = 4  # warp-instructions an SM issues per clock (4 schedulers)
EXP2_PER_CLOCK = 16  # MUFU exp2 results per SM per clock

PASSES = {"attn_fwd": "fwd", "attn_bwd_preprocess": "bwd_preprocess", "attn_bwd_dkdv": "bwd_dkdv",
          "attn_bwd_dq": "bwd_dq", "attn_bwd_dbias": "bwd_dbias"}
# matmuls per score tile in each pass's hot loop (each 2 * BLOCK_M * BLOCK_N * BLOCK_D FLOP)
MATMULS = {"fwd": 2, "bwd_dkdv": 4, "bwd_dq": 3, "bwd_dbias": 2}
MATMUL_NAMES = {"fwd": "S = Q Kᵀ, O += P V", "bwd_dkdv": "S = K Qᵀ (recompute), dP = V dOᵀ, dV += P dO, dK += dS Q",
                "bwd_dq": "S = Q Kᵀ (recompute), dP = dO Vᵀ, dQ += dS K", "bwd_dbias": "S = Q Kᵀ, dP = dO Vᵀ"}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

MODEL = (
    "Per SM and clock: {flop} dense fp16/bf16 tensor FLOP ({gpu}), {issue} warp-instructions issued, {exp2} exp2 "
    "(MUFU). One score of a pass with k matmuls costs 2·k·BLOCK_D tensor FLOP: fwd k=2 (QKᵀ, PV), dK/dV k=4 "
    "(QKᵀ recompute, dP=dO Vᵀ, dV, dK), dQ k=3 (QKᵀ recompute, dP, dQ), dBias k=2. So per 1K scores: tensor clocks "
    "= 2·k·BLOCK_D·1000/{flop}, issue clocks = warp-instr/1K ÷ {issue}, MUFU clocks = MUFU warp-instr·32 lanes per "
    "1K scores ÷ {exp2}; issue/tensor > 1 means the hot loop cannot keep the tensor cores busy even with perfect "
    "overlap (it is issue-bound), and the smaller that ratio the more slack there is for latency. "
    "warp-instr/1K scores = instructions per iteration · num_warps · 1000 / (BLOCK_M·BLOCK_N·unroll). fp32 'ieee' "
    "kernels have no MMAs (tensor clocks n/a); tf32 runs at half the fp16 rate."
)
GPU_NAMES = {80: "A100-class", 86: "RTX 3090-class, GeForce fp32 accumulate",
             89: "RTX 4090-class, GeForce fp32 accumulate", 90: "H100-class", 100: "B200-class",
             120: "RTX 5090-class, GeForce fp32 accumulate"}


# --- the stand-in driver: Triton's JIT path, for a GPU that is not here ------------------------------------------


def target_driver(arch: int):
    """Make Triton compile for `arch` (the launch layer's stand-in driver for the modelled GPU)."""
    from flashattn_py import _targets

    return _targets.stand_in_driver(_targets.TARGETS[f"sm_{arch}"])


@contextlib.contextmanager
def _watch_compiles(kernel, seen: dict) -> Iterator[None]:
    """Record (signature, constexprs, attrs) that the binder handed to `_do_compile`, by compiled kernel."""
    original = kernel._do_compile

    def do_compile(key, signature, device, constexprs, options, attrs, warmup):
        compiled = original(key, signature, device, constexprs, options, attrs, warmup)
        seen[id(compiled)] = (signature, constexprs, attrs)
        return compiled

    kernel._do_compile = do_compile
    try:
        yield
    finally:
        del kernel._do_compile


_SPECIALIZATIONS: dict[int, tuple] = {}


def compile_launch(record, arch: int):
    """The CompiledKernel `kernel[grid](**args)` would build on `arch`, and the binder's specialization."""
    cfg = record.config
    with target_driver(arch), _watch_compiles(record.kernel, _SPECIALIZATIONS):
        compiled = record.kernel.run(grid=record.grid, warmup=True, num_warps=cfg.num_warps,
                                     num_stages=cfg.num_stages, **record.args)
    return compiled, _SPECIALIZATIONS.get(id(compiled))


def describe_specialization(kernel, spec: tuple | None) -> dict:
    """Which runtime arguments the binder made 16-divisible / aligned, and which it folded to constants."""
    if spec is None:
        return {}
    signature, constexprs, attrs = spec
    names = kernel.arg_names
    declared = {p.name for p in kernel.params if p.is_constexpr}
    divisible = [names[k[0]] for k, v in attrs.items() if any(a[0] == "tt.divisibility" for a in v)]
    folded = {names[k[0]]: _jsonable(v) for k, v in constexprs.items() if names[k[0]] not in declared}
    types = {n: t for n, t in signature.items() if t != "constexpr"}
    return {"divisible_by_16": divisible, "folded_to_constants": folded, "signature": types}


def _jsonable(v):
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    return str(v)


# --- variants: what gets launched --------------------------------------------------------------------------------


@dataclass
class Variant:
    label: str
    dtype: str
    head_dim: int
    causal: bool
    kind: str  # "dense" or "feature"
    launch: Callable[[], None]  # makes the triton_fwd / triton_bwd calls (inside a capture)
    features: list[str] = field(default_factory=list)


def _contract():
    try:
        from flashattn_py import _contract as c
    except ImportError:  # before the launch layer's split
        from flashattn_py import ops as c
    return c


def _bias_float():
    c = _contract()
    return c.BiasKind.FLOAT if hasattr(c, "BiasKind") else c.BIAS_FLOAT


def _layout(**kw):
    c = _contract()
    if "mode" in kw and hasattr(c, "SeqMode"):
        kw["mode"] = c.SeqMode(kw["mode"])
    return c.SeqLayout(**kw)


def _launchers():
    try:
        from flashattn_py import _launch
    except ImportError:  # an older checkout: the launchers lived in ops
        from flashattn_py import ops as _launch
    return _launch


@dataclass
class _Record:  # the shape of _launch.LaunchRecord, for checkouts that predate it
    name: str
    kernel: Any
    args: dict[str, Any]
    config: Any
    grid: tuple[int, ...]


@contextlib.contextmanager
def _legacy_capture(capability: tuple[int, int]) -> Iterator[list]:
    """capture_launches for checkouts without it: replace ops' launcher and its config choice."""
    from flashattn_py import _config, ops

    records: list[_Record] = []

    def fake_launch(name, kernel, args, grid, constexprs, configs, cache_key):
        runtime = [p.name for p in kernel.params if not p.is_constexpr]
        cfg = configs[0]
        records.append(_Record(name, kernel, {**dict(zip(runtime, args, strict=True)), **constexprs(cfg)}, cfg,
                               tuple(grid(cfg))))

    tables = {"fwd": _config.fwd_configs, "dkdv": _config.dkdv_configs, "dq": _config.dq_configs}
    saved = ops._launch, ops._capability, ops._configs
    ops._launch, ops._capability = fake_launch, (lambda t: capability)
    ops._configs = lambda kind, q, block_d: tables[kind](block_d, q.element_size(), capability)
    try:
        yield records
    finally:
        ops._launch, ops._capability, ops._configs = saved


def _fwd_bwd(q, k, v, spec, bias=None, alibi=None, seq=None, backward=True, need_dbias=False):
    L = _launchers()
    seq_args = () if seq is None else (seq,)
    seeded = {}  # launchers that take the dropout key as a device tensor (older ones read spec.seed)
    if spec.dropout_p > 0 and "seed" in inspect.signature(L.triton_fwd).parameters:
        seeded = {"seed": torch.full((1,), spec.seed, dtype=torch.int64)}
    o, lse = L.triton_fwd(q, k, v, bias, alibi, spec, *seq_args, **seeded)
    if backward:
        L.triton_bwd(torch.empty_like(o), q, k, v, o, lse, None, bias, alibi, need_dbias, spec, *seq_args,
                     **seeded)


def variants(batch: int, heads: int, seqlen: int) -> list[Variant]:
    """Dense fp16/bf16 x D{64,128,256} x causal, an fp32 one, and the feature variants."""
    c = _contract()
    out: list[Variant] = []

    def dense(dtype: str, D: int, causal: bool) -> Callable[[], None]:
        def run():
            q, k, v = (torch.empty(batch, heads, seqlen, D, dtype=DTYPES[dtype]) for _ in range(3))
            _fwd_bwd(q, k, v, c.AttnSpec(scale=D ** -0.5, window_right=0 if causal else -1))
        return run

    for dtype in ("fp16", "bf16"):
        for D in (64, 128, 256):
            for causal in (False, True):
                out.append(Variant(f"{dtype} D{D}{' causal' if causal else ''}", dtype, D, causal, "dense",
                                   dense(dtype, D, causal)))
    out.append(Variant("fp32 D128", "fp32", 128, False, "dense", dense("fp32", 128, False)))

    def gqa_window():
        q = torch.empty(batch, heads, seqlen, 64, dtype=torch.bfloat16)
        k, v = (torch.empty(batch, heads // 4, seqlen, 64, dtype=torch.bfloat16) for _ in range(2))
        spec = c.AttnSpec(scale=0.125, window_left=1024, window_right=0, softcap=30.0)
        _fwd_bwd(q, k, v, spec, alibi=torch.rand(heads))

    def sliding_window():
        q, k, v = (torch.empty(batch, heads, seqlen, 128, dtype=torch.float16) for _ in range(3))
        _fwd_bwd(q, k, v, c.AttnSpec(scale=128 ** -0.5, window_left=4096, window_right=0))

    def bias_dropout():
        q, k, v = (torch.empty(batch, heads, seqlen, 128, dtype=torch.float16) for _ in range(3))
        bias = torch.empty(batch, 1, 1, seqlen, dtype=torch.float16)
        spec = c.AttnSpec(scale=128 ** -0.5, bias_kind=_bias_float(), dropout_p=0.1, seed=123)
        _fwd_bwd(q, k, v, spec, bias=bias, need_dbias=True)

    def varlen():
        lens = [seqlen // 2 - 100, seqlen // 2 + 100] * max(batch // 2, 1)
        total = sum(lens)
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
        q, k, v = (torch.empty(total, heads, 128, dtype=torch.bfloat16).unsqueeze(0).transpose(1, 2)
                   for _ in range(3))
        seq = _layout(mode=1, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max(lens), max_seqlen_k=max(lens))
        _fwd_bwd(q, k, v, c.AttnSpec(scale=128 ** -0.5, window_right=0), seq=seq)

    def decode():
        pages, page_size = 64, 256
        q = torch.empty(4, 8, 1, 128, dtype=torch.bfloat16)
        k, v = (torch.empty(pages, 2, page_size, 128, dtype=torch.bfloat16) for _ in range(2))
        seq = _layout(mode=2, seqlens_k=torch.full((4,), 4000, dtype=torch.int32),
                      block_table=torch.arange(pages, dtype=torch.int32).view(4, pages // 4))
        _launchers().triton_fwd(q, k, v, None, None, c.AttnSpec(scale=128 ** -0.5, window_right=0), seq,
                                num_splits=8)

    def fp32_d80():
        q, k, v = (torch.empty(batch, heads, seqlen, 80, dtype=torch.float32) for _ in range(3))
        _fwd_bwd(q, k, v, c.AttnSpec(scale=80 ** -0.5), backward=False)

    out += [
        Variant("bf16 D64 GQA4 window1024 alibi softcap causal", "bf16", 64, True, "feature", gqa_window,
                ["gqa", "window", "alibi", "softcap"]),
        Variant("fp16 D128 window4096 causal", "fp16", 128, True, "feature", sliding_window, ["window"]),
        Variant("fp16 D128 bias dropout dbias", "fp16", 128, False, "feature", bias_dropout,
                ["bias", "dropout", "dbias"]),
        Variant("bf16 D128 varlen causal", "bf16", 128, True, "feature", varlen, ["varlen"]),
        Variant("bf16 D128 paged split-K decode", "bf16", 128, True, "feature", decode, ["kv_cache", "paged",
                                                                                         "split_k"]),
        Variant("fp32 D80 fwd", "fp32", 80, False, "feature", fp32_d80, ["uneven_head_dim"]),
    ]
    return out


def capture(variant: Variant, capability: tuple[int, int]) -> list:
    """The launches the variant makes on a GPU of `capability` (LaunchRecord: name, kernel, args, config, grid)."""
    launchers = _launchers()
    recorder = getattr(launchers, "capture_launches", None) or _legacy_capture
    with recorder(capability=capability) as records:
        variant.launch()
    return list(records)


# --- one kernel's figures -----------------------------------------------------------------------------------------


def _block_d(args: dict) -> int:
    return int(args.get("BLOCK_D") or args.get("HEAD_DIM"))


def analyse(record, variant: Variant, arch: int, compiled, spec, dump_dir: Path | None) -> dict:
    cfg = record.config
    pass_ = PASSES.get(record.name, record.name)
    cubin = compiled.asm["cubin"]
    text = sass_tools.disassemble(cubin)
    instrs, labels = sass_tools.parse_sass(text)
    usage = sass_tools.resource_usage(cubin)
    shared = int(getattr(compiled.metadata, "shared", 0))
    tolerance = cfg.block_m * cfg.block_n / (64 * cfg.num_warps)  # half a select per score element per thread
    loops, hot_index = sass_tools.loop_table(instrs, labels, tolerance)
    whole = sass_tools.classify(instrs)
    entry: dict[str, Any] = {
        "name": record.name, "pass": pass_, "variant": variant.label, "dtype": variant.dtype,
        "head_dim": variant.head_dim, "causal": variant.causal, "features": variant.features,
        "config": {"block_m": cfg.block_m, "block_n": cfg.block_n, "num_warps": cfg.num_warps,
                   "num_stages": cfg.num_stages, "masked_block_m": cfg.masked_rows},
        "grid": list(record.grid),
        "registers": usage.get("REG", 0),
        "spill_bytes": usage.get("STACK", 0),
        "local_bytes": usage.get("LOCAL", 0),
        "shared_bytes": shared,
        "fits_shared_memory": shared <= MAX_SHARED[arch],
        "instructions": len(instrs),
        "kernel_totals": {k: v for k, v in whole.items() if k != "instructions"},
        "specialization": describe_specialization(record.kernel, spec),
        "constexprs": {k: _jsonable(v) for k, v in record.args.items()
                       if k in {p.name for p in record.kernel.params if p.is_constexpr}},
        "hot_loop": None,
        "loops": [],
    }
    block_d = _block_d(record.args)
    scores_per_tile = cfg.block_m * cfg.block_n
    for n, row in enumerate(loops):
        lp = row.pop("_loop")
        row["chosen"] = n == hot_index
        row["mma_flops"] = sass_tools.mma_flops(lp.instrs, cfg.num_warps)
        if n == hot_index:
            entry["hot_loop"] = _hot_loop(row, pass_, cfg, block_d, scores_per_tile, arch, variant.dtype,
                                          record.args.get("DOT_PRECISION"))
        entry["loops"].append(row)
    if dump_dir is not None:
        slug = re.sub(r"[^A-Za-z0-9]+", "_", f"{variant.label}_{record.name}").strip("_")
        dump_dir.mkdir(parents=True, exist_ok=True)
        (dump_dir / f"{slug}.sass").write_text(text)
        (dump_dir / f"{slug}.ptx").write_text(compiled.asm.get("ptx", ""))
        if "ttgir" in compiled.asm:
            (dump_dir / f"{slug}.ttgir").write_text(compiled.asm["ttgir"])
        entry["dump"] = slug
    return entry


def _hot_loop(row: dict, pass_: str, cfg, block_d: int, scores_per_tile: int, arch: int, dtype: str,
              precision: str | None) -> dict:
    k = MATMULS.get(pass_, 0)
    expected = 2.0 * k * scores_per_tile * block_d
    unroll = 1
    if row["mma_flops"] and expected:
        unroll = max(1, round(row["mma_flops"] / expected))
    scores = scores_per_tile * unroll
    instr = row["instructions"]
    per_1k = instr * cfg.num_warps * 1000 / scores
    mufu = sum(row["mufu"].values())
    tensor_rate = TENSOR_FLOP_PER_CLOCK[arch]
    uses_mma = bool(row["mma"])
    if dtype == "fp32":
        tensor_rate = tensor_rate / 2 if precision == "tf32" else 0
    tensor_clocks = 2.0 * k * block_d * 1000 / tensor_rate if (uses_mma and tensor_rate and k) else None
    issue_clocks = per_1k / ISSUE_PER_CLOCK
    mufu_clocks = mufu * cfg.num_warps * 32 * 1000 / scores / EXP2_PER_CLOCK
    return {
        "instructions_per_iteration": instr,
        "static_instructions_per_iteration": row["static_instructions"],
        "off_path": row["off_path"],
        "scores_per_iteration": scores,
        "unroll": unroll,
        "warp_instr_per_1k_scores": round(per_1k, 1),
        "mma": row["mma"],
        "mma_flops_per_iteration": row["mma_flops"],
        "expected_mma_flops_per_iteration": expected if uses_mma else None,
        "tensor_core_waits": row["tensor_core_waits"],
        "async_copies": row["async_copies"],
        "fences_barriers": row["fences_barriers"],
        "global_memory": row["global_memory"],
        "shared_memory": row["shared_memory"],
        "mufu": row["mufu"],
        "compare_select": row["compare_select"],
        "int64_ops": row["int64_ops"],
        "counter_bits": row["counter_bits"],
        "local_memory": row["local_memory"],
        "model": {
            "matmuls": k,
            "tensor_clocks_per_1k_scores": None if tensor_clocks is None else round(tensor_clocks, 1),
            "issue_clocks_per_1k_scores": round(issue_clocks, 1),
            "mufu_clocks_per_1k_scores": round(mufu_clocks, 1),
            "issue_vs_tensor": None if not tensor_clocks else round(issue_clocks / tensor_clocks, 2),
        },
        "start": row["start"], "end": row["end"],
    }


# --- the report -------------------------------------------------------------------------------------------------


def _fmt_counts(d: dict) -> str:
    return ", ".join(f"{k}×{v}" for k, v in d.items()) or "–"


def _short_mma(d: dict) -> str:
    return ", ".join(f"{k.split('.')[0]}.{k.split('.')[1]}×{v}" if "." in k else f"{k}×{v}" for k, v in d.items()) \
        or "–"


def notes_for(entry: dict) -> list[str]:
    """What stands out in one kernel's SASS."""
    notes = []
    hot = entry["hot_loop"]
    if entry["spill_bytes"]:
        notes.append(f"{entry['spill_bytes']} B/thread stack (spills)")
    if not entry["fits_shared_memory"]:
        notes.append(f"{entry['shared_bytes']} B shared memory exceeds the target's limit: a real launch falls back "
                     "to the next config")
    if hot:
        if hot["local_memory"]:
            notes.append(f"local memory in the hot loop: {_fmt_counts(hot['local_memory'])}")
        narrow = {k: v for k, v in hot["global_memory"].items() if not k.endswith((".128",))}
        if narrow:
            notes.append(f"narrow global accesses in the hot loop: {_fmt_counts(narrow)}")
        if hot["counter_bits"] == 64:
            notes.append("64-bit loop counter (the back branch tests an ISETP.EX)")
        if hot["int64_ops"]:
            notes.append(f"{hot['int64_ops']} 64-bit integer ops per iteration (IADD3.X/IMAD.WIDE/LEA.HI.X/.EX)")
        fences = {k: v for k, v in hot["fences_barriers"].items() if k.startswith(("MEMBAR", "FENCE"))}
        if fences:
            notes.append(f"fences per iteration: {_fmt_counts(fences)}")
        skipped = [b for b in hot.get("off_path", []) if b["instructions"] > 8]
        if skipped:
            notes.append("side blocks off the steady path: "
                         + ", ".join(f"{b['source']} ({b['instructions']} instr)" for b in skipped))
        if hot["unroll"] > 1:
            notes.append(f"hot loop unrolled ×{hot['unroll']}")
    return notes


def _instr_cell(hot: dict) -> str:
    """Steady-path instructions per iteration, with the static count of the whole body when it differs."""
    if not hot:
        return "–"
    steady, static = hot["instructions_per_iteration"], hot.get("static_instructions_per_iteration")
    return f"{steady}" if static in (None, steady) else f"{steady} ({static} static)"


def markdown(report: dict) -> str:
    arch = report["arch"]
    lines = [f"# Compiled code: {arch}, triton {report['triton']}", "",
             f"Shape B{report['shape']['batch']} H{report['shape']['heads']} S{report['shape']['seqlen']} "
             f"(feature variants: see labels). Each kernel compiled as a launch would compile it "
             f"(the launch layer's config; Triton's JIT binder for signature, constexprs and alignment/divisibility "
             f"attributes). Compile wall time {report['seconds']:.0f} s.", "",
             "**Model.** " + report["model"], "",
             "**Hot-loop rule.** " + report["hot_loop_rule"], "",
             "| variant | pass | config BMxBN w/s | regs | spill B | smem KB | instr/iter | scores/iter | "
             "warp-instr/1K | issue:tensor | MUFU clk/1K | hot-loop MMAs | TC waits | async copies |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in report["kernels"]:
        c = e["config"]
        h = e["hot_loop"] or {}
        model = h.get("model", {})
        cfg = f"{c['block_m']}x{c['block_n']} {c['num_warps']}/{c['num_stages']}"
        if c.get("masked_block_m", c["block_m"]) != c["block_m"]:
            cfg += f" (masked {c['masked_block_m']})"
        lines.append(
            f"| {e['variant']} | {e['pass']} | {cfg} | {e['registers']} | {e['spill_bytes']} | "
            f"{e['shared_bytes'] / 1024:.1f} | {_instr_cell(h)} | "
            f"{h.get('scores_per_iteration', '–')} | {h.get('warp_instr_per_1k_scores', '–')} | "
            f"{model.get('issue_vs_tensor') if model.get('issue_vs_tensor') is not None else '–'} | "
            f"{model.get('mufu_clocks_per_1k_scores', '–')} | {_short_mma(h.get('mma', {}))} | "
            f"{_fmt_counts(h.get('tensor_core_waits', {}))} | {_fmt_counts(h.get('async_copies', {}))} |")
    lines += ["", "## Loops with matmul work, per kernel (→ marks the hot loop)", ""]
    for e in report["kernels"]:
        if not e["loops"]:
            continue
        lines.append(f"**{e['variant']} · {e['name']}**: " + "; ".join(
            f"{'→ ' if r['chosen'] else ''}{r['start']}–{r['end']} {r['instructions']} instr, "
            f"{sum(r['mma'].values())} MMA, {r['compare_select']} cmp/sel"
            + ("" if r["innermost"] else " (outer)") for r in e["loops"]))
        lines.append("")
    noted = [(e, notes_for(e)) for e in report["kernels"]]
    if any(n for _, n in noted):
        lines += ["## Notes", ""]
        for e, n in noted:
            if n:
                lines.append(f"- {e['variant']} · {e['pass']}: " + "; ".join(n))
        lines.append("")
    if report.get("failures"):
        lines += ["## Failures", ""] + [f"- {f['variant']} · {f['name']}: {f['error']}" for f in report["failures"]]
    return "\n".join(lines) + "\n"


def _parse_bool(text: str) -> bool:
    t = text.lower()
    if t in ("1", "true", "yes", "causal"):
        return True
    if t in ("0", "false", "no", "none"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.codegen", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=sorted(ARCHS), default="sm_90")
    p.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), help="only these dtypes")
    p.add_argument("--head-dim", nargs="+", type=int, help="only these head dims")
    p.add_argument("--causal", type=_parse_bool, help="only causal (true) or non-causal (false) variants")
    p.add_argument("--pass", dest="passes", nargs="+", choices=sorted(set(PASSES.values())), help="only these passes")
    p.add_argument("--variants", choices=("all", "dense", "features"), default="all")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=8192)
    p.add_argument("--out", type=Path, help="write OUT/codegen.json and OUT/codegen.md")
    p.add_argument("--dump", type=Path, help="write each kernel's SASS (with source lines), PTX and TTGIR here")
    return p


def select(all_variants: list[Variant], args) -> list[Variant]:
    chosen = []
    for v in all_variants:
        if args.variants == "dense" and v.kind != "dense" or args.variants == "features" and v.kind != "feature":
            continue
        if args.dtype and v.dtype not in args.dtype:
            continue
        if args.head_dim and v.head_dim not in args.head_dim:
            continue
        if args.causal is not None and v.causal != args.causal:
            continue
        chosen.append(v)
    return chosen


def run_report(args, chosen: list[Variant] | None = None, verbose: bool = True) -> dict:
    """Compile and analyse every launch of the selected variants (or of `chosen`) for args.arch."""
    import triton

    arch = ARCHS[args.arch]
    capability = divmod(arch, 10)
    report: dict[str, Any] = {
        "arch": args.arch, "triton": triton.__version__, "torch": torch.__version__,
        "shape": {"batch": args.batch, "heads": args.heads, "seqlen": args.seqlen},
        "env": {k: os.environ[k] for k in ("TRITON_DEFAULT_FP_FUSION", "TRITON_CACHE_DIR") if k in os.environ},
        "model": MODEL.format(flop=TENSOR_FLOP_PER_CLOCK[arch], gpu=GPU_NAMES[arch], issue=ISSUE_PER_CLOCK,
                              exp2=EXP2_PER_CLOCK),
        "model_constants": {"tensor_flop_per_clock": TENSOR_FLOP_PER_CLOCK[arch], "issue_per_clock": ISSUE_PER_CLOCK,
                            "exp2_per_clock": EXP2_PER_CLOCK, "matmuls": MATMULS, "matmul_names": MATMUL_NAMES},
        "hot_loop_rule": sass_tools.HOT_LOOP_RULE,
        "kernels": [], "failures": [],
    }
    start = time.time()
    if chosen is None:
        chosen = select(variants(args.batch, args.heads, args.seqlen), args)
    for variant in chosen:
        for record in capture(variant, capability):
            pass_ = PASSES.get(record.name, record.name)
            if args.passes and pass_ not in args.passes:
                continue
            t0 = time.time()
            try:
                compiled, spec = compile_launch(record, arch)
                entry = analyse(record, variant, arch, compiled, spec, args.dump)
            except Exception as exc:  # noqa: BLE001 - report every kernel, then fail
                report["failures"].append({"variant": variant.label, "name": record.name,
                                           "error": f"{type(exc).__name__}: {str(exc)[-2000:]}"})
                print(f"FAIL {variant.label:46s} {record.name:20s} {type(exc).__name__}: {str(exc)[-300:]}",
                      file=sys.stderr, flush=True)
                continue
            entry["compile_seconds"] = round(time.time() - t0, 1)
            report["kernels"].append(entry)
            if not verbose:
                continue
            h = entry["hot_loop"] or {}
            print(f"{variant.label:46s} {record.name:20s} regs {entry['registers']:3d} spill {entry['spill_bytes']:4d}"
                  f" smem {entry['shared_bytes']:6d} instr/iter {h.get('instructions_per_iteration', '-'):>4}"
                  f" w-instr/1K {h.get('warp_instr_per_1k_scores', '-'):>6} {_short_mma(h.get('mma', {}))}",
                  flush=True)
    report["seconds"] = round(time.time() - start, 1)
    return report


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the report compiles for the GPU", file=sys.stderr)
        return 2
    report = run_report(args)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "codegen.json").write_text(json.dumps(report, indent=1) + "\n")
        (args.out / "codegen.md").write_text(markdown(report))
        print(f"wrote {args.out / 'codegen.json'} and {args.out / 'codegen.md'}")
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
