"""Forward: per-row log-sum-exps of the positive and negative logits, never holding S.

Grid: (row blocks, key splits). Program (r, p) walks the keys of split p in BLOCK_N tiles, computes
each tile of q·k (normalisation folded in through the inverse norms), applies the epilogue and keeps
an online log-sum-exp per row, in base 2. It writes one partial LP and LN per row and split; the
launcher combines the splits with a log-sum-exp (O(splits · B) floats). Splitting the keys fills the
GPU when B is small and N is large.

Each launch takes one kind (KIND) and keeps one online log-sum-exp. Class-level keys (the rows of W)
have one positive per row, its class: the tiles take the negatives (the row's class masked, one exp2
per similarity), and the positive logit comes from one gathered dot product q_i · w_{a_i}, O(B·D), in
the programs of split 0. Pair-wise tiles that may hold both kinds are walked twice, once for each kind
with the other masked; each launch writes -inf as the other kind's partials.

The launcher runs the whole tiles of keys in one launch and the last partial tile in a second (EDGE:
the only one whose epilogue masks keys past N); both write their own partials.

A problem sorted by label (label_order.py) runs its negatives twice: TILES "negative" walks the keys
outside each row block's mixed range with the negatives-only epilogue (no labels, no masks; the
class-level presets), "mixed" the keys inside it with labels; its pair-wise positives walk the mixed
keys only. Unsorted, TILES "all".

With TRACK_TOP1 the kernel also keeps each row's largest similarity of its kind (the nearest key of
each kind, for top-1 accuracy): one select and one max per similarity more.
With NEGATIVE_SUM it keeps V_i, the sum of each row's negative logits, which label smoothing needs.
"""
import torch
import triton
import triton.language as tl

from .label_order import label_order, tile_launches
from .presets import d_chunks, splits_to_fill, tile_config
from .tile import (LN_2, LOG2_E, circle_epilogue, circle_row_terms, column_labels, dot_resident, dot_tile, edge_ranges,
                   excluded_pairs, gathered_positive, keys_in_bounds, operand_loads, positive_pairs, problem_arguments,
                   query_norms, resident_tile, row_excluded_keys, row_labels, walk_at, walk_span)


@triton.jit
def _rescale(run_max, run_sum, tile_max):
    """(new running max, running sum rescaled to it, the shift to subtract: 0 while the max is -inf)."""
    new_max = tl.maximum(run_max, tile_max)
    shift = tl.where(new_max == float("-inf"), 0.0, new_max)
    return new_max, run_sum * tl.exp2(run_max - shift), shift


@triton.jit
def circle_forward_kernel(
    q_ptr, k_ptr, q_desc, k_desc, q_label_ptr, k_label_ptr, inv_norm_q_ptr, inv_norm_k_ptr, excluded_key_ptr,
    lse_pos_ptr, lse_neg_ptr, top_ptr, negative_sum_ptr, mixed_ptr,
    B, N, D, stride_qb, stride_qd, stride_kn, stride_kd, key_begin, key_end, keys_per_split,
    margin, gamma,
    CLASS_LEVEL: tl.constexpr, EXCLUDE_KEY: tl.constexpr, TRACK_TOP1: tl.constexpr, NEGATIVE_SUM: tl.constexpr,
    EDGE: tl.constexpr, TILES: tl.constexpr, KIND: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, TMA: tl.constexpr, DOT_PRECISION: tl.constexpr,
    D_CHUNKS: tl.constexpr, RESIDENT_ROWS: tl.constexpr = False,
):
    split = tl.program_id(1)
    rows_start = tl.program_id(0).to(tl.int64) * BLOCK_B
    rows = rows_start + tl.arange(0, BLOCK_B)
    norm_q, inv_norm_q = query_norms(inv_norm_q_ptr, rows, B)
    no_offset = tl.zeros((BLOCK_B,), tl.float32)
    # the formula's row terms, once for the whole walk: logits in base 2 (γ·log2 e), no offsets, no slope
    terms = circle_row_terms(norm_q, inv_norm_q, margin, gamma * LOG2_E, no_offset, no_offset, no_offset, True)[0]
    positives: tl.constexpr = KIND == "positive"
    run_max = tl.full((BLOCK_B,), float("-inf"), tl.float32)
    run_sum = tl.zeros((BLOCK_B,), tl.float32)
    top = tl.full((BLOCK_B,), float("-inf"), tl.float32)
    negative_sum = tl.zeros((BLOCK_B,), tl.float32)
    key_start = key_begin + split.to(tl.int64) * keys_per_split
    key_stop = tl.minimum(key_start + keys_per_split, key_end)
    # this program's tiles: all of its keys, or (TILES) those outside or inside the row block's mixed
    # range, the key tiles that may hold a positive or an excluded key of one of its rows (mixed_key_ranges)
    first, count, skip_at, skip = walk_span(mixed_ptr + 2 * tl.program_id(0), key_start, key_stop, TILES)
    # which pairs of a tile are this launch's kind: class-level tiles mask the row's own class (its
    # positive is gathered after the loop); pair-wise tiles that may hold both kinds mask the other kind
    # and the row's excluded key; negatives-only tiles (TILES "negative") mask nothing
    labelled: tl.constexpr = TILES != "negative"
    if labelled:
        q_label = row_labels(q_label_ptr, rows, B, CLASS_LEVEL)
    if EXCLUDE_KEY and labelled and not CLASS_LEVEL:
        excluded_key = row_excluded_keys(excluded_key_ptr, rows, B)
    # RESIDENT_ROWS (a preset's choice; with TMA and D in at most two chunks): the row block stays in
    # shared memory for the whole walk and only the keys stream
    resident: tl.constexpr = RESIDENT_ROWS and TMA and D_CHUNKS <= 2
    if resident:
        rows_first, rows_second = resident_tile(q_desc, rows_start, BLOCK_D, D_CHUNKS)
    for step in range(0, count, BLOCK_N):
        n0 = walk_at(first, step, skip_at, skip)
        keys = n0 + tl.arange(0, BLOCK_N)
        # S tile in units of 1/‖q_i‖: raw products on the tensor cores, the keys' norms folded in
        if resident:
            dots = dot_resident(k_desc, n0, rows_first, rows_second, BLOCK_B, BLOCK_N, BLOCK_D, D_CHUNKS, "rows",
                                DOT_PRECISION)
        else:
            dots = dot_tile(q_ptr, k_ptr, q_desc, k_desc, rows_start, n0, B, N, D, stride_qb, stride_qd, stride_kn,
                            stride_kd, BLOCK_B, BLOCK_N, BLOCK_D, EVEN_D, TMA, DOT_PRECISION, D_CHUNKS == 1)
        t = dots * tl.load(inv_norm_k_ptr + keys, mask=keys < N, other=0.0)[None, :]
        # masks: keys past N (only in the EDGE launch, the last partial tile), the other kind, the row's
        # excluded key (its own slot: i itself in-batch, or its slot in a memory)
        if EDGE:
            present = keys_in_bounds(n0, N, BLOCK_N)[None, :]
        else:
            present = tl.full((1, BLOCK_N), True, tl.int1)
        if labelled:
            is_pos = positive_pairs(q_label, column_labels(k_label_ptr, n0, N, BLOCK_N, CLASS_LEVEL), n0,
                                    CLASS_LEVEL)
            present = present & (is_pos if positives else ~is_pos)
            if EXCLUDE_KEY and not CLASS_LEVEL:
                present = present & ~excluded_pairs(excluded_key, n0, BLOCK_N)
        logit, _ = circle_epilogue(t, positives, terms, True, False)
        logit = tl.where(present, logit, float("-inf"))
        if TRACK_TOP1:  # the largest t of a row is its largest s (1/‖q_i‖ > 0)
            top = tl.maximum(top, tl.max(tl.where(present, t, float("-inf")), axis=1) * inv_norm_q)
        if NEGATIVE_SUM and not positives:
            negative_sum += tl.sum(tl.where(present, logit, 0.0), axis=1)
        # online log-sum-exp in base 2: rescale the running sum to the new maximum, add this tile
        run_max, run_sum, shift = _rescale(run_max, run_sum, tl.max(logit, axis=1))
        run_sum += tl.sum(tl.exp2(logit - shift[:, None]), axis=1)
    # this launch's log-sum-exp; the other kind's is -inf here (a log-sum-exp over the partials)
    none = tl.full((BLOCK_B,), float("-inf"), tl.float32)
    if positives:
        lse_pos, lse_neg, top_pos, top_neg = run_max + tl.log2(run_sum), none, top, none
    else:
        lse_pos, lse_neg, top_pos, top_neg = none, run_max + tl.log2(run_sum), none, top
    if CLASS_LEVEL and TILES != "negative":
        if (split == 0) & (key_begin == 0):  # the first program of the first launch that holds positives
            t_pos, has_pos = gathered_positive(q_ptr, k_ptr, inv_norm_k_ptr, rows, q_label, B, N, D, stride_qb,
                                               stride_qd, stride_kn, stride_kd, BLOCK_B, BLOCK_D)
            logit_pos, _ = circle_epilogue(t_pos[:, None], True, terms, True, False)
            lse_pos = tl.where(has_pos, tl.sum(logit_pos, axis=1), float("-inf"))
            top_pos = tl.where(has_pos, t_pos * inv_norm_q, float("-inf"))
    out = split.to(tl.int64) * B + rows
    # back to natural units (LP, LN are log-sum-exps of u and v)
    tl.store(lse_pos_ptr + out, lse_pos * LN_2, mask=rows < B)
    tl.store(lse_neg_ptr + out, lse_neg * LN_2, mask=rows < B)
    if NEGATIVE_SUM:  # (splits, B), in natural units: γ·Σ v/γ = ln 2 · Σ of the base-2 logits
        tl.store(negative_sum_ptr + out, negative_sum * LN_2, mask=rows < B)
    if TRACK_TOP1:  # top: (splits, 2, B)
        top_row = top_ptr + 2 * split.to(tl.int64) * B + rows
        tl.store(top_row, top_pos, mask=rows < B)
        tl.store(top_row + B, top_neg, mask=rows < B)


def circle_forward(queries, keys, query_labels, key_labels, inv_norm_q, inv_norm_k, margin, gamma,
                   excluded_keys, track_top1=False, negative_sum=False):
    """(LP, LN, top, V): float32 (B,) log-sum-exps over each row's positives and negatives (-inf if
    none); with track_top1, top (2, B) holds each row's largest positive and negative similarity (-inf
    if none); with negative_sum, V (B,) the sum of each row's negative logits; each empty otherwise."""
    order = label_order(query_labels, key_labels)
    if order is not None:  # sorted by label: most key tiles then hold negatives only (label_order.py)
        queries, keys, query_labels, key_labels, inv_norm_q, inv_norm_k, excluded_keys = order.sort(
            queries, keys, query_labels, key_labels, inv_norm_q, inv_norm_k, excluded_keys)
    problem = problem_arguments(queries, keys, query_labels, key_labels, inv_norm_q, inv_norm_k, margin, gamma,
                                excluded_keys)
    # a sorted problem's negatives-only tiles take the class-level forward's tiles
    kinds, mixed = tile_launches(order, problem, excluded_keys, tile_config("forward", queries),
                                 tile_config("forward" if key_labels is None else "forward_pairwise", queries),
                                 split_kinds=True)
    B, N = problem["B"], problem["N"]
    launches = []
    for tiles, kind, cfg in kinds:
        block_n, row_blocks = cfg.blocks["BLOCK_N"], triton.cdiv(B, cfg.blocks["BLOCK_B"])
        for begin, end, edge in edge_ranges(N, block_n):
            launches.append((tiles, kind, cfg, row_blocks, begin, end, edge,
                             *splits_to_fill(end - begin, row_blocks, block_n, queries)))
    splits = sum(launch[7] for launch in launches)
    partial_pos = torch.empty(splits, B, device=queries.device, dtype=torch.float32)
    partial_neg = torch.empty_like(partial_pos)
    top = torch.empty(splits if track_top1 else 0, 2, B, device=queries.device, dtype=torch.float32)
    partial_sum = torch.empty(splits if negative_sum else 0, B, device=queries.device, dtype=torch.float32)
    first = 0
    for tiles, kind, cfg, row_blocks, key_begin, key_end, edge, launch_splits, keys_per_split in launches:
        outputs = slice(first, first + launch_splits)
        circle_forward_kernel[(row_blocks, launch_splits)](
            **problem, lse_pos_ptr=partial_pos[outputs], lse_neg_ptr=partial_neg[outputs], top_ptr=top[outputs],
            negative_sum_ptr=partial_sum[outputs], mixed_ptr=mixed, key_begin=key_begin, key_end=key_end,
            keys_per_split=keys_per_split, TRACK_TOP1=track_top1, NEGATIVE_SUM=negative_sum, EDGE=edge, TILES=tiles,
            KIND=kind, D_CHUNKS=d_chunks(queries.shape[1], cfg), **operand_loads(queries, keys, cfg),
            **cfg.kwargs())
        first += launch_splits
    lse_pos, lse_neg = torch.logsumexp(partial_pos, dim=0), torch.logsumexp(partial_neg, dim=0)
    top = top.amax(dim=0) if track_top1 else top.new_empty(0)
    total = partial_sum.sum(dim=0) if negative_sum else partial_sum.new_empty(0)
    if order is not None:
        lse_pos, lse_neg, total = order.unsort_rows(lse_pos), order.unsort_rows(lse_neg), \
            order.unsort_rows(total) if negative_sum else total
        top = order.unsort_rows(top, dim=1) if track_top1 else top
    return lse_pos, lse_neg, top, total
