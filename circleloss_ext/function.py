"""The autograd Function behind both label forms on the fused backends.

FusedRows does the work and trusts its arguments (circle_loss, pairwise_circle_loss and the sharded
head have checked them); CircleLossFunction, the public one, checks them first.
"""
import torch

from . import ops
from .validation import as_index_labels, check_function_arguments


class FusedRows(torch.autograd.Function):
    """Per-row Circle Loss on a fused backend, for callers that have validated the arguments.
    Arguments and results: see CircleLossFunction."""

    @staticmethod
    def forward(ctx, queries, keys, query_labels, key_labels, margin, gamma, detach_alpha, backend, track_top1=False,
                smooth_pos=0.0, smooth_neg=0.0, excluded_keys=None):
        """(L, has_loss, top): top (2, B) is each row's largest positive and negative similarity with
        track_top1, else empty; smooth_pos, smooth_neg: label smoothing's c_p, c_n (ops.smoothed_rows);
        excluded_keys (B,) int64: each row's own slot in a reference set (-1: none)."""
        exclude_self = keys is None
        if exclude_self:
            keys, key_labels = queries, query_labels
        row_loss, statistics, top, _ = ops.forward_rows(queries, keys, query_labels, key_labels, margin, gamma,
                                                        exclude_self, backend, track_top1, smooth_pos, smooth_neg,
                                                        excluded_keys)
        ctx.save_for_backward(queries, keys, query_labels, key_labels, *statistics.tensors())
        ctx.hyper = (margin, gamma, exclude_self, detach_alpha, backend, smooth_pos, smooth_neg)
        ctx.excluded_keys = excluded_keys
        has_loss = statistics.takes_part()
        ctx.mark_non_differentiable(has_loss, top)
        return row_loss, has_loss, top

    @staticmethod
    def backward(ctx, grad_rows, *_grads_of_the_outputs_without_one):
        queries, keys, query_labels, key_labels, *statistics = ctx.saved_tensors
        margin, gamma, exclude_self, detach_alpha, backend, smooth_pos, smooth_neg = ctx.hyper
        need_queries = ctx.needs_input_grad[0]
        need_keys = need_queries if exclude_self else ctx.needs_input_grad[1]
        non_tensors = (None,) * (len(ctx.needs_input_grad) - 2)  # labels, settings (CircleLossFunction takes fewer)
        grad_q, grad_k = ops.backward_rows(
            grad_rows.float().contiguous(), queries, keys, query_labels, key_labels, ops.RowStatistics(*statistics),
            margin, gamma, exclude_self, detach_alpha, need_queries, need_keys, backend, smooth_pos, smooth_neg,
            ctx.excluded_keys)
        if exclude_self:  # queries and keys are one tensor: both contributions land on its rows
            return (grad_q + grad_k if need_queries else None, None, *non_tensors)
        return (grad_q if need_queries else None, grad_k if need_keys else None, *non_tensors)


class CircleLossFunction(FusedRows):
    """Per-row Circle Loss of queries against labelled keys, fused: no B × N tensor is ever held.

    apply(queries, keys, query_labels, key_labels, margin, gamma, detach_alpha, backend) -> (L, has_loss)

    Arguments, by position (autograd Functions take no keywords):
      queries: Tensor (B, D); keys: Optional[Tensor] (N, D); query_labels: Tensor (B,);
      key_labels: Optional[Tensor] (N,); margin: float; gamma: float; detach_alpha: bool;
      backend: "triton" or "cpu". Returns (Tensor float32 (B,), Tensor bool (B,)).

    queries (B, D), keys (N, D): unnormalised, same dtype (fp16, bf16 or fp32) and device.
    query_labels int64 or int32 (B,); key_labels likewise (N,), or None for class-level keys (the rows of W,
    b_j = j: a label is < N, or negative for a row of no class, which has no positive and so no loss).
    keys None (with key_labels None): the keys are the queries themselves and the pair (i, i) is
    left out. margin m: any finite number; gamma γ > 0. backend: "triton" or "cpu" (a fused one).
    L is float32 (B,), 0 for rows without a positive or a negative (such a row takes no part: its
    values reach neither L nor any gradient); has_loss (bool, B) marks the others.
    With detach_alpha the gradient treats α as a constant (the paper's); otherwise it is the true
    derivative of L. Every argument is checked first, with the messages of circle_loss (class labels
    are read: one host sync).
    """

    @staticmethod
    def forward(ctx, queries, keys, query_labels, key_labels, margin, gamma, detach_alpha, backend):
        check_function_arguments(queries, keys, query_labels, key_labels, margin, gamma, detach_alpha, backend)
        ops.check_backend_runs(backend, queries)
        key_labels = None if key_labels is None else as_index_labels(key_labels)
        row_loss, has_loss, _ = FusedRows.forward(ctx, queries, keys, as_index_labels(query_labels), key_labels,
                                                  float(margin), float(gamma), detach_alpha, backend)
        return row_loss, has_loss
