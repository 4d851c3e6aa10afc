"""Forward: per-row log-sum-exps of the positive and negative logits, never holding S.

Grid: (row blocks, key splits). Program (r, p) walks the keys of split p in BLOCK_N tiles, computes
each tile of q·k (normalisation folded in through the inverse norms), applies the epilogue and keeps
an online log-sum-exp per row, in base 2. It writes one partial LP and LN per row and split; the
launcher combines the splits with a log-sum-exp (O(splits · B) floats). Splitting the keys fills the
GPU when B is small and N is large.

Class-level keys (the rows of W) have one positive per row, its class: the tiles hold negatives only
(one exp2 per similarity), and the positive logit comes from one gathered dot product q_i · w_{a_i},
O(B·D), in the programs of split 0. Pair-wise tiles hold both kinds and still take one exp2 per
similarity, against the running maximum of the kind it belongs to.

The launcher runs the whole tiles of keys in one launch and the last partial tile in a second (EDGE:
the only one whose epilogue masks keys past N); both write their own partials.

With TRACK_TOP1 the kernel also keeps each row's largest positive and largest negative similarity
(the nearest key of each kind, for top-1 accuracy): one select and one max per similarity more.
With NEGATIVE_SUM it keeps V_i, the sum of each row's negative logits, which label smoothing needs.
"""
import torch
import triton
import triton.language as tl

from .presets import splits_to_fill, tile_config
from .tile import (LN_2, LOG2_E, circle_epilogue, column_labels, dot_tile, edge_ranges, excluded_pairs,
                   gathered_positive, keys_in_bounds, operand_loads, positive_pairs, problem_arguments, query_norms,
                   row_excluded_keys, row_labels)


@triton.jit
def _rescale(run_max, run_sum, tile_max):
    """(new running max, running sum rescaled to it, the shift to subtract: 0 while the max is -inf)."""
    new_max = tl.maximum(run_max, tile_max)
    shift = tl.where(new_max == float("-inf"), 0.0, new_max)
    return new_max, run_sum * tl.exp2(run_max - shift), shift


@triton.jit
def circle_forward_kernel(
    q_ptr, k_ptr, q_desc, k_desc, q_label_ptr, k_label_ptr, inv_norm_q_ptr, inv_norm_k_ptr, excluded_key_ptr,
    lse_pos_ptr, lse_neg_ptr, top_ptr, negative_sum_ptr,
    B, N, D, stride_qb, stride_qd, stride_kn, stride_kd, key_begin, key_end, keys_per_split,
    margin, gamma,
    CLASS_LEVEL: tl.constexpr, EXCLUDE_KEY: tl.constexpr, TRACK_TOP1: tl.constexpr, NEGATIVE_SUM: tl.constexpr,
    EDGE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    TMA: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    split = tl.program_id(1)
    rows_start = tl.program_id(0).to(tl.int64) * BLOCK_B
    rows = rows_start + tl.arange(0, BLOCK_B)
    norm_q, inv_norm_q = query_norms(inv_norm_q_ptr, rows, B)
    max_pos = tl.full((BLOCK_B,), float("-inf"), tl.float32)
    max_neg = tl.full((BLOCK_B,), float("-inf"), tl.float32)
    sum_pos = tl.zeros((BLOCK_B,), tl.float32)
    sum_neg = tl.zeros((BLOCK_B,), tl.float32)
    top_pos = tl.full((BLOCK_B,), float("-inf"), tl.float32)
    top_neg = tl.full((BLOCK_B,), float("-inf"), tl.float32)
    negative_sum = tl.zeros((BLOCK_B,), tl.float32)
    no_offset = tl.zeros((BLOCK_B,), tl.float32)
    key_start = key_begin + split.to(tl.int64) * keys_per_split
    key_stop = tl.minimum(key_start + keys_per_split, key_end)
    q_label = row_labels(q_label_ptr, rows, B, CLASS_LEVEL)
    if EXCLUDE_KEY:
        excluded_key = row_excluded_keys(excluded_key_ptr, rows, B)
    scale2 = gamma * LOG2_E  # logit units (γ) to base-2 logits
    for n0 in range(key_start, key_stop, BLOCK_N):
        keys = n0 + tl.arange(0, BLOCK_N)
        # S tile in units of 1/‖q_i‖: raw products on the tensor cores, the keys' norms folded in
        dots = dot_tile(q_ptr, k_ptr, q_desc, k_desc, rows_start, n0, B, N, D, stride_qb, stride_qd, stride_kn,
                        stride_kd, BLOCK_B, BLOCK_N, BLOCK_D, EVEN_D, TMA, DOT_PRECISION)
        t = dots * tl.load(inv_norm_k_ptr + keys, mask=keys < N, other=0.0)[None, :]
        # masks: keys past N (only in the EDGE launch, the last partial tile) and the row's excluded key
        if EDGE:
            present = keys_in_bounds(n0, N, BLOCK_N)[None, :]
        else:
            present = tl.full((1, BLOCK_N), True, tl.int1)
        if EXCLUDE_KEY:  # each row's own slot: i itself in-batch, or its slot in a memory
            present = present & ~excluded_pairs(excluded_key, n0, BLOCK_N)
        is_pos = positive_pairs(q_label, column_labels(k_label_ptr, n0, N, BLOCK_N, CLASS_LEVEL), n0, CLASS_LEVEL)
        if CLASS_LEVEL:
            # negatives only: the row's own class is the positive, gathered after the loop
            logit, _ = circle_epilogue(t, False, norm_q, inv_norm_q, margin, scale2, no_offset, no_offset,
                                       no_offset, True)
            present = present & ~is_pos
            logit = tl.where(present, logit, float("-inf"))
            if TRACK_TOP1:  # the largest t of a row is its largest s (1/‖q_i‖ > 0)
                top_neg = tl.maximum(top_neg, tl.max(tl.where(present, t, float("-inf")), axis=1) * inv_norm_q)
            if NEGATIVE_SUM:
                negative_sum += tl.sum(tl.where(present, logit, 0.0), axis=1)
            # online log-sum-exp in base 2: rescale the running sum to the new maximum, add this tile
            max_neg, sum_neg, shift = _rescale(max_neg, sum_neg, tl.max(logit, axis=1))
            sum_neg += tl.sum(tl.exp2(logit - shift[:, None]), axis=1)
        else:
            logit, _ = circle_epilogue(t, is_pos, norm_q, inv_norm_q, margin, scale2, no_offset, no_offset,
                                       no_offset, True)
            logit = tl.where(present, logit, float("-inf"))
            if TRACK_TOP1:
                top_pos = tl.maximum(top_pos, tl.max(tl.where(is_pos & present, t, float("-inf")), axis=1)
                                     * inv_norm_q)
                top_neg = tl.maximum(top_neg, tl.max(tl.where(~is_pos & present, t, float("-inf")), axis=1)
                                     * inv_norm_q)
            if NEGATIVE_SUM:
                negative_sum += tl.sum(tl.where(~is_pos & present, logit, 0.0), axis=1)
            # online log-sum-exp for each kind. Maxima: a row's logits lie within 4γ of each other (u² - m²
            # with u in [-1, 2] or constant, in units of γ), so logit ± 1024γ·f (f: 1 on positives, base 2)
            # puts the other kind out of the way, without a select; a tile without this kind gives a finite
            # maximum ~1024γ below the other's, against which no term is summed
            f = is_pos.to(tl.float32)
            apart = 1024.0 * scale2
            max_pos, sum_pos, shift_pos = _rescale(max_pos, sum_pos, tl.max(tl.fma(f, apart, logit), axis=1) - apart)
            max_neg, sum_neg, shift_neg = _rescale(max_neg, sum_neg, tl.max(tl.fma(f, -apart, logit), axis=1))
            # then one exp2 per similarity against its own kind's maximum; the sums take their kind by
            # selects, so a NaN stays in its own kind (LP is -inf exactly when a row has no positive)
            p = tl.exp2(logit - tl.where(is_pos, shift_pos[:, None], shift_neg[:, None]))
            sum_pos += tl.sum(tl.where(is_pos, p, 0.0), axis=1)
            sum_neg += tl.sum(tl.where(is_pos, 0.0, p), axis=1)
    lse_pos = max_pos + tl.log2(sum_pos)
    if CLASS_LEVEL:
        if (split == 0) & (key_begin == 0):  # the first program of the first launch
            t_pos, has_pos = gathered_positive(q_ptr, k_ptr, inv_norm_k_ptr, rows, q_label, B, N, D, stride_qb,
                                               stride_qd, stride_kn, stride_kd, BLOCK_B, BLOCK_D)
            logit_pos, _ = circle_epilogue(t_pos[:, None], True, norm_q, inv_norm_q, margin, scale2, no_offset,
                                           no_offset, no_offset, True)
            lse_pos = tl.where(has_pos, tl.sum(logit_pos, axis=1), float("-inf"))
            top_pos = tl.where(has_pos, t_pos * inv_norm_q, float("-inf"))
    out = split.to(tl.int64) * B + rows
    # back to natural units (LP, LN are log-sum-exps of u and v)
    tl.store(lse_pos_ptr + out, lse_pos * LN_2, mask=rows < B)
    tl.store(lse_neg_ptr + out, (max_neg + tl.log2(sum_neg)) * LN_2, mask=rows < B)
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
    problem = problem_arguments(queries, keys, query_labels, key_labels, inv_norm_q, inv_norm_k, margin, gamma,
                                excluded_keys)
    cfg = tile_config("forward" if key_labels is None else "forward_pairwise", queries)
    B, N, block_n = problem["B"], problem["N"], cfg.blocks["BLOCK_N"]
    row_blocks = triton.cdiv(B, cfg.blocks["BLOCK_B"])
    launches = [(begin, end, edge, *splits_to_fill(end - begin, row_blocks, block_n, queries))
                for begin, end, edge in edge_ranges(N, block_n)]
    splits = sum(launch[3] for launch in launches)
    partial_pos = torch.empty(splits, B, device=queries.device, dtype=torch.float32)
    partial_neg = torch.empty_like(partial_pos)
    top = torch.empty(splits if track_top1 else 0, 2, B, device=queries.device, dtype=torch.float32)
    partial_sum = torch.empty(splits if negative_sum else 0, B, device=queries.device, dtype=torch.float32)
    loads = operand_loads(queries, keys, cfg)
    first = 0
    for key_begin, key_end, edge, launch_splits, keys_per_split in launches:
        outputs = slice(first, first + launch_splits)
        circle_forward_kernel[(row_blocks, launch_splits)](
            **problem, lse_pos_ptr=partial_pos[outputs], lse_neg_ptr=partial_neg[outputs], top_ptr=top[outputs],
            negative_sum_ptr=partial_sum[outputs], key_begin=key_begin, key_end=key_end,
            keys_per_split=keys_per_split, TRACK_TOP1=track_top1, NEGATIVE_SUM=negative_sum, EDGE=edge, **loads,
            **cfg.kwargs())
        first += launch_splits
    top = top.amax(dim=0) if track_top1 else top.new_empty(0)
    return torch.logsumexp(partial_pos, dim=0), torch.logsumexp(partial_neg, dim=0), top, partial_sum.sum(dim=0) \
        if negative_sum else partial_sum.new_empty(0)
