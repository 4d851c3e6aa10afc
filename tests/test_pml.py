"""circleloss_ext.integrations.pml against pytorch-metric-learning itself."""
import pytest
import torch
from pytorch_metric_learning import losses, miners, reducers
from pytorch_metric_learning.utils import loss_and_miner_utils

from circleloss_ext.integrations import pml

TOL = {torch.float64: (1e-9, 1e-9), torch.float32: (1e-4, 1e-3)}  # (loss, gradients), relative


def inputs(dtype, tight=False, B=48, D=16, num_labels=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    emb = torch.randn(B, D, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, num_labels, (B,), generator=gen)
    if tight:  # tight clusters: every row of a label near its centre
        centres = torch.randn(num_labels, D, generator=gen, dtype=torch.float64)
        emb = centres[labels] + 0.05 * emb
    return emb.to(dtype), labels


def loss_and_grad(loss_fn, emb, *args, **kwargs):
    leaf = emb.clone().requires_grad_()
    loss = loss_fn(leaf, *args, **kwargs)
    loss.backward()
    return loss.detach(), leaf.grad


def assert_same(ours, theirs, dtype):
    loss_tol, grad_tol = TOL[dtype]
    torch.testing.assert_close(ours[0], theirs[0], rtol=loss_tol, atol=loss_tol * theirs[0].abs().item())
    scale = theirs[1].abs().max().item()
    torch.testing.assert_close(ours[1], theirs[1], rtol=0, atol=grad_tol * max(scale, 1e-12))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("tight", [False, True], ids=["random", "tight"])
@pytest.mark.parametrize("reducer", [None, reducers.MeanReducer()], ids=["avg-nonzero", "mean"])
def test_plain_call(dtype, tight, reducer):
    emb, labels = inputs(dtype, tight)
    kwargs = {} if reducer is None else {"reducer": reducer}
    ours_fn, theirs_fn = pml.CircleLoss(m=0.4, gamma=80, **kwargs), losses.CircleLoss(m=0.4, gamma=80, **kwargs)
    assert_same(loss_and_grad(ours_fn, emb, labels), loss_and_grad(theirs_fn, emb, labels), dtype)
    assert ours_fn.fused_calls == 1


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_positional_reference_set_and_int32_labels(dtype):
    emb, labels = inputs(dtype)
    ref, ref_labels = inputs(dtype, seed=1, B=70)
    ours = loss_and_grad(pml.CircleLoss(), emb, labels.int(), None, ref, ref_labels.int())
    theirs = loss_and_grad(losses.CircleLoss(), emb, labels.int(), None, ref, ref_labels.int())
    assert_same(ours, theirs, dtype)


@pytest.mark.parametrize("miner", [miners.MultiSimilarityMiner(epsilon=0.1), miners.TripletMarginMiner(margin=0.2)],
                         ids=["multi-similarity", "triplet-margin"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_mined_indices_tuple(miner, dtype, monkeypatch):
    """A miner's pairs or triplets: computed from those pairs alone (gathered dots), equal to PML's dense
    masks; pairs mined twice count once."""
    emb, labels = inputs(dtype)
    tuple_ = miner(emb, labels)
    assert min(len(t) for t in tuple_) > 5
    tuple_ = tuple(torch.cat([t, t[:5]]) for t in tuple_)  # some pairs twice
    theirs = loss_and_grad(losses.CircleLoss(), emb, labels, tuple_)
    ours_fn = pml.CircleLoss()
    monkeypatch.setattr(torch, "zeros_like", _no_dense_mask)  # PML's masks are zeros_like(mat)
    ours = loss_and_grad(ours_fn, emb, labels, tuple_)
    assert ours_fn.mined_calls == 1 and ours_fn.fused_calls == 0
    assert_same(ours, theirs, dtype)


def _no_dense_mask(*args, **kwargs):
    raise AssertionError("a dense mask was built")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cross_batch_memory_over_several_steps(dtype, monkeypatch):
    """Five steps of 48 into a memory of 100 (it wraps around twice): ours with our CircleLoss, fused and
    without PML's B × M pair tuple, against PML's CrossBatchMemory with PML's CircleLoss."""
    ours = pml.CrossBatchMemory(pml.CircleLoss(), embedding_size=16, memory_size=100)
    theirs = losses.CrossBatchMemory(losses.CircleLoss(), embedding_size=16, memory_size=100)
    real_pairs = loss_and_miner_utils.get_all_pairs_indices
    for step in range(5):
        emb, labels = inputs(dtype, tight=step % 2 == 1, seed=10 + step)
        monkeypatch.setattr(loss_and_miner_utils, "get_all_pairs_indices", _no_pairs_matrix)
        mine = loss_and_grad(ours, emb, labels)
        monkeypatch.setattr(loss_and_miner_utils, "get_all_pairs_indices", real_pairs)
        assert_same(mine, loss_and_grad(theirs, emb, labels), dtype)
    assert ours.loss.fused_calls == 5
    assert torch.equal(ours.embedding_memory, theirs.embedding_memory.to(ours.embedding_memory.dtype))


def _no_pairs_matrix(*args, **kwargs):
    raise AssertionError("our CrossBatchMemory built PML's B × M pair tuple")


def test_our_loss_inside_pmls_cross_batch_memory():
    """PML's own CrossBatchMemory hands our loss its tuple of pairs (computed from those pairs): PML's values."""
    ours = losses.CrossBatchMemory(pml.CircleLoss(), embedding_size=16, memory_size=100)
    theirs = losses.CrossBatchMemory(losses.CircleLoss(), embedding_size=16, memory_size=100)
    for step in range(3):
        emb, labels = inputs(torch.float64, seed=20 + step)
        assert_same(loss_and_grad(ours, emb, labels), loss_and_grad(theirs, emb, labels), torch.float64)


def test_self_supervised_and_multiple_losses_accept_it():
    emb, labels = inputs(torch.float32)
    ref = emb + 0.01
    wrapped = losses.SelfSupervisedLoss(pml.CircleLoss())
    torch.testing.assert_close(wrapped(emb, ref), losses.SelfSupervisedLoss(losses.CircleLoss())(emb, ref),
                               rtol=1e-4, atol=1e-5)
    both = losses.MultipleLosses([pml.CircleLoss(), losses.ContrastiveLoss()])
    assert torch.isfinite(both(emb, labels))


def test_cross_batch_memory_holds_nothing_batch_by_memory():
    """B = 256 against a memory of 65 536: one float32 B × M matrix would take 64 MB; the fused step
    grows the process by less than half of that (PML's takes several of them)."""
    from benchmarks.memory import PeakMemoryGrowth, cpu_peak_supported
    if not cpu_peak_supported():
        pytest.fail("the peak resident memory cannot be measured here (/proc/self/clear_refs)")
    memory = pml.CrossBatchMemory(pml.CircleLoss(backend="cpu"), embedding_size=32, memory_size=65536)
    with torch.no_grad():
        memory.embedding_memory.normal_()
        memory.label_memory.random_(0, 64)
    memory.has_been_filled = True
    emb, labels = inputs(torch.float32, B=256, D=32, num_labels=64)
    emb.requires_grad_()
    memory(emb, labels).backward()  # a first step: thread pools and the allocator's arenas
    emb.grad = None
    with PeakMemoryGrowth("cpu") as growth:
        memory(emb, labels).backward()
    assert memory.loss.fused_calls == 2
    assert growth.bytes < 256 * 65536 * 4 / 2, f"{growth.bytes / 2**20:.0f} MB"
