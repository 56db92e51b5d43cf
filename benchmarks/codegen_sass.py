"""SASS analysis for the compiled-code report: resources, loops, the hot loop and what it issues.

Everything here works on a cubin and the bundled NVIDIA tools (`nvdisasm`,
`cuobjdump`); nothing needs a GPU.

Loops are natural loops of the control-flow graph: a branch from block u back
to a block h that dominates u closes a loop with header h; its body is every
block that reaches u without passing through h. (An address-range rule, "a BRA
to an earlier label", is fooled by out-of-line wait/retry blocks that ptxas
places after EXIT and branch back into the middle of a loop; dominators are not.)
The instruction count of a loop is the static count over its blocks, each once.
"""

from __future__ import annotations

import heapq
import os
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass, field

# --- tools ------------------------------------------------------------------------------------------------------


def tool(name: str) -> str:
    """Path of an NVIDIA tool: Triton's bundled copy first (what it compiles with), then PATH."""
    try:
        import triton

        bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
        if os.path.exists(bundled):
            return bundled
    except ImportError:  # pragma: no cover - the report needs triton anyway
        pass
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found (neither bundled with triton nor on PATH)")
    return found


def has_bundled_toolchain() -> bool:
    """Whether the installed Triton ships the NVIDIA tools the report needs (ptxas, nvdisasm, cuobjdump)."""
    try:
        import triton
    except ImportError:
        return False
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    return all(os.path.exists(os.path.join(bin_dir, t)) for t in ("ptxas", "nvdisasm", "cuobjdump"))


def _run_on_cubin(args: list[str], cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([*args, f.name], capture_output=True, text=True, check=True).stdout


def disassemble(cubin: bytes) -> str:
    """SASS of a cubin, with source lines and their inlining chains (`nvdisasm -c -gi`)."""
    return _run_on_cubin([tool("nvdisasm"), "-c", "-gi"], cubin)


def resource_usage(cubin: bytes) -> dict[str, int]:
    """REG, STACK, SHARED, LOCAL, ... of the (single) kernel in a cubin, from `cuobjdump -res-usage`."""
    text = _run_on_cubin([tool("cuobjdump"), "-res-usage"], cubin)
    usage: dict[str, int] = {}
    for line in text.splitlines():
        if "REG:" in line:
            usage.update({k: int(v) for k, v in re.findall(r"([A-Z]+(?:\[\d+\])?):(\d+)", line)})
    return usage


PTXAS_RE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def ptxas_spills(log: str) -> dict[str, int] | None:
    """(stack frame, spill stores, spill loads) bytes from a `ptxas -v` log, if it has them."""
    m = PTXAS_RE.search(log or "")
    if m is None:
        return None
    return {"stack_frame": int(m[1]), "spill_stores": int(m[2]), "spill_loads": int(m[3])}


# --- parsing ----------------------------------------------------------------------------------------------------

_INSTR = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(@!?U?P[0-9T]+\s+)?([A-Z][A-Za-z0-9_.]*)\s*(.*?)\s*;")
_LABEL = re.compile(r"^(\.L_x_\d+|\.L_\w+):")
_TARGET = re.compile(r"`\(([^)]+)\)")
_LINE = re.compile(r'//## File "([^"]+)", line (\d+)')


@dataclass
class Instr:
    addr: int
    pred: str  # "" when unpredicated
    opcode: str  # with modifiers: "HGMMA.64x64x16.F32"
    operands: str
    source: tuple[str, int] | None = None  # innermost (file, line)

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]

    @property
    def text(self) -> str:
        return f"{self.pred}{self.opcode} {self.operands}".strip()


def parse_sass(sass: str) -> tuple[list[Instr], dict[str, int]]:
    """Instructions in address order and label -> address."""
    instrs: list[Instr] = []
    labels: dict[str, int] = {}
    pending_labels: list[str] = []
    source = None
    fresh = True  # the first "//## File" line after an instruction names the innermost frame
    for line in sass.splitlines():
        m = _LINE.search(line)
        if m:
            if fresh:
                source, fresh = (m[1], int(m[2])), False
            continue
        m = _LABEL.match(line.strip())
        if m:
            pending_labels.append(m[1])
            continue
        m = _INSTR.match(line)
        if m:
            addr = int(m[1], 16)
            for name in pending_labels:
                labels[name] = addr
            pending_labels.clear()
            instrs.append(Instr(addr, (m[2] or "").strip() + (" " if m[2] else ""), m[3], m[4], source))
            fresh = True
    return instrs, labels


# --- control flow -----------------------------------------------------------------------------------------------


def _is_branch(ins: Instr) -> bool:
    return ins.base in ("BRA", "BRX", "JMP", "JMX")


def _is_unconditional(ins: Instr) -> bool:
    if ins.pred and ins.pred.strip() != "@PT":
        return False
    head = ins.operands.split("`")[0]  # BRA.U !UP0, `(.L_x_3): a predicate operand before the target
    return not re.search(r"!?U?P[0-9]", head)


@dataclass
class Loop:
    header: int  # index of the header block
    blocks: set[int]
    instrs: list[Instr] = field(default_factory=list)
    parent: Loop | None = None
    children: list[Loop] = field(default_factory=list)
    latches: list[Instr] = field(default_factory=list)  # the branches back to the header
    path: list[Instr] = field(default_factory=list)  # one iteration's steady path (see `steady_path`)
    off_path: list[list[Instr]] = field(default_factory=list)  # the body's blocks that path skips

    @property
    def start(self) -> int:
        return min(i.addr for i in self.instrs)

    @property
    def end(self) -> int:
        return max(i.addr for i in self.instrs)


def find_loops(instrs: list[Instr], labels: dict[str, int]) -> list[Loop]:
    """Natural loops (dominator back edges), merged per header, with their nesting; in address order."""
    if not instrs:
        return []
    index_of = {ins.addr: n for n, ins in enumerate(instrs)}
    leaders = {0}
    for n, ins in enumerate(instrs):
        if _is_branch(ins) or ins.base in ("EXIT", "RET", "BPT"):
            if n + 1 < len(instrs):
                leaders.add(n + 1)
        if _is_branch(ins):
            for target in _TARGET.findall(ins.operands):
                if target in labels and labels[target] in index_of:
                    leaders.add(index_of[labels[target]])
    starts = sorted(leaders)
    block_of = {}
    blocks: list[list[int]] = []
    for b, s in enumerate(starts):
        e = starts[b + 1] if b + 1 < len(starts) else len(instrs)
        blocks.append(list(range(s, e)))
        for n in range(s, e):
            block_of[n] = b
    succ: list[set[int]] = [set() for _ in blocks]
    for b, members in enumerate(blocks):
        last = instrs[members[-1]]
        falls_through = True
        if _is_branch(last):
            for target in _TARGET.findall(last.operands):
                if target in labels and labels[target] in index_of:
                    succ[b].add(block_of[index_of[labels[target]]])
            falls_through = not _is_unconditional(last) or last.base in ("BRX", "JMX")
        elif last.base in ("EXIT", "RET", "BPT"):
            falls_through = not _is_unconditional(last)
        if falls_through and b + 1 < len(blocks):
            succ[b].add(b + 1)
    pred: list[set[int]] = [set() for _ in blocks]
    for b, ss in enumerate(succ):
        for s in ss:
            pred[s].add(b)
    # dominators (iterative; a few hundred blocks at most)
    reachable = {0}
    stack = [0]
    while stack:
        b = stack.pop()
        for s in succ[b]:
            if s not in reachable:
                reachable.add(s)
                stack.append(s)
    dom = {b: set(reachable) for b in reachable}
    dom[0] = {0}
    changed = True
    while changed:
        changed = False
        for b in sorted(reachable):
            if b == 0:
                continue
            ps = [dom[p] for p in pred[b] if p in reachable]
            new = set.intersection(*ps) | {b} if ps else {b}
            if new != dom[b]:
                dom[b], changed = new, True
    bodies: dict[int, set[int]] = {}
    latches: dict[int, list[Instr]] = {}
    for u in sorted(reachable):
        for h in succ[u]:
            if h in dom[u]:  # back edge u -> h
                latches.setdefault(h, []).append(instrs[blocks[u][-1]])
                body = bodies.setdefault(h, {h})
                work = [u]
                while work:
                    x = work.pop()
                    if x not in body:
                        body.add(x)
                        work.extend(p for p in pred[x] if p in reachable)
    loops = []
    for h, body in bodies.items():
        on_path = steady_path(h, body, blocks, succ)
        loops.append(Loop(h, body, [instrs[n] for b in sorted(body) for n in blocks[b]], latches=latches[h],
                          path=[instrs[n] for b in sorted(on_path) for n in blocks[b]],
                          off_path=[[instrs[n] for n in blocks[b]] for b in sorted(body - on_path)]))
    loops.sort(key=lambda lp: lp.start)
    for lp in loops:  # the parent is the smallest strictly enclosing loop
        enclosing = [o for o in loops if o is not lp and lp.blocks < o.blocks]
        if enclosing:
            lp.parent = min(enclosing, key=lambda o: len(o.blocks))
            lp.parent.children.append(lp)
    return loops


def steady_path(header: int, body: set[int], blocks: list[list[int]], succ: list[set[int]]) -> set[int]:
    """The blocks of the cheapest way once around a loop: header to a back edge, fewest instructions.

    What a steady-state iteration issues when every conditional side path is skipped: a wait
    that retries (an mbarrier try-wait that failed), a data-dependent rare branch (the forward's
    accumulator rescale when a row maximum grows by more than its threshold). Inner loops count
    once around at most. `loop_table` keeps the static count of the whole body next to it and
    falls back to it when the path would skip tensor-core or memory work.
    """
    dist = {header: len(blocks[header])}
    back: dict[int, int] = {}
    heap = [(dist[header], header)]
    best_latch, best = None, None
    while heap:
        d, b = heapq.heappop(heap)
        if d > dist.get(b, float("inf")):
            continue
        if header in succ[b] and (best is None or d < best):
            best_latch, best = b, d
        for s in succ[b]:
            if s in body and s != header and d + len(blocks[s]) < dist.get(s, float("inf")):
                dist[s] = d + len(blocks[s])
                back[s] = b
                heapq.heappush(heap, (dist[s], s))
    if best_latch is None:
        return set(body)
    path = {best_latch}
    b = best_latch
    while b != header:
        b = back[b]
        path.add(b)
    return path


def counter_bits(lp: Loop) -> int | None:
    """64 when the compare that decides the loop's back branch is 64-bit (ISETP/UISETP .EX), else 32.

    Follows the branch's predicate to the instruction that last set it, through one
    PLOP3 from a uniform predicate; None when the chain ends elsewhere.
    """
    def defining(reg: str, before: int) -> Instr | None:
        for ins in reversed([i for i in lp.instrs if i.addr < before]):
            if ins.operands.split(",")[0].strip() == reg:
                return ins
        return None

    for branch in lp.latches:
        m = re.match(r"@!?(U?P\d)", branch.pred.strip())
        if not m:
            continue
        ins = defining(m[1], branch.addr)
        if ins is not None and ins.base == "PLOP3":
            sources = re.findall(r"!?(UP\d)", ins.operands)
            ins = defining(sources[0], ins.addr) if sources else None
        if ins is not None and ins.base in ("ISETP", "UISETP"):
            return 64 if "EX" in ins.opcode.split(".") else 32
    return None


# --- instruction classes ----------------------------------------------------------------------------------------


def is_mma(ins: Instr) -> bool:
    """Tensor-core matrix multiplies: HMMA/IMMA (sm_80), HGMMA/QGMMA/IGMMA (sm_90 wgmma), UTC*MMA (sm_100 tcgen05)."""
    return ins.base.endswith("MMA")


def mma_shape(ins: Instr) -> str:
    """The MMA's mnemonic with its shape: HGMMA.64x64x16.F32, HMMA.16816.F32.BF16, UTCHMMA..."""
    return ins.opcode


def mma_flops_per_warp(ins: Instr) -> float | None:
    """Dense FLOPs one warp's copy of this MMA contributes (None when the shape is not in the mnemonic).

    HGMMA.MxNxK is a warpgroup instruction: 4 warps issue it and together compute
    M x N x K (M = 64), so each warp's copy counts a quarter. HMMA.16816 is a
    per-warp m16n8k16, HMMA.1688 m16n8k8. tcgen05 (UTC*MMA) takes its shape from
    a descriptor: unknown here.
    """
    m = re.match(r"[A-Z]*GMMA\.(\d+)x(\d+)x(\d+)", ins.opcode)
    if m:
        return 2.0 * int(m[1]) * int(m[2]) * int(m[3]) / 4
    m = re.match(r"[HI]MMA\.(\d{2})(\d)(\d+)", ins.opcode)
    if m:
        return 2.0 * int(m[1]) * int(m[2]) * int(m[3])
    return None


def _is_tc_wait(ins: Instr) -> str | None:
    if ins.opcode.startswith("WARPGROUP.DEPBAR"):
        return "WARPGROUP.DEPBAR"
    if ins.opcode.startswith("WARPGROUP.ARRIVE"):
        return "WARPGROUP.ARRIVE"
    if ins.opcode.startswith("WARPGROUP"):
        return ins.opcode
    if ins.base.endswith("GMMA") and re.search(r"\bgsb0\b", ins.operands):
        return "HGMMA gsb0 (commit)"
    if ins.base in ("UTCBAR",):
        return "UTCBAR (tcgen05 commit)"
    return None


_ASYNC_COPY = ("UTMALDG", "UTMASTG", "UTMAPF", "UTMACCTL", "UBLKCP", "UBLKRED", "LDGSTS", "LDGDEPBAR", "DEPBAR",
               "ARRIVES")
_FENCE_BARRIER = ("MEMBAR", "BAR", "FENCE", "ERRBAR", "SYNCS", "CCTL", "WARPSYNC", "BSYNC")
_COMPARE_SELECT = ("ISETP", "FSETP", "HSETP2", "DSETP", "FSEL", "SEL", "FMNMX", "IMNMX", "VIMNMX", "PLOP3", "P2R",
                   "R2P", "FCHK")


def _int64(ins: Instr) -> bool:
    """Instructions that only 64-bit integer arithmetic needs: carries (.X), wide multiplies, 64-bit compares."""
    ops = ins.opcode.split(".")
    return ((ins.base in ("IADD3", "LEA", "IADD", "UIADD3", "ULEA", "SHF", "USHF") and "X" in ops)
            or (ins.base in ("IMAD", "UIMAD") and "WIDE" in ops)
            or (ins.base in ("ISETP", "UISETP") and "EX" in ops))


def memory_width(ins: Instr) -> str:
    """LDG.E.128 -> '128', LDG.E.U16 -> '16', LDG.E -> '32'."""
    for part in ins.opcode.split(".")[1:]:
        if part in ("128", "64", "32"):
            return part
        if part in ("U16", "S16", "16"):
            return "16"
        if part in ("U8", "S8", "8"):
            return "8"
    return "32"


def classify(instrs: list[Instr]) -> dict:
    """Counts by instruction class over `instrs`."""
    mma = Counter(mma_shape(i) for i in instrs if is_mma(i))
    waits = Counter(w for i in instrs if (w := _is_tc_wait(i)))
    if any(i.base.startswith("UTC") and i.base.endswith("MMA") for i in instrs):  # tcgen05 commits arrive on mbarriers
        waits.update("SYNCS.PHASECHK (mbarrier wait)" for i in instrs if i.opcode.startswith("SYNCS.PHASECHK"))
    async_copy = Counter(i.opcode for i in instrs if i.base in _ASYNC_COPY)
    fences = Counter(i.opcode for i in instrs if i.base in _FENCE_BARRIER)
    glob = Counter(f"{i.base}.{memory_width(i)}" for i in instrs if i.base in ("LDG", "STG", "LDGSTS", "ATOMG", "RED"))
    shared = Counter(i.base for i in instrs if i.base in ("LDS", "STS", "LDSM", "STSM", "LDTM", "STTM"))
    mufu = Counter(i.opcode for i in instrs if i.base == "MUFU")
    return {
        "instructions": len(instrs),
        "mma": dict(sorted(mma.items())),
        "tensor_core_waits": dict(sorted(waits.items())),
        "async_copies": dict(sorted(async_copy.items())),
        "fences_barriers": dict(sorted(fences.items())),
        "global_memory": dict(sorted(glob.items())),
        "shared_memory": dict(sorted(shared.items())),
        "mufu": dict(sorted(mufu.items())),
        "compare_select": sum(i.base in _COMPARE_SELECT for i in instrs),
        "int64_ops": sum(_int64(i) for i in instrs),
        "local_memory": dict(sorted(Counter(i.base for i in instrs if i.base in ("LDL", "STL")).items())),
        "uniform": sum(i.base.startswith("U") and not i.base.startswith("UTC") for i in instrs),
        "branches": sum(_is_branch(i) for i in instrs),
    }


# --- the hot loop -----------------------------------------------------------------------------------------------

HOT_LOOP_RULE = (
    "Among the innermost loops with tensor-core MMAs (natural loops of the SASS control-flow graph), "
    "those with the most MMA instructions (full tiles); of these, the ones whose compare/select count "
    "(ISETP/FSETP/FSEL/SEL/FMNMX/...) is within half a select per score element held by a thread "
    "(BLOCK_M·BLOCK_N/(64·num_warps)) of the lowest are mask-free: a structural mask costs at least one select per "
    "score element; of those, the first in address order (the stages are emitted in source order: window's left "
    "edge, unmasked middle, right edge / diagonal / ragged block). Without MMAs (fp32 'ieee'), FFMA counts stand in. "
    "Its instructions per iteration are those of the steady path: the cheapest way once around the loop, skipping "
    "conditional side blocks (an mbarrier wait that retries; the forward's accumulator rescale, taken only when a "
    "row maximum grows by more than 2^8), unless that would skip MMAs or memory operations; the static count of "
    "every block and the skipped blocks (source line, size) are listed beside it."
)


def _loop_mma_count(lp: Loop) -> int:
    return sum(is_mma(i) for i in lp.instrs)


def _loop_ffma_count(lp: Loop) -> int:
    return sum(i.base in ("FFMA", "HFMA2") for i in lp.instrs)


def loop_table(instrs: list[Instr], labels: dict[str, int], mask_tolerance: float = 0.0,
               ) -> tuple[list[dict], int | None]:
    """Every loop that does matmul work (MMA, or FFMA without MMAs), with the hot one's index (HOT_LOOP_RULE).

    `mask_tolerance`: compare/select instructions above the loop with the fewest
    that still count as mask-free (half the score elements a thread holds).
    """
    loops = find_loops(instrs, labels)
    any_mma = any(is_mma(i) for i in instrs)
    work = _loop_mma_count if any_mma else _loop_ffma_count

    def nested_work(lp: Loop) -> bool:
        return any(work(c) > 0 or nested_work(c) for c in lp.children)

    rows = []
    for lp in loops:
        if work(lp) == 0:
            continue
        whole = classify(lp.instrs)
        c = classify(lp.path)
        if any(c[k] != whole[k] for k in ("mma", "async_copies", "global_memory", "shared_memory")):
            c = whole  # the cheap path skips real work (a guarded load, say): count every block
        c["static_instructions"] = whole["instructions"]
        c["off_path"] = [{"source": _where(blk), "instructions": len(blk)} for blk in lp.off_path
                         if c is not whole]
        rows.append({"start": f"0x{lp.start:04x}", "end": f"0x{lp.end:04x}", "depth": _depth(lp),
                     "counter_bits": counter_bits(lp),
                     "innermost": not nested_work(lp), "work": work(lp), "_loop": lp, **c})
    inner = [r for r in rows if r["innermost"]]
    hot = None
    if inner:
        top = max(r["work"] for r in inner)
        full = [r for r in inner if r["work"] == top]
        least = min(r["compare_select"] for r in full)
        mask_free = [r for r in full if r["compare_select"] <= least + mask_tolerance]
        best = min(mask_free, key=lambda r: int(r["start"], 16))
        hot = rows.index(best)
    for r in rows:
        r.pop("work")
    return rows, hot


def _where(block: list[Instr]) -> str:
    """file:line of a block's first instruction with a source line."""
    for ins in block:
        if ins.source:
            return f"{ins.source[0].rsplit('/', 1)[-1]}:{ins.source[1]}"
    return "?"


def _depth(lp: Loop) -> int:
    d = 0
    while lp.parent is not None:
        d, lp = d + 1, lp.parent
    return d


def mma_flops(instrs: list[Instr], num_warps: int) -> float | None:
    """Tensor-core FLOPs the CTA's copies of these instructions compute (None when a shape is unknown)."""
    total = 0.0
    for i in instrs:
        if is_mma(i):
            f = mma_flops_per_warp(i)
            if f is None:
                return None
            total += f * num_warps
    return total
