"""The fused kernels against the float64 reference: loss and every gradient, both label forms,
both α modes, every reduction, odd shapes, dtypes and layouts."""
import pytest
import torch

import circleloss_ext as cl
from helpers import check_against_reference, device_for, make_inputs, run

REDUCTIONS = ["none", "sum", "mean"]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("detach_alpha", [True, False])
@pytest.mark.parametrize("B,C,D", [(37, 75, 19), (16, 64, 32), (1, 2, 2), (5, 2, 2), (3, 133, 40)])
def test_class_level(B, C, D, detach_alpha, reduction, fused):
    emb, weight, labels, _ = make_inputs(B, C, D, device=device_for(fused))
    check_against_reference(cl.circle_loss, (emb, weight, labels), fused, detach_alpha=detach_alpha, reduction=reduction)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("detach_alpha", [True, False])
@pytest.mark.parametrize("B,D,num_labels", [(37, 19, 5), (50, 2, 3), (1, 3, 1), (2, 4, 2), (33, 16, 40)])
def test_pairwise_in_batch(B, D, num_labels, detach_alpha, reduction, fused):
    emb, _, labels, _ = make_inputs(B, 1, D, num_labels=num_labels, device=device_for(fused))
    check_against_reference(cl.pairwise_circle_loss, (emb, labels), fused, detach_alpha=detach_alpha, reduction=reduction)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("detach_alpha", [True, False])
@pytest.mark.parametrize("B,N,D,num_labels", [(29, 71, 21, 6), (1, 1, 2, 1), (17, 3, 5, 2)])
def test_pairwise_reference_set(B, N, D, num_labels, detach_alpha, reduction, fused):
    emb, ref, labels, ref_labels = make_inputs(B, N, D, num_labels=num_labels, device=device_for(fused))

    def loss(e, lab, r, rlab, **kw):
        return cl.pairwise_circle_loss(e, lab, ref_embeddings=r, ref_labels=rlab, **kw)

    check_against_reference(loss, (emb, labels, ref, ref_labels), fused, detach_alpha=detach_alpha, reduction=reduction)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("detach_alpha", [True, False])
def test_half_precision(dtype, detach_alpha, fused):
    emb, weight, labels, _ = make_inputs(24, 70, 40, dtype=dtype, device=device_for(fused))
    check_against_reference(cl.circle_loss, (emb, weight, labels), fused, dtype=dtype, detach_alpha=detach_alpha,
                            reduction="sum")
    emb, ref, labels, ref_labels = make_inputs(24, 45, 40, dtype=dtype, num_labels=4, device=device_for(fused))
    check_against_reference(cl.pairwise_circle_loss, (emb, labels), fused, dtype=dtype, detach_alpha=detach_alpha)


@pytest.mark.parametrize("gamma", [256.0, 300.0])
@pytest.mark.parametrize("detach_alpha", [True, False])
def test_peaked_similarities(gamma, detach_alpha, fused):
    """Some class rows equal their embeddings (s = 1) and some are their negation (s = -1):
    logits near γ(1+m)(1-m) must not overflow."""
    emb, weight, labels, _ = make_inputs(20, 50, 24, device=device_for(fused))
    weight[labels[:10]] = emb[:10] * 2.5
    weight[(labels[10:] + 1) % 50] = -emb[10:]
    loss = check_against_reference(cl.circle_loss, (emb, weight, labels), fused, gamma=gamma, detach_alpha=detach_alpha,
                                   reduction="none")
    assert torch.isfinite(loss).all()


def test_ignore_index(fused):
    emb, weight, labels, _ = make_inputs(21, 40, 12, device=device_for(fused))
    labels[::3] = -100
    loss = check_against_reference(cl.circle_loss, (emb, weight, labels), fused, reduction="none")
    assert (loss[::3] == 0).all() and (loss[1::3] > 0).all()
    mean = cl.circle_loss(emb, weight, labels, backend=fused)
    torch.testing.assert_close(mean, loss.sum() / (labels != -100).sum())


def test_ignore_index_inside_class_range(fused):
    emb, weight, labels, _ = make_inputs(12, 6, 8, device=device_for(fused))
    labels[:4] = 0
    loss = check_against_reference(cl.circle_loss, (emb, weight, labels), fused, ignore_index=0, reduction="none")
    assert (loss[:4] == 0).all()


def test_no_rows_with_a_loss_gives_zero_mean_and_zero_gradients(fused):
    emb, weight, labels, _ = make_inputs(7, 9, 5, device=device_for(fused))
    labels[:] = -100
    same = torch.zeros(6, dtype=torch.int64, device=labels.device)  # pair-wise: positives only
    unique = torch.arange(6, device=labels.device)  # pair-wise: negatives only
    for backend in (fused, "reference"):
        loss, (g_emb, g_weight) = run(cl.circle_loss, (emb, weight, labels), backend=backend)
        assert loss.item() == 0 and (g_emb == 0).all() and (g_weight == 0).all()
        for lab in (same, unique):
            loss, (g_emb,) = run(cl.pairwise_circle_loss, (emb[:6], lab), backend=backend)
            assert loss.item() == 0 and (g_emb == 0).all()


def test_non_contiguous_inputs(fused):
    device = device_for(fused)
    emb_t = torch.randn(19, 30, device=device).t()  # (30, 19), column-major
    weight_big = torch.randn(80, 40, device=device)
    weight = weight_big[::2, 3:22]  # (40, 19), strided rows and an offset
    labels = torch.randint(0, 40, (60,), device=device)[::2]
    assert not emb_t.is_contiguous() and not weight.is_contiguous() and not labels.is_contiguous()
    check_against_reference(cl.circle_loss, (emb_t, weight, labels), fused, reduction="sum")
    check_against_reference(cl.pairwise_circle_loss, (emb_t, labels % 4), fused)


def test_zero_embedding_row_is_finite(fused):
    emb, weight, labels, _ = make_inputs(9, 13, 7, device=device_for(fused))
    emb[3] = 0
    weight[5] = 0
    for backend in (fused, "reference"):
        loss, grads = run(cl.circle_loss, (emb, weight, labels), backend=backend)
        assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    check_against_reference(cl.circle_loss, (emb, weight, labels), fused)


@pytest.mark.parametrize("use_fused", [True, False], ids=["fused", "reference"])
def test_nan_propagates(use_fused, fused):
    backend = fused if use_fused else "reference"
    emb, weight, labels, _ = make_inputs(9, 13, 7, device=device_for(fused))
    emb[2, 1] = float("nan")
    loss = cl.circle_loss(emb, weight, labels, backend=backend, reduction="none")
    assert torch.isnan(loss[2]) and torch.isfinite(loss[torch.arange(9, device=loss.device) != 2]).all()
    assert torch.isnan(cl.circle_loss(emb, weight, labels, backend=backend))
    weight[4, 0] = float("nan")  # a NaN class row reaches every row's negatives
    assert torch.isnan(cl.circle_loss(emb, weight, labels, backend=backend, reduction="none")).all()
    assert torch.isnan(cl.pairwise_circle_loss(emb, labels % 3, backend=backend))


def test_deterministic(fused):
    num_keys = 2000 if fused == "cpu" else 150  # the C++ path: several splits of 256 keys
    emb, weight, labels, _ = make_inputs(40, num_keys, 33, device=device_for(fused))
    first = run(cl.circle_loss, (emb, weight, labels), backend=fused)
    threads = torch.get_num_threads()
    try:  # the C++ path's reduction order does not depend on the thread count either
        torch.set_num_threads(1 if threads > 1 else 2)
        second = run(cl.circle_loss, (emb, weight, labels), backend=fused)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(a, b) for a, b in zip(first[1], second[1]))


def test_fused_backend_runs_the_fused_function(fused):
    emb, weight, labels, _ = make_inputs(4, 8, 4, device=device_for(fused))
    emb.requires_grad_()
    loss = cl.circle_loss(emb, weight, labels, backend=fused)
    node, names = loss.grad_fn, []
    while node is not None:
        names.append(type(node).__name__)
        node = node.next_functions[0][0] if node.next_functions else None
    assert any("FusedRows" in n for n in names), names  # the Function behind CircleLossFunction
