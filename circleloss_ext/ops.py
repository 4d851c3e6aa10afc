"""The fused forward and backward as torch.library custom ops, and the dispatch to their backends.

Registering them as custom ops (with fake implementations for shape propagation) lets
torch.compile trace models that use the loss without a graph break: the ops stay opaque.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def _kernels(backend: str):
    """The module with inverse_norms, circle_forward and circle_backward for a fused backend."""
    if backend == "triton":
        from . import kernels
        return kernels
    if backend == "cpu":
        from . import _C
        return _C
    raise ValueError(f"backend={backend!r} has no fused implementation")


@torch.library.custom_op("circleloss_ext::fused_forward", mutates_args=())
def fused_forward(queries: Tensor, keys: Tensor, query_labels: Tensor, key_labels: Optional[Tensor],
                  margin: float, gamma: float, exclude_self: bool,
                  backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(L, LP, LN, inv_norm_q, inv_norm_k), all float32: per-row loss and the statistics backward needs."""
    impl = _kernels(backend)
    inv_norm_q = impl.inverse_norms(queries)
    inv_norm_k = inv_norm_q.clone() if exclude_self else impl.inverse_norms(keys)
    lse_pos, lse_neg = impl.circle_forward(queries, keys, query_labels, key_labels, inv_norm_q, inv_norm_k,
                                           margin, gamma, exclude_self)
    return F.softplus(lse_pos + lse_neg), lse_pos, lse_neg, inv_norm_q, inv_norm_k


@fused_forward.register_fake
def _(queries, keys, query_labels, key_labels, margin, gamma, exclude_self, backend):
    rows = queries.new_empty(queries.shape[0], dtype=torch.float32)
    return rows, torch.empty_like(rows), torch.empty_like(rows), torch.empty_like(rows), \
        keys.new_empty(keys.shape[0], dtype=torch.float32)


@torch.library.custom_op("circleloss_ext::fused_backward", mutates_args=())
def fused_backward(grad_rows: Tensor, queries: Tensor, keys: Tensor, query_labels: Tensor,
                   key_labels: Optional[Tensor], inv_norm_q: Tensor, inv_norm_k: Tensor, lse_pos: Tensor,
                   lse_neg: Tensor, margin: float, gamma: float, exclude_self: bool, detach_alpha: bool,
                   need_queries: bool, need_keys: bool, backend: str) -> tuple[Tensor, Tensor]:
    """(∂L/∂queries, ∂L/∂keys) in the inputs' dtypes; an empty tensor stands for a gradient not asked for."""
    grad_q, grad_k = _kernels(backend).circle_backward(
        grad_rows, queries, keys, query_labels, key_labels, inv_norm_q, inv_norm_k, lse_pos, lse_neg,
        margin, gamma, exclude_self, detach_alpha, need_queries, need_keys)
    return (grad_q if need_queries else queries.new_empty(0),
            grad_k if need_keys else keys.new_empty(0))


@fused_backward.register_fake
def _(grad_rows, queries, keys, query_labels, key_labels, inv_norm_q, inv_norm_k, lse_pos, lse_neg, margin,
      gamma, exclude_self, detach_alpha, need_queries, need_keys, backend):
    return (torch.empty_like(queries, memory_format=torch.contiguous_format) if need_queries
            else queries.new_empty(0),
            torch.empty_like(keys, memory_format=torch.contiguous_format) if need_keys else keys.new_empty(0))
