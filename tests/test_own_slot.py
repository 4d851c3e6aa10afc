"""ref_self_index: each row's own slot in a reference set (a cross-batch memory holding the current
batch) takes no part in that row's pairs; O(B), no B × N mask."""
import pytest
import torch

import circleloss_ext as cl
from helpers import check_against_reference, device_for, make_inputs, run


def with_memory(e, y, r, ry, slots, **kw):
    return cl.pairwise_circle_loss(e, y, ref_embeddings=r, ref_labels=ry, ref_self_index=slots, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_backends_leave_out_the_own_slot(fused, dtype):
    emb, ref, labels, ref_labels = make_inputs(37, 70, 16, num_labels=5, device=device_for(fused))
    slots = torch.randperm(70, device=emb.device)[:37]
    slots[::5] = -1  # rows without a slot in the memory
    ref[slots[slots >= 0]] = emb[slots >= 0] * 1.01  # the memory holds (almost) these rows
    ref_labels[slots[slots >= 0]] = labels[slots >= 0]
    check_against_reference(with_memory, (emb.to(dtype), labels, ref.to(dtype), ref_labels, slots), fused,
                            dtype=dtype, detach_alpha=False)


def test_the_reference_leaves_out_exactly_the_own_slot():
    """Against the same loss with the own slot's row removed from the memory, row by row."""
    emb, ref, labels, ref_labels = make_inputs(6, 15, 8, dtype=torch.float64, num_labels=3, device="cpu")
    slots = torch.tensor([3, -1, 0, 14, 7, 3])
    rows = with_memory(emb, labels, ref, ref_labels, slots, reduction="none", backend="reference")
    for i in range(6):
        keep = torch.arange(15) != slots[i]
        alone = cl.pairwise_circle_loss(emb[i:i + 1], labels[i:i + 1], ref_embeddings=ref[keep],
                                        ref_labels=ref_labels[keep], reduction="none", backend="reference")
        torch.testing.assert_close(rows[i:i + 1], alone)


def test_the_in_batch_form_is_the_own_slot_i(fused):
    emb, _, labels, _ = make_inputs(29, 1, 12, num_labels=4, device=device_for(fused))
    in_batch = run(cl.pairwise_circle_loss, (emb, labels), backend=fused)
    slots = torch.arange(29, device=emb.device)

    def as_memory(e, y, **kw):  # the batch is its own memory: gradients reach e through both sides
        return with_memory(e, y, e, y, slots, **kw)

    as_slots = run(as_memory, (emb, labels), backend=fused)
    torch.testing.assert_close(in_batch[0], as_slots[0])
    torch.testing.assert_close(in_batch[1][0], as_slots[1][0], rtol=1e-5, atol=1e-6)


def test_accuracy_skips_the_own_slot(fused):
    emb, ref, labels, ref_labels = make_inputs(20, 40, 8, num_labels=4, device=device_for(fused))
    slots = torch.arange(20, device=emb.device)
    ref[:20], ref_labels[:20] = emb, (labels + 1) % 4  # the own slot: the nearest key, of another label
    _, accuracy = with_memory(emb, labels, ref, ref_labels, slots, backend=fused, with_accuracy=True)
    _, expected = with_memory(emb.double().cpu(), labels.cpu(), ref.double().cpu(), ref_labels.cpu(), slots.cpu(),
                              backend="reference", with_accuracy=True)
    assert accuracy.item() == pytest.approx(expected.item())


def test_bad_slots_are_refused():
    emb, ref, labels, ref_labels = make_inputs(4, 6, 3, num_labels=2, device="cpu")
    with pytest.raises(ValueError, match="ref_self_index needs a reference set"):
        cl.pairwise_circle_loss(emb, labels, ref_self_index=torch.arange(4))
    with pytest.raises(ValueError, match=r"ref_self_index must lie in \[0, 6\)"):
        with_memory(emb, labels, ref, ref_labels, torch.tensor([0, 1, 6, -1]))
    with pytest.raises(ValueError, match="ref_self_index"):
        with_memory(emb, labels, ref, ref_labels, torch.tensor([0, 1]))
    with pytest.raises(TypeError):
        cl.pairwise_circle_loss(emb, labels, label_smoothing=0.1)  # class level only


@pytest.mark.parametrize("form", ["batch", "memory"])
def test_pairwise_ignore_index(fused, form):
    """Rows and keys labelled ignore_index take no part: the same loss and gradients as leaving them out."""
    emb, ref, labels, ref_labels = make_inputs(25, 40, 8, num_labels=4, device=device_for(fused))
    labels[[2, 9, 17]] = -1
    ref_labels[[0, 5, 6, 33]] = -1
    kept_rows = labels != -1
    if form == "batch":
        result = run(cl.pairwise_circle_loss, (emb, labels), backend=fused, ignore_index=-1, reduction="sum")
        expected = run(cl.pairwise_circle_loss, (emb[kept_rows], labels[kept_rows]), backend=fused, reduction="sum")
        torch.testing.assert_close(result[0], expected[0])
        torch.testing.assert_close(result[1][0][kept_rows], expected[1][0], rtol=1e-5, atol=1e-6)
        assert (result[1][0][~kept_rows] == 0).all()
    else:
        slots = torch.arange(25, device=emb.device)
        ref[:25], ref_labels[:25] = emb, labels  # the batch sits in slots 0..24
        result = run(with_memory, (emb, labels, ref, ref_labels, slots), backend=fused, ignore_index=-1,
                     reduction="sum")
        kept = ref_labels != -1
        position = torch.cumsum(kept, 0) - 1
        expected = run(with_memory, (emb[kept_rows], labels[kept_rows], ref[kept], ref_labels[kept],
                                     position[slots][kept_rows]), backend=fused, reduction="sum")
        torch.testing.assert_close(result[0], expected[0])
        torch.testing.assert_close(result[1][0][kept_rows], expected[1][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(result[1][1][kept], expected[1][1], rtol=1e-5, atol=1e-6)
        assert (result[1][1][~kept] == 0).all()
