"""Backward, key side: Cc = Gᵀ · Q̂ (N × D), accumulated in float32.

Grid: (key blocks,). Each program owns BLOCK_N keys and walks every row block (B is the small side),
recomputing the tile of S, forming G = ∂L/∂S and adding Gᵀ · Q̂ into its own rows of Cc: one writer
per output row, so the result is deterministic without atomics.
"""
import torch
import triton
import triton.language as tl

from .presets import tile_config
from .tile import circle_epilogue, dot_tile, grad_similarity, load_tile_labels, matmul


@triton.jit
def circle_grad_keys_kernel(
    q_ptr, k_ptr, q_label_ptr, k_label_ptr, inv_norm_q_ptr, inv_norm_k_ptr,
    lse_pos_ptr, lse_neg_ptr, row_scale_ptr, raw_grad_ptr,
    B, N, D, stride_qb, stride_qd, stride_kn, stride_kd,
    margin, gamma,
    CLASS_LEVEL: tl.constexpr, EXCLUDE_SELF: tl.constexpr, DETACH_ALPHA: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    keys = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    key_ok = keys < N
    inv_norm_k = tl.load(inv_norm_k_ptr + keys, mask=key_ok, other=0.0)
    out_keys = raw_grad_ptr + keys[:, None] * D
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B).to(tl.int64)
        row_ok = rows < B
        inv_norm_q = tl.load(inv_norm_q_ptr + rows, mask=row_ok, other=0.0)
        lse_pos = tl.load(lse_pos_ptr + rows, mask=row_ok, other=0.0)
        lse_neg = tl.load(lse_neg_ptr + rows, mask=row_ok, other=0.0)
        row_scale = tl.load(row_scale_ptr + rows, mask=row_ok, other=0.0)
        dots = dot_tile(q_ptr, k_ptr, rows, keys, B, N, D, stride_qb, stride_qd, stride_kn, stride_kd,
                        BLOCK_B, BLOCK_N, BLOCK_D, DOT_PRECISION)
        q_label, k_label = load_tile_labels(q_label_ptr, k_label_ptr, rows, keys, B, N, CLASS_LEVEL)
        logit, slope, is_pos, is_pair = circle_epilogue(dots, inv_norm_q, inv_norm_k, q_label, k_label, rows,
                                                        keys, B, N, margin, gamma, EXCLUDE_SELF, DETACH_ALPHA)
        grad_s = grad_similarity(logit, slope, is_pos, is_pair, lse_pos, lse_neg, row_scale)
        grad_s_t = tl.trans(grad_s * inv_norm_q[:, None]).to(q_ptr.dtype.element_ty)
        for d0 in range(0, D, BLOCK_D):
            dims = d0 + tl.arange(0, BLOCK_D)
            in_d = (dims < D)[None, :]
            q = tl.load(q_ptr + rows[:, None] * stride_qb + dims[None, :].to(tl.int64) * stride_qd,
                        mask=row_ok[:, None] & in_d, other=0.0)
            acc = matmul(grad_s_t, q, None, DOT_PRECISION)
            out = out_keys + dims[None, :]
            out_mask = key_ok[:, None] & in_d
            if b0 > 0:
                acc += tl.load(out, mask=out_mask, other=0.0)
            tl.store(out, acc, mask=out_mask)


def grad_keys_raw(problem: dict, lse_pos, lse_neg, row_scale, detach_alpha):
    """float32 (1, N, D): Cc = Gᵀ · Q̂ (with a leading split axis of one, as the projection expects).
    problem: tile.problem_arguments of the call."""
    queries, N, D = problem["q_ptr"], problem["N"], problem["D"]
    cfg = tile_config("grad_keys", queries)
    raw = torch.empty(1, N, D, device=queries.device, dtype=torch.float32)
    circle_grad_keys_kernel[(triton.cdiv(N, cfg.blocks["BLOCK_N"]),)](
        **problem, lse_pos_ptr=lse_pos, lse_neg_ptr=lse_neg, row_scale_ptr=row_scale, raw_grad_ptr=raw,
        DETACH_ALPHA=detach_alpha, **cfg.kwargs())
    return raw
