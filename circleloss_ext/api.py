"""Public functions: validation, autocast, backend dispatch and the reduction."""
from typing import Literal, Optional, Union

import torch
from torch import Tensor

from . import reference
from .function import FusedRows
from .ops import resolve_backend, top1_accuracy
from .validation import (as_index_labels, check_bool, check_hyperparameters, check_ignore_index, check_label_smoothing,
                         check_label_values, check_labels, check_matrix, check_same, check_slot_indices)

Reduction = Literal["none", "sum", "mean"]
Backend = Literal["auto", "triton", "cpu", "reference"]


def autocasting(x: Tensor) -> bool:
    """Whether autocast is on for x's device: then operands of different float dtypes are fine (both are
    cast to the autocast dtype, as nn.Linear's are)."""
    return torch.is_autocast_enabled(x.device.type)


def autocast_operands(*tensors):
    """Under torch.autocast the loss behaves as nn.Linear then cross_entropy: the products run in the
    autocast dtype, the loss comes back in float32."""
    if not autocasting(tensors[0]):
        return tensors, tensors[0].dtype
    dtype = torch.get_autocast_dtype(tensors[0].device.type)
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


def _rows(backend, queries, keys, query_labels, key_labels, margin, gamma, exclude_self, detach_alpha, track_top1,
          smooth_pos=0.0, smooth_neg=0.0, excluded_keys=None):
    """(L, has_loss, top) per row; key_labels None means class-level keys (b_j = j); top (2, B) is each
    row's largest positive and negative similarity with track_top1, else empty; smooth_pos, smooth_neg:
    label smoothing's c_p, c_n."""
    if backend == "reference":
        if key_labels is None:
            key_labels = torch.arange(keys.shape[0], device=keys.device)
        row_loss, has_loss = reference.circle_loss_rows(queries, keys, query_labels, key_labels, margin=margin,
                                                        gamma=gamma, exclude_self=exclude_self,
                                                        detach_alpha=detach_alpha, smooth_pos=smooth_pos,
                                                        smooth_neg=smooth_neg, excluded_keys=excluded_keys)
        top = reference.nearest_similarities(queries, keys, query_labels, key_labels, exclude_self=exclude_self,
                                             excluded_keys=excluded_keys) if track_top1 else row_loss.new_empty(0)
        return row_loss, has_loss, top
    if exclude_self:
        keys, key_labels = None, None
    return FusedRows.apply(queries, keys, query_labels, key_labels, float(margin), float(gamma), detach_alpha,
                           backend, track_top1, smooth_pos, smooth_neg, excluded_keys)


def smoothing_coefficients(label_smoothing: float, num_classes: int) -> tuple[float, float]:
    """(c_p, c_n) = (ε(1 - 1/C), ε/C): what label smoothing ε over C classes takes from the own class's logit
    and gives to every other class's."""
    return float(label_smoothing) * (1.0 - 1.0 / num_classes), float(label_smoothing) / num_classes


def _result(row_loss, has_loss, top, reduction, dtype, with_accuracy):
    loss = _reduce(row_loss, has_loss, reduction, dtype)
    return (loss, top1_accuracy(top, has_loss)) if with_accuracy else loss


def circle_loss(embeddings: Tensor, weight: Tensor, labels: Tensor, *, m: float = 0.25, gamma: float = 256.0,
                reduction: Reduction = "mean", detach_alpha: bool = True, ignore_index: int = -100,
                backend: Backend = "auto", with_accuracy: bool = False,
                label_smoothing: float = 0.0) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Circle Loss with class-level labels: embeddings (B, D) against the class matrix W = weight (C, D).

    Both are unnormalised (normalised inside); fp16, bf16, fp32 or fp64, of one dtype (any two under
    torch.autocast, e.g. 16-bit embeddings with an fp32 weight) and one device.
    labels: int64 or int32 (B,) in [0, C), or ignore_index for rows that take no part.
    m: margin (any finite number), gamma: scale γ > 0. reduction "none" gives (B,) row losses (0 for
    rows without a loss), "sum" their sum, "mean" their sum over the rows that have a loss (0 when
    none). detach_alpha=True treats the weights α as constants in the gradient, as the paper does;
    False gives the true derivative. backend: "auto" (triton for CUDA tensors, cpu for CPU tensors),
    "triton" (the fused Triton kernels), "cpu" (the fused C++ path) or "reference" (the naive
    formulation); float64 always runs the reference.
    with_accuracy=True returns (loss, accuracy): accuracy (float32, no gradient) is the share of the
    rows that take part whose own class has the highest cosine (argmax over all C classes, ties
    counted as misses), computed inside the forward at O(B) extra memory.
    label_smoothing ε in [0, 1] as F.cross_entropy's, over the C class logits (the row's own, -u, and
    every other, v): L_i - ε(1 - 1/C)·LP_i - (ε/C)·Σ_j v_ij, fused (one more per-row sum in forward).
    """
    check_matrix("embeddings", embeddings)
    check_matrix("weight", weight, embeddings.shape[1])
    check_same("weight", weight, "embeddings", embeddings, dtype=not autocasting(embeddings))
    check_labels("labels", labels, embeddings.shape[0], "embeddings")
    check_same("labels", labels, "embeddings", embeddings, dtype=False)
    check_hyperparameters(m, gamma, reduction, backend, detach_alpha)
    check_ignore_index(ignore_index)
    check_bool("with_accuracy", with_accuracy)
    check_label_smoothing(label_smoothing)
    labels = as_index_labels(labels)
    (embeddings, weight), out_dtype = autocast_operands(embeddings, weight)
    run = resolve_backend(backend, embeddings)
    check_label_values(labels, weight.shape[0], ignore_index)
    if 0 <= ignore_index < weight.shape[0]:  # an in-range ignore_index must not match its class
        labels = labels.masked_fill(labels == ignore_index, -1)
    smooth_pos, smooth_neg = smoothing_coefficients(label_smoothing, weight.shape[0])
    row_loss, has_loss, top = _rows(run, embeddings, weight, labels, None, m, gamma, False, detach_alpha,
                                    with_accuracy, smooth_pos, smooth_neg)
    return _result(row_loss, has_loss, top, reduction, out_dtype, with_accuracy)


def pairwise_circle_loss(embeddings: Tensor, labels: Tensor, *, ref_embeddings: Optional[Tensor] = None,
                         ref_labels: Optional[Tensor] = None, m: float = 0.4, gamma: float = 80.0,
                         reduction: Reduction = "mean", detach_alpha: bool = True,
                         backend: Backend = "auto", with_accuracy: bool = False,
                         ref_self_index: Optional[Tensor] = None,
                         ignore_index: Optional[int] = None) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Circle Loss with pair-wise labels: each embedding against the others of the batch (the pair
    (i, i) left out) or against a reference set (ref_embeddings (N, D), ref_labels (N,), e.g. a
    cross-batch memory). Positives share the label, negatives do not; rows without a positive or
    a negative have no loss (0 under "none", not counted by "mean"). Labels are int64 or int32.
    Other arguments and the backends ("auto", "triton", "cpu", "reference") as circle_loss.
    with_accuracy=True returns (loss, accuracy): the share of the rows that take part whose nearest
    key (highest cosine) shares their label, i.e. retrieval precision at 1.
    ref_self_index (B,) int64 or int32, with a reference set: the key of the set that is each row's own
    slot (-1 for none), left out of that row's pairs, as a cross-batch memory that already holds the
    current batch needs; O(B), no B × N mask. The in-batch form is the case ref_self_index[i] = i.
    ignore_index: a label whose rows and keys take no part (default None: every label counts; pair-wise
    labels may be any integers, so no value is reserved unless you name one).
    """
    check_matrix("embeddings", embeddings)
    check_labels("labels", labels, embeddings.shape[0], "embeddings")
    check_same("labels", labels, "embeddings", embeddings, dtype=False)
    if (ref_embeddings is None) != (ref_labels is None):
        missing = "ref_labels" if ref_labels is None else "ref_embeddings"
        raise ValueError(f"a reference set needs both ref_embeddings and ref_labels; {missing} is missing")
    if ref_embeddings is not None:
        check_matrix("ref_embeddings", ref_embeddings, embeddings.shape[1])
        check_same("ref_embeddings", ref_embeddings, "embeddings", embeddings, dtype=not autocasting(embeddings))
        check_labels("ref_labels", ref_labels, ref_embeddings.shape[0], "ref_embeddings")
        check_same("ref_labels", ref_labels, "embeddings", embeddings, dtype=False)
    if ref_self_index is not None:
        if ref_embeddings is None:
            raise ValueError("ref_self_index needs a reference set (ref_embeddings, ref_labels); the in-batch form "
                             "leaves out each row's own pair already")
        check_labels("ref_self_index", ref_self_index, embeddings.shape[0], "embeddings")
        check_same("ref_self_index", ref_self_index, "embeddings", embeddings, dtype=False)
        check_slot_indices(ref_self_index, ref_embeddings.shape[0])
        ref_self_index = as_index_labels(ref_self_index)
    check_hyperparameters(m, gamma, reduction, backend, detach_alpha)
    check_bool("with_accuracy", with_accuracy)
    if ignore_index is not None:
        check_ignore_index(ignore_index)
    labels = as_index_labels(labels)
    exclude_self = ref_embeddings is None
    if exclude_self:
        ref_embeddings, ref_labels = embeddings, labels
    ref_labels = as_index_labels(ref_labels)
    (embeddings, ref_embeddings), out_dtype = autocast_operands(embeddings, ref_embeddings)
    if exclude_self:
        ref_embeddings = embeddings
    if ignore_index is not None:
        ref_embeddings, ref_labels, ref_self_index, exclude_self = _without_ignored_keys(
            ref_embeddings, ref_labels, ref_self_index, exclude_self, ignore_index)
    run = resolve_backend(backend, embeddings)
    row_loss, has_loss, top = _rows(run, embeddings, ref_embeddings, labels, ref_labels, m, gamma, exclude_self,
                                    detach_alpha, with_accuracy, excluded_keys=ref_self_index)
    return _result(row_loss, has_loss, top, reduction, out_dtype, with_accuracy)


def _without_ignored_keys(keys, key_labels, self_index, exclude_self, ignore_index):
    """The keys labelled ignore_index taken out of the reference set (rows with that label then have no
    positive, so they take no part either). In-batch keys become a reference set of the kept rows,
    with each row's own slot in it; a given ref_self_index is moved to the kept keys' positions.
    One host sync, and a copy of the kept keys (O(N·D)) when any is dropped."""
    keep = key_labels != ignore_index
    if bool(keep.all()):
        return keys, key_labels, self_index, exclude_self
    position = torch.where(keep, torch.cumsum(keep, dim=0) - 1, -1)  # old key -> new key (-1: dropped)
    if exclude_self:
        self_index = position
    elif self_index is not None:
        self_index = torch.where(self_index >= 0, position[self_index.clamp_min(0)], -1)
    return keys[keep], key_labels[keep], self_index, False


def set_workspace_limit(nbytes: int) -> None:
    """Cap, in bytes, the workspace of the Triton backward (default 1 GiB): the only memory it holds
    that grows with B × N (∂L/∂S for one chunk of keys, in the operands' dtype). Backward runs over
    ⌈N / chunk⌉ chunks of the largest size that fits; a smaller cap costs speed, never accuracy.
    Process-wide; read at each backward."""
    from .kernels.backward import set_workspace_limit as set_limit
    set_limit(nbytes)


def workspace_limit() -> int:
    """The current cap of set_workspace_limit, in bytes."""
    from .kernels.backward import workspace_limit as limit
    return limit()
