"""Decode benchmark: one new token per sequence against a long KV cache, judged by bandwidth.

Bytes moved ≈ 2 (K and V) · B · H_kv · S_kv · D · bytes/element (ANCHORS.md); the
ceiling is this device's measured copy bandwidth (read + write of a large
buffer). Reported: achieved GB/s and its fraction of that ceiling.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

import torch

from flashattn_py import attention_with_kvcache

from .suite import _time_ms

STANDARD = [(16, 32, 8, 128, 4096), (16, 32, 8, 128, 16384), (16, 32, 8, 128, 65536)]  # B, H, H_kv, D, cache
CPU = [(4, 16, 4, 128, 8192)]  # the PyTorch path (one dense problem per sequence)
QUICK_CPU = [(2, 8, 2, 64, 1024)]
INTERPRETER = [(2, 4, 2, 32, 256)]  # Triton's CPU interpreter: tiny, a smoke run


@dataclass
class DecodeRecord:
    impl: str
    batch: int
    heads: int
    heads_kv: int
    head_dim: int
    cache_len: int
    dtype: str
    paged: bool
    ms: float | None
    gbps: float | None
    copy_gbps: float | None
    fraction_of_copy: float | None
    status: str
    message: str | None = None


def copy_bandwidth_gbps(device: torch.device) -> float:
    """Device-to-device copy: (read + write) bytes / time, on a buffer far larger than the caches."""
    n = (1 << 28) if device.type == "cuda" else (1 << 25)
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = _time_ms(lambda: dst.copy_(src), device.type == "cuda")
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


def run_decode(device: torch.device, quick: bool, dtype: str = "bfloat16",
               interpreter: bool = False) -> list[DecodeRecord]:
    on_gpu = device.type == "cuda"
    if interpreter:
        dtype = "float16"  # the interpreter's bf16 dot is broken (triton #11584)
        shapes = INTERPRETER
    elif on_gpu:
        shapes = STANDARD[:1] if quick else STANDARD
    else:
        shapes = QUICK_CPU if quick else CPU
    copy = copy_bandwidth_gbps(device)
    records = []
    for B, H, H_kv, D, S in shapes:
        for paged in (False, True):
            tdt = getattr(torch, dtype)
            try:
                q = torch.randn(B, H, 1, D, device=device, dtype=tdt)
                lens = torch.full((B,), S - 1, dtype=torch.int32, device=device)
                k_new = torch.randn(B, H_kv, 1, D, device=device, dtype=tdt)
                v_new = torch.randn_like(k_new)
                if paged:
                    page = 64 if interpreter else 256
                    pages = B * (S // page)
                    k_cache = torch.randn(pages, H_kv, page, D, device=device, dtype=tdt)
                    v_cache = torch.randn_like(k_cache)
                    table = torch.randperm(pages, device=device).view(B, -1).to(torch.int32)
                else:
                    k_cache = torch.randn(B, H_kv, S, D, device=device, dtype=tdt)
                    v_cache = torch.randn_like(k_cache)
                    table = None

                # appends the same token at the same slot every call: the cache does not grow
                step = functools.partial(attention_with_kvcache, q, k_cache, v_cache, lens, k_new=k_new,
                                         v_new=v_new, block_table=table)
                ms = _time_ms(step, on_gpu)
                gbps = 2 * B * H_kv * S * D * k_cache.element_size() / (ms * 1e-3) / 1e9
                records.append(DecodeRecord("flashattn_py", B, H, H_kv, D, S, dtype, paged, ms, gbps, copy,
                                            gbps / copy, "ok"))
            except torch.cuda.OutOfMemoryError:
                records.append(DecodeRecord("flashattn_py", B, H, H_kv, D, S, dtype, paged, None, None, copy,
                                            None, "oom"))
            except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
                records.append(DecodeRecord("flashattn_py", B, H, H_kv, D, S, dtype, paged, None, None, copy,
                                            None, "error", f"{type(exc).__name__}: {str(exc)[:300]}"))
            finally:
                if on_gpu:
                    torch.cuda.empty_cache()
    return records


def decode_markdown(records: list[DecodeRecord]) -> str:
    lines = ["", "## Decode (Sq = 1) against a KV cache: bandwidth", "",
             "| B | H | H_kv | D | cache | dtype | paged | ms | GB/s | copy GB/s | fraction of copy |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        if r.status != "ok":
            lines.append(f"| {r.batch} | {r.heads} | {r.heads_kv} | {r.head_dim} | {r.cache_len} | {r.dtype} | "
                         f"{r.paged} | {r.status} | – | {r.copy_gbps:.0f} | – |")
            continue
        lines.append(f"| {r.batch} | {r.heads} | {r.heads_kv} | {r.head_dim} | {r.cache_len} | {r.dtype} | "
                     f"{r.paged} | {r.ms:.4g} | {r.gbps:.4g} | {r.copy_gbps:.4g} | {r.fraction_of_copy:.1%} |")
    return "\n".join(lines) + "\n"


def to_json(records: list[DecodeRecord]) -> list[dict]:
    return [asdict(r) for r in records]
