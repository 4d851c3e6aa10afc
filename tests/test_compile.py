"""torch.compile(fullgraph=True) through the custom ops: no graph break, same loss and gradients."""
import pytest
import torch

import circleloss_ext as cl
from helpers import assert_close_scaled, device_for


class FaceModel(torch.nn.Module):
    def __init__(self, backend):
        super().__init__()
        self.backbone = torch.nn.Linear(10, 8)
        self.loss = cl.CircleLoss(30, 8, gamma=64.0, backend=backend)
        self.pair_loss = cl.PairwiseCircleLoss(backend=backend)

    def forward(self, x, labels):
        emb = self.backbone(x)
        return self.loss(emb, labels) + self.pair_loss(emb, labels % 4)


@pytest.mark.parametrize("backend", ["triton", "cpu", "reference"])
def test_fullgraph_compile(backend):
    torch._dynamo.reset()
    device = device_for(backend)
    model = FaceModel(backend).to(device)
    x = torch.randn(13, 10, device=device)
    labels = torch.randint(0, 30, (13,), device=device)
    eager = model(x, labels)
    eager_grads = torch.autograd.grad(eager, list(model.parameters()))
    compiled = torch.compile(model, fullgraph=True)
    loss = compiled(x, labels)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-5)
    for g, e in zip(grads, eager_grads):
        assert_close_scaled(g, e.double(), 1e-4)


@pytest.mark.parametrize("track_top1,smooth_neg", [(False, 0.0), (True, 0.01)])
def test_fake_tensor_shapes(fused, track_top1, smooth_neg):
    """The fake implementations give the shapes and dtypes the real ops return."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    device = device_for(fused)
    emb = torch.randn(5, 6, dtype=torch.bfloat16, device=device)
    weight = torch.randn(9, 6, dtype=torch.bfloat16, device=device)
    labels = torch.randint(0, 9, (5,), device=device)
    real = torch.ops.circleloss_ext.fused_forward(emb, weight, labels, None, 0.25, 256.0, False, None, track_top1,
                                                  0.1, smooth_neg, fused)
    with FakeTensorMode() as mode:
        fake = torch.ops.circleloss_ext.fused_forward(mode.from_tensor(emb), mode.from_tensor(weight),
                                                      mode.from_tensor(labels), None, 0.25, 256.0, False, None,
                                                      track_top1, 0.1, smooth_neg, fused)
    assert [(t.shape, t.dtype) for t in fake] == [(t.shape, t.dtype) for t in real]
