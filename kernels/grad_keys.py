"""Backward, step 2 (key side): ∂L/∂K for one chunk of keys, with the normalisation backward fused.

Grid: (key blocks of the chunk, D blocks). Program (j, d) forms Hᵀ · Q for its tile, reducing over all
B rows, and finishes in its epilogue:

    ∂L/∂k_j = ((Hᵀ · Q)_j - ‖k_j‖⁻² · ρ_j · k_j) / c       ρ_j = Σ_i H_ij (q_i · k_j) = c·‖k_j‖·σ_j
                                                           (σ_j = Σ_i G_ij s_ij, the radial sum)

written once, in the dtype of K: no float32 N × D buffer, no second pass.
"""
import triton
import triton.language as tl

from .tile import matmul


@triton.jit
def circle_grad_keys_kernel(
    h_ptr, q_ptr, k_ptr, radial_coef_ptr, grad_scale_ptr, out_ptr,
    B, D, stride_qb, stride_qd, stride_kn, stride_kd, key_start, chunk_len, h_stride,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    local = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    # keys past the chunk read columns of the workspace that exist (h_stride ≥ every local index of
    # the grid) and dims ≥ D read dim d mod D: both are never stored, so only rows ≥ B are masked
    steps = tl.arange(0, BLOCK_B)
    h_ptrs = h_ptr + steps[:, None] * h_stride + local[None, :]
    q_ptrs = q_ptr + steps[:, None] * stride_qb + (dims % D)[None, :] * stride_qd
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        in_range = (b0 + steps < B)[:, None]
        h = tl.load(h_ptrs, mask=in_range, other=0.0)
        q = tl.load(q_ptrs, mask=in_range, other=0.0)
        acc = matmul(tl.trans(h), q, acc, DOT_PRECISION)
        h_ptrs += BLOCK_B * h_stride
        q_ptrs += BLOCK_B * stride_qb
    # normalisation backward: the tangential part of Hᵀ · Q, divided by c
    keys = key_start + local
    out_mask = (local < chunk_len)[:, None] & (dims < D)[None, :]
    k = tl.load(k_ptr + keys[:, None] * stride_kn + dims[None, :] * stride_kd, mask=out_mask, other=0.0)
    radial_coef = tl.load(radial_coef_ptr + local, mask=local < chunk_len, other=0.0)
    grad = (acc - radial_coef[:, None] * k.to(tl.float32)) * (1.0 / tl.load(grad_scale_ptr))
    tl.store(out_ptr + keys[:, None] * D + dims[None, :], grad.to(out_ptr.dtype.element_ty), mask=out_mask)
