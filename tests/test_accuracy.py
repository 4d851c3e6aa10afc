"""Top-1 accuracy from the fused forward: equal to the argmax of the materialised cosines."""
import pytest
import torch
import torch.nn.functional as F

import circleloss_ext as cl
from helpers import device_for, make_inputs


def argmax_accuracy(emb, keys, labels, key_labels=None, exclude_self=False, ignore_index=-100):
    """The share of rows taking part whose highest cosine is a positive, from S in float64."""
    s = F.normalize(emb.double()) @ F.normalize(keys.double()).T
    if key_labels is None:  # class level: the row's class among all classes
        taking_part = labels != ignore_index
        return ((s.argmax(dim=1) == labels) & taking_part).sum().item() / max(int(taking_part.sum()), 1)
    same = labels[:, None] == key_labels[None, :]
    if exclude_self:
        s.fill_diagonal_(float("-inf"))
        same.fill_diagonal_(False)
    taking_part = same.any(dim=1) & (~same).sum(dim=1).gt(int(exclude_self))
    nearest_is_positive = same.gather(1, s.argmax(dim=1, keepdim=True)).squeeze(1)
    return (nearest_is_positive & taking_part).sum().item() / max(int(taking_part.sum()), 1)


@pytest.mark.parametrize("backend", ["triton", "cpu", "reference"])
def test_class_level_accuracy(backend):
    emb, weight, labels, _ = make_inputs(70, 261, 24, device=device_for(backend))
    labels[:30] = weight[:30].argmax(dim=1) % 261  # some rows
    weight[labels[:35]] = emb[:35] * 2.0  # these rows' own class is nearest: accuracy well away from 0
    labels[5] = -100
    loss, accuracy = cl.circle_loss(emb, weight, labels, backend=backend, with_accuracy=True)
    expected = argmax_accuracy(emb, weight, labels)
    assert 0.3 < expected < 0.9
    assert accuracy.dtype == torch.float32 and not accuracy.requires_grad
    assert accuracy.item() == pytest.approx(expected, abs=1e-6)
    assert torch.equal(loss, cl.circle_loss(emb, weight, labels, backend=backend))  # the loss is unchanged


@pytest.mark.parametrize("backend", ["triton", "cpu", "reference"])
@pytest.mark.parametrize("form", ["batch", "reference set"])
def test_pairwise_accuracy_is_precision_at_one(backend, form):
    emb, ref, labels, ref_labels = make_inputs(45, 77, 16, num_labels=6, device=device_for(backend))
    emb[1:12] = emb[0] + 0.05 * emb[1:12]  # a tight cluster, mixed labels
    if form == "batch":
        _, accuracy = cl.pairwise_circle_loss(emb, labels, backend=backend, with_accuracy=True)
        expected = argmax_accuracy(emb, emb, labels, labels, exclude_self=True)
    else:
        _, accuracy = cl.pairwise_circle_loss(emb, labels, ref_embeddings=ref, ref_labels=ref_labels,
                                              backend=backend, with_accuracy=True)
        expected = argmax_accuracy(emb, ref, labels, ref_labels)
    assert accuracy.item() == pytest.approx(expected, abs=1e-6)


def test_modules_keep_the_last_accuracy():
    head = cl.CircleLoss(50, 8, track_accuracy=True, backend="cpu")
    emb, labels = torch.randn(20, 8), torch.randint(0, 50, (20,))
    with torch.no_grad():
        head.weight[labels[:10]] = emb[:10]
    loss = head(emb, labels)
    assert loss.dim() == 0 and head.last_accuracy.item() == pytest.approx(argmax_accuracy(emb, head.weight, labels))
    pair = cl.PairwiseCircleLoss(track_accuracy=True)
    pair(emb, labels % 3)
    assert 0.0 <= pair.last_accuracy.item() <= 1.0
    assert cl.CircleLoss(50, 8).last_accuracy is None


def test_with_accuracy_is_checked():
    emb, weight, labels, _ = make_inputs(4, 5, 3, device="cpu")
    with pytest.raises(TypeError, match="with_accuracy"):
        cl.circle_loss(emb, weight, labels, with_accuracy=1)
