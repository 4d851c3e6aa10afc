"""Public functions: validation, autocast, backend dispatch and the reduction."""
import torch

from . import reference
from .function import FusedRows
from .ops import resolve_backend
from .validation import (check_bool, check_hyperparameters, check_label_values, check_labels, check_matrix,
                         check_same)


def _autocast(*tensors):
    """Under torch.autocast the loss behaves as nn.Linear then cross_entropy: the products run in the
    autocast dtype, the loss comes back in float32."""
    device_type = tensors[0].device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors, tensors[0].dtype
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) for t in tensors), torch.float32


def _reduce(row_loss, has_loss, reduction, dtype):
    """Row losses (float32, or float64 from the reference) summed at that precision, cast to dtype
    once at the end: 16-bit rows that fit their dtype give a mean that fits it too."""
    if reduction == "none":
        return row_loss.to(dtype)
    total = row_loss.sum()
    if reduction == "mean":
        total = total / has_loss.sum().clamp_min(1)
    return total.to(dtype)


def _rows(backend, queries, keys, query_labels, key_labels, margin, gamma, exclude_self, detach_alpha):
    """(L, has_loss) per row; key_labels None means class-level keys (b_j = j)."""
    if backend == "reference":
        if key_labels is None:
            key_labels = torch.arange(keys.shape[0], device=keys.device)
        return reference.circle_loss_rows(queries, keys, query_labels, key_labels, margin=margin, gamma=gamma,
                                          exclude_self=exclude_self, detach_alpha=detach_alpha)
    if exclude_self:
        keys, key_labels = None, None
    return FusedRows.apply(queries, keys, query_labels, key_labels, float(margin), float(gamma), detach_alpha,
                           backend)


def circle_loss(embeddings, weight, labels, *, m=0.25, gamma=256.0, reduction="mean", detach_alpha=True,
                ignore_index=-100, backend="auto"):
    """Circle Loss with class-level labels: embeddings (B, D) against the class matrix W = weight (C, D).

    Both are unnormalised (normalised inside). labels: int64 (B,) in [0, C), or ignore_index for rows
    that take no part. reduction "none" gives (B,) row losses (0 for ignored rows), "sum" their sum,
    "mean" their sum over the rows that have a loss (0 when none). detach_alpha=True treats the
    weights α as constants in the gradient, as the paper does. backend: "auto", "triton", "cpu" or
    "reference" (README, Backends).
    """
    check_matrix("embeddings", embeddings)
    check_matrix("weight", weight, embeddings.shape[1])
    check_same("weight", weight, "embeddings", embeddings)
    check_labels("labels", labels, embeddings.shape[0], "embeddings")
    check_same("labels", labels, "embeddings", embeddings, dtype=False)
    check_hyperparameters(m, gamma, reduction, backend)
    check_bool("detach_alpha", detach_alpha)
    if not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    (embeddings, weight), out_dtype = _autocast(embeddings, weight)
    run = resolve_backend(backend, embeddings)
    check_label_values(labels, weight.shape[0], ignore_index)
    if 0 <= ignore_index < weight.shape[0]:  # an in-range ignore_index must not match its class
        labels = labels.masked_fill(labels == ignore_index, -1)
    row_loss, has_loss = _rows(run, embeddings, weight, labels, None, m, gamma, False, detach_alpha)
    return _reduce(row_loss, has_loss, reduction, out_dtype)


def pairwise_circle_loss(embeddings, labels, *, ref_embeddings=None, ref_labels=None, m=0.4, gamma=80.0,
                         reduction="mean", detach_alpha=True, backend="auto"):
    """Circle Loss with pair-wise labels: each embedding against the others of the batch (the pair
    (i, i) left out) or against a reference set (ref_embeddings (N, D), ref_labels (N,), e.g. a
    cross-batch memory). Positives share the label, negatives do not; rows without a positive or
    a negative have no loss (0 under "none", not counted by "mean").
    """
    check_matrix("embeddings", embeddings)
    check_labels("labels", labels, embeddings.shape[0], "embeddings")
    check_same("labels", labels, "embeddings", embeddings, dtype=False)
    if (ref_embeddings is None) != (ref_labels is None):
        missing = "ref_labels" if ref_labels is None else "ref_embeddings"
        raise ValueError(f"a reference set needs both ref_embeddings and ref_labels; {missing} is missing")
    if ref_embeddings is not None:
        check_matrix("ref_embeddings", ref_embeddings, embeddings.shape[1])
        check_same("ref_embeddings", ref_embeddings, "embeddings", embeddings)
        check_labels("ref_labels", ref_labels, ref_embeddings.shape[0], "ref_embeddings")
        check_same("ref_labels", ref_labels, "embeddings", embeddings, dtype=False)
    check_hyperparameters(m, gamma, reduction, backend)
    check_bool("detach_alpha", detach_alpha)
    exclude_self = ref_embeddings is None
    if exclude_self:
        ref_embeddings, ref_labels = embeddings, labels
    (embeddings, ref_embeddings), out_dtype = _autocast(embeddings, ref_embeddings)
    if exclude_self:
        ref_embeddings = embeddings
    run = resolve_backend(backend, embeddings)
    row_loss, has_loss = _rows(run, embeddings, ref_embeddings, labels, ref_labels, m, gamma, exclude_self,
                               detach_alpha)
    return _reduce(row_loss, has_loss, reduction, out_dtype)
