"""Where the fused step spends its time on a GPU: CUDA time per kernel for forward + backward of the
gpu-check cases, from torch.profiler (one warm-up step, then `--steps` profiled ones).

    python -m benchmarks.kernel_times [--steps 3]

It explains the totals of `python -m benchmarks.run --gpu-check` (which are the measurements);
these per-kernel times carry the profiler's own overhead.
"""
import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from .cases import gpu_check_grid, make_inputs
from .implementations import LOSSES


def kernel_table(case, steps: int) -> str:
    inputs = make_inputs(case, "cuda")
    loss_fn = LOSSES[case.label_form]
    leaves = [inputs[name] for name in ("embeddings", "keys") if name in inputs]
    args = [inputs[name] for name in ("embeddings", "keys", "labels", "key_labels") if name in inputs]
    if case.label_form == "batch":
        args = [inputs["embeddings"], inputs["labels"]]

    def step():
        for leaf in leaves:
            leaf.grad = None
        loss_fn(*args, backend="triton").backward()

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kernel_times", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args(argv)
    print(torch.cuda.get_device_name())
    for case in gpu_check_grid():
        print(f"\n== {case.name}: {args.steps} steps of forward + backward")
        print(kernel_table(case, args.steps))


if __name__ == "__main__":
    main()
