"""Command line: `python -m benchmarks.sharded [--reps 5] [--out DIR]`.

Per-process time and memory of one training step of ShardedCircleLoss over 2 gloo ranks on the CPU,
against the unsharded fused loss (`circle_loss(..., backend="cpu")`) on the same global problem:
B = 512 embeddings (256 per rank), C = 100 000 classes, D = 128, fp32, forward + backward to the
embeddings and the class matrix. Same core budget on both sides: the unsharded loss runs in one
process with 2 threads, the sharded one in 2 processes with 1 thread each; the unsharded loss with
1 thread and the sharded loss with Partial FC sampling (sample_rate = 0.1) are shown beside them.

Each configuration runs in fresh processes (torch.multiprocessing, spawned like the tests), which
all build the same problem from one seed and keep their part of it. Every process times 1 warmup
step and then a fixed number of steps (the same on every rank, since the collectives make them wait
for each other), and measures its peak resident-memory growth during them as benchmarks.run does
(benchmarks/memory.py). Reported per configuration: the medians of the slowest process, the largest
growth of any process, and the bytes of each process's share of W and its gradient.
Prints the table; writes benchmarks/results/sharded_<device>_<date>.json (or into --out).
"""
import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import circleloss_ext
from circleloss_ext.distributed import ShardedCircleLoss

from .memory import PeakMemoryGrowth, cpu_peak_supported
from .report import environment, write_record
from .run import RESULTS_DIR
from .timing import Step, TimingPlan, time_step, warm_up

GLOBAL_BATCH, NUM_CLASSES, DIM = 512, 100_000, 128


@dataclasses.dataclass(frozen=True)
class Config:
    """One side of the comparison: `processes` ranks of `threads` threads each."""
    name: str
    processes: int
    threads: int
    sharded: bool
    sample_rate: float = 1.0


CONFIGS = (Config("unsharded circle_loss", 1, 2, False),
           Config("sharded ShardedCircleLoss", 2, 1, True),
           Config("unsharded circle_loss", 1, 1, False),
           Config("sharded, sample_rate=0.1", 2, 1, True, 0.1))


def global_problem():
    """The global batch, its labels and the whole class matrix, identical in every process."""
    gen = torch.Generator().manual_seed(0)
    embeddings = torch.randn(GLOBAL_BATCH, DIM, generator=gen)
    labels = torch.randint(0, NUM_CLASSES, (GLOBAL_BATCH,), generator=gen)
    return embeddings, labels, torch.randn(NUM_CLASSES, DIM, generator=gen)


def unsharded_step(embeddings, labels, weight):
    """The whole batch against the whole class matrix in this process."""
    embeddings, weight = embeddings.requires_grad_(), weight.requires_grad_()

    def prepare():
        embeddings.grad = weight.grad = None

    return Step(prepare, lambda: circleloss_ext.circle_loss(embeddings, weight, labels, backend="cpu"),
                lambda loss: loss.backward()), weight


def sharded_step(embeddings, labels, weight, rank, world_size, sample_rate):
    """This rank's slice of the batch against its shard of the class matrix."""
    head = ShardedCircleLoss(NUM_CLASSES, DIM, sample_rate=sample_rate, backend="cpu")
    with torch.no_grad():
        head.weight.copy_(weight[head.class_start:head.class_stop])
    rows = slice(rank * GLOBAL_BATCH // world_size, (rank + 1) * GLOBAL_BATCH // world_size)
    local_embeddings, local_labels = embeddings[rows].clone().requires_grad_(), labels[rows]

    def prepare():
        local_embeddings.grad = head.weight.grad = None

    return Step(prepare, lambda: head(local_embeddings, local_labels), lambda loss: loss.backward()), head.weight


def run_process(rank, config, reps, rendezvous, folder):
    """One process of a configuration: builds its step, times it, writes <folder>/<rank>.json."""
    torch.set_num_threads(config.threads)
    if config.sharded:
        dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=config.processes)
    embeddings, labels, weight = global_problem()
    if config.sharded:
        step, own_weight = sharded_step(embeddings, labels, weight, rank, config.processes, config.sample_rate)
    else:
        step, own_weight = unsharded_step(embeddings, labels, weight)
    del weight  # a shard keeps only its rows
    plan = TimingPlan(warmup=1, min_reps=reps, max_reps=reps, budget_s=0.0)
    warm_up(step, "cpu", plan)
    step.prepare()
    with PeakMemoryGrowth("cpu") as memory:
        timings = time_step(step, "cpu", plan)
    result = {"rank": rank, **timings, "peak_memory_bytes": memory.bytes, "class_rows": own_weight.shape[0],
              "weight_bytes": own_weight.numel() * own_weight.element_size(),
              "loss": step.forward().item()}
    if config.sharded:
        dist.destroy_process_group()
    with open(os.path.join(folder, f"{rank}.json"), "w") as file:
        json.dump(result, file)


def measure(config, reps) -> dict:
    """The configuration's row: per-process results, and the slowest / largest over its processes."""
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(run_process, args=(config, reps, os.path.join(folder, "rendezvous"), folder),
                 nprocs=config.processes, join=True)
        ranks = [json.load(open(os.path.join(folder, f"{rank}.json"))) for rank in range(config.processes)]
    peaks = [r["peak_memory_bytes"] for r in ranks]
    return {**dataclasses.asdict(config), "ranks": ranks,
            **{f"{phase}_median_ms": max(r[phase]["median"] for r in ranks)
               for phase in ("forward_ms", "backward_ms", "fwd_bwd_ms")},
            "peak_memory_bytes_per_process": None if None in peaks else max(peaks),
            "weight_bytes_per_process": max(r["weight_bytes"] for r in ranks),
            "loss": ranks[0]["loss"]}


def communication_bytes(world_size: int) -> dict:
    """What the sharded step sends into each collective, per rank and step (fp32 embeddings)."""
    local = GLOBAL_BATCH // world_size
    return {"label_check_all_gather": 3 * 8, "labels_all_gather": local * 8,
            "embeddings_all_gather": local * DIM * 4, "lse_all_reduces": 4 * GLOBAL_BATCH * 4,
            "query_gradient_all_reduce": GLOBAL_BATCH * DIM * 4}


def format_table(rows) -> str:
    header = (f"{'configuration':<28}{'procs x thr':>12}{'fwd ms':>9}{'bwd ms':>9}{'fwd+bwd ms':>12}"
              f"{'peak MB/proc':>14}{'W rows/proc':>13}{'W+grad MB/proc':>16}{'loss':>10}")
    lines = [header, "-" * len(header)]
    for row in rows:
        peak, layout = row["peak_memory_bytes_per_process"], f"{row['processes']} x {row['threads']}"
        lines.append(f"{row['name']:<28}{layout:>12}"
                     f"{row['forward_ms_median_ms']:>9.0f}{row['backward_ms_median_ms']:>9.0f}"
                     f"{row['fwd_bwd_ms_median_ms']:>12.0f}{'-' if peak is None else f'{peak / 2**20:.0f}':>14}"
                     f"{max(r['class_rows'] for r in row['ranks']):>13}"
                     f"{2 * row['weight_bytes_per_process'] / 2**20:>16.1f}{row['loss']:>10.4f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    started = time.perf_counter()
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sharded", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5, help="timed steps per configuration (default 5)")
    parser.add_argument("--out", default=RESULTS_DIR, help="folder of the JSON record")
    args = parser.parse_args(argv)
    if not cpu_peak_supported():
        print("peak memory is not measured: /proc/self/clear_refs is not writable here", file=sys.stderr)
    rows = []
    for config in CONFIGS:
        print(f"{config.name}, {config.processes} x {config.threads} ...", file=sys.stderr, flush=True)
        rows.append(measure(config, args.reps))
    print(f"global B={GLOBAL_BATCH} C={NUM_CLASSES} D={DIM} fp32, forward + backward, median of {args.reps} steps; "
          "time: slowest process; peak MB: resident growth of the largest process")
    print(format_table(rows))
    record = {"environment": environment("cpu"), "command": ["python", "-m", "benchmarks.sharded"] +
              (sys.argv[1:] if argv is None else list(argv)),
              "problem": {"global_batch": GLOBAL_BATCH, "num_classes": NUM_CLASSES, "dim": DIM, "dtype": "fp32"},
              "reps": args.reps, "communication_bytes_per_rank_and_step": communication_bytes(2), "rows": rows,
              "wall_time_s": time.perf_counter() - started}
    path = write_record(record, args.out, prefix="sharded_")
    print(f"\nrecord: {path}\nwall time: {record['wall_time_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
