"""Test setup: the Triton kernels run compiled on a CUDA GPU when there is one, and under the
Triton interpreter on the CPU otherwise (TRITON_INTERPRET must be set before triton is imported)."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

# triton.jit reads TRITON_INTERPRET when a kernel is defined: define them now, before any test changes it.
import circleloss_ext.kernels  # noqa: E402,F401


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=["triton", "cpu"])
def fused(request):
    """Each fused backend: the Triton kernels and the C++ CPU path."""
    return request.param
