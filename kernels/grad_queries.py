"""Backward, query side: R = G · K̂ (B × D), accumulated in float32 per key split.

Grid: (row blocks, key splits), as the forward. Program (r, p) recomputes each tile of S over the
keys of split p, forms G = ∂L/∂S on it and adds G · K̂ into its own slice R_p[rows] of a
(splits, B, D) buffer; no other program writes there, so the result is deterministic. The
projection kernel sums the splits in a fixed order.
"""
import torch
import triton
import triton.language as tl

from .forward import key_splits
from .presets import tile_config
from .tile import circle_epilogue, dot_tile, grad_similarity, load_tile_labels, matmul


@triton.jit
def circle_grad_queries_kernel(
    q_ptr, k_ptr, q_label_ptr, k_label_ptr, inv_norm_q_ptr, inv_norm_k_ptr,
    lse_pos_ptr, lse_neg_ptr, row_scale_ptr, raw_grad_ptr,
    B, N, D, stride_qb, stride_qd, stride_kn, stride_kd, keys_per_split,
    margin, gamma,
    CLASS_LEVEL: tl.constexpr, EXCLUDE_SELF: tl.constexpr, DETACH_ALPHA: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    split = tl.program_id(1)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    inv_norm_q = tl.load(inv_norm_q_ptr + rows, mask=row_ok, other=0.0)
    lse_pos = tl.load(lse_pos_ptr + rows, mask=row_ok, other=0.0)
    lse_neg = tl.load(lse_neg_ptr + rows, mask=row_ok, other=0.0)
    row_scale = tl.load(row_scale_ptr + rows, mask=row_ok, other=0.0)
    out_rows = raw_grad_ptr + (split.to(tl.int64) * B + rows[:, None]) * D
    key_start = split.to(tl.int64) * keys_per_split
    key_stop = tl.minimum(key_start + keys_per_split, N)
    for n0 in range(key_start, key_stop, BLOCK_N):
        keys = n0 + tl.arange(0, BLOCK_N)
        key_ok = keys < N
        dots = dot_tile(q_ptr, k_ptr, rows, keys, B, N, D, stride_qb, stride_qd, stride_kn, stride_kd,
                        BLOCK_B, BLOCK_N, BLOCK_D, DOT_PRECISION)
        inv_norm_k = tl.load(inv_norm_k_ptr + keys, mask=key_ok, other=0.0)
        q_label, k_label = load_tile_labels(q_label_ptr, k_label_ptr, rows, keys, B, N, CLASS_LEVEL)
        logit, slope, is_pos, is_pair = circle_epilogue(dots, inv_norm_q, inv_norm_k, q_label, k_label, rows,
                                                        keys, B, N, margin, gamma, EXCLUDE_SELF, DETACH_ALPHA)
        grad_s = grad_similarity(logit, slope, is_pos, is_pair, lse_pos, lse_neg, row_scale)
        grad_s = (grad_s * inv_norm_k[None, :]).to(k_ptr.dtype.element_ty)
        for d0 in range(0, D, BLOCK_D):
            dims = d0 + tl.arange(0, BLOCK_D)
            in_d = (dims < D)[None, :]
            k = tl.load(k_ptr + keys[:, None] * stride_kn + dims[None, :].to(tl.int64) * stride_kd,
                        mask=key_ok[:, None] & in_d, other=0.0)
            acc = matmul(grad_s, k, None, DOT_PRECISION)
            out = out_rows + dims[None, :]
            out_mask = row_ok[:, None] & in_d
            if n0 > key_start:
                acc += tl.load(out, mask=out_mask, other=0.0)
            tl.store(out, acc, mask=out_mask)


def grad_queries_raw(problem: dict, lse_pos, lse_neg, row_scale, detach_alpha):
    """float32 (splits, B, D) partial sums of R = G · K̂; their sum over splits is R.
    problem: tile.problem_arguments of the call."""
    queries, B, D = problem["q_ptr"], problem["B"], problem["D"]
    cfg = tile_config("grad_queries", queries)
    row_blocks = triton.cdiv(B, cfg.blocks["BLOCK_B"])
    splits, keys_per_split = key_splits(problem["N"], row_blocks, cfg.blocks["BLOCK_N"], queries)
    raw = torch.empty(splits, B, D, device=queries.device, dtype=torch.float32)
    circle_grad_queries_kernel[(row_blocks, splits)](
        **problem, lse_pos_ptr=lse_pos, lse_neg_ptr=lse_neg, row_scale_ptr=row_scale, raw_grad_ptr=raw,
        keys_per_split=keys_per_split, DETACH_ALPHA=detach_alpha, **cfg.kwargs())
    return raw
