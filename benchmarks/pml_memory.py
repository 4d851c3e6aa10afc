"""pytorch-metric-learning's CrossBatchMemory: PML's with its CircleLoss against ours with ours.

    python -m benchmarks.pml_memory [--batch 512] [--memory 16384] [--dim 128] [--device cpu|cuda]

Each step enqueues a new batch (fp32 embeddings that require grad, B / 4 labels) into a memory that
warm-up steps have filled, scores the batch against the whole memory (own slots left out), and runs
backward. Forward, backward and peak memory growth are taken as in benchmarks/METHOD.md
(timing.time_step, memory.PeakMemoryGrowth), both implementations in this one process; the record
goes to benchmarks/results/pml_memory_<device>_<date>.json.
"""
import argparse
import os

import torch
from pytorch_metric_learning import losses

from circleloss_ext.integrations import pml

from .memory import PeakMemoryGrowth
from .report import environment, write_record
from .timing import PLANS, Step, time_step

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
IMPLEMENTATIONS = {
    "pml": lambda dim, size: losses.CrossBatchMemory(losses.CircleLoss(), embedding_size=dim, memory_size=size),
    "fused": lambda dim, size: pml.CrossBatchMemory(pml.CircleLoss(), embedding_size=dim, memory_size=size),
}


def measure(impl: str, args) -> dict:
    wrapper = IMPLEMENTATIONS[impl](args.dim, args.memory).to(args.device)
    gen = torch.Generator(device=args.device).manual_seed(0)
    num_labels = max(args.batch // 4, 2)
    batches = [(torch.randn(args.batch, args.dim, generator=gen, device=args.device).requires_grad_(),
                torch.randint(0, num_labels, (args.batch,), generator=gen, device=args.device)) for _ in range(4)]
    turn = [0]

    def forward():
        embeddings, labels = batches[turn[0] % len(batches)]
        turn[0] += 1
        return wrapper(embeddings, labels)

    def prepare():
        for embeddings, _ in batches:
            embeddings.grad = None

    step = Step(prepare=prepare, forward=forward, backward=lambda loss: loss.backward())
    for _ in range(-(-args.memory // args.batch)):  # fill the memory
        prepare()
        step.backward(step.forward())
    prepare()
    with PeakMemoryGrowth(args.device) as memory:
        row = time_step(step, args.device, PLANS[args.device])
    return {"impl": impl, "B": args.batch, "memory": args.memory, "D": args.dim, **row,
            "peak_memory_bytes": memory.bytes}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pml_memory", description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--memory", type=int, default=16384)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=RESULTS_DIR)
    args = parser.parse_args(argv)
    rows = [measure(impl, args) for impl in IMPLEMENTATIONS]
    print(f"CrossBatchMemory, B = {args.batch}, memory = {args.memory}, D = {args.dim}, fp32, {args.device}")
    print(f"{'impl':8s} {'fwd ms':>9s} {'bwd ms':>9s} {'fwd+bwd ms':>11s} {'peak MB':>9s}")
    for row in rows:
        peak = "-" if row["peak_memory_bytes"] is None else f"{row['peak_memory_bytes'] / 2**20:.0f}"
        print(f"{row['impl']:8s} {row['forward_ms']['median']:9.1f} {row['backward_ms']['median']:9.1f} "
              f"{row['fwd_bwd_ms']['median']:11.1f} {peak:>9s}")
    pml_row, fused_row = rows
    print(f"fused vs PML: {pml_row['fwd_bwd_ms']['median'] / fused_row['fwd_bwd_ms']['median']:.2f}x faster")
    path = write_record({"environment": environment(args.device), "rows": rows}, args.out, prefix="pml_memory_")
    print(f"record: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
