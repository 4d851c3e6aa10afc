"""Compile every kernel launch ahead of time for CUDA archs and report registers, spills and shared memory.

    python -m circleloss_ext.aot --arch 80 --arch 90 [--dtype bf16] [--json FILE] [--sass DIR] [--d 128]

Needs no GPU: each launch listed in kernels/aot_specs.py is compiled with its preset from
kernels/presets.py through triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32)).
The resource numbers are `cuobjdump -res-usage` (triton's bundled one) on the cubin, per thread:
  registers     REG.
  spill_bytes   STACK + LOCAL. ptxas spills registers into the stack frame (STACK); LOCAL is local
                memory outside it. These kernels have no local arrays and no calls, so either one
                means spilling, and both cost local-memory traffic: they are added.
  shared_bytes  SHARED (static, including what ptxas reserves itself: 1 KB on sm_90) plus the dynamic
                shared memory triton requests at launch (compiled.metadata.shared), which the cubin
                does not record; the sum is what a block needs (sm_80: 163 KB at most, sm_90: 227 KB).
  wgmma         whether the PTX uses Hopper's warpgroup matrix products (wgmma.mma_async); the table
                shows it for sm_90 only.
A failed compile is printed with its reason, the others still run, and the exit status is 1. The last
line counts the sm_90 16-bit rows with matrix products that keep the budget (issue_to_mma at most 0.6,
no synchronous wait in a loop, no spill) and names the others; the rows of a negative margin's
variants (marked m<0, aot_specs.NEGATIVE_MARGIN) are listed after them, not counted.

Instruction counts, read from the SASS (`cuobjdump -sass`; `--sass DIR` keeps each kernel's), at
D = 512 (the face-training width; ANALYSIS_D), or at the width `--d` names, with each launch configured
as the launchers configure it for that D (BLOCK_D narrowed, grad_keys' key tile widened):
  mma_flops_per_tile  the tensor-core work of one tile (one iteration of the kernel's outermost loop:
                a BLOCK_B × BLOCK_N tile of S with its epilogue in forward and grad_similarity, one
                step of the plain products: BLOCK_B × BLOCK_N × BLOCK_D in grad_queries, the same into
                each of grad_keys' one or two accumulators): every HGMMA.MxNxK (M·N·K·2 flops per
                warpgroup) or HMMA.mnk (m·n·k·2 per warp) in it, those inside an inner loop (the D
                chunks) times its trip count, ceil(512 / BLOCK_D). For 16-bit operands this is exactly
                2·BLOCK_B·BLOCK_N·D, or the step's products (a test checks it);
                fp32 operands count what 3xTF32 issues (three or more tf32 products per product).
                0 for kernels without matrix products.
  issue_to_mma  (SASS instructions executed per tile per warp, loop bodies × trip counts, × warps / 4
                issue slots per SM cycle) / (mma_flops_per_tile / 4096 16-bit or 2048 tf32 flops per
                SM cycle): above 1 a tile cannot keep the tensor cores busy whatever the overlap.
                null where there are no products.
  sync_waits    synchronous waits for all outstanding wgmma (`WARPGROUP.DEPBAR.LE gsb0, 0x0`) inside
                an inner loop: each one stalls the warpgroup until its products are done.
Loops are the backward branches, except the jump back from an out-of-line retry of a TMA barrier
wait (a one-instruction spin loop, then an unconditional branch to the code it left), which is not a
loop around that code. Estimates from the static code: software pipelining peels some iterations out
of a loop, and branches inside the tile count both ways, so the counts are a little high; the
launches counted are the whole-tile ones (EDGE False), whose epilogues carry no bounds masks. A
problem sorted by label (kernels/label_order.py) runs its negatives-only tiles in launches of their own:
those are the "negative tiles" rows; the other rows are the tiles that may hold positives (all of an
unsorted problem's, the mixed ones of a sorted problem), which the pair-wise forward walks once a kind
("negatives" and "positives" rows) and the pair-wise backward once, with both kinds.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from .kernels.aot_specs import ANALYSIS_D, NEGATIVE_MARGIN, OPERAND_TYPES, launches
from .kernels.presets import AOT_SHARED_BYTES, PRESETS, arch_family, interpreting, operand_width

_RESOURCE = re.compile(r"\b(REG|STACK|SHARED|LOCAL):(\d+)")
_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);")
_BRANCH = re.compile(r"\bBRA\s+0x([0-9a-f]+)")
_HGMMA = re.compile(r"\bHGMMA\.(\d+)x(\d+)x(\d+)\.")
_HMMA = re.compile(r"\bHMMA\.168(\d+)\.")  # HMMA.16816: m16 n8 k16; HMMA.1688: m16 n8 k8
_TENSOR_FLOPS_PER_CYCLE = {"16": 4096, "32": 2048}
_COLUMNS = (("kernel", 27), ("variant", 40), ("arch", 5), ("config", 40), ("registers", 9),
            ("spill_bytes", 11), ("shared_bytes", 12), ("wgmma", 5), ("issue_to_mma", 12), ("sync_waits", 10))


def _cuobjdump(cubin: bytes, flag: str) -> str:
    """What triton's bundled cuobjdump prints for cubin with flag (-res-usage, -sass)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        return subprocess.run([triton.knobs.nvidia.cuobjdump.path, flag, path], capture_output=True, text=True,
                              check=True).stdout


def resource_usage(cubin: bytes) -> dict:
    """{"REG", "STACK", "SHARED", "LOCAL"} of the one kernel in cubin, from `cuobjdump -res-usage`."""
    return {key: int(value) for key, value in _RESOURCE.findall(_cuobjdump(cubin, "-res-usage"))}


def _mma_flops(instruction: str, warps: int) -> int:
    """Tensor-core flops of one SASS instruction issued by every warp of a block (0 if it is none)."""
    if match := _HGMMA.search(instruction):
        m, n, k = map(int, match.groups())
        return 2 * m * n * k * (warps // 4)  # per warpgroup
    if match := _HMMA.search(instruction):
        return 2 * 16 * 8 * int(match.group(1)) * warps
    return 0


def _loops(code: list) -> list:
    """(first, last) address of every loop of (address, instruction) code: each backward branch."""
    loops = []
    for (_, before), (address, text) in zip([(None, "")] + code, code):
        target = _BRANCH.search(text)
        if not target or int(target.group(1), 16) >= address:
            continue
        # an out-of-line retry of a barrier wait (a spin loop on its own branch, then an unconditional
        # jump back into the code it left) is not a loop around that code
        spin = _BRANCH.search(before)
        if not text.startswith("@") and spin and address - 0x40 <= int(spin.group(1), 16) < address:
            continue
        loops.append((int(target.group(1), 16), address))
    return loops


def tile_counts(sass: str, warps: int, block_d: int, d: int = ANALYSIS_D) -> dict:
    """{"instructions", "mma_flops", "sync_waits"} of one iteration of the outermost loop at D = d
    (inner loops counted ceil(d / BLOCK_D) times); zeros when the kernel has no loop."""
    code = [(int(address, 16), text.strip()) for address, text in _SASS_LINE.findall(sass)]
    loops = _loops(code)
    if not loops:
        return {"instructions": 0, "mma_flops": 0, "sync_waits": 0}
    outer = max(loops, key=lambda loop: loop[1] - loop[0])
    inner = [loop for loop in loops if loop != outer and outer[0] <= loop[0] and loop[1] <= outer[1]]
    inner = [loop for loop in inner if not any(o != loop and o[0] <= loop[0] and loop[1] <= o[1] for o in inner)]
    trips = -(-d // block_d)
    counts = {"instructions": 0, "mma_flops": 0, "sync_waits": 0}
    for address, text in code:
        if not outer[0] <= address <= outer[1]:
            continue
        in_inner = any(start <= address <= stop for start, stop in inner)
        times = trips if in_inner else 1
        counts["instructions"] += times
        counts["mma_flops"] += times * _mma_flops(text, warps)
        counts["sync_waits"] += in_inner and "WARPGROUP.DEPBAR.LE gsb0, 0x0" in text
    return counts


def compile_launch(launch, arch: int, sass_dir: str = None, d: int = ANALYSIS_D) -> dict:
    """Compile one launch for sm_<arch> with its preset, as launched for rows of d; returns its row of
    the report."""
    family = arch_family(arch // 10, AOT_SHARED_BYTES[arch])
    config = launch.launch_config(PRESETS[(family, operand_width(launch.dtype))][launch.kernel], d)
    signature, constexprs, attrs = launch.compile_args(config, tma=family == "sm90", d=d)
    compiled = triton.compile(ASTSource(launch.fn, signature, constexprs, attrs),
                              target=GPUTarget("cuda", arch, 32),
                              options=config.options())
    usage = resource_usage(compiled.asm["cubin"])
    sass = _cuobjdump(compiled.asm["cubin"], "-sass")
    counts = tile_counts(sass, config.num_warps, config.blocks.get("BLOCK_D", d), d)
    mma_cycles = counts["mma_flops"] / _TENSOR_FLOPS_PER_CYCLE[operand_width(launch.dtype)]
    row = {"kernel": launch.fn.__name__, "variant": launch.variant, "arch": arch, "config": config.label(),
           "registers": usage["REG"], "spill_bytes": usage["STACK"] + usage["LOCAL"],
           "shared_bytes": usage["SHARED"] + compiled.metadata.shared,
           "wgmma": "wgmma.mma_async" in compiled.asm["ptx"],
           "mma_flops_per_tile": counts["mma_flops"],
           "issue_to_mma": counts["instructions"] * config.num_warps / 4 / mma_cycles if mma_cycles else None,
           "sync_waits": counts["sync_waits"], "sass": None}
    if sass_dir:
        row["sass"] = f"{launch.fn.__name__}.sm_{arch}.{launch.variant.replace(' ', '_')}.sass"
        with open(os.path.join(sass_dir, row["sass"]), "w") as f:
            f.write(sass)
    return row


def _reasons(error: BaseException) -> str:
    """The error and what caused it (a CompilationError shows the source line, its cause the reason)."""
    reasons = []
    while error is not None:
        reasons.append(f"{type(error).__name__}: {error}".rstrip())
        error = error.__cause__
    return "\ncaused by ".join(reasons)


ISSUE_TO_MMA_BUDGET = 0.6  # a tile that issues at most this share of its tensor-core cycles leaves room


def _tile_rows(rows: list, negative_margin: bool) -> list:
    """The sm_90 16-bit rows with matrix products, of a negative margin's variants or of the others."""
    return [row for row in rows if row["arch"] == 90 and row["issue_to_mma"] is not None
            and not row["variant"].startswith("fp32") and row["variant"].endswith(NEGATIVE_MARGIN) == negative_margin]


def budget_rows(rows: list) -> list:
    """The rows the budget counts: sm_90, 16-bit, with matrix products, at m ≥ 0 (aot_specs.NEGATIVE_MARGIN)."""
    return _tile_rows(rows, negative_margin=False)


def budget_summary(rows: list) -> str:
    """One line: how many of the budget's rows (budget_rows) keep it (issue_to_mma at most
    ISSUE_TO_MMA_BUDGET, no synchronous wgmma wait in a loop, no spill), naming those that do not, and
    what the sm_90 16-bit rows of a negative margin read, which it does not count."""
    counted = budget_rows(rows)
    over = [row for row in counted if row["issue_to_mma"] > ISSUE_TO_MMA_BUDGET or row["sync_waits"]
            or row["spill_bytes"]]
    names = sorted({f"{row['kernel']} {row['variant'].split(' ', 1)[-1]}".rstrip() for row in over})
    apart = sorted({f"{row['kernel']} {row['variant'].split(' ', 1)[-1]} {row['issue_to_mma']:.2f}"
                    for row in _tile_rows(rows, negative_margin=True)})
    return (f"sm_90 16-bit rows within the budget (issue_to_mma <= {ISSUE_TO_MMA_BUDGET}, no sync wait, "
            f"no spill): {len(counted) - len(over)} of {len(counted)}"
            + (f"; over: {', '.join(names)}" if names else "")
            + (f"; not counted ({NEGATIVE_MARGIN}): {', '.join(apart)}" if apart else ""))


def _format(cells) -> str:
    return "  ".join(f"{cell:<{width}}" for cell, (_, width) in zip(cells, _COLUMNS)).rstrip()


def _table_row(row: dict) -> str:
    wgmma = ("yes" if row["wgmma"] else "no") if row["arch"] == 90 else "-"
    ratio = "-" if row["issue_to_mma"] is None else f"{row['issue_to_mma']:.2f}"
    return _format([row["kernel"], row["variant"], f"sm_{row['arch']}", row["config"], row["registers"],
                    row["spill_bytes"], row["shared_bytes"], wgmma, ratio, row["sync_waits"]])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m circleloss_ext.aot", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, action="append", choices=sorted(AOT_SHARED_BYTES),
                        help="CUDA compute capability as major*10+minor, 80 or 90; repeatable "
                             "(default: 80 and 90)")
    parser.add_argument("--dtype", choices=list(OPERAND_TYPES.values()), action="append",
                        help="only launches with this operand dtype; repeatable (default: all)")
    parser.add_argument("--json", metavar="FILE", help="also write the rows to FILE as a JSON list")
    parser.add_argument("--sass", metavar="DIR", help="write each kernel's SASS into DIR (named in the rows)")
    parser.add_argument("--d", type=int, default=ANALYSIS_D, choices=(64, 128, 256, 512),
                        help=f"the rows' width the launches are configured and counted for (default {ANALYSIS_D}, "
                             "the width of the issue budget)")
    args = parser.parse_args(argv)
    if interpreting():
        parser.error("TRITON_INTERPRET is set, so the kernels are interpreted rather than compiled: unset it")
    dtypes = [dtype for dtype, name in OPERAND_TYPES.items() if args.dtype is None or name in args.dtype]
    if args.sass:
        os.makedirs(args.sass, exist_ok=True)

    rows, failed = [], 0
    print(_format([name for name, _ in _COLUMNS]), flush=True)
    for arch in args.arch or [80, 90]:
        for launch in launches(dtypes):
            try:
                row = compile_launch(launch, arch, args.sass, args.d)
            except Exception as error:  # report every failure, then go on with the other launches
                failed += 1
                print(f"FAILED {launch.fn.__name__} sm_{arch} {launch.variant}: {_reasons(error)}",
                      file=sys.stderr, flush=True)
            else:
                rows.append(row)
                print(_table_row(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    print(budget_summary(rows) + ("" if args.d == ANALYSIS_D else
                                  f" (at D = {args.d}; the budget is set at D = {ANALYSIS_D})"))
    if failed:
        print(f"{failed} of {failed + len(rows)} compiles failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
