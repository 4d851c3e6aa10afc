"""Backward, step 1: H = ∂L/∂S with both inverse norms folded in, for one chunk of keys.

Grid: (row blocks, key splits of the chunk). Program (r, p) recomputes each tile of S over its keys,
forms G_ij = ∂L/∂s_ij = σ_i · (softmax weight of the logit within its own log-sum-exp) · slope, and
writes

  H_ij = G_ij · (1/‖q_i‖) · (1/‖k_j‖) · c      into the workspace (B × chunk, the operands' dtype),
  Σ_i H_ij · (q_i · k_j) over its rows           into its row of the radial partials (row blocks × chunk),

where c is a power of two that keeps fp16 workspaces in range (1 for bf16 and fp32). With H, the two
matrix products of backward take raw operands: H · K = c·G · K̂ / ‖q_i‖ and Hᵀ · Q = c·Gᵀ · Q̂ / ‖k_j‖.
The radial sums c·σ_j = c·Σ_i G_ij s_ij are summed from H as stored (rounded to the workspace dtype),
so that grad_keys removes exactly the radial part of the Hᵀ · Q it computes.
With TMA the operands come through tensor descriptors and H leaves through one (h_desc); the chunk's
last partial tile runs in a launch of its own (EDGE), the only one that masks keys past N.
Every element of both outputs has one writer: no atomics, the same bits on every run.
With LABEL_SMOOTHING, G_ij = g_i·(σ_i·weight − c)·slope: the smoothed target moves c = c_p = ε(1 − 1/C)
from the positive and c = c_n = ε/C onto every negative.
"""
import triton
import triton.language as tl

from .tile import (LOG2_E, circle_epilogue, dot_tile, excluded_pairs, keys_in_bounds, positive_pairs,
                   row_excluded_keys, row_labels)


@triton.jit
def circle_grad_similarity_kernel(
    q_ptr, k_ptr, q_desc, k_desc, q_label_ptr, k_label_ptr, inv_norm_q_ptr, inv_norm_k_ptr, excluded_key_ptr,
    lse_pos_ptr, lse_neg_ptr, row_scale_ptr, grad_rows_ptr, grad_scale_ptr, h_ptr, h_desc, radial_ptr,
    B, N, D, stride_qb, stride_qd, stride_kn, stride_kd, key_start, chunk_len, h_stride, local_begin, local_end,
    keys_per_split,
    margin, gamma, smooth_pos, smooth_neg,
    CLASS_LEVEL: tl.constexpr, EXCLUDE_KEY: tl.constexpr, DETACH_ALPHA: tl.constexpr, NEED_RADIAL: tl.constexpr,
    LABEL_SMOOTHING: tl.constexpr, EDGE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    TMA: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    row_block = tl.program_id(0)
    split = tl.program_id(1)
    rows_start = row_block.to(tl.int64) * BLOCK_B
    rows = rows_start + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    inv_norm_q = tl.load(inv_norm_q_ptr + rows, mask=row_ok, other=0.0)
    # the row's statistics in base 2; rows past B get +inf log-sum-exps, so their weights are 0
    lse_pos2 = tl.load(lse_pos_ptr + rows, mask=row_ok, other=float("inf")) * LOG2_E
    lse_neg2 = tl.load(lse_neg_ptr + rows, mask=row_ok, other=float("inf")) * LOG2_E
    row_scale = tl.load(row_scale_ptr + rows, mask=row_ok, other=0.0)  # σ_i
    # H_ij = h_row_i · (G_ij / (γ·σ_i)) · (1/‖k_j‖): γ (the epilogue's unit) folded into the row factor
    row_factor = inv_norm_q * (gamma * tl.load(grad_scale_ptr))
    h_row = row_scale * row_factor
    q_label = row_labels(q_label_ptr, rows, B, CLASS_LEVEL)
    if EXCLUDE_KEY:
        excluded_key = row_excluded_keys(excluded_key_ptr, rows, B)
    if LABEL_SMOOTHING:  # the smoothed target's share, g_i·c_p or g_i·c_n, in the units of h_row
        smooth_row = tl.load(grad_rows_ptr + rows, mask=row_ok, other=0.0) * row_factor
    scale2 = gamma * LOG2_E  # logit units (γ) to base-2 logits
    local_start = local_begin + split.to(tl.int64) * keys_per_split
    local_stop = tl.minimum(local_start + keys_per_split, local_end)
    for j0 in range(local_start, local_stop, BLOCK_N):
        local = j0 + tl.arange(0, BLOCK_N)
        keys = key_start + local
        # S tile, recomputed: raw products on the tensor cores, normalised in the float32 accumulator
        dots = dot_tile(q_ptr, k_ptr, q_desc, k_desc, rows_start, key_start + j0, B, N, D, stride_qb, stride_qd,
                        stride_kn, stride_kd, BLOCK_B, BLOCK_N, BLOCK_D, EVEN_D, TMA, DOT_PRECISION)
        inv_norm_k = tl.load(inv_norm_k_ptr + keys, mask=keys < N, other=0.0)
        s = dots * inv_norm_k[None, :] * inv_norm_q[:, None]
        is_pos = positive_pairs(q_label, k_label_ptr, key_start + j0, N, BLOCK_N, CLASS_LEVEL)
        logit, slope = circle_epilogue(s, is_pos, margin, DETACH_ALPHA)
        # G_ij / (γ·σ_i): the logit's softmax weight within LP_i or LN_i, times (d logit / d s) / γ
        weight = tl.exp2(tl.fma(logit, scale2, -tl.where(is_pos, lse_pos2[:, None], lse_neg2[:, None])))
        # masks: keys past N (only in the EDGE launch, the last partial tile) and the row's excluded key
        present = keys_in_bounds(key_start + j0, N, BLOCK_N)[None, :] if EDGE else tl.full((1, BLOCK_N), True, tl.int1)
        if EXCLUDE_KEY:
            present = present & ~excluded_pairs(excluded_key, key_start + j0, BLOCK_N)
        if LABEL_SMOOTHING:  # G_ij = g_i·(σ_i·weight - c)·slope, c = c_p on the positive, c_n on negatives
            smooth = smooth_row[:, None] * tl.where(is_pos, smooth_pos, smooth_neg)
            h = tl.where(present, (h_row[:, None] * weight - smooth) * slope, 0.0) * inv_norm_k[None, :]
        else:
            h = tl.where(present, weight * slope, 0.0) * h_row[:, None] * inv_norm_k[None, :]
        h = h.to(h_ptr.dtype.element_ty)
        if TMA:  # one bulk copy; rows ≥ B are clipped, columns past the chunk (zeros) land in its padding
            h_desc.store([tl.cast(rows_start, tl.int32), tl.cast(j0, tl.int32)], h)
        else:
            in_chunk = (local < chunk_len)[None, :] if EDGE else tl.full((1, BLOCK_N), True, tl.int1)
            tl.store(h_ptr + rows[:, None] * h_stride + local[None, :], h, mask=row_ok[:, None] & in_chunk)
        if NEED_RADIAL:  # c·σ_j's share from these rows, times ‖k_j‖: Σ_i H_ij (q_i · k_j)
            radial = tl.sum(h.to(tl.float32) * dots, axis=0)
            tl.store(radial_ptr + row_block * h_stride + local, radial, mask=local < chunk_len)
