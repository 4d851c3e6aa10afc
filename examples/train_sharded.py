"""Training with the class matrix sharded over processes: ShardedCircleLoss under torchrun, on CPUs.

    torchrun --nproc_per_node 2 examples/train_sharded.py [--steps 40] [--sample-rate 0.5] [--out DIR]

Every process (rank) trains the same small MLP backbone, wrapped in DistributedDataParallel, on its
own slice of each batch, and owns a contiguous slice of the class matrix of Circle Loss. The data
are synthetic but learnable: each class has a fixed random prototype, and a sample is its class's
prototype plus noise. Rank 0 prints the loss of the global batch as it falls.

At the end every rank saves its shard of the class matrix (shard_state()) to --out, then the
checkpoint is read back twice: into a fresh module on every rank (it must give back the trained
rows), and by rank 0 alone as a one-rank group, which re-shards it into a single shard holding all
classes, used to measure nearest-class accuracy on new samples. load_shards does the same for any
other world size (docs/distributed.md).

Runs on CPU tensors over gloo (torchrun sets the rendezvous variables); on GPUs use "nccl" and
move the backbone, the loss module and the data to cuda:LOCAL_RANK.
"""
import argparse
import glob
import os
import tempfile
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from circleloss_ext.distributed import ShardedCircleLoss

IN_DIM, HIDDEN_DIM, EMBEDDING_DIM = 32, 128, 64
NOISE = 0.5


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="SGD steps (default 40)")
    parser.add_argument("--num-classes", type=int, default=1000, help="classes of the loss (default 1000)")
    parser.add_argument("--local-batch", type=int, default=256, help="samples per rank and step (default 256)")
    parser.add_argument("--sample-rate", type=float, default=1.0,
                        help="Partial FC: share of each shard's classes used per step (default 1: all)")
    parser.add_argument("--out", default=None, help="folder for the checkpoint shards (default: a new temp folder)")
    return parser.parse_args()


def class_prototypes(num_classes: int) -> torch.Tensor:
    """One random input-space point per class, the same on every rank (fixed seed)."""
    return torch.randn(num_classes, IN_DIM, generator=torch.Generator().manual_seed(0))


def draw_batch(prototypes: torch.Tensor, size: int, generator: torch.Generator):
    """size samples of uniformly drawn classes: (prototype + noise, label)."""
    labels = torch.randint(0, prototypes.shape[0], (size,), generator=generator)
    return prototypes[labels] + NOISE * torch.randn(size, IN_DIM, generator=generator), labels


def shared_folder(out) -> str:
    """--out, or a temp folder made by rank 0 whose name every rank receives."""
    if out is None:
        out = [tempfile.mkdtemp(prefix="circleloss-shards-") if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(out, src=0)
        out = out[0]
    os.makedirs(out, exist_ok=True)
    return out


def nearest_class_accuracy(backbone, class_matrix, prototypes, generator, size=2000) -> float:
    """Share of new samples whose embedding is most cosine-similar to their own class's row."""
    inputs, labels = draw_batch(prototypes, size, generator)
    with torch.no_grad():
        scores = nn.functional.normalize(backbone(inputs)) @ nn.functional.normalize(class_matrix).T
    return (scores.argmax(dim=1) == labels).float().mean().item()


def main():
    args = parse_args()
    torch.set_num_threads(1)  # one core per rank
    # Every rank must call each forward: one that skips it (or dies) leaves the others waiting in a
    # collective until this timeout, which then raises on them. A step here takes milliseconds.
    dist.init_process_group("gloo", timeout=timedelta(minutes=2))
    rank, world_size = dist.get_rank(), dist.get_world_size()

    torch.manual_seed(0)  # the same initial backbone everywhere (DDP also broadcasts rank 0's)
    backbone = DistributedDataParallel(nn.Sequential(
        nn.Linear(IN_DIM, HIDDEN_DIM), nn.ReLU(), nn.Linear(HIDDEN_DIM, EMBEDDING_DIM)))
    # Not wrapped in DDP: each rank holds different rows of the class matrix (initialised from (seed, rank)).
    head = ShardedCircleLoss(args.num_classes, EMBEDDING_DIM, m=0.25, gamma=64.0, sample_rate=args.sample_rate)
    optimizer = torch.optim.SGD([*backbone.parameters(), *head.parameters()], lr=0.2, momentum=0.5)
    if rank == 0:
        print(f"{world_size} ranks, {args.num_classes} classes, global batch {world_size * args.local_batch}; "
              f"rank 0 holds classes [{head.class_start}, {head.class_stop})")

    prototypes = class_prototypes(args.num_classes)
    data = torch.Generator().manual_seed(1 + rank)  # each rank draws its own samples
    for step in range(1, args.steps + 1):
        inputs, labels = draw_batch(prototypes, args.local_batch, data)
        loss = head(backbone(inputs), labels)  # the loss of the global batch, the same on every rank
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if rank == 0 and (step % 5 == 0 or step == 1):
            print(f"step {step:4d}  loss {loss.item():.4f}")

    # Checkpoint: one file per rank, each with its rows and where they sit in the whole matrix.
    out = shared_folder(args.out)
    torch.save(head.shard_state(), os.path.join(out, f"class_shard_{rank}_of_{world_size}.pt"))
    dist.barrier()  # every shard is on disk
    shards = [torch.load(path) for path in sorted(glob.glob(os.path.join(out, f"class_shard_*_of_{world_size}.pt")))]

    restored = ShardedCircleLoss(args.num_classes, EMBEDDING_DIM)
    restored.load_shards(shards)
    assert torch.equal(restored.weight, head.weight), f"rank {rank}: restored rows differ from the trained ones"

    alone = dist.new_group([0])  # every rank takes part in creating it; only rank 0 is in it
    if rank == 0:
        whole = ShardedCircleLoss(args.num_classes, EMBEDDING_DIM, process_group=alone)  # world size 1
        whole.load_shards(shards)
        accuracy = nearest_class_accuracy(backbone.module, whole.weight, prototypes, torch.Generator().manual_seed(99))
        print(f"saved {len(shards)} shards to {out}; reloaded on {world_size} ranks (identical) and on 1 rank "
              f"({whole.weight.shape[0]} classes): nearest-class accuracy {accuracy:.1%}")
    dist.barrier()  # no rank tears the group down while rank 0 still works in the one-rank group
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
