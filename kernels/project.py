"""Normalisation backward: ∂L/∂x_r = (X_r - (x̂_r · X_r) x̂_r) / max(‖x_r‖, eps).

X_r is the raw gradient with respect to x̂_r (R or Cc), given as float32 partial sums (S, rows, D)
that this kernel adds in a fixed order. The result is written in the dtype of x.
"""
import torch
import triton
import triton.language as tl

from .presets import tile_config


@triton.jit
def _summed_chunk(raw_ptr, rows, dims, mask, R, D, S):
    """Σ_s raw[s, rows, dims], added in split order."""
    acc = tl.load(raw_ptr + rows[:, None] * D + dims[None, :], mask=mask, other=0.0)
    for s in range(1, S):
        acc += tl.load(raw_ptr + (s * R + rows[:, None]) * D + dims[None, :], mask=mask, other=0.0)
    return acc


@triton.jit
def project_kernel(raw_ptr, x_ptr, inv_norm_ptr, out_ptr, R, D, S, stride_xr, stride_xd,
                   BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    inv_norm = tl.load(inv_norm_ptr + rows, mask=row_ok, other=0.0)
    radial = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (dims < D)[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_xr + dims[None, :].to(tl.int64) * stride_xd, mask=mask, other=0.0)
        radial += tl.sum(_summed_chunk(raw_ptr, rows, dims, mask, R, D, S) * x.to(tl.float32), axis=1)
    radial = radial * inv_norm * inv_norm  # (x̂ · X) / ‖x‖: the coefficient of x in the projection
    for d0 in range(0, D, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (dims < D)[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_xr + dims[None, :].to(tl.int64) * stride_xd, mask=mask, other=0.0)
        grad = (_summed_chunk(raw_ptr, rows, dims, mask, R, D, S) - radial[:, None] * x.to(tl.float32)) \
            * inv_norm[:, None]
        tl.store(out_ptr + rows[:, None] * D + dims[None, :], grad.to(out_ptr.dtype.element_ty), mask=mask)


def project_grad(raw: torch.Tensor, x: torch.Tensor, inv_norm: torch.Tensor) -> torch.Tensor:
    """Gradient with respect to x (R, D), in x's dtype, from raw partial sums (S, R, D) float32."""
    S, R, D = raw.shape
    out = torch.empty(R, D, device=x.device, dtype=x.dtype)
    cfg = tile_config("project", x)
    project_kernel[(triton.cdiv(R, cfg.blocks["BLOCK_R"]),)](
        raw, x, inv_norm, out, R, D, S, x.stride(0), x.stride(1), **cfg.kwargs())
    return out
