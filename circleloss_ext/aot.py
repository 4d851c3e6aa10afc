"""Compile every kernel launch ahead of time for CUDA archs and report registers, spills and shared memory.

    python -m circleloss_ext.aot --arch 80 --arch 90 [--dtype bf16] [--json FILE]

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
A failed compile is printed with its reason, the others still run, and the exit status is 1.
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

from .kernels.aot_specs import OPERAND_TYPES, launches
from .kernels.presets import AOT_SHARED_BYTES, PRESETS, arch_family, interpreting, operand_width

_RESOURCE = re.compile(r"\b(REG|STACK|SHARED|LOCAL):(\d+)")
_COLUMNS = (("kernel", 27), ("variant", 40), ("arch", 5), ("config", 25), ("registers", 9),
            ("spill_bytes", 11), ("shared_bytes", 12), ("wgmma", 5))


def resource_usage(cubin: bytes) -> dict:
    """{"REG", "STACK", "SHARED", "LOCAL"} of the one kernel in cubin, from `cuobjdump -res-usage`."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        report = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "-res-usage", path],
                                capture_output=True, text=True, check=True).stdout
    return {key: int(value) for key, value in _RESOURCE.findall(report)}


def compile_launch(launch, arch: int) -> dict:
    """Compile one launch for sm_<arch> with its preset; returns its row of the report."""
    family = arch_family(arch // 10, AOT_SHARED_BYTES[arch])
    config = PRESETS[(family, operand_width(launch.dtype))][launch.kernel]
    signature, constexprs, attrs = launch.compile_args(config)
    compiled = triton.compile(ASTSource(launch.fn, signature, constexprs, attrs),
                              target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": config.num_warps, "num_stages": config.num_stages})
    usage = resource_usage(compiled.asm["cubin"])
    return {"kernel": launch.fn.__name__, "variant": launch.variant, "arch": arch, "config": config.label(),
            "registers": usage["REG"], "spill_bytes": usage["STACK"] + usage["LOCAL"],
            "shared_bytes": usage["SHARED"] + compiled.metadata.shared,
            "wgmma": "wgmma.mma_async" in compiled.asm["ptx"]}


def _reasons(error: BaseException) -> str:
    """The error and what caused it (a CompilationError shows the source line, its cause the reason)."""
    reasons = []
    while error is not None:
        reasons.append(f"{type(error).__name__}: {error}".rstrip())
        error = error.__cause__
    return "\ncaused by ".join(reasons)


def _format(cells) -> str:
    return "  ".join(f"{cell:<{width}}" for cell, (_, width) in zip(cells, _COLUMNS)).rstrip()


def _table_row(row: dict) -> str:
    wgmma = ("yes" if row["wgmma"] else "no") if row["arch"] == 90 else "-"
    return _format([row["kernel"], row["variant"], f"sm_{row['arch']}", row["config"], row["registers"],
                    row["spill_bytes"], row["shared_bytes"], wgmma])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m circleloss_ext.aot", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, action="append", choices=sorted(AOT_SHARED_BYTES),
                        help="CUDA compute capability as major*10+minor, 80 or 90; repeatable "
                             "(default: 80 and 90)")
    parser.add_argument("--dtype", choices=list(OPERAND_TYPES.values()), action="append",
                        help="only launches with this operand dtype; repeatable (default: all)")
    parser.add_argument("--json", metavar="FILE", help="also write the rows to FILE as a JSON list")
    args = parser.parse_args(argv)
    if interpreting():
        parser.error("TRITON_INTERPRET is set, so the kernels are interpreted rather than compiled: unset it")
    dtypes = [dtype for dtype, name in OPERAND_TYPES.items() if args.dtype is None or name in args.dtype]

    rows, failed = [], 0
    print(_format([name for name, _ in _COLUMNS]), flush=True)
    for arch in args.arch or [80, 90]:
        for launch in launches(dtypes):
            try:
                row = compile_launch(launch, arch)
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
    if failed:
        print(f"{failed} of {failed + len(rows)} compiles failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
