"""Backward, step 2 (query side): R = H · K over one chunk of keys, in float32 partial sums.

Grid: (row blocks, D blocks, key splits of the chunk). B × D is small next to the chunk, so the
reduction over keys is split to fill the device; program (r, d, p) writes its own slice of a
(splits, B, D) float32 buffer, which the launcher adds in a fixed order.
"""
import triton
import triton.language as tl

from .tile import matmul


@triton.jit
def circle_grad_queries_kernel(
    h_ptr, k_ptr, partial_ptr,
    B, D, stride_kn, stride_kd, key_start, chunk_len, h_stride, keys_per_split,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    dims = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    split = tl.program_id(2)
    local_start = split.to(tl.int64) * keys_per_split
    local_stop = tl.minimum(local_start + keys_per_split, chunk_len)
    # rows ≥ B and dims ≥ D read row i mod B, dim d mod D (in bounds; never stored): only the key
    # range is masked in the loop, and the pointers advance by one step of keys
    steps = tl.arange(0, BLOCK_N)
    h_ptrs = h_ptr + (rows % B)[:, None] * h_stride + (local_start + steps)[None, :]
    k_ptrs = k_ptr + (key_start + local_start + steps)[:, None] * stride_kn + (dims % D)[None, :] * stride_kd
    acc = tl.zeros((BLOCK_B, BLOCK_D), dtype=tl.float32)
    for j0 in range(local_start, local_stop, BLOCK_N):
        in_range = j0 + steps < local_stop
        h = tl.load(h_ptrs, mask=in_range[None, :], other=0.0)
        k = tl.load(k_ptrs, mask=in_range[:, None], other=0.0)
        acc = matmul(h, k, acc, DOT_PRECISION)
        h_ptrs += BLOCK_N
        k_ptrs += BLOCK_N * stride_kn
    out = partial_ptr + (split * B + rows[:, None]) * D + dims[None, :]
    tl.store(out, acc, mask=(rows < B)[:, None] & (dims < D)[None, :])
