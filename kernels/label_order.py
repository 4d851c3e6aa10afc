"""Problems sorted by label, so that most key tiles hold negatives only.

A tile that may hold both kinds pays for them in every similarity: the forward walks it once a kind
(`KIND`) with the other masked, the backward selects each kind's terms (tile.circle_epilogue), and a
class-level forward tile compares every key with each row's class. With the queries (and pair-wise
keys) sorted by label, the positives of a block of rows lie in one narrow range of keys, the mixed
range: the launchers run the tiles outside it with the plain negatives-only epilogue (`TILES`
"negative": no labels, no masks) and only the others with labels (`TILES` "mixed"). Sorting copies
the queries and, for pair-wise labels, the keys (O((B + N)·D)); class-level keys (the rows of W) stay
where they are. It is done where the rows are many enough for the mixed ranges to be narrow and the
copies repaid (SORT_MIN_ROWS, an estimate: a block of 64 sorted class-level rows spans ~64/B of the
classes); results are put back in the callers' order. Stable sorts: forward and backward sort alike.
(The class-level backward does not sort: its tiles take the negative formula everywhere and the
positives are written over them afterwards, grad_similarity.circle_row_entries_kernel.)
"""
import math
from dataclasses import dataclass
from typing import Optional

import torch
import triton

SORT_MIN_ROWS = 512


@dataclass(frozen=True)
class LabelOrder:
    """rows[p], keys[p]: the original index of the query and of the key in sorted position p (keys None:
    class-level keys, left in place)."""
    rows: torch.Tensor
    keys: Optional[torch.Tensor]

    def sort(self, queries, keys, query_labels, key_labels, inv_norm_q, inv_norm_k, excluded_keys):
        """The problem in sorted order; an excluded key is renamed to its sorted position (-1 stays -1)."""
        queries, query_labels, inv_norm_q = queries[self.rows], query_labels[self.rows], inv_norm_q[self.rows]
        if excluded_keys is not None:
            excluded_keys = excluded_keys[self.rows]
        if self.keys is None:
            return queries, keys, query_labels, key_labels, inv_norm_q, inv_norm_k, excluded_keys
        if excluded_keys is not None:
            position = torch.empty_like(self.keys)
            position[self.keys] = torch.arange(self.keys.shape[0], device=self.keys.device)
            excluded_keys = torch.where(excluded_keys >= 0, position[excluded_keys.clamp_min(0)], -1)
        return (queries, keys[self.keys], query_labels, key_labels[self.keys], inv_norm_q, inv_norm_k[self.keys],
                excluded_keys)

    def unsort_rows(self, values: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """values with the rows in sorted order along dim, back in the caller's order."""
        return torch.empty_like(values).index_copy_(dim, self.rows, values)

    def unsort_keys(self, values: torch.Tensor) -> torch.Tensor:
        """values with the keys in sorted order along dim 0, back in the caller's order."""
        return values if self.keys is None else torch.empty_like(values).index_copy_(0, self.keys, values)


def label_order(query_labels: torch.Tensor, key_labels: Optional[torch.Tensor]) -> Optional[LabelOrder]:
    """The sorted order of a problem with at least SORT_MIN_ROWS rows; None otherwise."""
    if query_labels.shape[0] < SORT_MIN_ROWS:
        return None
    return LabelOrder(torch.argsort(query_labels, stable=True),
                      None if key_labels is None else torch.argsort(key_labels, stable=True))


def mixed_key_ranges(query_labels: torch.Tensor, key_labels: Optional[torch.Tensor], num_keys: int,
                     excluded_keys: Optional[torch.Tensor], block_b: int, block_n: int) -> torch.Tensor:
    """int32 (row blocks, 2): for each block of block_b rows, [lo, hi), multiples of block_n, the key
    tiles that hold a positive or an excluded key of one of its rows ((0, 0) if none). Pair-wise
    key_labels must be sorted ascending (row i's positives are then the keys of its label, one run);
    None: class-level keys, the positive of row i is key a_i (none unless 0 <= a_i < num_keys)."""
    if key_labels is None:
        lo = query_labels
        hi = torch.where((query_labels >= 0) & (query_labels < num_keys), query_labels + 1, query_labels)
    else:
        lo = torch.searchsorted(key_labels, query_labels, side="left")
        hi = torch.searchsorted(key_labels, query_labels, side="right")
    none = lo == hi
    lo, hi = torch.where(none, num_keys, lo), torch.where(none, 0, hi)
    if excluded_keys is not None:
        chosen = excluded_keys >= 0
        lo = torch.where(chosen, torch.minimum(lo, excluded_keys), lo)
        hi = torch.where(chosen, torch.maximum(hi, excluded_keys + 1), hi)
    blocks = triton.cdiv(query_labels.shape[0], block_b)
    pad = blocks * block_b - query_labels.shape[0]
    lo = torch.nn.functional.pad(lo, (0, pad), value=num_keys).view(blocks, block_b).amin(dim=1)
    hi = torch.nn.functional.pad(hi, (0, pad), value=0).view(blocks, block_b).amax(dim=1)
    lo, hi = lo // block_n * block_n, (hi + block_n - 1) // block_n * block_n
    empty = lo >= hi
    return torch.stack([torch.where(empty, 0, lo), torch.where(empty, 0, hi)], dim=1).to(torch.int32)


def mixed_row_ranges(key_ranges: torch.Tensor, num_keys: int, group: int) -> torch.Tensor:
    """int32 (key groups, 2): for each group of `group` keys (a multiple of every launch's BLOCK_N), [lo,
    hi) in row blocks, every row block whose mixed range (key_ranges, from mixed_key_ranges) meets the
    group, and any between them ((0, 0) if none): programs that own a key tile walk the rows, so each
    launch's share is one run of row blocks ("mixed") or the rows around it ("negative"). Sorted rows
    make the mixed ranges rise with the row block, so the run holds few others."""
    lo, hi = key_ranges[:, 0].long(), key_ranges[:, 1].long()
    empty = hi <= lo
    # bounds that rise with the row block: hi_m_b >= hi_b and lo_m_b <= lo_b for every block that meets
    hi_m = torch.cummax(torch.where(empty, 0, hi), dim=0).values
    lo_m = torch.where(empty, num_keys + group, lo).flip(0).cummin(dim=0).values.flip(0)
    starts = torch.arange(0, num_keys, group, device=key_ranges.device)
    first = torch.searchsorted(hi_m, starts, right=True)  # the first block with hi_m > the group's start
    stop = torch.searchsorted(lo_m, starts + group)  # the first block with lo_m >= the group's end
    none = stop <= first
    return torch.stack([torch.where(none, 0, first), torch.where(none, 0, stop)], dim=1).to(torch.int32)


def mixed_group(negative_config, mixed_config) -> int:
    """The keys a mixed range is measured in: whole tiles of both launches' widths."""
    return math.lcm(negative_config.blocks["BLOCK_N"], mixed_config.blocks["BLOCK_N"])


def tile_launches(order: Optional[LabelOrder], problem: dict, excluded_keys: Optional[torch.Tensor],
                  negative_config, mixed_config, split_kinds: bool, walk_rows: bool = False
                  ) -> tuple[list, torch.Tensor]:
    """([(TILES, KIND, config)], mixed ranges): the launches that together cover every tile of a problem
    (from tile.problem_arguments) and the table of mixed ranges their kernels index. Unsorted, every tile
    with mixed_config; sorted, the negatives-only tiles with negative_config ("negative") and the mixed
    ones with mixed_config ("mixed"). KIND: class-level tiles take the negatives (their positives are
    gathered apart); pair-wise tiles that may hold both kinds take one kind a launch with split_kinds
    (the forward: "negative" and "positive", the other masked), else both at once ("both", the
    backward). Launches that index the table share BLOCK_B (a test checks the presets). The table holds,
    for kernels whose programs own a row block and walk the keys, each row block's range of keys, whole
    tiles of both configs' widths (mixed_key_ranges); with walk_rows, for kernels whose programs own a
    key tile and walk the rows, each group of mixed_group keys' range of rows (mixed_row_ranges, in
    rows)."""
    kinds = ("negative", "positive") if split_kinds else ("both",)
    mixed_kinds = ("negative",) if problem["CLASS_LEVEL"] else kinds
    if order is None:
        return ([("all", kind, mixed_config) for kind in mixed_kinds],
                torch.empty(0, device=problem["q_ptr"].device, dtype=torch.int32))
    if negative_config.blocks["BLOCK_B"] != mixed_config.blocks["BLOCK_B"]:
        raise ValueError(f"the negatives-only and mixed tiles of a sorted problem index one table of row blocks: "
                         f"their presets must share BLOCK_B, got {negative_config.label()} and {mixed_config.label()}")
    launches = [("negative", "negative", negative_config)] + [("mixed", kind, mixed_config) for kind in mixed_kinds]
    block_b, group = mixed_config.blocks["BLOCK_B"], mixed_group(negative_config, mixed_config)
    ranges = mixed_key_ranges(problem["q_label_ptr"], None if problem["CLASS_LEVEL"] else problem["k_label_ptr"],
                              problem["N"], excluded_keys, block_b, group)
    if walk_rows:
        ranges = mixed_row_ranges(ranges, problem["N"], group) * block_b
    return launches, ranges
