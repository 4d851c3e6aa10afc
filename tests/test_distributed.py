"""ShardedCircleLoss over gloo with 2 and 3 CPU processes, against single-process circle_loss on the
concatenated batch with the whole class matrix."""
import copy
import os
import socket
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

import circleloss_ext as cl
from circleloss_ext.distributed import ShardedCircleLoss, shard_range

LOCAL_BATCH, IN_DIM, EMB_DIM = 4, 10, 8


def run_ranks(worker, world_size, *args, timeout=180):
    """worker(rank, world_size, *args) in world_size processes joined by a gloo group; fails on any
    rank's exception, or after timeout seconds (a hang)."""
    with socket.socket() as probe:  # a free port on the loopback for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = mp.spawn(_init_and_run, args=(world_size, f"tcp://127.0.0.1:{port}", worker, args),
                       nprocs=world_size, join=False)
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"ranks did not finish within {timeout} s")


def _init_and_run(rank, world_size, rendezvous, worker, args):
    torch.set_num_threads(1)
    os.environ["TRITON_INTERPRET"] = "1"
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world_size)
    worker(rank, world_size, *args)
    dist.barrier()  # no rank tears the group down while another still uses it
    dist.destroy_process_group()
    # Leave without running C++ static destructors: under pytest a rank now and then aborted at
    # interpreter exit ("terminate called without an active exception", no Python frame), after all
    # its work had passed.
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)


def _problem(world_size, num_classes, dtype, shared_class):
    """The global batch, labels, backbone and full class matrix, identical on every rank."""
    gen = torch.Generator().manual_seed(1234)
    x = torch.randn(world_size * LOCAL_BATCH, IN_DIM, generator=gen, dtype=torch.float64).to(dtype)
    labels = torch.randint(0, num_classes, (world_size * LOCAL_BATCH,), generator=gen)
    if shared_class:  # the same class on every rank's batch
        labels[::LOCAL_BATCH] = num_classes - 1
    backbone = torch.nn.Linear(IN_DIM, EMB_DIM).to(dtype)
    with torch.no_grad():
        backbone.weight.copy_(torch.randn(EMB_DIM, IN_DIM, generator=gen))
        backbone.bias.copy_(torch.randn(EMB_DIM, generator=gen))
    weight = torch.randn(num_classes, EMB_DIM, generator=gen, dtype=torch.float64).to(dtype)
    return x, labels, backbone, weight


def _matches_single_process(rank, world_size, num_classes, dtype, backend, shared_class, tol):
    x, labels, backbone, full_weight = _problem(world_size, num_classes, dtype, shared_class)
    # single process, whole batch, whole class matrix
    single = copy.deepcopy(backbone)
    single_weight = full_weight.clone().requires_grad_()
    expected = cl.circle_loss(single(x).double(), single_weight.double(), labels, backend="reference")
    expected.backward()
    # sharded, each rank its slice of the batch, DDP-wrapped backbone
    ddp = DistributedDataParallel(copy.deepcopy(backbone))
    sharded = ShardedCircleLoss(num_classes, EMB_DIM, dtype=dtype, backend=backend)
    start, stop = shard_range(num_classes, world_size, rank)
    assert (sharded.class_start, sharded.class_stop) == (start, stop)
    with torch.no_grad():
        sharded.weight.copy_(full_weight[start:stop])
    rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    loss = sharded(ddp(x[rows]), labels[rows])
    loss.backward()

    def close(actual, wanted, what):
        err = (actual.double() - wanted.double()).abs().max().item()
        scale = wanted.abs().max().item()
        assert err <= tol * max(scale, 1e-12), f"rank {rank}: {what} differs by {err:.3e} (scale {scale:.3e})"

    close(loss, expected, "loss")
    close(sharded.weight.grad, single_weight.grad[start:stop], "weight gradient")
    for (name, p), q in zip(ddp.module.named_parameters(), single.parameters()):
        close(p.grad, q.grad, f"backbone {name} gradient")


@pytest.mark.parametrize("world_size,num_classes", [(2, 11), (3, 11), (3, 30)])
def test_float64_matches_single_process(world_size, num_classes):
    run_ranks(_matches_single_process, world_size, num_classes, torch.float64, "auto", True, 1e-10)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_fused_backends_match_single_process(backend):
    run_ranks(_matches_single_process, 2, 13, torch.float32, backend, True, 1e-4)


def _reductions(rank, world_size, reduction, dtype, backend, tol):
    """reduction "mean", "sum" or "none" with rows labelled ignore_index, against circle_loss on the whole
    batch: the value, W·∂L/∂(own rows) (one reduce-scatter) and ∂L/∂(weight shard), where for "none" L is
    the sum over ranks of each rank's weighted sum of its own rows."""
    num_classes = 13
    gen = torch.Generator().manual_seed(99)
    embeddings = torch.randn(world_size * LOCAL_BATCH, EMB_DIM, generator=gen, dtype=torch.float64)
    full_weight = torch.randn(num_classes, EMB_DIM, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, num_classes, (world_size * LOCAL_BATCH,), generator=gen)
    labels[1], labels[-1] = 5, 5
    labels[2], labels[-2] = -7, -7  # ignored, on the first and the last rank
    upstream = torch.linspace(0.5, 1.5, labels.shape[0], dtype=torch.float64)
    e_all, w_all = embeddings.clone().requires_grad_(), full_weight.clone().requires_grad_()
    expected = cl.circle_loss(e_all, w_all, labels, reduction=reduction, ignore_index=-7, backend="reference")
    (expected * upstream if reduction == "none" else expected).sum().backward()

    rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    head = ShardedCircleLoss(num_classes, EMB_DIM, reduction=reduction, ignore_index=-7, dtype=dtype, backend=backend)
    with torch.no_grad():
        head.weight.copy_(full_weight[head.class_start:head.class_stop])
    local = embeddings[rows].to(dtype).requires_grad_()
    out = head(local, labels[rows].int())
    (out * upstream[rows].to(out.dtype) if reduction == "none" else out).sum().backward()
    torch.testing.assert_close(out.double(), expected[rows] if reduction == "none" else expected, rtol=tol, atol=tol)
    torch.testing.assert_close(local.grad.double(), world_size * e_all.grad[rows], rtol=tol, atol=tol)
    torch.testing.assert_close(head.weight.grad.double(), w_all.grad[head.class_start:head.class_stop], rtol=tol,
                               atol=tol)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_and_ignored_rows(reduction):
    run_ranks(_reductions, 3, reduction, torch.float64, "auto", 1e-10)


def test_reductions_on_a_fused_backend():
    run_ranks(_reductions, 2, "none", torch.float32, "cpu", 1e-4)


def _autocast_with_fp32_weight(rank, world_size, embedding_dtype):
    """16-bit embeddings (as an autocast backbone makes them) and an fp32 weight under autocast: the loss
    and gradients of circle_loss under the same autocast, and an fp32 weight gradient."""
    num_classes = 11
    gen = torch.Generator().manual_seed(5)
    embeddings = torch.randn(world_size * LOCAL_BATCH, EMB_DIM, generator=gen)
    full_weight = torch.randn(num_classes, EMB_DIM, generator=gen)
    labels = torch.randint(0, num_classes, (world_size * LOCAL_BATCH,), generator=gen)
    e_all = embeddings.to(embedding_dtype).clone().requires_grad_()
    w_all = full_weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = cl.circle_loss(e_all, w_all, labels, backend="cpu")
    expected.backward()
    rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    head = ShardedCircleLoss(num_classes, EMB_DIM, backend="cpu")
    with torch.no_grad():
        head.weight.copy_(full_weight[head.class_start:head.class_stop])
    local = embeddings[rows].to(embedding_dtype).clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = head(local, labels[rows])
    loss.backward()
    assert loss.dtype == torch.float32 and head.weight.grad.dtype == torch.float32
    assert local.grad.dtype == embedding_dtype
    torch.testing.assert_close(loss, expected.float(), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(head.weight.grad, w_all.grad[head.class_start:head.class_stop], rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(local.grad.float(), world_size * e_all.grad[rows].float(), rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("embedding_dtype", [torch.float32, torch.bfloat16])
def test_autocast_with_an_fp32_weight(embedding_dtype):
    run_ranks(_autocast_with_fp32_weight, 2, embedding_dtype)


def _label_smoothing(rank, world_size, backend, dtype, tol):
    """label_smoothing over all shards: circle_loss(label_smoothing=ε) on the whole batch and class matrix."""
    num_classes = 14
    gen = torch.Generator().manual_seed(21)
    embeddings = torch.randn(world_size * LOCAL_BATCH, EMB_DIM, generator=gen, dtype=torch.float64)
    full_weight = torch.randn(num_classes, EMB_DIM, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, num_classes, (world_size * LOCAL_BATCH,), generator=gen)
    labels[1] = -100
    e_all, w_all = embeddings.clone().requires_grad_(), full_weight.clone().requires_grad_()
    expected = cl.circle_loss(e_all, w_all, labels, gamma=32.0, label_smoothing=0.2, backend="reference")
    expected.backward()
    head = ShardedCircleLoss(num_classes, EMB_DIM, gamma=32.0, label_smoothing=0.2, dtype=dtype, backend=backend)
    with torch.no_grad():
        head.weight.copy_(full_weight[head.class_start:head.class_stop])
    rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    local = embeddings[rows].to(dtype).requires_grad_()
    loss = head(local, labels[rows])
    loss.backward()
    torch.testing.assert_close(loss.double(), expected, rtol=tol, atol=tol)
    torch.testing.assert_close(local.grad.double(), world_size * e_all.grad[rows], rtol=tol, atol=tol)
    torch.testing.assert_close(head.weight.grad.double(), w_all.grad[head.class_start:head.class_stop], rtol=tol,
                               atol=tol)


@pytest.mark.parametrize("backend,dtype,tol", [("auto", torch.float64, 1e-10), ("cpu", torch.float32, 1e-4)])
def test_label_smoothing_over_all_shards(backend, dtype, tol):
    run_ranks(_label_smoothing, 3, backend, dtype, tol)


def _accuracy(rank, world_size, backend):
    """track_accuracy: the global batch's share of rows whose own class has the highest cosine over all
    shards, the same on every rank."""
    num_classes = 17
    gen = torch.Generator().manual_seed(8)
    embeddings = torch.randn(world_size * LOCAL_BATCH, EMB_DIM, generator=gen)
    full_weight = torch.randn(num_classes, EMB_DIM, generator=gen)
    labels = torch.randperm(num_classes, generator=gen)[:world_size * LOCAL_BATCH]
    full_weight[labels[::2]] = embeddings[::2] * 3.0  # half the rows nearest their own class
    head = ShardedCircleLoss(num_classes, EMB_DIM, track_accuracy=True, backend=backend)
    with torch.no_grad():
        head.weight.copy_(full_weight[head.class_start:head.class_stop])
    rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    head(embeddings[rows], labels[rows]).backward()
    cosines = torch.nn.functional.normalize(embeddings) @ torch.nn.functional.normalize(full_weight).T
    expected = (cosines.argmax(dim=1) == labels).float().mean().item()
    assert 0.4 < expected < 1.0
    assert head.last_accuracy.item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_accuracy_over_all_shards(backend):
    run_ranks(_accuracy, 3, backend)


def _sampling(rank, world_size, num_classes):
    x, labels, backbone, full_weight = _problem(world_size, num_classes, torch.float64, True)
    rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    embeddings = backbone(x[rows]).detach()
    results = []
    for seed in (7, 7, 8):
        sharded = ShardedCircleLoss(num_classes, EMB_DIM, dtype=torch.float64, sample_rate=0.3, seed=seed)
        with torch.no_grad():
            sharded.weight.copy_(full_weight[sharded.class_start:sharded.class_stop])
        loss = sharded(embeddings, labels[rows])
        loss.backward()
        sampled = sharded.last_sampled
        local = labels - sharded.class_start
        positives = local[(local >= 0) & (local < sharded.weight.shape[0])].unique()
        assert torch.isin(positives, sampled).all(), "a positive class was not sampled"
        assert len(sampled) >= max(len(positives), round(0.3 * sharded.weight.shape[0]))
        unsampled = torch.ones(sharded.weight.shape[0], dtype=torch.bool)
        unsampled[sampled] = False
        assert unsampled.any() and (sharded.weight.grad[unsampled] == 0).all()
        assert (sharded.weight.grad[sampled].abs().sum(dim=1) > 0).all()
        results.append((loss.item(), sampled.tolist()))
    assert results[0] == results[1], "the same seed must draw the same classes"
    assert results[0][1] != results[2][1], "another seed should draw other classes"


def test_negative_class_sampling():
    run_ranks(_sampling, 2, 60)


def _bad_use(rank, world_size):
    sharded = ShardedCircleLoss(10, EMB_DIM)
    with pytest.raises(ValueError, match=r"same number of local_embeddings rows; got \[3, 4\]"):
        sharded(torch.randn(3 + rank, EMB_DIM), torch.zeros(3 + rank, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"ranks \[1\] passed labels outside"):
        sharded(torch.randn(3, EMB_DIM), torch.full((3,), 10 * rank, dtype=torch.int64))
    with pytest.raises(ValueError, match="embedding_dim = 8"):
        sharded(torch.randn(3, EMB_DIM + rank), torch.zeros(3, dtype=torch.int64))


def test_bad_use_raises_on_every_rank():
    run_ranks(_bad_use, 2)


MISMATCHED_SETTINGS = [  # (the settings of rank r, the error every rank must raise)
    (lambda r: dict(num_classes=10 + 2 * r), r"same num_classes; got \[10, 12\]"),
    (lambda r: dict(embedding_dim=EMB_DIM + r), r"same embedding_dim; got \[8, 9\]"),
    (lambda r: dict(m=0.25 + 0.1 * r), "same m"),
    (lambda r: dict(gamma=64.0 * (r + 1)), r"same gamma; got \[64.0, 128.0\]"),
    (lambda r: dict(sample_rate=1.0 - 0.5 * r), "same sample_rate"),
    (lambda r: dict(detach_alpha=r == 0), "same detach_alpha"),
    (lambda r: dict(backend="reference" if r else "auto"), "same backend"),
    (lambda r: dict(dtype=torch.float64 if r else torch.float32), "same dtype"),
    (lambda r: dict(device="meta" if r else "cpu"), "same device_type"),
    (lambda r: dict(gamma=-1.0 if r else 64.0), "on rank 1: gamma must be a finite number > 0"),
    (lambda r: dict(num_classes=1 if r else 10), "on rank 1: num_classes must be an int of at least the world size 2"),
    (lambda r: dict(sample_rate=2.0 if r == 0 else 1.0), r"on rank 0: sample_rate must lie in \(0, 1\]"),
]


def _mismatched_settings(rank, world_size):
    for settings_of, message in MISMATCHED_SETTINGS:
        settings = {"num_classes": 10, "embedding_dim": EMB_DIM, **settings_of(rank)}
        with pytest.raises(ValueError, match=message):
            ShardedCircleLoss(settings.pop("num_classes"), settings.pop("embedding_dim"), **settings)
    agreed = ShardedCircleLoss(10, EMB_DIM, gamma=64.0)  # after all those, an agreeing head still works
    assert torch.isfinite(agreed(torch.randn(3, EMB_DIM), torch.arange(3) + 3 * rank))


def test_ranks_that_disagree_on_settings_raise_the_same_error():
    """Before the check, num_classes 10 and 12 gave a loss in which class 10 belonged to no rank."""
    run_ranks(_mismatched_settings, 2)


def test_needs_a_process_group():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="needs an initialised process group"):
        ShardedCircleLoss(10, 4)


def _resharding(rank, world_size, folder):
    """Save shards with world size 3, load them into world size 2 (ranks 0, 1 of the group here)."""
    full = torch.randn(17, EMB_DIM, generator=torch.Generator().manual_seed(3))
    saved = []
    for saved_rank in range(3):
        start, stop = shard_range(17, 3, saved_rank)
        saved.append({"weight": full[start:stop], "class_start": start, "class_stop": stop, "num_classes": 17})
    sharded = ShardedCircleLoss(17, EMB_DIM)
    sharded.load_shards(saved)
    assert torch.equal(sharded.weight.detach(), full[sharded.class_start:sharded.class_stop])
    state = sharded.shard_state()
    assert (state["class_start"], state["class_stop"]) == (sharded.class_start, sharded.class_stop)
    with pytest.raises(ValueError, match="cover"):
        sharded.load_shards(saved[:1] if rank == 1 else saved[1:2])


def test_resharding_a_checkpoint():
    run_ranks(_resharding, 2, None)


def test_shard_ranges_partition_the_classes():
    for num_classes, world in ((11, 2), (11, 3), (100, 7), (8, 8)):
        ranges = [shard_range(num_classes, world, r) for r in range(world)]
        assert ranges[0][0] == 0 and ranges[-1][1] == num_classes
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert all(stop - start == num_classes // world + (r < num_classes % world)
                   for r, (start, stop) in enumerate(ranges))
