"""Label smoothing, fused: equal to cross-entropy with label_smoothing over the Circle logits (fast-reid's
CircleSoftmax followed by a smoothed cross-entropy), in float64."""
import pytest
import torch
import torch.nn.functional as F

import circleloss_ext as cl
from circleloss_ext.integrations.insightface import CircleMargin
from helpers import assert_close_scaled, device_for, make_inputs, run


def smoothed_cross_entropy(emb, weight, labels, m, gamma, epsilon, detach_alpha, ignore_index=-100):
    cosines = F.normalize(emb) @ F.normalize(weight).T
    columns = torch.where(labels == ignore_index, -1, labels)[:, None]
    logits = CircleMargin(m=m, gamma=gamma, detach_alpha=detach_alpha)(cosines, columns)
    return F.cross_entropy(logits, labels, label_smoothing=epsilon, ignore_index=ignore_index)


@pytest.mark.parametrize("epsilon", [0.1, 0.5, 1.0])
@pytest.mark.parametrize("detach_alpha", [True, False])
def test_reference_equals_smoothed_cross_entropy(epsilon, detach_alpha):
    emb, weight, labels, _ = make_inputs(13, 29, 10, dtype=torch.float64, device="cpu")
    labels[3] = -100
    expected = run(smoothed_cross_entropy, (emb, weight, labels), m=0.25, gamma=32.0, epsilon=epsilon,
                   detach_alpha=detach_alpha)
    actual = run(cl.circle_loss, (emb, weight, labels), m=0.25, gamma=32.0, label_smoothing=epsilon,
                 detach_alpha=detach_alpha, backend="reference")
    torch.testing.assert_close(actual[0], expected[0])
    for a, e in zip(actual[1], expected[1]):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("detach_alpha", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_backends_equal_smoothed_cross_entropy(fused, detach_alpha, dtype):
    emb, weight, labels, _ = make_inputs(37, 70, 20, device=device_for(fused))
    weight[labels[:10]] = emb[:10] * 2.0  # peaked positives
    labels[5] = -100
    emb, weight = emb.to(dtype), weight.to(dtype)
    loss, grads = run(cl.circle_loss, (emb, weight, labels), m=0.25, gamma=64.0, label_smoothing=0.1,
                      detach_alpha=detach_alpha, backend=fused)
    ref_loss, ref_grads = run(smoothed_cross_entropy, (emb.double().cpu(), weight.double().cpu(), labels.cpu()),
                              m=0.25, gamma=64.0, epsilon=0.1, detach_alpha=detach_alpha)
    tol = 2e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(loss.double().cpu(), ref_loss, rtol=tol, atol=tol)
    for g, r in zip(grads, ref_grads):
        assert_close_scaled(g.cpu(), r, tol)


def test_label_smoothing_is_checked():
    emb, weight, labels, _ = make_inputs(4, 5, 3, device="cpu")
    for bad in (-0.1, 1.5, True, "0.1"):
        with pytest.raises(ValueError, match="label_smoothing must be a number in"):
            cl.circle_loss(emb, weight, labels, label_smoothing=bad)
    with pytest.raises(ValueError, match="label_smoothing"):
        cl.CircleLoss(5, 3, label_smoothing=2.0)


def test_fast_reid_smoothing_is_a_rescaled_epsilon():
    """fast-reid's cross_entropy_loss(eps) gives the target 1 - eps and every other class eps/(C - 1);
    F.cross_entropy's label_smoothing ε gives ε/C to every class. They agree for ε = eps·C/(C - 1), which
    is what a fast-reid recipe (CircleSoftmax, eps = 0.1) passes here."""
    emb, weight, labels, _ = make_inputs(11, 23, 9, dtype=torch.float64, device="cpu")
    eps, num_classes = 0.1, weight.shape[0]
    cosines = F.normalize(emb) @ F.normalize(weight).T
    logits = CircleMargin(m=0.25, gamma=64.0)(cosines, labels[:, None])
    targets = torch.full_like(logits, eps / (num_classes - 1)).scatter_(1, labels[:, None], 1 - eps)
    fast_reid = (-targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    ours = cl.circle_loss(emb, weight, labels, m=0.25, gamma=64.0, backend="reference",
                          label_smoothing=eps * num_classes / (num_classes - 1))
    torch.testing.assert_close(ours, fast_reid)
