"""Launch configurations: every block shape, warp and stage count lives here.

Each kernel gets an ordered list of candidate configs for a (head dim, dtype,
compute capability). The launcher tries them in order and caches the first
that compiles, so a config too large for a GPU's shared memory falls back to
a smaller one instead of failing. Under the Triton interpreter one fixed,
small config is used; its block shapes are deliberately unequal (BLOCK_M !=
BLOCK_N) so the CPU test suite exercises the general causal-band logic.

The GPU configs are chosen from the compiled code (``python -m benchmarks.codegen``:
registers, spills, shared memory and hot-loop instructions per score on sm_90),
not from timings: no GPU was available to time them.
"""

from __future__ import annotations

from dataclasses import dataclass

from ._targets import GpuTarget


@dataclass(frozen=True)
class KernelConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    # dK/dV pass: query rows per step in the masked stages (causal diagonal, window edges, ragged
    # block); 0 means block_m. Half-height masked tiles free the registers their index tiles take.
    masked_block_m: int = 0

    @property
    def masked_rows(self) -> int:
        return self.masked_block_m or self.block_m


# Interpreter: warps and stages mean nothing there; small blocks keep CPU tests quick.
INTERPRETER = {
    "fwd": KernelConfig(block_m=32, block_n=16, num_warps=4, num_stages=1),
    "dkdv": KernelConfig(block_m=32, block_n=16, num_warps=4, num_stages=1, masked_block_m=16),
    "dq": KernelConfig(block_m=32, block_n=16, num_warps=4, num_stages=1),
    "dbias": KernelConfig(block_m=32, block_n=16, num_warps=4, num_stages=1),
    "preprocess": KernelConfig(block_m=32, block_n=32, num_warps=4, num_stages=1),
}
# Whether the interpreter reads streamed operands (K/V in the forward and dQ pass, Q/dO in the dK/dV pass)
# through tensor descriptors (TMA on a GPU, taken there from sm_90 on). Off by default on CPU, where the
# pointer path is the general one; tests switch it on to cover both.
INTERPRETER_STREAM_DESCRIPTORS = False
# The backward's row-wise preprocess (delta = rowsum(O * dO)); block_n is unused. It holds no tile in
# shared memory (512 B on every target); the second is there so no launch site has a single candidate.
PREPROCESS = (KernelConfig(block_m=128, block_n=128, num_warps=4, num_stages=1),
              KernelConfig(block_m=32, block_n=32, num_warps=4, num_stages=1))

# KV-cache calls with at most this many query rows use `decode_configs` (16-row tiles).
DECODE_MAX_QUERIES = 16
# Split-K decoding (num_splits=0): enough splits to fill the multiprocessors, each at least
# SPLIT_MIN_KEYS keys long, and at most MAX_SPLITS.
SPLIT_MIN_KEYS = 256
MAX_SPLITS = 64


def _large(gpu: GpuTarget) -> bool:
    """Hopper-class shared memory (227 KB: sm_90, sm_100): the 128-wide tiles of the Hopper tables fit."""
    return gpu.max_shared >= 200 * 1024


def budget(gpu: GpuTarget) -> str:
    """The shared-memory class whose tables a GPU takes: its budget decides, never its capability.

    "large" 227 KB (sm_90, sm_100), "medium" 163 KB (sm_80; gfx950's 160 KB), "small" below
    (sm_86, sm_89, sm_120: 99 KB; gfx942's 64 KB until AMD has tables of its own, where the
    launcher's fit check moves down the list). An unknown GPU gets the class of its budget.
    """
    if _large(gpu):
        return "large"
    return "medium" if gpu.max_shared >= 150 * 1024 else "small"


def auto_splits(multiprocessors: int, batch_heads: int, cache_len: int) -> int:
    """Split-K factor for decoding: fill the GPU, but never splits shorter than SPLIT_MIN_KEYS."""
    return max(1, min(multiprocessors // max(batch_heads, 1), cache_len // SPLIT_MIN_KEYS, MAX_SPLITS))


def _configs(*specs: str) -> list[KernelConfig]:
    """KernelConfigs from "BMxBN warps/stages [mMASKED]" strings, the notation of TUNING.md."""
    out = []
    for spec in specs:
        tile, ws, *masked = spec.split()
        bm, bn = (int(x) for x in tile.split("x"))
        warps, stages = (int(x) for x in ws.split("/"))
        out.append(KernelConfig(bm, bn, warps, stages, int(masked[0][1:]) if masked else 0))
    return out


def _bucket(block_d: int, elem_bytes: int) -> str:
    if elem_bytes == 4:
        return "fp32"
    return "d64" if block_d <= 64 else "d128" if block_d <= 128 else "d256"


# Tables for the GPUs below Hopper's shared memory, from the codegen report (triton 3.9; first choice:
# shared bytes, registers, spill bytes, warp-instructions per 1K scores; K/V by pointer). "small":
# sm_86 (= sm_89, identical in every config checked) and sm_120 with pointers. "medium": sm_80.
# A candidate is first only if it fits with 0 spills in every variant of its bucket (dense fp16/bf16
# causal or not, GQA + window + ALiBi + softcap at D64, varlen at D128) unless noted; "heavy" is a bias
# tile or dropout, measured at D128 fp16 (D64 / D256 heavy take the plain list). benchmarks/TUNING.md.
_TABLES: dict[str, dict[tuple[str, str], list[KernelConfig]]] = {
    "small": {
        ("fwd", "d64"): _configs("128x128 8/3", "128x32 4/2", "64x64 4/2", "32x32 4/1"),  # 81952 B, 255, 0, 569
        # dense fp16: 65568 B, 0 spills but 16 B in one variant, 422-448 (64x64 4/3, 0 spills everywhere: 616)
        ("fwd", "d128"): _configs("128x64 8/2", "64x64 4/3", "64x64 4/2", "64x32 4/2", "32x32 4/1"),
        ("fwd", "d128 heavy"): _configs("64x32 4/2", "32x32 4/1"),  # 40960 B, 245, 0, 2590
        ("fwd", "d256"): _configs("64x32 8/2", "64x32 8/1", "32x64 4/1", "16x16 4/1"),  # 69632 B, 177, 0, 941
        ("fwd", "fp32"): _configs("64x32 4/2", "32x32 4/1", "16x16 4/1"),  # fits, spills 2280 B (issue 22)
        ("dkdv", "d64"): _configs("32x64 4/2", "16x32 4/1", "16x64 4/2"),  # 24704 B, 252, 0, 817
        ("dkdv", "d128"): _configs("16x64 4/2", "32x64 8/2", "16x64 4/3", "16x32 4/1"),  # 43072 B, 252, 0, 648
        ("dkdv", "d128 heavy"): _configs("32x64 8/2", "16x32 4/1"),  # 57600 B, 252, 0, 1766
        ("dkdv", "d256"): _configs("16x32 4/1", "32x32 8/1", "16x16 4/1"),  # 57344 B, 235, 0, 1293
        ("dkdv", "fp32"): _configs("16x64 8/1", "16x32 4/1", "16x16 4/1"),  # 90112 B, 160, 0
        ("dq", "d64"): _configs("128x32 4/2", "128x64 8/2", "64x64 4/2", "32x16 4/1"),  # 40960 B, 253, 0, 554
        ("dq", "d128"): _configs("128x32 8/2", "128x32 8/3", "64x32 4/2", "32x16 4/1"),  # 81920 B, 196, 0, 513
        ("dq", "d128 heavy"): _configs("32x16 4/1", "64x32 4/2"),  # 24576 B, 168, 0, 1758
        ("dq", "d256"): _configs("64x32 8/1", "32x16 4/1", "16x16 4/1"),  # 98304 B, 215, 0, 926
        ("dq", "fp32"): _configs("64x16 4/1", "32x32 4/1", "32x16 4/1"),  # 81920 B, 168, 0
        ("dbias", "d128"): _configs("128x32 4/2", "128x32 8/2", "64x32 4/2", "32x16 4/1"),  # 86016 B, 255, 0
        ("decode", "d64"): _configs("16x128 4/2", "16x64 4/1", "16x32 4/1"),  # 38 KB, 168, 0, 570
        ("decode", "d128"): _configs("16x128 4/2", "16x128 4/1", "16x64 4/2", "16x32 4/1"),  # 73728 B, 255, 0, 927
        ("decode", "d256"): _configs("16x32 4/2", "16x32 4/1", "16x16 4/1"),
        ("decode", "fp32"): _configs("16x32 4/2", "16x32 4/1", "16x16 4/1"),
    },
    "medium": {
        ("fwd", "d64"): _configs("128x64 4/3", "128x128 8/3", "128x32 4/2", "32x32 4/1"),  # 49168 B, 255, 0, 533
        # dense fp16/bf16: 65568 B, 237, 0, 437 (64x64 4/2, 0 spills in every variant: 608)
        ("fwd", "d128"): _configs("128x64 8/2", "64x64 4/2", "64x32 4/2", "32x32 4/1"),
        ("fwd", "d128 heavy"): _configs("64x32 4/2", "32x32 4/1"),  # 40960 B, 248, 0, 2551
        ("fwd", "d256"): _configs("64x32 8/1", "64x32 8/2", "32x64 4/1", "16x16 4/1"),  # 53248 B, 193, 0, 938
        ("fwd", "fp32"): _configs("64x32 4/2", "32x32 4/1", "16x16 4/1"),  # 73984 B, spills 128 B
        # dense fp16/bf16: 49408 B, 238, 0, 463 (16x32 4/1, 0 spills everywhere: 757)
        ("dkdv", "d64"): _configs("64x128 8/2", "16x32 4/1", "16x64 4/2"),
        ("dkdv", "d128"): _configs("16x64 4/2", "32x64 8/2", "16x32 4/1"),  # 43072 B, 254, 0, 647
        ("dkdv", "d128 heavy"): _configs("32x64 8/2", "16x32 4/1"),  # 57600 B, 254, 0, 1766
        ("dkdv", "d256"): _configs("32x64 8/2 m16", "32x64 8/1 m16", "16x32 4/1"),  # 102528 B, 254, 0, 1012
        ("dkdv", "fp32"): _configs("16x64 8/1", "16x32 4/1", "16x16 4/1"),  # 90112 B, 157, 0
        ("dq", "d64"): _configs("128x64 8/2", "128x32 4/2", "64x64 4/2", "32x16 4/1"),  # 49152 B, 251, 0, 559
        ("dq", "d128"): _configs("128x32 8/2", "128x32 8/3", "64x32 4/2", "32x16 4/1"),  # 81920 B, 208, 0, 507
        ("dq", "d128 heavy"): _configs("32x16 4/1", "128x32 8/2"),  # 24576 B, 168, 0, 1758
        ("dq", "d256"): _configs("64x32 8/2", "64x32 8/1", "32x16 4/1", "16x16 4/1"),  # 102400 B, 225, 0, 857
        ("dq", "fp32"): _configs("64x16 4/1", "32x32 4/1", "32x16 4/1"),  # 81920 B, 190, 0
        ("dbias", "d128"): _configs("32x16 4/1", "128x32 8/2"),  # 18432 B, 201, 0, 1891
        ("decode", "d64"): _configs("16x128 4/3", "16x128 4/2", "16x64 4/2"),  # 71680 B, 128, 0, 576
        ("decode", "d128"): _configs("16x128 4/3", "16x128 4/2", "16x64 4/2"),  # 139264 B, 168, 0, 770
        ("decode", "d256"): _configs("16x64 4/2", "16x32 4/1", "16x16 4/1"),
        ("decode", "fp32"): _configs("16x64 4/2", "16x32 4/1", "16x16 4/1"),
    },
}


def _without_128x128(configs: list[KernelConfig]) -> list[KernelConfig]:
    """A forward with a bias tile or dropout: the 128x128 tiles no longer fit (295 KB at D=128 on Hopper)."""
    return [c for c in configs if c.block_m * c.block_n < 128 * 128] or configs


def _table(kind: str, block_d: int, elem_bytes: int, gpu: GpuTarget, heavy_scores: bool) -> list[KernelConfig]:
    """A "small" / "medium" GPU's candidates; heavy lists where measured, else the plain one (fwd without its
    128x128 tiles, too large with a bias tile)."""
    table = _TABLES[budget(gpu)]
    bucket = _bucket(block_d, elem_bytes)
    if kind == "dbias":
        return table.get(("dbias", bucket)) or table[("dq", bucket)]
    if heavy_scores and (kind, f"{bucket} heavy") in table:
        return table[(kind, f"{bucket} heavy")]
    configs = table[(kind, bucket)]
    return _without_128x128(configs) if heavy_scores and kind == "fwd" else configs


def fwd_configs(block_d: int, elem_bytes: int, gpu: GpuTarget, heavy_scores: bool = False) -> list[KernelConfig]:
    """Forward candidates, best first. BLOCK_M query rows stay in registers; K/V tiles stream.

    Hopper (sm_90, codegen report, fp16 = bf16, K/V through descriptors, warp-instructions per
    1K scores in the unmasked loop's steady path, triton 3.9): D=64 128x128 8/3 218 (128x64 4/3:
    256); D=128 128x128 8/3 225, 194 registers, 0 spills, 225 KB shared (128x64 8/3: 364 with
    pointers); D=256 128x64 8/2 337 (64x64 8/2: 551). benchmarks/TUNING.md has the log.
    `heavy_scores`: a bias/mask tile loaded per score tile (pipelined in shared memory like K
    and V) or dropout's Philox state. The 128x128 tile then no longer fits (295 KB of shared
    memory at D=128): it starts one size down. Smaller GPUs: `_TABLES`.
    """
    if not _large(gpu):
        return _table("fwd", block_d, elem_bytes, gpu, heavy_scores)
    if elem_bytes == 4:  # fp32 tiles are twice the size: halve them
        configs = _configs("64x32 4/2", "32x32 4/1", "16x16 4/1")
    elif block_d <= 64:
        configs = _configs("128x128 8/3", "128x64 4/3", "64x64 4/2", "32x32 4/1")
    elif block_d <= 128:
        configs = _configs("128x128 8/3", "128x64 8/3", "64x64 4/2", "32x32 4/1")
    else:
        configs = _configs("128x64 8/2", "64x64 8/2", "64x32 4/2", "32x32 4/1", "16x16 4/1")
    return _without_128x128(configs) if heavy_scores else configs


def dkdv_configs(block_d: int, elem_bytes: int, gpu: GpuTarget, descriptors: bool = False,
                 heavy_scores: bool = False) -> list[KernelConfig]:
    """dK/dV candidates: K/V tiles of BLOCK_N rows resident, query tiles of BLOCK_M rows stream.

    Hopper (codegen report, warp-instructions per 1K scores, triton 3.9 / 3.6): D=64 32x128 4/3
    with 16-row masked steps 362, causal 356, 0 spills (64x128 8/2: 377); D=128 with Q/dO
    descriptors 64x128 8/2 with 32-row masked steps 415 / 408, causal 415 / 458, 0 spills
    (without bias or dropout: see `stream_descriptors`; 64-row masked steps spill 72 B causal on
    3.9); with pointers 64x64 8/3 493 (32x128 8/2: 598; 64x128 spills). Smaller GPUs: `_TABLES`.
    """
    if not _large(gpu):
        return _table("dkdv", block_d, elem_bytes, gpu, heavy_scores)
    if elem_bytes == 4:
        return _configs("32x64 4/2", "16x32 4/1", "16x16 4/1")
    if block_d <= 64:
        return _configs("32x128 4/3 m16", "32x64 4/2", "16x32 4/1")
    if block_d <= 128:
        if descriptors:  # Q/dO through TMA free the registers a 64x128 tile needs
            return _configs("64x128 8/2 m32", "64x64 8/3", "32x128 8/2", "32x64 4/2", "16x32 4/1")
        return _configs("64x64 8/3", "32x128 8/2", "32x64 4/2", "16x32 4/1")
    # D=256 spills in every config tried (320 B; 16-row masked steps: causal 440 -> 336 B)
    return _configs("32x64 8/1 m16", "16x64 4/1", "16x32 4/1", "16x16 4/1")


def dq_configs(block_d: int, elem_bytes: int, gpu: GpuTarget, heavy_scores: bool = False) -> list[KernelConfig]:
    """dQ candidates: Q/dO tiles of BLOCK_M rows resident, K/V tiles of BLOCK_N rows stream.

    Hopper (codegen report): BLOCK_N=64 pays the per-iteration fixed work over twice the keys:
    D=64 128x64 4/3 215 (128x32 4/3: 281); D=128 128x64 8/3 305 with K/V descriptors (128x32 8/2: 479).
    Smaller GPUs: `_TABLES`.
    """
    if not _large(gpu):
        return _table("dq", block_d, elem_bytes, gpu, heavy_scores)
    if elem_bytes == 4:
        return _configs("64x32 4/2", "32x16 4/1", "16x16 4/1")
    if block_d <= 64:
        return _configs("128x64 4/3", "128x32 4/3", "64x32 4/2", "32x16 4/1")
    if block_d <= 128:
        return _configs("128x64 8/3", "128x32 8/2", "64x32 4/2", "32x16 4/1")
    # D=256: 789, 0 spills (64x32 8/1: 1127, 160 B spilled)
    return _configs("128x32 8/2", "64x32 8/1", "64x16 4/1", "32x16 4/1", "16x16 4/1")


def decode_configs(block_d: int, elem_bytes: int, gpu: GpuTarget) -> list[KernelConfig]:
    """KV-cache decoding: a handful of query rows, so the smallest M tl.dot takes and long key blocks.

    16x128 4/3 needs 139,264 B at D=128 (71,680 B at D=64) on every target: Hopper and sm_80
    take it; the 99 KB GPUs start at 16x128 4/2 (73,728 B). Smaller GPUs: `_TABLES`.
    """
    if not _large(gpu):
        return _table("decode", block_d, elem_bytes, gpu, False)
    if elem_bytes == 4 or block_d > 128:
        return _configs("16x64 4/2", "16x32 4/1", "16x16 4/1")
    return _configs("16x128 4/3", "16x64 4/2", "16x32 4/1")


def candidates(kind: str, block_d: int, elem_bytes: int, gpu: GpuTarget,
               descriptors: bool = False, heavy_scores: bool = False) -> list[KernelConfig]:
    """The GPU candidates of one pass: "fwd", "dkdv", "dq" or "dbias" (Hopper's dBias uses dq's).

    `heavy_scores`: a bias/mask tile or dropout (see `fwd_configs`; dK/dV: `stream_descriptors`).
    """
    if kind == "dkdv":
        return dkdv_configs(block_d, elem_bytes, gpu, descriptors, heavy_scores)
    if kind == "fwd":
        return fwd_configs(block_d, elem_bytes, gpu, heavy_scores)
    if kind == "dbias" and not _large(gpu):
        return _table("dbias", block_d, elem_bytes, gpu, heavy_scores)
    return dq_configs(block_d, elem_bytes, gpu, heavy_scores)


def stream_descriptors(kind: str, block_d: int, gpu: GpuTarget | None, heavy_scores: bool = False) -> bool:
    """Whether a pass reads its streamed operands through tensor descriptors where the inputs allow.

    Only on GPUs with TMA and Hopper's shared memory (sm_90, sm_100): on sm_120 (TMA, 99 KB) the
    descriptor path spills in the tiles that fit (fwd D=128 128x64 8/2: 80 B; dQ 128x32 8/2: 40 B)
    and the pointer path matches sm_86, so sm_120 takes the pointer tables.

    From the codegen report: the forward and dQ gain at every head dim (D=128: fwd 269 -> 257,
    dQ 330 -> 305 warp-instructions per 1K scores, and far fewer registers). dK/dV gains at
    D=128 with the 64x128 tile it allows (493 -> 415, causal too), but not with a bias tile or
    dropout (`heavy_scores`: that tile then spills); it loses at D=64 (356 -> 367) and spills
    either way at D=256.
    """
    if gpu is not None and not (gpu.tma and _large(gpu)):  # None: the interpreter, which runs both paths
        return False
    if kind == "dkdv":
        return not heavy_scores and 64 < block_d <= 128
    return True
