"""circleloss_ext.integrations.insightface against a plain-torch Partial FC with a Circle margin
(insightface's PartialFC_V2 algorithm: gathered batch, this rank's sampled rows, cosine logits through
the margin, a cross-entropy whose softmax spans the ranks), on 2 and 3 gloo ranks."""
import pytest
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_autograd
import torch.nn.functional as F

from circleloss_ext.integrations.insightface import CircleMargin, PartialFC_V2
from test_distributed import run_ranks

LOCAL_BATCH, EMB_DIM = 5, 12


def partial_fc_loss(local_embeddings, local_labels, weight, class_start, sampled, margin):
    """Partial FC's loss written out in plain torch: every rank's logits against its own (sampled)
    rows, the softmax's denominator and the target logit summed over the ranks (held constant where
    they come from other ranks, so each rank's autograd sees exactly its share), the mean over the
    global batch. Gradients reach the local embeddings summed over the ranks (an autograd all-gather)."""
    embeddings = torch.cat(dist_autograd.all_gather(local_embeddings))
    labels = torch.cat([torch.empty_like(local_labels) for _ in range(dist.get_world_size())])
    dist.all_gather_into_tensor(labels, local_labels)
    local = labels - class_start
    in_shard = (local >= 0) & (local < weight.shape[0])
    if sampled is not None:
        weight = weight[sampled]
        local = torch.searchsorted(sampled, local)
    columns = torch.where(in_shard, local, -1)[:, None]
    cosines = (F.normalize(embeddings) @ F.normalize(weight).T).clamp(-1, 1)
    logits = margin(cosines, columns)
    top = logits.detach().max(dim=1).values
    dist.all_reduce(top, op=dist.ReduceOp.MAX)
    local_sum = torch.exp(logits - top[:, None]).sum(dim=1)
    total = local_sum.detach().clone()
    dist.all_reduce(total)
    target = torch.where(in_shard, logits.gather(1, columns.clamp_min(0)).squeeze(1), 0.0)
    target_total = target.detach().clone()
    dist.all_reduce(target_total)
    lse = torch.log(local_sum + (total - local_sum.detach())) + top
    return (lse - (target + (target_total - target.detach()))).mean()


def _matches_partial_fc(rank, world_size, num_classes, sample_rate, fp16):
    gen = torch.Generator().manual_seed(2024)
    embeddings = torch.randn(world_size * LOCAL_BATCH, EMB_DIM, generator=gen)
    labels = torch.randint(0, num_classes, (world_size * LOCAL_BATCH,), generator=gen, dtype=torch.int32)
    labels[0] = labels[-1]  # a class shared by the first and the last rank
    margin = CircleMargin(m=0.25, gamma=32.0)
    head = PartialFC_V2(margin, EMB_DIM, num_classes, sample_rate=sample_rate, fp16=fp16)
    assert head.state_dict().keys() == {"weight"}  # insightface's module holds exactly this
    assert head.weight.shape == (head.num_local, EMB_DIM)
    assert head.weight.std().item() == pytest.approx(0.01, rel=0.5)
    rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    local = embeddings[rows].clone().requires_grad_()
    loss = head(local, labels[rows][:, None])  # (b, 1) int32, as insightface's data loader gives
    loss.backward()

    if sample_rate < 1:
        local_labels = labels.long() - head.class_start
        positives = local_labels[(local_labels >= 0) & (local_labels < head.num_local)].unique()
        assert torch.isin(positives, head.last_sampled).all()
        assert len(head.last_sampled) == max(int(sample_rate * head.num_local), len(positives))
    # the oracle in fp32; with fp16=True on the fp16-rounded operands the products see (it would round
    # each cosine to fp16 itself under autocast, which γ amplifies: it is the less accurate side)
    rounded = (lambda x: x.half().float()) if fp16 else (lambda x: x)
    weight = rounded(head.weight.detach()).requires_grad_()
    oracle_local = rounded(embeddings[rows]).requires_grad_()
    expected = partial_fc_loss(oracle_local, labels[rows].long(), weight, head.class_start, head.last_sampled, margin)
    expected.backward()
    tol = 1e-2 if fp16 else 1e-4
    torch.testing.assert_close(loss.float(), expected, rtol=tol, atol=tol)
    assert head.weight.grad.dtype == torch.float32
    for actual, reference in ((head.weight.grad, weight.grad), (local.grad, world_size * oracle_local.grad)):
        torch.testing.assert_close(actual, reference, rtol=0, atol=tol * reference.abs().max().item())

    # state_dict both ways: into a fresh module (as into insightface's) and back
    other = PartialFC_V2(CircleMargin(m=0.25, gamma=32.0), EMB_DIM, num_classes, sample_rate=sample_rate)
    other.load_state_dict({"weight": head.weight.detach().clone()})
    assert torch.equal(other.weight, head.weight)


@pytest.mark.parametrize("world_size,num_classes,sample_rate", [(2, 23, 1.0), (3, 40, 1.0), (3, 40, 0.5)])
def test_matches_plain_torch_partial_fc(world_size, num_classes, sample_rate):
    run_ranks(_matches_partial_fc, world_size, num_classes, sample_rate, False)


def test_fp16_runs_the_products_in_half_precision():
    run_ranks(_matches_partial_fc, 2, 23, 1.0, True)


def test_other_margins_are_refused():
    class CombinedMarginLoss:  # insightface's ArcFace / CosFace margin, by name
        def __call__(self, logits, labels):
            return logits

    with pytest.raises(TypeError, match="margin_loss must be a circleloss_ext.integrations.insightface.CircleMargin"):
        PartialFC_V2(CombinedMarginLoss(), 512, 1000)


def test_circle_margin_logits_give_circle_loss():
    """The cross-entropy of CircleMargin's logits is circle_loss (the identity of docs/design.md)."""
    import circleloss_ext as cl
    gen = torch.Generator().manual_seed(3)
    emb, weight = torch.randn(6, 8, generator=gen, dtype=torch.float64), torch.randn(9, 8, generator=gen,
                                                                                       dtype=torch.float64)
    labels = torch.randint(0, 9, (6,), generator=gen)
    cosines = F.normalize(emb) @ F.normalize(weight).T
    logits = CircleMargin(m=0.3, gamma=16.0)(cosines, labels[:, None])
    expected = cl.circle_loss(emb, weight, labels, m=0.3, gamma=16.0, backend="reference")
    torch.testing.assert_close(F.cross_entropy(logits, labels), expected)
    with pytest.raises(ValueError):
        CircleMargin(gamma=0.0)
