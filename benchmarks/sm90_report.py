"""Static analysis of the fused samplers compiled for an H100 (sm_90) on a machine without a GPU.

The CPU interpreter checks what the kernels compute, not what they cost. This script compiles the
real kernels through Triton's own launch path (``JITFunction.warmup``, so the same specialisations
happen as on a GPU: integers equal to 1 or divisible by 16, pointer alignment) with a stand-in
driver that answers "sm_90", then reads what ``ptxas`` made of them with the tools Triton bundles
(``cuobjdump``): registers, spill and stack bytes, the width of the global stores, layout
conversions (TTGIR ``convert_layout``) and barriers inside the sample loop, and the instructions
per written value.

**Instructions per value.** An H100 issues about 3.2e13 thread-instructions per second and copies
float32 at about 3.0 TB/s, 7.5e11 values per second: about 40 instructions per written float32
value is the break-even between arithmetic and memory. Counted here:

* ``S > 1``: the hot loop, the loop over whole quads (the backward branch whose body holds the
  global stores), its instructions per trip over the values one thread writes per trip
  (elements per thread x 4 rows);
* ``S = 1`` (straight-line code): every instruction from the kernel's entry to its exit, over the
  elements per thread, so loads, ``sigma`` and index set-up count too.

Both leave out ``NOP``s, the subroutines and the slow-path blocks: those that call one (``CALL``:
IEEE division and square root of unusual operands) or touch local memory, float64 or constant
tables (libdevice's reduction of huge sine arguments). The spill column still reports local memory.
A uniform branch's arms both count. Nothing here runs a kernel: speed comes only from a GPU,
correctness from the interpreter tests.

Usage: ``python benchmarks/sm90_report.py [--json] [--quick]``. ``--json`` ends the output with one
line holding a JSON object (worst cases over the main configurations: ``flat_precise_fp32``,
``flat_fast_fp32``, ``segments_s1``, ``segments_registers``, ...). ``--quick`` compiles one
configuration per kernel (for the tests).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The model of bench_gpu.py: 12 blocks of 12 tensors plus embeddings, 146 tensors, 87M parameters at d = 768.
MODEL_TENSORS = 146
FLAT_P = 1_000_000
FLAT_S = 16


def toolchain_missing() -> str | None:
    """Why sm_90 code cannot be compiled and read here (None when it can)."""
    try:
        import triton
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except ImportError as exc:
        return f"triton unavailable: {exc}"
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return "TRITON_INTERPRET is set: kernels are built for the interpreter"
    bins = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    for tool in ("ptxas", "cuobjdump"):
        if not (bins / tool).exists():
            return f"Triton's bundled {tool} is missing ({bins})"
    return None


class Sm90CompileDriver:
    """The part of Triton's driver interface that compilation touches, answering for an sm_90 device."""

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self):  # noqa: ANN201
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)

    def get_device_interface(self):  # noqa: ANN201
        return torch.cuda

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")


def use_sm90_driver() -> None:
    """Makes Triton compile for sm_90 from now on in this process (nothing can be launched afterwards)."""
    import triton

    triton.runtime.driver.set_active(Sm90CompileDriver())


def _tool(name: str, *args: str) -> str:
    import triton

    exe = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return subprocess.run([str(exe), *args], capture_output=True, text=True, check=True).stdout


def disassemble(cubin: bytes) -> tuple[str, dict[str, int]]:
    """SASS text and resource usage (REG, STACK, SHARED, LOCAL) of a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        sass = _tool("cuobjdump", "-sass", path)
        usage = _tool("cuobjdump", "--dump-resource-usage", path)
    finally:
        os.unlink(path)
    res = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage)}
    return sass, res


@dataclass(frozen=True)
class Instr:
    addr: int
    text: str

    @property
    def op(self) -> str:
        """The opcode with its modifiers, predicate stripped (``STG.E.EF.128``)."""
        return re.sub(r"^@!?U?P\w+\s+", "", self.text).split()[0]


def parse_sass(sass: str) -> list[Instr]:
    return [Instr(int(a, 16), t.strip()) for a, t in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*?)\s*;", sass)]


def _target(text: str) -> int | None:
    m = re.search(r"\b(?:BRA|CALL\.REL\.NOINC|CALL\.REL|CALL\.ABS\.NOINC)\s+(?:!?U?P\w+,\s*)?`?\(?(0x[0-9a-f]+)", text)
    return int(m.group(1), 16) if m else None


def basic_blocks(ins: list[Instr]) -> list[list[Instr]]:
    """Basic blocks in address order (leaders: entry, branch and call targets, instructions after a jump)."""
    leaders = {ins[0].addr} if ins else set()
    for k, i in enumerate(ins):
        t = _target(i.text)
        if t is not None:
            leaders.add(t)
        if re.search(r"\b(BRA|EXIT|RET|CALL)\b", i.text) and k + 1 < len(ins):
            leaders.add(ins[k + 1].addr)
    blocks: list[list[Instr]] = []
    for i in ins:
        if i.addr in leaders or not blocks:
            blocks.append([])
        blocks[-1].append(i)
    return blocks


def _successors(block: list[Instr], next_addr: int | None) -> list[int]:
    last = block[-1]
    predicated = last.text.startswith("@")
    op = last.op
    out = []
    if op.startswith("BRA"):
        t = _target(last.text)
        if t is not None:
            out.append(t)
        if predicated and next_addr is not None:
            out.append(next_addr)
    elif op.startswith(("EXIT", "RET")):
        if predicated and next_addr is not None:
            out.append(next_addr)
    elif next_addr is not None:
        out.append(next_addr)  # a CALL returns here; its target is a subroutine, not part of this path
    return out


def main_path_blocks(ins: list[Instr]) -> list[list[Instr]]:
    """The kernel body's blocks (reachable from the entry without entering subroutines), less slow paths."""
    blocks = basic_blocks(ins)
    by_addr = {b[0].addr: k for k, b in enumerate(blocks)}
    seen, todo = set(), [0]
    while todo:
        k = todo.pop()
        if k in seen:
            continue
        seen.add(k)
        nxt = blocks[k + 1][0].addr if k + 1 < len(blocks) else None
        todo += [by_addr[a] for a in _successors(blocks[k], nxt) if a in by_addr]
    kept = []
    for k in sorted(seen):
        b = blocks[k]
        if any(_slow(i.op) for i in b):
            continue
        if len(b) == 1 and b[0].op.startswith("BRA") and _target(b[0].text) == b[0].addr:
            continue  # the trailing self-loop after EXIT
        kept.append(b)
    return kept


def _slow(op: str) -> bool:
    """Marks a slow-path block: a call (IEEE division or square root of unusual operands), local memory
    (libdevice's large-argument sine reduction keeps a table there), float64 or constant-table loads."""
    return op.startswith(("CALL", "LDL", "STL", "DMUL", "DADD", "DFMA")) or ".F64" in op or "CONSTANT" in op


def _histogram(blocks: list[list[Instr]]) -> collections.Counter:
    return collections.Counter(i.op.split(".")[0] for b in blocks for i in b if i.op != "NOP")


def hot_loop_blocks(ins: list[Instr]) -> list[list[Instr]] | None:
    """Main-path blocks of the hot loop, or None without a loop that stores.

    The hot loop is an innermost loop (a backward branch with no other storing loop inside) whose
    body holds a global store; the longest such when there are several.
    """
    main = main_path_blocks(ins)
    loops = []
    for b in main:
        last = b[-1]
        t = _target(last.text)
        if last.op.startswith("BRA") and t is not None and t < last.addr:
            body = [x for x in main if t <= x[0].addr <= last.addr]
            if any(i.op.startswith("STG") for x in body for i in x):
                loops.append((t, last.addr, body))
    inner = [body for lo, hi, body in loops if not any(lo <= a and b <= hi and (a, b) != (lo, hi) for a, b, _ in loops)]
    return max(inner, key=lambda body: sum(len(x) for x in body)) if inner else None


def _loop_regions_ttgir(ttgir: str) -> list[str]:
    """Bodies of the ``scf.for`` loops of a TTGIR module (brace matching)."""
    out = []
    for m in re.finditer(r"scf\.for\b", ttgir):
        start = ttgir.find("{", m.end())
        depth, k = 0, start
        while k < len(ttgir):
            depth += {"{": 1, "}": -1}.get(ttgir[k], 0)
            if depth == 0:
                break
            k += 1
        out.append(ttgir[start : k + 1])
    return out


@dataclass
class Analysis:
    """What one compiled kernel became. ``per_value`` is instructions per written value (hot loop, or
    straight line at S = 1); ``store_bits``: widths of its global stores; conversions and barriers
    are counted inside the sample loop (TTGIR ``convert_layout``; SASS ``BAR``)."""

    kernel: str
    num_samples: int
    dtype: str
    math: str
    block: int
    num_warps: int
    registers: int
    spill_bytes: int
    stack_bytes: int
    store_bits: tuple[int, ...]
    convert_in_loop: int
    barriers_in_loop: int
    instructions: int
    per_value: float
    top: str
    store_ops: tuple[str, ...] = ()
    mufu: tuple[tuple[str, int], ...] = ()


def analyse(kernel, name: str, num_samples: int, dtype: torch.dtype, math: str, block: int, warps: int) -> Analysis:  # noqa: ANN001
    """Reads one compiled kernel (the object ``JITFunction.warmup`` returns)."""
    sass, res = disassemble(kernel.asm["cubin"])
    ins = parse_sass(sass)
    per_thread = block // (32 * warps)
    blocks = hot_loop_blocks(ins) or []
    values = per_thread * (4 if num_samples > 1 else 1)
    hist = _histogram(blocks)
    n = sum(hist.values())
    widths = sorted({_store_bits(i.op) for b in blocks for i in b if i.op.startswith("STG")})
    loops = _loop_regions_ttgir(kernel.asm.get("ttgir", "")) if num_samples > 1 else []
    spills = res.get("LOCAL", 0) + 4 * sum(1 for i in ins if i.op.startswith(("LDL", "STL")))
    return Analysis(
        kernel=name,
        num_samples=num_samples,
        dtype=str(dtype).removeprefix("torch."),
        math=math,
        block=block,
        num_warps=warps,
        registers=res.get("REG", -1),
        spill_bytes=spills,
        stack_bytes=res.get("STACK", 0),
        store_bits=tuple(widths),
        convert_in_loop=sum(r.count("ttg.convert_layout") for r in loops),
        barriers_in_loop=hist.get("BAR", 0),
        instructions=n,
        per_value=round(n / values, 1) if values else float("nan"),
        top=", ".join(f"{k} {v}" for k, v in hist.most_common(6)),
        store_ops=tuple(sorted({i.op for b in blocks for i in b if i.op.startswith("STG")})),
        mufu=tuple(
            sorted(
                collections.Counter(
                    ".".join(i.op.split(".")[:2]) for b in blocks for i in b if i.op.startswith("MUFU")
                ).items()
            )
        ),
    )


def _store_bits(op: str) -> int:
    m = re.search(r"\.(128|64|U16|S16|U8|S8)\b", op)
    return {"128": 128, "64": 64, "U16": 16, "S16": 16, "U8": 8, "S8": 8}[m.group(1)] if m else 32


def compile_flat(cfg, dtype: torch.dtype, math: str, num_samples: int, n: int):  # noqa: ANN001, ANN201
    """Compiles the flat kernel as :func:`sample_diag_gaussian_triton` would launch it (one segment)."""
    from l2m_fast.ops import triton_kernel as tk

    out = torch.empty(num_samples, 16, dtype=dtype)
    plan = tk.row_plan(torch.empty(1, dtype=dtype), num_samples, n, aligned_base=True)
    blocks = -(-n // cfg.block)
    _, per, _ = tk.launch_grid(blocks, num_samples, 0, torch.device("cuda"))
    small = torch.empty(16)
    return tk.flat_kernel.warmup(
        small, small, small[:1], small[:1], torch.zeros(2, dtype=torch.int64), out,
        plan.n_vec, plan.n_rest, plan.stride_vec, num_samples, 1, -5, 0, 3, per, blocks,
        VEC=plan.vec, TAIL=plan.n_rest > 0, ONE_ROW=num_samples == 1, WIDE=False, BLOCK=cfg.block,
        SEG_STEPS=0, MATH=tk.MATH_MODES[math], num_warps=cfg.num_warps, grid=(1,),
    )  # fmt: skip


def compile_segments(cfg, dtype: torch.dtype, math: str, num_samples: int):  # noqa: ANN001, ANN201
    """Compiles the segment kernel for a table whose tensors are all 16-byte aligned (the model's case)."""
    import triton.language as tl

    from l2m_fast.ops import triton_kernel as tk
    from l2m_fast.ops import triton_segments as ts

    tl_dtype = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]
    entries = 85_000
    _, per, _ = tk.launch_grid(entries, num_samples, 0, torch.device("cuda"))
    small = torch.empty(16)
    return ts.segments_kernel.warmup(
        torch.zeros(16, dtype=torch.int64), small, small, entries, num_samples, -5, 0, per,
        OUT_DTYPE=tl_dtype, ALIGN=1, VEC=16 // out_size(dtype), ONE_ROW=num_samples == 1, BLOCK=cfg.block,
        MATH=tk.MATH_MODES[math], num_warps=cfg.num_warps, grid=(1,),
    )  # fmt: skip


def out_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def run(quick: bool = False) -> list[Analysis]:
    """Compiles and reads every main configuration (with ``quick``: the default configuration only,
    float32, flat precise and fast at S = 16, flat and segments precise at S = 1)."""
    from l2m_fast.ops import triton_kernel as tk
    from l2m_fast.ops import triton_segments as ts

    flat_cfgs = tk.CONFIGS[:1] if quick else tk.CONFIGS
    seg_cfgs = ts.SEG_CONFIGS[:1] if quick else ts.SEG_CONFIGS
    dtypes = (torch.float32,) if quick else (torch.float32, torch.bfloat16)
    maths = ("precise", "fast")
    rows = []
    for cfg in flat_cfgs:
        for dtype in dtypes:
            for math in maths:
                k = compile_flat(cfg, dtype, math, FLAT_S, FLAT_P)
                rows.append(analyse(k, "flat", FLAT_S, dtype, math, cfg.block, cfg.num_warps))
    for dtype in dtypes:
        for math in maths[:1] if quick else maths:
            cfg = tk.CONFIGS[0]
            k = compile_flat(cfg, dtype, math, 1, FLAT_P)
            rows.append(analyse(k, "flat", 1, dtype, math, cfg.block, cfg.num_warps))
    name = f"segments ({MODEL_TENSORS} tensors)"
    for s in (1,) if quick else (1, FLAT_S):
        for cfg in seg_cfgs:
            for dtype in dtypes:
                for math in maths if s == 1 and not quick else maths[:1]:
                    k = compile_segments(cfg, dtype, math, s)
                    rows.append(analyse(k, name, s, dtype, math, cfg.block, cfg.num_warps))
    return rows


def summary(rows: Sequence[Analysis]) -> dict[str, object]:
    """Worst cases over the main configurations (the figures the targets name)."""
    import triton

    def worst(pred) -> float:  # noqa: ANN001
        vals = [r.per_value for r in rows if pred(r)]
        return max(vals) if vals else float("nan")

    flat16 = [r for r in rows if r.kernel == "flat" and r.num_samples == FLAT_S]
    seg = [r for r in rows if r.kernel.startswith("segments")]
    return {
        "triton": triton.__version__,
        "flat_precise_fp32": worst(lambda r: r in flat16 and r.dtype == "float32" and r.math == "precise"),
        "flat_fast_fp32": worst(lambda r: r in flat16 and r.dtype == "float32" and r.math == "fast"),
        "flat_precise_bf16": worst(lambda r: r in flat16 and r.dtype == "bfloat16" and r.math == "precise"),
        "flat_s1_per_element": worst(lambda r: r.kernel == "flat" and r.num_samples == 1),
        "segments_s1": worst(lambda r: r in seg and r.num_samples == 1),
        "segments_s1_precise": worst(lambda r: r in seg and r.num_samples == 1 and r.math == "precise"),
        "segments_s1_fast": worst(lambda r: r in seg and r.num_samples == 1 and r.math == "fast"),
        "segments_registers": max((r.registers for r in seg), default=-1),
        "flat_registers": max((r.registers for r in rows if r.kernel == "flat"), default=-1),
        "spill_bytes": max((r.spill_bytes for r in rows), default=-1),
        "convert_in_loop": max((r.convert_in_loop for r in rows), default=-1),
        "barriers_in_loop": max((r.barriers_in_loop for r in rows), default=-1),
        "min_store_bits": min((min(r.store_bits) for r in rows if r.store_bits), default=0),
        "configs": len(rows),
    }


def format_table(rows: Sequence[Analysis]) -> str:
    """The rows as a markdown table."""
    lines = [
        "| kernel | S | out | math | BLOCK / warps | regs | spill B | store bits | cvt in loop | bar in loop "
        "| instr | per value | top opcodes |",
        "|---|---:|---|---|---|---:|---:|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        unit = "" if r.num_samples > 1 else " /elem"
        lines.append(
            f"| {r.kernel} | {r.num_samples} | {r.dtype} | {r.math} | {r.block} / {r.num_warps} | {r.registers} | "
            f"{r.spill_bytes} | {'/'.join(map(str, r.store_bits))} | {r.convert_in_loop} | {r.barriers_in_loop} | "
            f"{r.instructions} | {r.per_value}{unit} | {r.top} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="end with one JSON line of worst cases")
    ap.add_argument("--quick", action="store_true", help="one configuration per kernel")
    args = ap.parse_args(argv)
    missing = toolchain_missing()
    if missing:
        print(f"sm_90 toolchain unavailable: {missing}", file=sys.stderr)
        return 3
    use_sm90_driver()
    import triton

    rows = run(quick=args.quick)
    print(
        f"sm_90 static analysis, triton {triton.__version__}, torch {torch.__version__}; "
        f"flat: P = {FLAT_P:,}; segments: {MODEL_TENSORS} aligned tensors"
    )
    print()
    print(format_table(rows))
    if args.json:
        out = summary(rows)
        out["rows"] = [asdict(r) for r in rows]
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
