"""Backward launcher: σ_i per row, then R = G·K̂ and Cc = Gᵀ·Q̂, then the normalisation backward."""
import torch

from .grad_keys import grad_keys_raw
from .grad_queries import grad_queries_raw
from .project import project_grad
from .tile import problem_arguments


def circle_backward(grad_rows, queries, keys, query_labels, key_labels, inv_norm_q, inv_norm_k,
                    lse_pos, lse_neg, margin, gamma, exclude_self, detach_alpha, need_queries, need_keys):
    """(∂L/∂queries, ∂L/∂keys) in the inputs' dtypes (None where not needed).

    grad_rows: float32 (B,) upstream gradient g_i of each row loss L_i = softplus(LP_i + LN_i).
    """
    problem = problem_arguments(queries, keys, query_labels, key_labels, inv_norm_q, inv_norm_k, margin, gamma,
                                exclude_self)
    row_scale = torch.sigmoid(lse_pos + lse_neg) * grad_rows  # σ_i; 0 for rows without a loss
    stats = (problem, lse_pos, lse_neg, row_scale, detach_alpha)
    grad_queries = project_grad(grad_queries_raw(*stats), queries, inv_norm_q) if need_queries else None
    grad_keys = project_grad(grad_keys_raw(*stats), keys, inv_norm_k) if need_keys else None
    return grad_queries, grad_keys
