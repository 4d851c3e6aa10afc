"""Forward: per-row log-sum-exps of the positive and negative logits, never holding S.

Grid: (row blocks, key splits). Program (r, p) walks the keys of split p in BLOCK_N tiles, computes
each tile of q·k (normalisation folded in through the inverse norms), applies the epilogue and keeps
an online log-sum-exp per row for positives and for negatives. It writes one partial LP and LN per
row and split; the launcher combines the splits with a log-sum-exp (O(splits · B) floats).
Splitting the keys fills the GPU when B is small and N is large.
"""
import torch
import triton
import triton.language as tl

from .presets import target_programs, tile_config
from .tile import circle_epilogue, dot_tile, load_tile_labels, problem_arguments


@triton.jit
def _online_lse(run_max, run_sum, logits):
    """Fold one tile of logits (-inf = absent) into a running (max, sum of exp(x - max)) per row."""
    new_max = tl.maximum(run_max, tl.max(logits, axis=1))
    shift = tl.where(new_max == float("-inf"), 0.0, new_max)
    run_sum = run_sum * tl.exp(run_max - shift) + tl.sum(tl.exp(logits - shift[:, None]), axis=1)
    return new_max, run_sum


@triton.jit
def circle_forward_kernel(
    q_ptr, k_ptr, q_label_ptr, k_label_ptr, inv_norm_q_ptr, inv_norm_k_ptr,
    lse_pos_ptr, lse_neg_ptr,
    B, N, D, stride_qb, stride_qd, stride_kn, stride_kd, keys_per_split,
    margin, gamma,
    CLASS_LEVEL: tl.constexpr, EXCLUDE_SELF: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    split = tl.program_id(1)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    inv_norm_q = tl.load(inv_norm_q_ptr + rows, mask=rows < B, other=0.0)
    max_pos = tl.full((BLOCK_B,), float("-inf"), tl.float32)
    max_neg = tl.full((BLOCK_B,), float("-inf"), tl.float32)
    sum_pos = tl.zeros((BLOCK_B,), tl.float32)
    sum_neg = tl.zeros((BLOCK_B,), tl.float32)
    key_start = split.to(tl.int64) * keys_per_split
    key_stop = tl.minimum(key_start + keys_per_split, N)
    for n0 in range(key_start, key_stop, BLOCK_N):
        keys = n0 + tl.arange(0, BLOCK_N)
        dots = dot_tile(q_ptr, k_ptr, rows, keys, B, N, D, stride_qb, stride_qd, stride_kn, stride_kd,
                        BLOCK_B, BLOCK_N, BLOCK_D, DOT_PRECISION)
        inv_norm_k = tl.load(inv_norm_k_ptr + keys, mask=keys < N, other=0.0)
        q_label, k_label = load_tile_labels(q_label_ptr, k_label_ptr, rows, keys, B, N, CLASS_LEVEL)
        logit, _, is_pos, _ = circle_epilogue(dots, inv_norm_q, inv_norm_k, q_label, k_label, rows, keys,
                                              B, N, margin, gamma, EXCLUDE_SELF, True)
        max_pos, sum_pos = _online_lse(max_pos, sum_pos, tl.where(is_pos, logit, float("-inf")))
        max_neg, sum_neg = _online_lse(max_neg, sum_neg, tl.where(is_pos, float("-inf"), logit))
    out = split.to(tl.int64) * B + rows
    tl.store(lse_pos_ptr + out, max_pos + tl.log(sum_pos), mask=rows < B)
    tl.store(lse_neg_ptr + out, max_neg + tl.log(sum_neg), mask=rows < B)


def key_splits(num_keys: int, row_blocks: int, block_n: int, x: torch.Tensor) -> tuple[int, int]:
    """(splits, keys_per_split): enough programs to fill the device, each split a whole number of tiles."""
    tiles = triton.cdiv(num_keys, block_n)
    splits = max(1, min(tiles, triton.cdiv(target_programs(x), row_blocks)))
    keys_per_split = triton.cdiv(tiles, splits) * block_n
    return triton.cdiv(num_keys, keys_per_split), keys_per_split


def circle_forward(queries, keys, query_labels, key_labels, inv_norm_q, inv_norm_k, margin, gamma,
                   exclude_self):
    """(LP, LN): float32 (B,) log-sum-exps over each row's positives and negatives (-inf if none)."""
    problem = problem_arguments(queries, keys, query_labels, key_labels, inv_norm_q, inv_norm_k, margin, gamma,
                                exclude_self)
    cfg = tile_config("forward", queries)
    row_blocks = triton.cdiv(problem["B"], cfg.blocks["BLOCK_B"])
    splits, keys_per_split = key_splits(problem["N"], row_blocks, cfg.blocks["BLOCK_N"], queries)
    partial_pos = torch.empty(splits, problem["B"], device=queries.device, dtype=torch.float32)
    partial_neg = torch.empty_like(partial_pos)
    circle_forward_kernel[(row_blocks, splits)](
        **problem, lse_pos_ptr=partial_pos, lse_neg_ptr=partial_neg, keys_per_split=keys_per_split,
        **cfg.kwargs())
    return torch.logsumexp(partial_pos, dim=0), torch.logsumexp(partial_neg, dim=0)
