"""Cases a hostile user finds: each gave a silent wrong number or a crash once (issue 11).

Every fused backend must agree with the float64 reference wherever an input is accepted, and refuse
clearly where it is not.
"""
import pytest
import torch

import circleloss_ext as cl
from circleloss_ext import CircleLossFunction
from helpers import assert_close_scaled, check_against_reference, device_for, make_inputs, run


# 1. The true derivative where α is clipped -------------------------------------------------------

@pytest.mark.parametrize("m", [-0.2, -0.05, 0.0, 0.3, 1.2])
def test_true_derivative_where_alpha_is_clipped(m, fused):
    """With m < 0 a positive with s > 1 + m has α^p = 0: its logit is 0 whatever s, so its slope is 0
    (not -2γ(1 - s)). With m > 1 negatives are never clipped. Peaked rows put s on both sides."""
    emb, weight, labels, _ = make_inputs(14, 23, 9, device=device_for(fused))
    weight[labels[:7]] = emb[:7] * 1.7  # s = 1 > 1 + m
    weight[labels[7:11]] = emb[7:11] * 0.6 + 0.2 * torch.randn(4, 9, device=emb.device)  # s near 1
    check_against_reference(cl.circle_loss, (emb, weight, labels), fused, m=m, gamma=64.0, detach_alpha=False,
                            reduction="sum")
    pair_labels = labels % 3
    check_against_reference(cl.pairwise_circle_loss, (torch.cat([emb[:7], weight[labels[:7]]]),
                                                      torch.cat([pair_labels[:7], pair_labels[:7]])),
                            fused, m=m, gamma=64.0, detach_alpha=False)


@pytest.mark.parametrize("detach_alpha", [True, False])
def test_upstream_gradients_of_every_sign(detach_alpha, fused):
    """reduction="none" under an upstream gradient that is negative on some rows, 0 on others: the true
    derivative carries each row's sign on v and its magnitude in the exponent (tile.circle_row_terms),
    so rows of either sign and rows whose gradient is 0 must match the reference (label smoothing too,
    whose constants come in that magnitude's unit)."""
    emb, weight, labels, _ = make_inputs(23, 37, 9, device=device_for(fused))
    upstream = torch.randn(23, generator=torch.Generator().manual_seed(3))
    upstream[::5] = 0.0
    assert (upstream < 0).any() and (upstream > 0).any()
    for smoothing in (0.0, 0.1):
        check_against_reference(cl.circle_loss, (emb, weight, labels), fused, upstream=upstream, m=0.25, gamma=64.0,
                                detach_alpha=detach_alpha, reduction="none", label_smoothing=smoothing)
    check_against_reference(cl.pairwise_circle_loss, (emb, labels % 4), fused, upstream=upstream, m=-0.1,
                            gamma=64.0, detach_alpha=detach_alpha, reduction="none")


def test_true_derivative_with_negative_margin_is_a_gradient():
    """The reference is gradchecked at m < 0 with positives beyond 1 + m (float64, finite differences)."""
    emb, weight, labels, _ = make_inputs(4, 6, 3, dtype=torch.float64, device="cpu")
    weight[labels[:2]] = emb[:2] * 2.0 + 0.01
    emb.requires_grad_(), weight.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda e, w: cl.circle_loss(e, w, labels, m=-0.2, gamma=8.0, detach_alpha=False, reduction="sum"),
        (emb, weight))


# 2. Labels of any layout -------------------------------------------------------------------------

def _label_layouts(labels):
    """The same label values as a column slice, a step slice and (when constant) an expansion."""
    B = labels.shape[0]
    column = torch.stack([labels, labels.flip(0) + 7], dim=1)[:, 0]
    stepped = torch.stack([labels, labels * 0 - 3], dim=1).reshape(-1)[::2]
    assert column.stride() == (2,) and stepped.stride() == (2,)
    return {"column": column, "stepped": stepped}, labels[:1].expand(B)


def test_class_labels_of_any_layout(fused):
    emb, weight, labels, _ = make_inputs(19, 40, 7, device=device_for(fused))
    layouts, expanded = _label_layouts(labels)
    for name, view in layouts.items():
        assert torch.equal(view, labels)
        assert torch.equal(cl.circle_loss(emb, weight, view, reduction="none", backend=fused),
                           cl.circle_loss(emb, weight, labels, reduction="none", backend=fused)), name
    assert expanded.stride() == (0,)
    torch.testing.assert_close(cl.circle_loss(emb, weight, expanded, reduction="none", backend=fused),
                               cl.circle_loss(emb, weight, expanded.contiguous(), reduction="none", backend=fused),
                               rtol=0, atol=0)
    check_against_reference(lambda e, w, **kw: cl.circle_loss(e, w, expanded, **kw), (emb, weight), fused)


def test_pairwise_labels_of_any_layout(fused):
    emb, ref, labels, ref_labels = make_inputs(17, 300, 6, num_labels=4, device=device_for(fused))
    layouts, _ = _label_layouts(labels)
    ref_layouts, _ = _label_layouts(ref_labels)
    expected = cl.pairwise_circle_loss(emb, labels, ref_embeddings=ref, ref_labels=ref_labels, reduction="none",
                                       backend=fused)
    for name in layouts:
        got = cl.pairwise_circle_loss(emb, layouts[name], ref_embeddings=ref, ref_labels=ref_layouts[name],
                                      reduction="none", backend=fused)
        assert torch.equal(got, expected), name
        assert torch.equal(cl.pairwise_circle_loss(emb, layouts[name], reduction="none", backend=fused),
                           cl.pairwise_circle_loss(emb, labels, reduction="none", backend=fused)), name
    # an expanded reference label tensor: one class for the whole memory (stride 0, one element of storage)
    one_class = ref_labels[:1].expand(300)
    assert one_class.untyped_storage().nbytes() >= 8 and one_class.stride() == (0,)
    check_against_reference(
        lambda e, lab, r, **kw: cl.pairwise_circle_loss(e, lab, ref_embeddings=r, ref_labels=one_class, **kw),
        (emb, labels, ref), fused)


# 3. CircleLossFunction and the C++ entry points validate ------------------------------------------

def _function_args(device, **changes):
    emb, weight, labels, key_labels = make_inputs(6, 10, 4, device=device)
    args = dict(queries=emb, keys=weight, query_labels=labels, key_labels=None, margin=0.25, gamma=64.0,
                detach_alpha=True)
    args.update(changes)
    return args


BAD_FUNCTION_CALLS = [
    (dict(query_labels=torch.zeros(5, dtype=torch.int64)), r"query_labels must have shape \(6,\)"),
    (dict(key_labels=torch.zeros(9, dtype=torch.int64)), r"key_labels must have shape \(10,\)"),
    (dict(keys=torch.randn(10, 5)), "keys must have D = 4"),
    (dict(queries=torch.randn(6)), "queries must be 2-D"),
    (dict(query_labels=torch.tensor([0, 1, 2, 3, 4, 10])), r"query_labels must be < N = 10"),
    (dict(gamma=0.0), "gamma must be a finite number > 0"),
    (dict(gamma=-3.0), "gamma must be a finite number > 0"),
    (dict(margin=float("nan")), "m must be a finite number"),
    (dict(keys=torch.randn(10, 4).double()), "keys has dtype"),
    (dict(queries=torch.randn(6, 4).double(), keys=torch.randn(10, 4).double()),
     "queries must be float16, bfloat16 or float32"),
    (dict(query_labels=torch.zeros(6)), "query_labels must have dtype"),
    (dict(keys=None, key_labels=torch.zeros(6, dtype=torch.int64)), "key_labels must be None when keys is None"),
    (dict(detach_alpha="yes"), "detach_alpha must be a bool"),
]


@pytest.mark.parametrize("changes,message", BAD_FUNCTION_CALLS, ids=[m for _, m in BAD_FUNCTION_CALLS])
def test_circle_loss_function_validates(changes, message, fused):
    device = device_for(fused)
    args = _function_args(device, **{k: v.to(device) if isinstance(v, torch.Tensor) else v
                                     for k, v in changes.items()})
    with pytest.raises((ValueError, TypeError), match=message):
        CircleLossFunction.apply(*args.values(), fused)


def test_circle_loss_function_backend_names():
    args = _function_args("cpu")
    with pytest.raises(ValueError, match=r"backend must be 'triton' or 'cpu'"):
        CircleLossFunction.apply(*args.values(), "reference")


def test_circle_loss_function_accepts_what_it_documents(fused):
    """Negative class labels are no class (no positive, no loss); keys None is the batch itself."""
    args = _function_args(device_for(fused))
    args["query_labels"] = args["query_labels"].clone()
    args["query_labels"][0] = -1
    rows, has_loss = CircleLossFunction.apply(*args.values(), fused)
    assert rows[0] == 0 and not has_loss[0] and has_loss[1:].all()
    args.update(keys=None, query_labels=args["query_labels"] % 2)
    rows, has_loss = CircleLossFunction.apply(*args.values(), fused)
    expected = cl.pairwise_circle_loss(args["queries"], args["query_labels"], m=0.25, gamma=64.0, reduction="none",
                                       backend="reference")
    torch.testing.assert_close(rows, expected, rtol=1e-5, atol=1e-5)


def test_cpu_extension_checks_sizes_itself():
    """The C++ entry points are reachable without the Python checks: they refuse what would read out of bounds."""
    from circleloss_ext import _C
    keys = torch.randn(300_000, 2)
    queries = torch.randn(3, 2)
    labels = torch.zeros(3, dtype=torch.int64)
    inv_q, inv_k = _C.inverse_norms(queries), _C.inverse_norms(keys)
    with pytest.raises(RuntimeError, match=r"key_labels must have 300000 elements"):
        _C.circle_forward(queries, keys, labels, labels, inv_q, inv_k, 0.25, 64.0, None, False, False)
    with pytest.raises(RuntimeError, match=r"query_labels must have 3 elements"):
        _C.circle_forward(queries, keys, labels[:1], None, inv_q, inv_k, 0.25, 64.0, None, False, False)
    with pytest.raises(RuntimeError, match=r"inv_norm_k must have 300000 elements"):
        _C.circle_forward(queries, keys, labels, None, inv_q, inv_k[:5], 0.25, 64.0, None, False, False)
    with pytest.raises(RuntimeError, match=r"keys must have D = 2"):
        _C.circle_forward(queries, torch.randn(10, 3), labels, None, inv_q, inv_k[:10], 0.25, 64.0, None, False,
                          False)
    with pytest.raises(RuntimeError, match=r"query_labels must be int64"):
        _C.circle_forward(queries, keys, labels.int(), None, inv_q, inv_k, 0.25, 64.0, None, False, False)
    lse = torch.zeros(3)
    with pytest.raises(RuntimeError, match=r"grad_rows must have 3 elements"):
        _C.circle_backward(lse[:2], queries, keys, labels, None, inv_q, inv_k, lse, lse, 0.25, 64.0, None, True,
                           True, True, 0.0, 0.0)
    with pytest.raises(RuntimeError, match=r"lse_neg must have 3 elements"):
        _C.circle_backward(lse, queries, keys, labels, None, inv_q, inv_k, lse, lse[:1], 0.25, 64.0, None, True,
                           True, True, 0.0, 0.0)
    with pytest.raises(RuntimeError, match=r"excluded_keys must have 3 elements"):
        _C.circle_forward(queries, keys, labels, None, inv_q, inv_k, 0.25, 64.0, labels[:1], False, False)


# 4. 16-bit reductions ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_reductions_sum_in_float32(dtype, fused):
    """Rows that fit fp16 (a few thousand each) whose sum does not: mean and sum are formed in float32."""
    emb, weight, labels, _ = make_inputs(64, 30, 8, dtype=dtype, device=device_for(fused))
    weight[(labels + 1) % 30] = emb  # a negative at s = 1 in every row: row losses near γ(1 + m)(1 - m)
    rows = cl.circle_loss(emb, weight, labels, gamma=3000.0, reduction="none", backend=fused)
    assert torch.isfinite(rows).all() and rows.float().sum() > 65504 and rows.min() > 1000
    mean = cl.circle_loss(emb, weight, labels, gamma=3000.0, backend=fused)
    assert mean.dtype == dtype and torch.isfinite(mean)
    torch.testing.assert_close(mean.float(), rows.float().mean(), rtol=4e-3, atol=0)
    total = cl.circle_loss(emb, weight, labels, gamma=3000.0, reduction="sum", backend=fused)
    assert total.dtype == dtype
    torch.testing.assert_close(total.float(), rows.float().sum().to(dtype).float(), rtol=0, atol=0)


# 5. Rows that take no part -----------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["triton", "cpu", "reference"])
def test_nan_in_an_ignored_row_stays_out(backend):
    """An ignored row takes no part, whatever its values: finite loss, no gradient to it, and its NaN
    reaches neither the class matrix's gradient nor the other rows (as F.cross_entropy's loss)."""
    emb, weight, labels, _ = make_inputs(11, 17, 6, device=device_for(backend))
    labels[[2, 5]] = -100
    clean_emb = emb.clone()
    emb[2, 0] = float("nan")
    emb[5] = float("inf")
    for reduction in ("mean", "sum", "none"):
        loss, (g_emb, g_weight) = run(cl.circle_loss, (emb, weight, labels), backend=backend, reduction=reduction)
        expected, (e_emb, e_weight) = run(cl.circle_loss, (clean_emb.double(), weight.double(), labels),
                                          backend="reference", reduction=reduction)
        assert torch.isfinite(loss).all() and torch.isfinite(g_emb).all() and torch.isfinite(g_weight).all()
        torch.testing.assert_close(loss.double(), expected, rtol=2e-5, atol=2e-5)
        assert (g_emb[[2, 5]] == 0).all()
        assert_close_scaled(g_emb, e_emb, 2e-4)
        assert_close_scaled(g_weight, e_weight, 2e-4)
    # pair-wise against a memory: a query row without a positive there takes no part either
    ref, ref_labels = weight, torch.arange(17, device=emb.device) % 4
    pair_labels = torch.where(labels < 0, 9, labels % 4)
    loss = cl.pairwise_circle_loss(emb, pair_labels, ref_embeddings=ref, ref_labels=ref_labels, backend=backend)
    expected = cl.pairwise_circle_loss(clean_emb, pair_labels, ref_embeddings=ref, ref_labels=ref_labels,
                                       backend="reference")
    torch.testing.assert_close(loss, expected, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("backend", ["triton", "cpu", "reference"])
def test_nan_in_a_row_that_takes_part_still_propagates(backend):
    emb, weight, labels, _ = make_inputs(11, 17, 6, device=device_for(backend))
    labels[2] = -100
    emb[3, 1] = float("nan")
    emb.requires_grad_()
    rows = cl.circle_loss(emb, weight, labels, reduction="none", backend=backend)
    assert torch.isnan(rows[3]) and rows[2] == 0
    assert torch.isnan(cl.circle_loss(emb, weight, labels, backend=backend))
    # in the batch a row is also every other row's key: its NaN reaches them
    pair_rows = cl.pairwise_circle_loss(emb, labels % 3, reduction="none", backend=backend)
    assert torch.isnan(pair_rows).all()


# 6. The C++ path's bits do not depend on the thread count -----------------------------------------

@pytest.mark.parametrize("B,C,D", [(2, 5, 100_000), (1, 3, 300_000), (8, 3, 20_000), (33, 700, 257)],
                         ids=["small-C-large-D", "one-row", "few-keys", "several-splits"])
def test_cpu_results_do_not_depend_on_thread_count(B, C, D):
    """Each reduction stressed: products with a long inner dimension (one split), row norms over long
    rows, the combination of several splits."""
    emb, weight, labels, _ = make_inputs(B, C, D, device="cpu")
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            for fn, args in ((cl.circle_loss, (emb, weight, labels)), (cl.pairwise_circle_loss, (emb, labels % 2))):
                results.append((count, fn.__name__, run(fn, args, backend="cpu", detach_alpha=False)))
    finally:
        torch.set_num_threads(threads)
    for count, name, (loss, grads) in results[2:]:
        _, _, (loss_1, grads_1) = results[0 if name == "circle_loss" else 1]
        assert torch.equal(loss, loss_1), (count, name)
        assert all(torch.equal(a, b) for a, b in zip(grads, grads_1)), (count, name)


def test_custom_ops_check_the_sizes_they_index(fused):
    """torch.ops.circleloss_ext.* are reachable too: sizes are checked before any kernel reads."""
    device = device_for(fused)
    emb, weight, labels, _ = make_inputs(6, 10, 4, device=device)
    short = labels[:3]
    with pytest.raises(ValueError, match=r"query_labels must have shape \(6,\)"):
        torch.ops.circleloss_ext.fused_forward(emb, weight, short, None, 0.25, 64.0, False, None, False, 0.0, 0.0, fused)
    with pytest.raises(ValueError, match=r"key_labels must have shape \(10,\)"):
        torch.ops.circleloss_ext.fused_forward(emb, weight, labels, short, 0.25, 64.0, False, None, False, 0.0, 0.0, fused)
    with pytest.raises(ValueError, match="must share D"):
        torch.ops.circleloss_ext.fused_forward(emb, weight[:, :3], labels, None, 0.25, 64.0, False, None, False, 0.0,
                                               0.0, fused)
    # excluded keys belong to pair-wise reference sets: class-level keys would get them honoured by one
    # backend and not by another
    with pytest.raises(ValueError, match="class-level keys .key_labels None. have none"):
        torch.ops.circleloss_ext.fused_forward(emb, weight, labels, None, 0.25, 64.0, False, labels.clone(), False,
                                               0.0, 0.0, fused)
    rows, lse_pos, lse_neg, inv_q, inv_k, *_ = torch.ops.circleloss_ext.fused_forward(
        emb, weight, labels, None, 0.25, 64.0, False, None, False, 0.0, 0.0, fused)
    with pytest.raises(ValueError, match=r"lse_neg must have shape \(6,\)"):
        torch.ops.circleloss_ext.fused_backward(rows, emb, weight, labels, None, inv_q, inv_k, lse_pos, lse_neg[:2],
                                                0.25, 64.0, False, None, True, True, True, 0.0, 0.0, fused)
    with pytest.raises(ValueError, match=r"inv_norm_k must have shape \(10,\)"):
        torch.ops.circleloss_ext.fused_backward(rows, emb, weight, labels, None, inv_q, inv_k[:4], lse_pos, lse_neg,
                                                0.25, 64.0, False, None, True, True, True, 0.0, 0.0, fused)


# GPU presets: chosen by capability and shared memory; tile logic of the sm_90 presets on the CPU -------

def test_preset_families():
    from circleloss_ext.kernels.presets import arch_family
    assert arch_family(9, 227 * 1024) == "sm90" and arch_family(10, 227 * 1024) == "sm90"
    assert arch_family(8, 163 * 1024) == "sm80"
    assert arch_family(12, 99 * 1024) == "sm80"  # consumer Blackwell: the sm_90 tiles would not fit
    with pytest.raises(RuntimeError, match="compute capability 8.0 or newer"):
        arch_family(7, 96 * 1024)


@pytest.mark.parametrize("D,sort", [(70, False), (72, False), (72, True), (300, False)])  # rows of 140 / 144
# bytes in bf16: pointers / tensor descriptors; sorted by label (label_order.py), as from 512 rows; D = 300:
# grad_keys' second 256-wide accumulator, partly past D (fp32: several groups, the product finished apart)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_sm90_presets_under_the_interpreter(dtype, D, sort, monkeypatch):
    """The interpreter runs the H100 tiles (16 bits: forward 128 × 256 × 64 and 128 × 256 × 128,
    grad_similarity 64 × 128 × 256, grad_keys 64 keys × two 256-wide halves) on a case that crosses their row, key and D
    boundaries, through both operand paths and, sorted, with negatives-only and mixed tiles of different
    widths side by side, so their masking is checked without a GPU."""
    from circleloss_ext.kernels import label_order, presets
    monkeypatch.setattr(presets, "_INTERPRETER", presets.PRESETS[("sm90", presets.operand_width(dtype))])
    if sort:
        monkeypatch.setattr(label_order, "SORT_MIN_ROWS", 0)
    emb, weight, labels, _ = make_inputs(130, 261, D, dtype=dtype, device="cpu")
    check_against_reference(cl.circle_loss, (emb, weight, labels), "triton", dtype=dtype, reduction="sum",
                            detach_alpha=False)
    check_against_reference(cl.pairwise_circle_loss, (emb, labels % 5), "triton", dtype=dtype)


@pytest.mark.parametrize("D", [72, 200, 264, 130, 600])  # tensor descriptors, D in one or two chunks of
# each preset's BLOCK_D (the second partly past D); streamed after all: pointers (rows of 260 bytes), more
# than two chunks
def test_resident_tiles_under_the_interpreter(D, monkeypatch):
    """The H100 presets with the tile held for a program's whole walk (grad_similarity's keys,
    RESIDENT_KEYS; the forward's rows, RESIDENT_ROWS), only the other side streamed: the same loss and
    gradients as the reference for class-level keys with either derivative and pair-wise labels sorted
    by label (negatives-only and mixed tiles), in bf16."""
    from circleloss_ext.kernels import label_order, presets
    table = dict(presets.PRESETS[("sm90", "16")])
    held = {"forward": "RESIDENT_ROWS", "forward_pairwise": "RESIDENT_ROWS", "grad_similarity": "RESIDENT_KEYS",
            "grad_similarity_full": "RESIDENT_KEYS", "grad_similarity_pairwise": "RESIDENT_KEYS",
            "grad_similarity_pairwise_full": "RESIDENT_KEYS"}
    for name, flag in held.items():
        table[name] = presets.LaunchConfig({**table[name].blocks, flag: True}, table[name].num_warps,
                                           table[name].num_stages)
    monkeypatch.setattr(presets, "_INTERPRETER", table)
    monkeypatch.setattr(label_order, "SORT_MIN_ROWS", 0)
    emb, weight, labels, _ = make_inputs(130, 261, D, dtype=torch.bfloat16, device="cpu")
    for detach_alpha in (True, False):
        check_against_reference(cl.circle_loss, (emb, weight, labels), "triton", dtype=torch.bfloat16,
                                reduction="sum", detach_alpha=detach_alpha)
    check_against_reference(cl.pairwise_circle_loss, (emb, labels % 5), "triton", dtype=torch.bfloat16,
                            detach_alpha=False)


@pytest.mark.parametrize("form", ["batch", "reference set"])
def test_pairwise_labels_past_int32(form, fused):
    """The Triton kernels compare pair-wise labels as dense int32 ids (tile.dense_labels): labels past
    2^31, negative ones and two that differ only in their high 32 bits keep exactly their pairs."""
    emb, ref, labels, ref_labels = make_inputs(29, 41, 20, num_labels=5, device=device_for(fused))
    spread = torch.tensor([-(2 ** 62), -1, 2 ** 31, 2 ** 40, 2 ** 40 + 2 ** 32], device=labels.device)
    labels, ref_labels = spread[labels], spread[ref_labels]
    if form == "batch":
        check_against_reference(cl.pairwise_circle_loss, (emb, labels), fused, reduction="none")
    else:
        def against(e, y, r, ry, **kw):
            return cl.pairwise_circle_loss(e, y, ref_embeddings=r, ref_labels=ry, **kw)
        check_against_reference(against, (emb, labels, ref, ref_labels), fused, reduction="none")


def test_dense_labels_keep_equality():
    from circleloss_ext.kernels.tile import dense_labels
    queries = torch.tensor([7, 2 ** 40, -3, 7, 2 ** 40 + 2 ** 32])
    keys = torch.tensor([2 ** 40 + 2 ** 32, 7, 9, 2 ** 40])
    dense_q, dense_k = dense_labels(queries, keys)
    assert dense_q.dtype == dense_k.dtype == torch.int32
    assert torch.equal(dense_q[:, None] == dense_k[None, :], queries[:, None] == keys[None, :])
    assert torch.equal(dense_q[:, None] == dense_q[None, :], queries[:, None] == queries[None, :])
    same, _ = dense_labels(queries, queries)  # in-batch: one tensor for both sides
    assert torch.equal(same[:, None] == same[None, :], queries[:, None] == queries[None, :])
