"""Backward, step 1: H = ∂L/∂S with both inverse norms folded in, for one chunk of keys.

Grid: (key tiles of the chunk, row splits). Program (t, p) holds one BLOCK_N tile of keys and walks
the row blocks of split p: for each it recomputes the tile of S, forms G_ij = ∂L/∂s_ij = σ_i · (softmax
weight of the logit within its own log-sum-exp) · slope, and writes

  H_ij = G_ij · (1/‖q_i‖) · (1/‖k_j‖) · c      into the workspace (B × chunk, the operands' dtype),

while it keeps H_ij · (q_i · k_j) in a tile-shaped float32 accumulator (RADIAL_TILE: one fma a
similarity, the rows summed once, after the last row block; for wgmma, whose operands stay in shared
memory) or sums it over each tile's rows as it goes (mma.sync, whose operands take the registers such
an accumulator would need), and writes

  Σ_i H_ij · (q_i · k_j) over its rows           into its row of the radial partials (splits × chunk).

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

from .tile import (LOG2_E, circle_epilogue, column_labels, dot_tile, excluded_pairs, keys_in_bounds,
                   positive_pairs, row_excluded_keys, row_labels)


@triton.jit
def circle_grad_similarity_kernel(
    q_ptr, k_ptr, q_desc, k_desc, q_label_ptr, k_label_ptr, inv_norm_q_ptr, inv_norm_k_ptr, excluded_key_ptr,
    lse_pos_ptr, lse_neg_ptr, row_scale_ptr, grad_rows_ptr, grad_scale_ptr, h_ptr, h_desc, radial_ptr,
    B, N, D, stride_qb, stride_qd, stride_kn, stride_kd, key_start, chunk_len, h_stride, local_begin,
    rows_per_split,
    margin, gamma, smooth_pos, smooth_neg,
    CLASS_LEVEL: tl.constexpr, EXCLUDE_KEY: tl.constexpr, DETACH_ALPHA: tl.constexpr, NEED_RADIAL: tl.constexpr,
    LABEL_SMOOTHING: tl.constexpr, EDGE: tl.constexpr, RADIAL_TILE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    TMA: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    split = tl.program_id(1)
    # this program's keys: one tile of the chunk, fixed for the whole program
    local0 = local_begin + tl.program_id(0).to(tl.int64) * BLOCK_N
    local = local0 + tl.arange(0, BLOCK_N)
    first_key = key_start + local0
    keys = first_key + tl.arange(0, BLOCK_N)
    inv_norm_k = tl.load(inv_norm_k_ptr + keys, mask=keys < N, other=0.0)
    k_label = column_labels(k_label_ptr, first_key, N, BLOCK_N, CLASS_LEVEL)
    if EDGE:  # the last partial tile: keys past N are no pair
        in_bounds = keys_in_bounds(first_key, N, BLOCK_N)[None, :]
    else:
        in_bounds = tl.full((1, BLOCK_N), True, tl.int1)
    scale2 = gamma * LOG2_E  # logit units (γ) to base-2 logits
    grad_scale = gamma * tl.load(grad_scale_ptr)  # γ (the epilogue's unit) and c, folded into the row factor
    # Σ_i H_ij (q_i · k_j): a tile, summed over its rows at the end (RADIAL_TILE), or summed every tile
    radial = tl.zeros((BLOCK_B, BLOCK_N) if RADIAL_TILE else (BLOCK_N,), tl.float32)
    row_stop = tl.minimum(split.to(tl.int64) * rows_per_split + rows_per_split, B)
    for rows_start in range(split.to(tl.int64) * rows_per_split, row_stop, BLOCK_B):
        rows = rows_start + tl.arange(0, BLOCK_B)
        row_ok = rows < B
        # the rows' statistics in base 2; rows past B get +inf log-sum-exps, so their weights are 0
        inv_norm_q = tl.load(inv_norm_q_ptr + rows, mask=row_ok, other=0.0)
        lse_pos2 = tl.load(lse_pos_ptr + rows, mask=row_ok, other=float("inf")) * LOG2_E
        lse_neg2 = tl.load(lse_neg_ptr + rows, mask=row_ok, other=float("inf")) * LOG2_E
        # H_ij = h_row_i · (G_ij / (γ·σ_i)) · (1/‖k_j‖), σ_i the row's scale
        row_factor = inv_norm_q * grad_scale
        h_row = tl.load(row_scale_ptr + rows, mask=row_ok, other=0.0) * row_factor
        q_label = row_labels(q_label_ptr, rows, B, CLASS_LEVEL)
        # S tile, recomputed: raw products on the tensor cores, normalised in the float32 accumulator
        dots = dot_tile(q_ptr, k_ptr, q_desc, k_desc, rows_start, first_key, B, N, D, stride_qb, stride_qd,
                        stride_kn, stride_kd, BLOCK_B, BLOCK_N, BLOCK_D, EVEN_D, TMA, DOT_PRECISION)
        s = dots * inv_norm_k[None, :] * inv_norm_q[:, None]
        is_pos = positive_pairs(q_label, k_label, first_key, CLASS_LEVEL)
        logit, slope = circle_epilogue(s, is_pos, margin, DETACH_ALPHA)
        # G_ij / (γ·σ_i): the logit's softmax weight within LP_i or LN_i, times (d logit / d s) / γ
        weight = tl.exp2(tl.fma(logit, scale2, -tl.where(is_pos, lse_pos2[:, None], lse_neg2[:, None])))
        present = in_bounds
        if EXCLUDE_KEY:  # the row's excluded key (i itself in-batch, its slot in a memory)
            present = present & ~excluded_pairs(row_excluded_keys(excluded_key_ptr, rows, B), first_key, BLOCK_N)
        if LABEL_SMOOTHING:  # G_ij = g_i·(σ_i·weight - c)·slope, c = c_p on the positive, c_n on negatives
            smooth_row = tl.load(grad_rows_ptr + rows, mask=row_ok, other=0.0) * row_factor
            smooth = smooth_row[:, None] * tl.where(is_pos, smooth_pos, smooth_neg)
            h = tl.where(present, (h_row[:, None] * weight - smooth) * slope, 0.0) * inv_norm_k[None, :]
        else:
            h = tl.where(present, weight * slope, 0.0) * h_row[:, None] * inv_norm_k[None, :]
        h = h.to(h_ptr.dtype.element_ty)
        # rows ≥ B are not stored; columns past the chunk (zeros, in the EDGE tile) land in its padding
        if TMA:  # one bulk copy, which clips the rows
            h_desc.store([tl.cast(rows_start, tl.int32), tl.cast(local0, tl.int32)], h)
        else:
            tl.store(h_ptr + rows[:, None] * h_stride + local[None, :], h, mask=row_ok[:, None])
        if NEED_RADIAL:  # from H as stored, so that grad_keys removes exactly its radial part
            if RADIAL_TILE:
                radial = tl.fma(h.to(tl.float32), dots, radial)
            else:
                radial += tl.sum(h.to(tl.float32) * dots, axis=0)
    if NEED_RADIAL:  # c·σ_j's share from this split's rows, times ‖k_j‖
        if RADIAL_TILE:
            radial = tl.sum(radial, axis=0)
        tl.store(radial_ptr + split * h_stride + local, radial, mask=local < chunk_len)
