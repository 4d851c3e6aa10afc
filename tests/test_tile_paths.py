"""How the tile kernels read their operands (tensor descriptors or pointers) and their EDGE launch.

Under the interpreter `tile.operand_loads` takes descriptors wherever an H100's copy engine could
(16-byte aligned base and rows, unit stride along D), so both ways run here: D = 24 in bf16 reads
through descriptors, D = 37 through pointers. The interpreter presets tile keys by 32: N = 13 is one
partial tile (only the EDGE launch), N = 64 whole tiles only, N = 77 both launches.
"""
import pytest
import torch

import circleloss_ext as cl
from circleloss_ext.kernels import presets, tile
from helpers import check_against_reference, make_inputs, run


def _loads(queries, keys):
    return tile.operand_loads(queries, keys, presets.tile_config("forward", queries))


def test_descriptors_only_where_the_copy_engine_can_read():
    queries = torch.randn(5, 24, dtype=torch.bfloat16)
    keys = torch.randn(40, 24, dtype=torch.bfloat16)
    assert _loads(queries, keys)["TMA"]
    assert _loads(queries, keys)["q_desc"].block_shape == [16, 16]
    odd = torch.randn(40, 37, dtype=torch.bfloat16)  # rows of 74 bytes
    assert not _loads(odd[:5], odd)["TMA"]
    assert not _loads(queries, torch.randn(24, 40, dtype=torch.bfloat16).t())["TMA"]  # stride 40 along D
    shifted = torch.randn(41 * 24, dtype=torch.bfloat16)[8:8 + 40 * 24].view(40, 24)  # base 16 bytes in: aligned
    assert _loads(queries, shifted)["TMA"]
    misaligned = torch.randn(41 * 24, dtype=torch.bfloat16)[1:1 + 40 * 24].view(40, 24)
    pointers = _loads(queries, misaligned)
    assert not pointers["TMA"] and pointers["q_desc"] is None and not pointers["EVEN_D"]


def test_edge_ranges_split_whole_tiles_from_the_last_partial_one():
    assert tile.edge_ranges(13, 32) == [(0, 13, True)]
    assert tile.edge_ranges(64, 32) == [(0, 64, False)]
    assert tile.edge_ranges(77, 32) == [(0, 64, False), (64, 77, True)]


@pytest.mark.parametrize("D,tma", [(24, True), (37, False)])
@pytest.mark.parametrize("N", [13, 64, 77])
@pytest.mark.parametrize("detach_alpha", [True, False])
def test_class_level_through_both_paths(D, tma, N, detach_alpha):
    emb, weight, labels, _ = make_inputs(19, N, D, dtype=torch.bfloat16, device="cpu")
    assert _loads(emb, weight)["TMA"] == tma
    check_against_reference(cl.circle_loss, (emb, weight, labels), "triton", dtype=torch.bfloat16,
                            detach_alpha=detach_alpha, reduction="none")


@pytest.mark.parametrize("D,tma", [(24, True), (37, False)])
@pytest.mark.parametrize("N", [13, 64, 77])
def test_pairwise_through_both_paths(D, tma, N):
    emb, ref, labels, ref_labels = make_inputs(21, N, D, dtype=torch.bfloat16, num_labels=4, device="cpu")
    assert _loads(emb, ref)["TMA"] == tma

    def loss(e, lab, r, rlab, **kw):
        return cl.pairwise_circle_loss(e, lab, ref_embeddings=r, ref_labels=rlab, **kw)

    check_against_reference(loss, (emb, labels, ref, ref_labels), "triton", dtype=torch.bfloat16,
                            detach_alpha=False, reduction="none")


@pytest.fixture
def sorted_by_label(monkeypatch):
    """Pair-wise problems sorted by label at any size (label_order.py), as the GPU does from 512 rows."""
    from circleloss_ext.kernels import label_order
    monkeypatch.setattr(label_order, "SORT_MIN_ROWS", 0)


@pytest.mark.parametrize("detach_alpha", [True, False])
@pytest.mark.parametrize("form", ["batch", "reference set", "memory"])
def test_sorted_pairwise_problems_split_negative_and_mixed_tiles(form, detach_alpha, sorted_by_label):
    """Sorted by label, a block of 16 rows (the interpreter's) has its positives and excluded keys in a
    few key tiles of 32: the other tiles run the negatives-only epilogue (TILES "negative") and the
    results, put back in the callers' order, match the reference (odd sizes: the last key tile partial)."""
    from circleloss_ext.kernels.label_order import mixed_key_ranges
    emb, keys, labels, key_labels = make_inputs(150, 170, 24, num_labels=40)
    ranges = mixed_key_ranges(labels.sort().values, key_labels.sort().values, 170, None, 16, 32)
    assert ((ranges[:, 1] - ranges[:, 0]) < 160).all() and (ranges[:, 1] > ranges[:, 0]).any()
    if form == "batch":
        check_against_reference(cl.pairwise_circle_loss, (emb, labels), "triton", detach_alpha=detach_alpha,
                                reduction="none")
    else:
        self_index = torch.randint(-1, 170, (150,)) if form == "memory" else None

        def against(e, y, r, ry, **kw):
            return cl.pairwise_circle_loss(e, y, ref_embeddings=r, ref_labels=ry, ref_self_index=self_index, **kw)
        check_against_reference(against, (emb, labels, keys, key_labels), "triton", detach_alpha=detach_alpha,
                                reduction="sum")


def test_sorted_pairwise_accuracy_and_workspace_chunks(sorted_by_label):
    """Top-1 tracking comes back in the callers' row order, and a sorted backward in several chunks (the
    last with a partial tile) gives the same key gradients as in one."""
    emb, keys, labels, key_labels = make_inputs(90, 77, 24, num_labels=20)
    loss, accuracy = cl.pairwise_circle_loss(emb, labels, backend="triton", with_accuracy=True)
    ref_loss, ref_accuracy = cl.pairwise_circle_loss(emb.double(), labels, backend="reference", with_accuracy=True)
    assert accuracy == ref_accuracy
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)

    def against(e, y, r, ry, **kw):
        return cl.pairwise_circle_loss(e, y, ref_embeddings=r, ref_labels=ry, **kw)
    whole = run(against, (emb, labels, keys, key_labels), backend="triton")
    before = cl.workspace_limit()
    cl.set_workspace_limit(90 * 32 * 4)  # 32 keys of H a chunk
    try:
        chunked = run(against, (emb, labels, keys, key_labels), backend="triton")
    finally:
        cl.set_workspace_limit(before)
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1][1], chunked[1][1])


def test_sorted_pairwise_launches_with_different_tile_widths(sorted_by_label, monkeypatch):
    """The negatives-only tiles take the class-level presets, which may be wider than the mixed ones (on
    sm_90 grad_similarity with the true derivative: 128 / 64 keys): the mixed ranges are whole tiles of
    both."""
    wide = {"forward": presets._tiles(16, 64, 16, 4, 1),
            "grad_similarity": presets._tiles(16, 64, 16, 4, 1),
            "grad_similarity_full": presets._tiles(16, 64, 16, 4, 1)}
    monkeypatch.setattr(presets, "_INTERPRETER", {**presets._INTERPRETER, **wide})
    emb, keys, labels, key_labels = make_inputs(70, 150, 24, num_labels=30)
    check_against_reference(cl.pairwise_circle_loss, (emb, labels), "triton", reduction="sum")

    def against(e, y, r, ry, **kw):
        return cl.pairwise_circle_loss(e, y, ref_embeddings=r, ref_labels=ry, **kw)
    check_against_reference(against, (emb, labels, keys, key_labels), "triton", detach_alpha=False)


def test_negative_and_mixed_tile_presets_share_their_row_blocks():
    """label_order's two launches index one table of mixed ranges by row block: each family's class-level
    and pair-wise presets must agree on BLOCK_B."""
    for table in [*presets.PRESETS.values(), presets._INTERPRETER]:
        assert table["forward"].blocks["BLOCK_B"] == table["forward_pairwise"].blocks["BLOCK_B"]
        for mode in ("", "_full"):
            assert table["grad_similarity" + mode].blocks["BLOCK_B"] == \
                table["grad_similarity_pairwise" + mode].blocks["BLOCK_B"]


def test_presets_of_different_row_blocks_are_refused_when_sorted(sorted_by_label, monkeypatch):
    """A preset swapped in by hand (benchmarks/tune_presets.py does) that breaks the agreement above is
    refused with the two configurations named, instead of indexing the wrong row blocks' ranges."""
    monkeypatch.setitem(presets._INTERPRETER, "forward_pairwise", presets._tiles(32, 32, 16, 4, 1))
    emb, _, labels, _ = make_inputs(40, 40, 8, num_labels=4)
    with pytest.raises(ValueError, match="must share BLOCK_B, got B=16 .* and B=32"):
        cl.pairwise_circle_loss(emb, labels, backend="triton")


@pytest.mark.parametrize("detach_alpha", [True, False])
def test_sorted_class_level_rows(detach_alpha, sorted_by_label):
    """Class-level rows sorted by class (the keys stay): a block of 16 rows has its positives in a few key
    tiles, the others run without the own-class compare; ignored rows, label smoothing and accuracy come
    back in the callers' order."""
    from circleloss_ext.kernels.label_order import mixed_key_ranges
    emb, weight, labels, _ = make_inputs(100, 300, 24)
    labels[::7] = -100
    ranges = mixed_key_ranges(labels.sort().values, None, 300, None, 16, 32)
    assert ((ranges[:, 1] - ranges[:, 0]) < 288).all()
    check_against_reference(cl.circle_loss, (emb, weight, labels), "triton", detach_alpha=detach_alpha,
                            label_smoothing=0.1, reduction="none", ignore_index=-100)
    _, accuracy = cl.circle_loss(emb, weight, labels, backend="triton", with_accuracy=True, ignore_index=-100)
    _, expected = cl.circle_loss(emb.double(), weight.double(), labels, backend="reference", with_accuracy=True,
                                 ignore_index=-100)
    assert accuracy == expected


@pytest.mark.parametrize("form", ["class", "pairwise"])
def test_mixed_key_ranges_hold_every_positive_and_excluded_key(form):
    """The invariant the negatives-only tiles rest on: for every row, each of its positives and its
    excluded key lie in its block's range, and the range is whole tiles (multiples of block_n)."""
    from circleloss_ext.kernels.label_order import mixed_key_ranges
    gen = torch.Generator().manual_seed(3)
    B, N, block_b, block_n = 203, 517, 16, 64
    if form == "class":
        labels = torch.randint(-1, N, (B,), generator=gen).sort().values  # -1: no class, no positive
        key_labels, excluded = None, None
        positive = labels[:, None] == torch.arange(N)[None, :]
    else:
        labels = torch.randint(0, 60, (B,), generator=gen).sort().values
        key_labels = torch.randint(0, 60, (N,), generator=gen).sort().values
        excluded = torch.randint(-1, N, (B,), generator=gen)
        positive = labels[:, None] == key_labels[None, :]
        positive[torch.arange(B)[excluded >= 0], excluded[excluded >= 0]] = True
    ranges = mixed_key_ranges(labels, key_labels, N, excluded, block_b, block_n).long()
    assert (ranges % block_n == 0).all()
    lo, hi = ranges[torch.arange(B) // block_b].unbind(dim=1)
    keys = torch.arange(N)[None, :]
    assert not (positive & ((keys < lo[:, None]) | (keys >= hi[:, None]))).any()
    assert ((hi - lo) < N).any()  # and the ranges leave negatives-only tiles


@pytest.mark.parametrize("key_labels_present", [True, False])
def test_mixed_row_ranges_hold_every_mixed_tile(key_labels_present):
    """The transposed table grad_similarity walks (its programs own a key tile): for each group of keys,
    one run of row blocks holds every block whose mixed range meets the group, and with sorted labels the
    run is exactly those blocks; blocks with no positive (rows whose label no key has) may lie inside a
    run, never decide one."""
    from circleloss_ext.kernels.label_order import mixed_key_ranges, mixed_row_ranges
    gen = torch.Generator().manual_seed(5)
    B, N, block_b, group = 403, 517, 16, 64
    labels = torch.randint(0, 40, (B,), generator=gen).sort().values
    key_labels = torch.randint(0, 40 if key_labels_present else 20, (N,), generator=gen).sort().values
    key_ranges = mixed_key_ranges(labels, key_labels, N, None, block_b, group)
    rows = mixed_row_ranges(key_ranges, N, group).long()
    starts = torch.arange(0, N, group)
    lo, hi = key_ranges.long().unbind(dim=1)
    meets = (lo[:, None] < starts[None, :] + group) & (hi[:, None] > starts[None, :])  # (row blocks, groups)
    block = torch.arange(meets.shape[0])[:, None]
    inside = (block >= rows[None, :, 0]) & (block < rows[None, :, 1])
    assert not (meets & ~inside).any()
    has_mixed = meets.any(dim=0)
    first = torch.where(meets, block, meets.shape[0]).amin(dim=0)
    last = torch.where(meets, block, -1).amax(dim=0)
    assert torch.equal(rows[has_mixed, 0], first[has_mixed]) and torch.equal(rows[has_mixed, 1], last[has_mixed] + 1)
    assert (rows[~has_mixed] == 0).all()
    assert has_mixed.any() and (~meets).any()


def test_grad_keys_takes_more_keys_where_d_is_narrow():
    """grad_keys' preset holds two BLOCK_D halves a key for the widest D; where D fits one narrower
    accumulator the launch takes up to 4× the keys (every program reads all of Q), within the preset's
    registers (accumulator and one slice of keys) and shared memory per stage, and covers D."""
    from circleloss_ext.kernels.grad_keys import key_dim_groups, key_tile
    from circleloss_ext.kernels.presets import PRESETS
    for table in PRESETS.values():
        config = table["grad_keys"]
        b, n, d = (config.blocks[k] for k in ("BLOCK_B", "BLOCK_N", "BLOCK_D"))
        assert key_tile(config, 512) == config and key_tile(config, d + 1) == config
        for D in (D for D in (16, 40, 64, 72, 128, 200, 256) if D <= d):
            tile = key_tile(config, D)
            n_w, d_w = tile.blocks["BLOCK_N"], tile.blocks["BLOCK_D"]
            assert D <= d_w <= max(d, 16) and key_dim_groups(D, d_w) == (1, 1), (config, D)
            assert n_w in (n, 2 * n, 4 * n) and tile.blocks["BLOCK_B"] == b
            assert 2 * n_w * d_w <= 3 * n * d and n_w + d_w <= n + 2 * d, (config, D)
    sm90 = PRESETS[("sm90", "16")]["grad_keys"]
    assert key_tile(sm90, 128).blocks["BLOCK_N"] == 2 * sm90.blocks["BLOCK_N"]
