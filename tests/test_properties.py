"""Property test: random shapes, labels and hyper-parameters, fused kernels against the float64 reference."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import circleloss_ext as cl
from helpers import check_against_reference, device_for


@pytest.mark.parametrize("backend", ["triton", "cpu"])
@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 40), N=st.integers(1, 70), D=st.integers(2, 40), num_labels=st.integers(1, 8),
       class_level=st.booleans(), reference_set=st.booleans(), detach_alpha=st.booleans(),
       reduction=st.sampled_from(["none", "sum", "mean"]), m=st.floats(0.0, 0.5), gamma=st.floats(1.0, 300.0),
       seed=st.integers(0, 2**31 - 1))
def test_matches_reference(backend, B, N, D, num_labels, class_level, reference_set, detach_alpha, reduction, m,
                           gamma, seed):
    gen = torch.Generator().manual_seed(seed)
    device = device_for(backend)
    emb = torch.randn(B, D, generator=gen).to(device)
    keys = torch.randn(N, D, generator=gen).to(device)
    options = dict(m=m, gamma=gamma, detach_alpha=detach_alpha, reduction=reduction)
    if class_level:
        labels = torch.randint(-1, N, (B,), generator=gen).to(device)  # -1: ignored rows

        def loss(e, w, lab, **kw):
            return cl.circle_loss(e, w, lab, ignore_index=-1, **kw)

        check_against_reference(loss, (emb, keys, labels), backend, **options)
    elif reference_set:
        labels = torch.randint(0, num_labels, (B,), generator=gen).to(device)
        key_labels = torch.randint(0, num_labels, (N,), generator=gen).to(device)

        def loss(e, lab, r, rlab, **kw):
            return cl.pairwise_circle_loss(e, lab, ref_embeddings=r, ref_labels=rlab, **kw)

        check_against_reference(loss, (emb, labels, keys, key_labels), backend, **options)
    else:
        labels = torch.randint(0, num_labels, (B,), generator=gen).to(device)
        check_against_reference(cl.pairwise_circle_loss, (emb, labels), backend, **options)
