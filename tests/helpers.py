"""Shared test utilities: inputs, the float64 oracle, and tolerances per dtype."""
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (loss rtol, gradient tolerance relative to the largest reference gradient entry)
TOLERANCES = {
    torch.float32: (2e-5, 2e-4),
    torch.float16: (2e-3, 2e-2),
    torch.bfloat16: (1e-2, 4e-2),
}


def device_for(backend):
    """The C++ path takes CPU tensors; the Triton kernels CUDA ones (CPU ones under the interpreter)."""
    return "cpu" if backend == "cpu" else DEVICE


def make_inputs(B, N, D, dtype=torch.float32, num_labels=None, device=DEVICE):
    """Random non-zero embeddings (B, D), keys (N, D) and labels: class labels in [0, N) when
    num_labels is None, else pair-wise labels in [0, num_labels) for both sides."""
    emb = torch.randn(B, D, device=device).to(dtype)
    keys = (torch.randn(N, D, device=device) * 3).to(dtype)
    high = N if num_labels is None else num_labels
    labels = torch.randint(0, high, (B,), device=device)
    key_labels = torch.randint(0, high, (N,), device=device)
    return emb, keys, labels, key_labels


def run(fn, tensors, upstream=None, **kwargs):
    """Loss and gradients (None where not required) of fn(*tensors, **kwargs) reduced to a scalar: the
    sum of the loss times upstream (by default a non-uniform positive one, for reduction="none")."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) if isinstance(t, torch.Tensor) else t
              for t in tensors]
    loss = fn(*leaves, **kwargs)
    if upstream is None:
        upstream = torch.linspace(0.5, 1.5, loss.numel())
    (loss * upstream.to(loss.device, loss.dtype).reshape(loss.shape)).sum().backward()
    return loss.detach(), [t.grad for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()]


def to64(t):
    return t.detach().double() if t.is_floating_point() else t


def check_against_reference(fn, tensors, backend, dtype=torch.float32, grad_atol=0.0, upstream=None, **kwargs):
    """fn(..., backend=backend) against fn(..., backend="reference") in float64 on the same
    (dtype-rounded) inputs: loss and every gradient of the loss times upstream (run) (within the dtype's
    tolerance relative to the largest reference entry, plus grad_atol). Returns the fused backend's loss."""
    loss, grads = run(fn, tensors, upstream, backend=backend, **kwargs)
    ref_loss, ref_grads = run(fn, [to64(t) for t in tensors], upstream, backend="reference", **kwargs)
    loss_tol, grad_tol = TOLERANCES[dtype]
    assert loss.dtype == dtype
    torch.testing.assert_close(loss.double(), ref_loss, rtol=loss_tol, atol=loss_tol)
    for g, ref in zip(grads, ref_grads):
        assert g.dtype == dtype and g.shape == ref.shape
        assert_close_scaled(g, ref, grad_tol, grad_atol)
    return loss


def assert_close_scaled(actual, expected, tol, atol=0.0):
    """max |actual - expected| <= tol * max |expected| + atol (gradients of cosine losses span many
    scales; atol covers inputs whose true gradient cancels to nearly 0, where float32 leaves noise)."""
    scale = expected.abs().max().item()
    err = (actual.double() - expected).abs().max().item()
    assert torch.isfinite(actual).all(), "non-finite values"
    assert err <= tol * max(scale, 1e-12) + atol, f"max error {err:.3e} > {tol} * {scale:.3e} + {atol:.1e}"
