"""The public API around the kernels: errors on bad input, backends, modules, autocast, poisoned
buffers and the true derivative under gradcheck."""
import math

import pytest
import torch

import circleloss_ext as cl
from circleloss_ext import ops
from circleloss_ext.ops import resolve_backend
from helpers import DEVICE, TOLERANCES, assert_close_scaled, device_for, make_inputs, run, to64

E, W, Y, _ = make_inputs(6, 10, 4, device="cpu")


def class_call(**changes):
    args = dict(embeddings=E, weight=W, labels=Y)
    args.update(changes)
    return lambda: cl.circle_loss(args.pop("embeddings"), args.pop("weight"), args.pop("labels"), **args)


BAD_CLASS_CALLS = [
    (dict(embeddings=E[0]), "embeddings must be 2-D"),
    (dict(weight=W[None]), "weight must be 2-D"),
    (dict(weight=W[:, :3]), "weight must have D = 4"),
    (dict(embeddings=E.long()), "embeddings must be float"),
    (dict(weight=W.double()), "weight has dtype"),
    (dict(labels=Y.short()), "labels must have dtype torch.int64 or torch.int32, got torch.int16"),
    (dict(labels=Y.to(torch.uint8)), "labels must have dtype torch.int64 or torch.int32, got torch.uint8"),
    (dict(labels=Y[:5]), r"labels must have shape \(6,\)"),
    (dict(labels=Y.float()), "labels must have dtype"),
    (dict(labels=torch.tensor([0, 1, 2, 3, 4, 10])), r"labels must lie in \[0, num_classes=10\)"),
    (dict(labels=torch.tensor([0, 1, 2, 3, 4, -1])), "found -1"),
    (dict(m=float("nan")), "m must be a finite number"),
    (dict(gamma=float("inf")), "gamma must be a finite number > 0"),
    (dict(gamma=0.0), "gamma must be a finite number > 0"),
    (dict(gamma=-1.0), "gamma must be a finite number > 0"),
    (dict(reduction="avg"), "reduction must be one of"),
    (dict(backend="cuda"), "backend must be one of"),
    (dict(embeddings=E[:0]), "embeddings must have at least one row"),
    (dict(ignore_index=None), "ignore_index must be an int"),
]


@pytest.mark.parametrize("changes,message", BAD_CLASS_CALLS, ids=[m for _, m in BAD_CLASS_CALLS])
def test_bad_class_level_input(changes, message):
    with pytest.raises((ValueError, TypeError), match=message):
        class_call(**changes)()


def test_bad_pairwise_input():
    with pytest.raises(ValueError, match="ref_labels is missing"):
        cl.pairwise_circle_loss(E, Y, ref_embeddings=W)
    with pytest.raises(ValueError, match="ref_embeddings is missing"):
        cl.pairwise_circle_loss(E, Y, ref_labels=Y)
    with pytest.raises(ValueError, match=r"ref_labels must have shape \(10,\)"):
        cl.pairwise_circle_loss(E, Y, ref_embeddings=W, ref_labels=Y)
    with pytest.raises(ValueError, match="ref_embeddings must have D = 4"):
        cl.pairwise_circle_loss(E, Y, ref_embeddings=W[:, :2], ref_labels=Y)
    with pytest.raises(ValueError, match="labels must have shape"):
        cl.pairwise_circle_loss(E, Y[:2])
    with pytest.raises(ValueError, match="m must be a finite"):
        cl.pairwise_circle_loss(E, Y, m=float("inf"))


def test_tensors_on_different_devices():
    with pytest.raises(ValueError, match="weight is on meta but embeddings is on cpu"):
        cl.circle_loss(E, W.to("meta"), Y)
    with pytest.raises(ValueError, match="labels is on meta but embeddings is on cpu"):
        cl.circle_loss(E, W, Y.to("meta"))
    with pytest.raises(ValueError, match="ref_embeddings is on meta"):
        cl.pairwise_circle_loss(E, Y, ref_embeddings=W.to("meta"), ref_labels=torch.zeros(10, dtype=torch.int64))


def test_triton_backend_without_cuda_or_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="backend='triton' needs CUDA tensors"):
        cl.circle_loss(E, W, Y, backend="triton")


def test_backend_resolution():
    x = torch.zeros(1, device=DEVICE)
    assert resolve_backend("auto", x) == ("triton" if DEVICE == "cuda" else "cpu")
    assert resolve_backend("auto", x.cpu()) == "cpu"
    assert resolve_backend("triton", x) == "triton"
    assert resolve_backend("triton", x.double()) == "reference"  # the fused paths compute in float32
    assert resolve_backend("cpu", x.cpu().double()) == "reference"
    assert resolve_backend("reference", x) == "reference"


def test_cpu_backend_without_the_extension(monkeypatch):
    monkeypatch.setattr(ops, "cpu_extension_built", lambda: False)
    monkeypatch.setattr(ops, "_warned_no_cpu_extension", False)
    with pytest.raises(RuntimeError, match="backend='cpu' needs the C\\+\\+ extension circleloss_ext._C"):
        cl.circle_loss(E, W, Y, backend="cpu")
    with pytest.warns(RuntimeWarning, match="was not built") as warned:
        first = cl.circle_loss(E, W, Y)
        second = cl.circle_loss(E, W, Y)  # warned once only
    assert len(warned) == 1
    torch.testing.assert_close(first, cl.circle_loss(E, W, Y, backend="reference"))
    assert torch.equal(first, second)


def test_cpu_backend_on_another_device():
    with pytest.raises(RuntimeError, match="backend='cpu' needs CPU tensors, got tensors on meta"):
        resolve_backend("cpu", E.to("meta"))


def test_true_derivative_gradcheck():
    """detach_alpha=False is the true derivative of L: finite differences in float64 agree."""
    emb, weight, labels, _ = make_inputs(5, 7, 3, dtype=torch.float64)
    emb.requires_grad_(), weight.requires_grad_()
    for reduction in ("mean", "none"):
        assert torch.autograd.gradcheck(
            lambda e, w: cl.circle_loss(e, w, labels, gamma=8.0, detach_alpha=False, reduction=reduction),
            (emb, weight))
    pair_labels = torch.tensor([0, 1, 0, 1, 1], device=DEVICE)
    assert torch.autograd.gradcheck(
        lambda e: cl.pairwise_circle_loss(e, pair_labels, gamma=8.0, detach_alpha=False), (emb,))
    assert torch.autograd.gradcheck(
        lambda e, r: cl.pairwise_circle_loss(e, pair_labels, ref_embeddings=r, ref_labels=torch.arange(7, device=DEVICE) % 2, gamma=8.0,
                                             detach_alpha=False), (emb, weight))


def test_poisoned_buffers(monkeypatch):
    """Every buffer the kernels allocate starts as NaN: results must not depend on its contents."""
    emb, weight, labels, _ = make_inputs(23, 67, 21)
    clean = run(cl.circle_loss, (emb, weight, labels), backend="triton")
    clean_pair = run(cl.pairwise_circle_loss, (emb, labels % 3), backend="triton")
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-12345)

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))
    assert torch.isnan(torch.empty(2)).all()
    for result, expected in ((run(cl.circle_loss, (emb, weight, labels), backend="triton"), clean),
                             (run(cl.pairwise_circle_loss, (emb, labels % 3), backend="triton"), clean_pair)):
        assert torch.equal(result[0], expected[0])
        assert all(torch.equal(a, b) for a, b in zip(result[1], expected[1]))


def test_autocast_behaves_as_linear_then_cross_entropy():
    emb, weight, labels, _ = make_inputs(12, 30, 16)
    dtype = torch.bfloat16
    with torch.autocast(DEVICE, dtype=dtype):
        loss, (g_emb, g_weight) = run(cl.circle_loss, (emb, weight, labels), backend="triton")
        logits = torch.nn.functional.linear(emb, weight)
        assert logits.dtype == dtype and torch.nn.functional.cross_entropy(logits, labels).dtype == torch.float32
    assert loss.dtype == torch.float32 and g_emb.dtype == torch.float32 and g_weight.dtype == torch.float32
    ref_loss, (r_emb, r_weight) = run(cl.circle_loss, (to64(emb.to(dtype)), to64(weight.to(dtype)), labels),
                                      backend="reference")
    loss_tol, grad_tol = TOLERANCES[dtype]
    torch.testing.assert_close(loss.double(), ref_loss, rtol=loss_tol, atol=loss_tol)
    assert_close_scaled(g_emb, r_emb, grad_tol)
    assert_close_scaled(g_weight, r_weight, grad_tol)


def test_mixed_dtypes_need_autocast():
    """16-bit embeddings (from an autocast backbone) with an fp32 weight: refused outside autocast,
    computed in the autocast dtype inside it, each gradient in its own input's dtype."""
    emb, weight, labels, _ = make_inputs(12, 30, 16)
    emb = emb.to(torch.bfloat16).requires_grad_()
    weight.requires_grad_()
    with pytest.raises(TypeError, match="weight has dtype torch.float32 but embeddings has torch.bfloat16"):
        cl.circle_loss(emb, weight, labels, backend="triton")
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        loss = cl.circle_loss(emb, weight, labels, backend="triton")
    loss.backward()
    assert loss.dtype == torch.float32 and emb.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.float32
    expected = cl.circle_loss(to64(emb), to64(weight.to(torch.bfloat16)), labels, backend="reference")
    torch.testing.assert_close(loss.double(), expected, rtol=1e-2, atol=1e-2)


def test_frozen_weight_and_frozen_embeddings(fused):
    emb, weight, labels, _ = make_inputs(9, 20, 8, device=device_for(fused))
    e64, w64 = emb.double().requires_grad_(), weight.double().requires_grad_()
    expected = torch.autograd.grad(cl.circle_loss(e64, w64, labels, backend="reference"), (e64, w64))
    emb.requires_grad_()
    cl.circle_loss(emb, weight, labels, backend=fused).backward()
    assert weight.grad is None
    assert_close_scaled(emb.grad, expected[0], 1e-4)
    weight.requires_grad_()
    cl.circle_loss(emb.detach(), weight, labels, backend=fused).backward()
    assert_close_scaled(weight.grad, expected[1], 1e-4)


def test_circle_loss_module():
    module = cl.CircleLoss(50, 12, backend="triton", gamma=128.0).to(DEVICE)
    assert module.weight.shape == (50, 12)
    bound = 1 / math.sqrt(12)  # nn.Linear's kaiming_uniform(a=√5) bound
    assert module.weight.abs().max() <= bound and module.weight.std() > bound / 3
    emb = torch.randn(7, 12, device=DEVICE, requires_grad=True)
    labels = torch.randint(0, 50, (7,), device=DEVICE)
    loss = module(emb, labels)
    loss.backward()
    expected = cl.circle_loss(emb, module.weight, labels, gamma=128.0, backend="reference")
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    assert module.weight.grad.shape == (50, 12) and emb.grad.shape == (7, 12)
    assert "num_classes=50" in repr(module)


def test_pairwise_module_matches_metric_learning_call():
    module = cl.PairwiseCircleLoss(backend="triton")
    emb, ref, labels, ref_labels = make_inputs(10, 14, 6, num_labels=3)
    torch.testing.assert_close(module(emb, labels), cl.pairwise_circle_loss(emb, labels, backend="reference"),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(module(emb, labels, ref, ref_labels),
                               cl.pairwise_circle_loss(emb, labels, ref_embeddings=ref, ref_labels=ref_labels,
                                                       backend="reference"), rtol=1e-5, atol=1e-5)


def test_cross_entropy_identity():
    """With one positive, Circle Loss is cross-entropy over z_y = -u_iy and z_j = v_ij (docs/design.md)."""
    emb, weight, labels, _ = make_inputs(11, 17, 9)
    m, gamma = 0.25, 64.0
    s = torch.nn.functional.normalize(emb.double()) @ torch.nn.functional.normalize(weight.double()).T
    one_hot = torch.nn.functional.one_hot(labels, 17).bool()
    z = torch.where(one_hot, gamma * torch.relu(1 + m - s) * (s - 1 + m), gamma * torch.relu(s + m) * (s - m))
    expected = torch.nn.functional.cross_entropy(z, labels, reduction="none")
    loss = cl.circle_loss(emb, weight, labels, m=m, gamma=gamma, reduction="none", backend="triton")
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-5)
