"""Backward, step 2 (query side): R = H · K over one chunk of keys, in float32 partial sums.

Grid: (row blocks, D blocks, key splits of the chunk). B × D is small next to the chunk, so the
reduction over keys is split to fill the device; program (r, d, p) writes its own slice of a
(splits, B, D) float32 buffer, which the launcher adds in a fixed order.
With TMA (product_loads) both operands come through tensor descriptors bounded to the chunk, one bulk
copy each a step, so the loop is the products and the copies' bookkeeping: offline (sm_90 bf16,
D = 512) 0.19 issue per tensor-core cycle with either triton, against 0.57 (triton 3.9) and 0.72 (3.6)
through pointers, whose masked loads went through registers.
"""
import torch
import triton
import triton.language as tl

from .tile import matmul, workspace_product_loads


@triton.jit
def circle_grad_queries_kernel(
    h_ptr, k_ptr, h_desc, k_desc, partial_ptr,
    B, D, stride_kn, stride_kd, key_start, chunk_len, h_stride, keys_per_split,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    TMA: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    dims = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    split = tl.program_id(2)
    local_start = split.to(tl.int64) * keys_per_split
    local_stop = tl.minimum(local_start + keys_per_split, chunk_len)
    acc = tl.zeros((BLOCK_B, BLOCK_D), dtype=tl.float32)
    if TMA:  # rows past B, dims past D and keys past the chunk read as zeros: no masks
        row0 = tl.program_id(0) * BLOCK_B
        dim0 = tl.program_id(1) * BLOCK_D
        for j0 in range(local_start, local_stop, BLOCK_N):
            h = h_desc.load([row0, tl.cast(j0, tl.int32)])
            k = k_desc.load([tl.cast(j0, tl.int32), dim0])
            acc = matmul(h, k, acc, DOT_PRECISION)
    else:
        # rows ≥ B and dims ≥ D read row i mod B, dim d mod D (in bounds; never stored): only the key
        # range is masked in the loop, and the pointers advance by one step of keys
        steps = tl.arange(0, BLOCK_N)
        h_ptrs = h_ptr + (rows % B)[:, None] * h_stride + (local_start + steps)[None, :]
        k_ptrs = k_ptr + (key_start + local_start + steps)[:, None] * stride_kn + (dims % D)[None, :] * stride_kd
        for j0 in range(local_start, local_stop, BLOCK_N):
            in_range = j0 + steps < local_stop
            h = tl.load(h_ptrs, mask=in_range[None, :], other=0.0)
            k = tl.load(k_ptrs, mask=in_range[:, None], other=0.0)
            acc = matmul(h, k, acc, DOT_PRECISION)
            h_ptrs += BLOCK_N
            k_ptrs += BLOCK_N * stride_kn
    out = partial_ptr + (split * B + rows[:, None]) * D + dims[None, :]
    tl.store(out, acc, mask=(rows < B)[:, None] & (dims < D)[None, :])


def product_loads(h: torch.Tensor, keys: torch.Tensor, key_start: int, chunk_len: int, config) -> dict:
    """How circle_grad_queries_kernel reads the chunk [key_start, key_start + chunk_len) of keys and
    its columns of the workspace h (tile.workspace_product_loads): both descriptors bounded to the
    chunk, so that the last step of the last split reads zeros past it."""
    return workspace_product_loads(h, chunk_len, keys[key_start:key_start + chunk_len], "k_desc",
                                   ("BLOCK_N", "BLOCK_D"), config)
