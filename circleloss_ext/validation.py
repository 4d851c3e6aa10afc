"""Input checks: every bad argument gets an error that names it and says what was expected."""
import math

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
REDUCTIONS = ("none", "sum", "mean")
BACKENDS = ("auto", "triton", "cpu", "reference")
FUSED_BACKENDS = ("triton", "cpu")


def check_matrix(name: str, x, dim: int = None, dim_name: str = "D", like: str = "embeddings") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (rows, {dim_name}), got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must have at least one row and one column, got shape {tuple(x.shape)}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name} must have {dim_name} = {dim} columns (as {like}), got shape {tuple(x.shape)}")


LABEL_DTYPES = (torch.int64, torch.int32)


def check_labels(name: str, labels, rows: int, rows_of: str) -> None:
    """Labels: a 1-D int64 or int32 tensor (int32 as DALI loaders and pytorch-metric-learning give)
    with one entry per row; callers widen int32 to int64 (as_index_labels)."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of int64 or int32, got {type(labels).__name__}")
    if labels.dtype not in LABEL_DTYPES:
        raise TypeError(f"{name} must have dtype torch.int64 or torch.int32, got {labels.dtype}")
    if labels.dim() != 1 or labels.shape[0] != rows:
        raise ValueError(f"{name} must have shape ({rows},), one label per row of {rows_of}, "
                         f"got {tuple(labels.shape)}")


def as_index_labels(labels: torch.Tensor) -> torch.Tensor:
    """Checked labels as the kernels read them: int64 (a copy of B or N integers for int32)."""
    return labels.long()


def check_same(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor, dtype: bool = True) -> None:
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}; both must be on one device")
    if dtype and x.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {x.dtype} but {ref_name} has {ref.dtype}; they must match "
                        "(cast one, or run under torch.autocast)")


def check_margin_and_scale(margin, gamma) -> None:
    """m: any finite number (the paper sweeps m < 0 too; every fused path follows α's clipping for
    any m). γ: finite and > 0."""
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
        raise ValueError(f"m must be a finite number, got {margin!r}")
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not math.isfinite(gamma) or gamma <= 0:
        raise ValueError(f"gamma must be a finite number > 0, got {gamma!r}")


def check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")


def check_hyperparameters(margin, gamma, reduction, backend, detach_alpha=True) -> None:
    """The options every function and module takes, with the messages they all share."""
    check_margin_and_scale(margin, gamma)
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    check_bool("detach_alpha", detach_alpha)


def check_label_smoothing(label_smoothing) -> None:
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)) or \
            not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be a number in [0, 1], got {label_smoothing!r}")


def check_slot_indices(index: torch.Tensor, num_keys: int) -> None:
    """ref_self_index values are keys of the reference set or -1."""
    _refuse_labels((index < -1) | (index >= num_keys), index,
                   f"ref_self_index must lie in [0, {num_keys}) (a key of the reference set) or be -1 (none)")


def check_ignore_index(ignore_index) -> None:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")


def check_label_values(labels: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """Class labels must lie in [0, C) or equal ignore_index."""
    bad = ((labels < 0) | (labels >= num_classes)) & (labels != ignore_index)
    _refuse_labels(bad, labels, f"labels must lie in [0, num_classes={num_classes}) or equal "
                                f"ignore_index={ignore_index}")


def _refuse_labels(bad: torch.Tensor, labels: torch.Tensor, message: str) -> None:
    """ValueError(message, and the first bad label) where any label is bad. Reads the mask (one host
    sync); under torch.compile the check becomes a device-side assert."""
    if torch.compiler.is_compiling():
        torch._assert_async(~bad.any(), message)
        return
    if bool(bad.any()):
        raise ValueError(f"{message}; found {labels[bad][0].item()}")


def check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_function_arguments(queries, keys, query_labels, key_labels, margin, gamma, detach_alpha,
                             backend) -> None:
    """CircleLossFunction's arguments, with the functions' messages, plus what only the fused paths
    require: 16- or 32-bit operands and a fused backend. Class labels are read (one host sync)."""
    check_matrix("queries", queries)
    if queries.dtype not in FUSED_DTYPES:
        raise TypeError(f"queries must be float16, bfloat16 or float32 for a fused backend, got {queries.dtype} "
                        "(circle_loss and pairwise_circle_loss send float64 to the reference)")
    check_labels("query_labels", query_labels, queries.shape[0], "queries")
    check_same("query_labels", query_labels, "queries", queries, dtype=False)
    if keys is None:
        if key_labels is not None:
            raise ValueError("key_labels must be None when keys is None (the batch against itself: "
                             "query_labels label the keys too)")
    else:
        check_matrix("keys", keys, queries.shape[1], like="queries")
        check_same("keys", keys, "queries", queries)
        if key_labels is not None:
            check_labels("key_labels", key_labels, keys.shape[0], "keys")
            check_same("key_labels", key_labels, "queries", queries, dtype=False)
    check_margin_and_scale(margin, gamma)
    check_bool("detach_alpha", detach_alpha)
    if backend not in FUSED_BACKENDS:
        raise ValueError(f"backend must be 'triton' or 'cpu' (a fused backend), got {backend!r}")
    if keys is not None and key_labels is None:
        check_class_indices("query_labels", query_labels, keys.shape[0])


def check_class_indices(name: str, labels: torch.Tensor, num_keys: int) -> None:
    """Class-level keys: a label indexes a row of keys, or is negative (no class: no positive, no loss)."""
    _refuse_labels(labels >= num_keys, labels, f"{name} must be < N = {num_keys} (a row of keys) or negative "
                                               "(no class)")
