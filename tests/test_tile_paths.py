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
from helpers import check_against_reference, make_inputs


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
