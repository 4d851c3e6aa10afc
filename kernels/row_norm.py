"""Inverse row norms 1 / max(‖x_r‖, eps): the only normalisation the fused kernels need."""
import torch
import triton
import triton.language as tl

from .presets import tile_config

EPS = 1e-12  # as F.normalize


@triton.jit
def inv_norm_kernel(x_ptr, out_ptr, R, D, stride_r, stride_d, eps,
                    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    sum_sq = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(x_ptr + rows[:, None] * stride_r + dims[None, :].to(tl.int64) * stride_d,
                    mask=row_ok[:, None] & (dims < D)[None, :], other=0.0).to(tl.float32)
        sum_sq += tl.sum(x * x, axis=1)
    tl.store(out_ptr + rows, 1.0 / tl.maximum(tl.sqrt(sum_sq), eps), mask=row_ok)


def inverse_norms(x: torch.Tensor) -> torch.Tensor:
    """float32 (R,) inverse norms of the rows of x (R, D); x is read in place, never copied."""
    R, D = x.shape
    out = torch.empty(R, device=x.device, dtype=torch.float32)
    cfg = tile_config("inv_norm", x)
    grid = (triton.cdiv(R, cfg.blocks["BLOCK_R"]),)
    inv_norm_kernel[grid](x, out, R, D, x.stride(0), x.stride(1), EPS, **cfg.kwargs())
    return out
