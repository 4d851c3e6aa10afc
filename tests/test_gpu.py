"""The GPU tier: the compiled Triton kernels with the GPU presets (what the interpreter cannot show:
compiled bf16 products, int32 address overflow, the tile sizes of sm_80 / sm_90). Run by
benchmarks/gpu_check.sh on a lent H100 or H200; on a machine without CUDA every test here is
skipped, with this reason shown.

Shapes cross every tile and split boundary of the GPU presets (128-row and 128-key tiles, D chunks
of 32 or 64, D not a multiple of 16), every dtype and label form; one case has C·D > 2^31; two runs
must give the same bits. Kernel variants are few on purpose: each compiles once (seconds each).
"""
import pytest
import torch

import circleloss_ext as cl
from helpers import assert_close_scaled, check_against_reference, make_inputs, run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="GPU tier: needs CUDA (benchmarks/gpu_check.sh runs it on a GPU)")


@pytest.mark.parametrize("dtype,B,C,D", [(torch.bfloat16, 1, 1000, 512), (torch.bfloat16, 129, 4099, 72),
                                         (torch.bfloat16, 300, 20_011, 130), (torch.float16, 129, 4099, 72),
                                         (torch.float32, 129, 4099, 72)])
def test_class_level_across_tiles(dtype, B, C, D):
    emb, weight, labels, _ = make_inputs(B, C, D, dtype=dtype)
    labels[::7] = -100
    check_against_reference(cl.circle_loss, (emb, weight, labels), "triton", dtype=dtype, reduction="sum")


@pytest.mark.parametrize("detach_alpha", [True, False])
def test_true_and_detached_derivative(detach_alpha):
    emb, weight, labels, _ = make_inputs(257, 3001, 96, dtype=torch.bfloat16)
    weight[labels[:40]] = emb[:40] * 1.5  # peaked positives at s = 1
    check_against_reference(cl.circle_loss, (emb, weight, labels), "triton", dtype=torch.bfloat16, m=-0.1,
                            gamma=256.0, detach_alpha=detach_alpha)
    # pair-wise tiles hold both kinds (unsorted, under 512 rows); α clipped on many pairs of both kinds,
    # where the true derivative's slope must be exactly 0 (compiled code once gave ~1e28 there)
    emb, _, labels, _ = make_inputs(300, 1, 72, dtype=torch.bfloat16, num_labels=20)
    check_against_reference(cl.pairwise_circle_loss, (emb, labels), "triton", dtype=torch.bfloat16, m=0.25,
                            detach_alpha=detach_alpha)
    # per-row upstream gradients of both signs and 0 (the true derivative carries the sign on v and the
    # magnitude in the exponent), and a negative margin, whose tiles compare positives too
    upstream = torch.randn(300, generator=torch.Generator().manual_seed(5))
    upstream[::7] = 0.0
    check_against_reference(cl.pairwise_circle_loss, (emb, labels), "triton", dtype=torch.bfloat16, m=-0.1,
                            detach_alpha=detach_alpha, reduction="none", upstream=upstream)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_pairwise_forms_across_tiles(dtype):
    emb, ref, labels, ref_labels = make_inputs(263, 2049, 80, dtype=dtype, num_labels=37)
    check_against_reference(cl.pairwise_circle_loss, (emb, labels), "triton", dtype=dtype)

    def against_memory(e, lab, r, rlab, **kw):
        return cl.pairwise_circle_loss(e, lab, ref_embeddings=r, ref_labels=rlab, **kw)

    check_against_reference(against_memory, (emb, labels, ref, ref_labels), "triton", dtype=dtype)


@pytest.mark.parametrize("detach_alpha", [True, False])
def test_sorted_by_label_from_512_rows(detach_alpha):
    """From 512 rows the launchers sort by label (kernels/label_order.py) and run negatives-only and mixed
    tiles apart, with the class-level presets (128 × 256 forward, 64 × 128 backward tiles) beside the
    pair-wise ones: class-level, in batch and against a reference set, results in the callers' order."""
    emb, weight, labels, _ = make_inputs(700, 5003, 136, dtype=torch.bfloat16)
    labels[::11] = -100
    check_against_reference(cl.circle_loss, (emb, weight, labels), "triton", dtype=torch.bfloat16,
                            detach_alpha=detach_alpha, reduction="sum")
    emb, ref, labels, ref_labels = make_inputs(900, 3001, 72, dtype=torch.bfloat16, num_labels=150)
    check_against_reference(cl.pairwise_circle_loss, (emb, labels), "triton", dtype=torch.bfloat16,
                            detach_alpha=detach_alpha)

    def against_memory(e, lab, r, rlab, **kw):
        return cl.pairwise_circle_loss(e, lab, ref_embeddings=r, ref_labels=rlab, **kw)

    check_against_reference(against_memory, (emb, labels, ref, ref_labels), "triton", dtype=torch.bfloat16,
                            detach_alpha=detach_alpha)


@pytest.mark.parametrize("transposed", [False, True], ids=["row-major", "transposed"])
def test_class_matrix_beyond_int32_offsets(transposed):
    """C·D > 2^31 elements: row offsets (C · D) and, for a transposed W, D offsets (d · C) pass int32."""
    B, C, D = 4, 4_300_000, 512
    gen = torch.Generator(device="cuda").manual_seed(0)
    emb = torch.randn(B, D, device="cuda", generator=gen, dtype=torch.bfloat16)
    if transposed:
        weight = torch.randn(D, C, device="cuda", generator=gen, dtype=torch.bfloat16).t()
    else:
        weight = torch.randn(C, D, device="cuda", generator=gen, dtype=torch.bfloat16)
    labels = torch.tensor([0, C // 2, C - 2, C - 1], device="cuda")
    weight[labels[1]] = emb[1] * 2.0
    emb.requires_grad_(), weight.requires_grad_()
    loss = cl.circle_loss(emb, weight, labels, backend="triton", reduction="sum")
    g_emb, g_weight = torch.autograd.grad(loss, (emb, weight))
    e32, w32 = emb.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    expected = cl.circle_loss(e32, w32, labels, backend="reference", reduction="sum")
    r_emb, r_weight = torch.autograd.grad(expected, (e32, w32))
    torch.testing.assert_close(loss.float(), expected, rtol=1e-2, atol=1e-2)
    assert_close_scaled(g_emb, r_emb.double(), 4e-2)
    for rows in (labels, torch.arange(C - 1000, C, device="cuda"), torch.arange(0, 1000, device="cuda")):
        assert_close_scaled(g_weight[rows], r_weight[rows].double(), 4e-2)


@pytest.mark.parametrize("form", ["class", "batch"])
def test_same_bits_twice(form):
    if form == "class":
        emb, weight, labels, _ = make_inputs(1000, 50_000, 256, dtype=torch.bfloat16)
        args, fn = (emb, weight, labels), cl.circle_loss
    else:
        emb, _, labels, _ = make_inputs(4096, 1, 128, dtype=torch.bfloat16, num_labels=500)
        args, fn = (emb, labels), cl.pairwise_circle_loss
    first, second = run(fn, args, backend="triton"), run(fn, args, backend="triton")
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(a, b) for a, b in zip(first[1], second[1]))


@pytest.mark.parametrize("D", [130, 128])  # rows of 260 / 256 bytes: pointers / tensor descriptors on sm_90
def test_backward_in_chunks(D):
    """A workspace cap of 1024 keys a chunk (20 chunks): key gradients are the same bits as one chunk
    (chunks start on tile boundaries, rows split by the whole problem), query gradients differ only by
    summation order."""
    emb, weight, labels, _ = make_inputs(300, 20_011, D, dtype=torch.bfloat16)
    whole = run(cl.circle_loss, (emb, weight, labels), backend="triton")
    before = cl.workspace_limit()
    cl.set_workspace_limit(300 * 1024 * 2)
    try:
        chunked = run(cl.circle_loss, (emb, weight, labels), backend="triton")
    finally:
        cl.set_workspace_limit(before)
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1][1], chunked[1][1])
    assert_close_scaled(chunked[1][0], whole[1][0].double(), 1e-2)


@pytest.mark.parametrize("precision", ["highest", "high", "medium"])
def test_fp32_follows_the_matmul_precision(precision):
    """fp32 inputs: "highest" and "high" use 3xTF32 (fp32 accuracy), "medium" one TF32 product, whose error
    of ~1e-3 in s γ amplifies into gradients percents off (measured 15% at γ = 256, kernels/presets.py).
    The measured errors are printed (gpu_check.sh shows them)."""
    emb, weight, labels, _ = make_inputs(129, 4099, 72)
    ref_loss, ref_grads = run(cl.circle_loss, (emb.double(), weight.double(), labels), backend="reference")
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        loss, grads = run(cl.circle_loss, (emb, weight, labels), backend="triton")
    finally:
        torch.set_float32_matmul_precision(before)
    errors = [(loss.double() - ref_loss).abs().item() / ref_loss.abs().item()] + \
        [((g.double() - r).abs().max() / r.abs().max()).item() for g, r in zip(grads, ref_grads)]
    print(f"fp32, matmul precision {precision!r}: relative error of the loss {errors[0]:.1e}, "
          f"embedding gradient {errors[1]:.1e}, weight gradient {errors[2]:.1e}")
    if precision == "medium":
        assert errors[0] <= 1e-3 and all(e < 1.0 for e in errors)
    else:
        assert max(errors) <= 2e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_accuracy_and_label_smoothing_compiled(dtype):
    """The TRACK_TOP1, NEGATIVE_SUM and LABEL_SMOOTHING variants, compiled, across the presets' tiles."""
    emb, weight, labels, _ = make_inputs(300, 20_011, 130, dtype=dtype)
    weight[labels[:150]] = emb[:150] * 2.0
    check_against_reference(cl.circle_loss, (emb, weight, labels), "triton", dtype=dtype, label_smoothing=0.1)
    _, accuracy = cl.circle_loss(emb, weight, labels, backend="triton", with_accuracy=True)
    cosines = torch.nn.functional.normalize(emb.double()) @ torch.nn.functional.normalize(weight.double()).T
    expected = (cosines.argmax(dim=1) == labels).double().mean().item()
    assert 0.3 < expected < 0.9 and abs(accuracy.item() - expected) <= 3 / 300  # a near-tie may flip a row
    pair_labels = labels % 40
    _, pair_accuracy = cl.pairwise_circle_loss(emb, pair_labels, backend="triton", with_accuracy=True)
    pair_cosines = torch.nn.functional.normalize(emb.double()) @ torch.nn.functional.normalize(emb.double()).T
    pair_cosines.fill_diagonal_(float("-inf"))
    nearest = pair_labels[pair_cosines.argmax(dim=1)] == pair_labels
    same = (pair_labels[:, None] == pair_labels[None, :]).sum(dim=1) > 1
    assert abs(pair_accuracy.item() - (nearest & same).double().sum().item() / same.sum().item()) <= 3 / 300
