"""Command line: `python -m benchmarks.run [--full | --gpu-check | --quick | --pml-memory] [--cases ...] [--fused-backend ...]`.

Runs every (case, implementation) of the grid in this process, prints the table and the targets,
writes the JSON record and the plot under benchmarks/results/ (or --out). How each number is taken:
benchmarks/METHOD.md.
"""
import argparse
import dataclasses
import gc
import os
import sys
import time

import torch

from . import cases as grids
from .implementations import IMPLEMENTATIONS, build_step, estimated_peak_bytes, fused_error
from .memory import PeakMemoryGrowth, available_bytes, cpu_peak_supported, is_out_of_memory
from .plot import plot_record
from .report import add_comparisons, check_targets, environment, format_table, format_targets, write_record
from .timing import PLANS, time_step, warm_up

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# A baseline whose estimated peak exceeds this share of the available memory is skipped.
MEMORY_SHARE_LIMIT = 0.6

# Largest relative difference from the reference the fused backend may show before a warning.
FUSED_TOLERANCE = 1e-3


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    grid = parser.add_mutually_exclusive_group()
    grid.add_argument("--full", action="store_true", help="the large grid meant for a GPU")
    grid.add_argument("--gpu-check", action="store_true",
                      help="cases A, B, C of the GPU goals (bf16; what benchmarks/gpu_check.sh runs)")
    grid.add_argument("--quick", action="store_true",
                      help="a tiny smoke grid, without torch.compile unless --impls names it")
    grid.add_argument("--pml-memory", action="store_true",
                      help="the CrossBatchMemory case instead: pytorch-metric-learning's against ours "
                           "(B = 512, memory 16384, D = 128; python -m benchmarks.pml_memory)")
    parser.add_argument("--cases", nargs="+", default=[], metavar="PATTERN",
                        help="run only the cases whose name contains every pattern, e.g. --cases class C100000")
    parser.add_argument("--impls", default=None,
                        help=f"comma-separated subset of {','.join(IMPLEMENTATIONS)} (default: all; "
                             "--quick: all but compiled)")
    parser.add_argument("--fused-backend", default=None,
                        help='backend of the "fused" rows (default: "triton" on CUDA, "cpu" on the CPU); '
                             '"reference" stands in while a fused backend is missing')
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: cuda when available")
    parser.add_argument("--out", default=RESULTS_DIR, help="folder of the JSON record and the plot")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    args = parser.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.fused_backend = args.fused_backend or ("triton" if args.device == "cuda" else "cpu")
    if args.impls is None:
        args.impls = [impl for impl in IMPLEMENTATIONS if not (args.quick and impl == "compiled")]
    else:
        args.impls = args.impls.split(",")
        unknown = set(args.impls) - set(IMPLEMENTATIONS)
        if unknown:
            parser.error(f"unknown implementation(s) {sorted(unknown)}; choose from {IMPLEMENTATIONS}")
    return args


class Progress:
    """tqdm when it is installed, else one line per step on stderr."""

    def __init__(self, total: int):
        try:
            from tqdm import tqdm
            self._bar = tqdm(total=total, file=sys.stderr, unit="run")
        except ImportError:
            self._bar = None
        self.total, self.done, self.start = total, 0, time.perf_counter()

    def next(self, what: str) -> None:
        if self._bar is not None:
            self._bar.set_description(what)
            if self.done:
                self._bar.update()
        else:
            print(f"[{self.done + 1}/{self.total} {time.perf_counter() - self.start:5.0f} s] {what}",
                  file=sys.stderr, flush=True)
        self.done += 1

    def close(self) -> None:
        if self._bar is not None:
            self._bar.update()
            self._bar.close()


def check_fused_backend(backend: str, device: str) -> float:
    """Fails fast, before the grid, when the fused backend cannot run here; warns when it disagrees
    with the reference. Returns its largest relative error (implementations.fused_error)."""
    try:
        error = fused_error(backend, device)
    except Exception as failure:  # noqa: BLE001 - any failure means the backend is unusable
        sys.exit(f"fused backend {backend!r} does not run on {device}: {type(failure).__name__}: {failure}\n"
                 "Pass --fused-backend reference to try the harness without it, or --impls without 'fused'.")
    if error > FUSED_TOLERANCE:
        print(f"WARNING: fused backend {backend!r} differs from the reference by {error:.2e} (relative) "
              "on a small fp32 case: its timings may be of a wrong result", file=sys.stderr)
    return error


def _release(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def measure(case, impl: str, inputs: dict, device: str, fused_backend: str) -> dict:
    """One row: timings, peak memory growth, or why there are none (skipped, oom, error)."""
    row = {"case": case.name, "label_form": case.label_form, "B": case.B, "N": case.N, "D": case.D,
           "dtype": case.dtype, "impl": impl, "status": "ok", "note": None, "peak_memory_bytes": None,
           "gradient_bytes": (case.B + case.N) * case.D * case.torch_dtype.itemsize}
    estimate, available = estimated_peak_bytes(case, impl), available_bytes(device)
    if estimate is not None and estimate > MEMORY_SHARE_LIMIT * available:
        row.update(status="skipped", note=f"est. {estimate / 1e9:.1f} GB > {MEMORY_SHARE_LIMIT:.0%} of "
                                          f"{available / 1e9:.1f} GB available")
        return row
    plan, step = PLANS[device], None
    try:
        step = build_step(case, impl, inputs, fused_backend)
        row["warmup_s"] = warm_up(step, device, plan)
        step.prepare()
        _release(device)
        with PeakMemoryGrowth(device) as memory:
            row.update(time_step(step, device, plan))
        if impl != "floor":
            row["peak_memory_bytes"] = memory.bytes
    except Exception as error:  # noqa: BLE001 - recorded in the row; the grid goes on
        row.update(status="oom" if is_out_of_memory(error) else "error", note=f"{type(error).__name__}: {error}")
    step = None  # frees what the step holds (compiled code, buffers) before the next one starts
    _release(device)
    return row


def main(argv=None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    if args.pml_memory:  # its rows compare two CrossBatchMemory wrappers, not the grid's implementations
        from . import pml_memory
        return pml_memory.main(["--device", args.device, "--out", args.out])
    grid = (grids.full_grid() if args.full else grids.gpu_check_grid() if args.gpu_check
            else grids.quick_grid() if args.quick else grids.default_grid())
    cases = grids.select(grid, args.cases)
    if not cases:
        sys.exit(f"no case matches {args.cases}; cases: {', '.join(case.name for case in grid)}")
    fused_relative_error = check_fused_backend(args.fused_backend, args.device) if "fused" in args.impls else None
    if args.device == "cpu" and not cpu_peak_supported():
        print("peak memory is not measured: /proc/self/clear_refs is not writable here", file=sys.stderr)

    rows, progress = [], Progress(len(cases) * len(args.impls))
    for case in cases:
        inputs = grids.make_inputs(case, args.device)
        for impl in args.impls:
            progress.next(f"{case.name} {impl}")
            rows.append(measure(case, impl, inputs, args.device, args.fused_backend))
        inputs = None
        _release(args.device)
    progress.close()

    add_comparisons(rows)
    targets = check_targets(rows)
    print(format_table(rows, args.fused_backend))
    if targets:
        print("\n" + format_targets(targets))
    record = {"environment": environment(args.device), "fused_backend": args.fused_backend,
              "fused_max_relative_error": fused_relative_error,
              "command": ["python", "-m", "benchmarks.run"] + (sys.argv[1:] if argv is None else list(argv)),
              "timing_plan": dataclasses.asdict(PLANS[args.device]), "rows": rows, "targets": targets,
              "wall_time_s": time.perf_counter() - started}
    path = write_record(record, args.out)
    print(f"\nrecord: {path}")
    if not args.no_plot:
        plot = plot_record(record, path[:-len(".json")] + ".png")
        if plot:
            print(f"plot: {plot}")
    print(f"wall time: {record['wall_time_s']:.0f} s")
    return 1 if any(row["status"] == "error" for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
