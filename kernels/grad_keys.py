"""Backward, step 2 (key side): ∂L/∂K for one chunk of keys, with the normalisation backward fused.

Grid: (key blocks of the chunk, dim groups). Program (j, g) forms P = Hᵀ · Q for its BLOCK_N keys and
its group of dims, reducing over all B rows, in one or two accumulators of BLOCK_D dims (HALVES).
When the group is all of D (FINISH: D ≤ HALVES·BLOCK_D, the face-training widths), the program takes
the radial part from its own product and finishes:

    ∂L/∂k_j = (P_j - ‖k_j‖⁻² · ρ_j · k_j) / c       ρ_j = k_j · P_j = Σ_i H_ij (q_i · k_j) = c·‖k_j‖·σ_j
                                                   (σ_j = Σ_i G_ij s_ij, the radial sum)

written once, in the dtype of K: no float32 N × D buffer, no second pass. ρ_j comes from the very P it
is removed from (H as stored, in the products' rounding), so the projection is exact to float32: where
a key's true gradient cancels, as for identical rows, nothing of H's rounding is left radial.
Wider D runs in several groups, each writing its float32 share of P (chunk × D) for the launcher to
finish.
With TMA (key_loads) H and Q come through tensor descriptors, H bounded to the chunk, one bulk copy
each a step (Hᵀ is read transposed from shared memory): offline (sm_90 bf16, D = 512) 0.25 issue per
tensor-core cycle against 0.44 through pointers, 0.35 against 0.51 at D = 128 (triton 3.9).
"""
import torch
import triton
import triton.language as tl

from .presets import LaunchConfig, narrowed
from .tile import matmul, workspace_product_loads


@triton.jit
def circle_grad_keys_kernel(
    h_ptr, q_ptr, k_ptr, h_desc, q_desc, inv_norm_k_ptr, grad_scale_ptr, out_ptr, product_ptr,
    B, D, stride_qb, stride_qd, stride_kn, stride_kd, key_start, chunk_len, h_stride,
    HALVES: tl.constexpr, FINISH: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr, TMA: tl.constexpr,
):
    local = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.program_id(1) * (HALVES * BLOCK_D) + tl.arange(0, BLOCK_D)
    in_dims = (dims < D)[None, :]
    in_dims_2 = (dims + BLOCK_D < D)[None, :]
    product = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    product_2 = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)  # the second half (HALVES == 2)
    if TMA:  # rows past B, dims past D and keys past the chunk read as zeros: no masks
        local0 = tl.program_id(0) * BLOCK_N
        dim0 = tl.program_id(1) * (HALVES * BLOCK_D)
        for b0 in range(0, B, BLOCK_B):
            h_t = tl.trans(h_desc.load([b0, local0]))
            product = matmul(h_t, q_desc.load([b0, dim0]), product, DOT_PRECISION)
            if HALVES == 2:
                product_2 = matmul(h_t, q_desc.load([b0, dim0 + BLOCK_D]), product_2, DOT_PRECISION)
    else:
        # keys past the chunk read columns of the workspace that exist (h_stride ≥ every local index of
        # the grid) and are never stored; rows ≥ B and dims ≥ D are masked (zeros)
        steps = tl.arange(0, BLOCK_B)
        h_ptrs = h_ptr + steps[:, None] * h_stride + local[None, :]
        q_ptrs = q_ptr + steps[:, None] * stride_qb + dims[None, :] * stride_qd
        for b0 in range(0, B, BLOCK_B):
            in_rows = (b0 + steps < B)[:, None]
            h_t = tl.trans(tl.load(h_ptrs, mask=in_rows, other=0.0))
            product = matmul(h_t, tl.load(q_ptrs, mask=in_rows & in_dims, other=0.0), product, DOT_PRECISION)
            if HALVES == 2:
                q_2 = tl.load(q_ptrs + BLOCK_D * stride_qd, mask=in_rows & in_dims_2, other=0.0)
                product_2 = matmul(h_t, q_2, product_2, DOT_PRECISION)
            h_ptrs += BLOCK_B * h_stride
            q_ptrs += BLOCK_B * stride_qb
    in_chunk = (local < chunk_len)[:, None]
    if FINISH:  # the normalisation backward: the tangential part of P, divided by c
        keys = (key_start + local).to(tl.int64)
        k_ptrs = k_ptr + keys[:, None] * stride_kn + dims[None, :] * stride_kd
        radial = tl.sum(tl.load(k_ptrs, mask=in_chunk & in_dims, other=0.0).to(tl.float32) * product, axis=1)
        if HALVES == 2:
            k_2 = tl.load(k_ptrs + BLOCK_D * stride_kd, mask=in_chunk & in_dims_2, other=0.0)
            radial += tl.sum(k_2.to(tl.float32) * product_2, axis=1)
        inv_norm_k = tl.load(inv_norm_k_ptr + keys, mask=local < chunk_len, other=0.0)
        radial_coef = (radial * inv_norm_k * inv_norm_k)[:, None]
        unscale = 1.0 / tl.load(grad_scale_ptr)
        # k read again, one half at a time (evict_first: a load of its own, not the one above held
        # through the sums, which would not leave the registers for both)
        out = out_ptr + keys[:, None] * D + dims[None, :]
        k = tl.load(k_ptrs, mask=in_chunk & in_dims, other=0.0, eviction_policy="evict_first").to(tl.float32)
        tl.store(out, ((product - radial_coef * k) * unscale).to(out_ptr.dtype.element_ty), mask=in_chunk & in_dims)
        if HALVES == 2:
            k_2 = tl.load(k_ptrs + BLOCK_D * stride_kd, mask=in_chunk & in_dims_2, other=0.0,
                          eviction_policy="evict_first").to(tl.float32)
            tl.store(out + BLOCK_D, ((product_2 - radial_coef * k_2) * unscale).to(out_ptr.dtype.element_ty),
                     mask=in_chunk & in_dims_2)
    else:  # this group's dims of P, float32 (chunk × D)
        out = product_ptr + local.to(tl.int64)[:, None] * D + dims[None, :]
        tl.store(out, product, mask=in_chunk & in_dims)
        if HALVES == 2:
            tl.store(out + BLOCK_D, product_2, mask=in_chunk & in_dims_2)


def key_loads(h: torch.Tensor, queries: torch.Tensor, chunk_len: int, config: LaunchConfig) -> dict:
    """How circle_grad_keys_kernel reads the workspace's chunk h (its chunk_len columns) and the
    queries (tile.workspace_product_loads)."""
    return workspace_product_loads(h, chunk_len, queries, "q_desc", ("BLOCK_B", "BLOCK_D"), config)


def key_tile(config: LaunchConfig, D: int) -> LaunchConfig:
    """grad_keys' launch for rows of D from its preset, whose accumulators (BLOCK_N keys × two BLOCK_D
    halves) are sized for the widest D it finishes in the kernel. D that one accumulator holds (its
    BLOCK_D narrowed to the next power of two, at least 16) keeps the preset's accumulator by taking up
    to 4× the keys a program, as far as its registers and a stage of operands stay within the preset's:
    every program reads all of Q, so wider key tiles read it fewer times (offline, sm_90 bf16 at D = 128:
    128 keys issue 0.51 of the tensor cores' cycles where the preset's 64 read 0.99)."""
    blocks = config.blocks
    block_n, block_d = blocks["BLOCK_N"], blocks["BLOCK_D"]
    if D > block_d:  # two halves, or groups of them
        return config
    depth = narrowed(config, D).blocks["BLOCK_D"]
    # registers: the epilogue holds the accumulator and one accumulator's width of the keys (3 · BLOCK_N ·
    # BLOCK_D values at the preset's D); shared memory: a stage of operands
    widen = max(w for w in (1, 2, 4) if 2 * w * depth <= 3 * block_d and block_n * w + depth <= block_n + 2 * block_d)
    return LaunchConfig({**blocks, "BLOCK_N": block_n * widen, "BLOCK_D": depth}, config.num_warps, config.num_stages)


def key_dim_groups(D: int, block_d: int) -> tuple[int, int]:
    """(HALVES, groups): circle_grad_keys_kernel holds ∂L/∂K's dims in one or two BLOCK_D accumulators,
    and D wider than that in several groups of programs (then it writes P for the launcher to finish)."""
    halves = 2 if D > block_d else 1
    return halves, triton.cdiv(D, halves * block_d)
