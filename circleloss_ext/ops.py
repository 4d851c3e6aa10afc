"""The fused forward and backward as torch.library custom ops, and the dispatch to their backends.

Registering them as custom ops (with fake implementations for shape propagation) lets
torch.compile trace models that use the loss without a graph break: the ops stay opaque.
"""
import importlib.util
import warnings
from dataclasses import dataclass
from typing import Optional, Protocol

import torch
from torch import Tensor

_NEG_INF = float("-inf")


def cpu_extension_built() -> bool:
    return importlib.util.find_spec("circleloss_ext._C") is not None


def _triton_runs_on(device: torch.device) -> bool:
    if device.type == "cuda":
        return True
    from .kernels.presets import interpreting
    return interpreting()


def check_backend_runs(backend: str, x: Tensor) -> None:
    """A fused backend named by the caller must be able to run on x's device: say why not."""
    if backend == "triton" and not _triton_runs_on(x.device):
        raise RuntimeError(f"backend='triton' needs CUDA tensors, got tensors on {x.device}; set "
                           "TRITON_INTERPRET=1 before importing triton to run the kernels on the CPU "
                           "(slowly), or use backend='cpu' or 'reference'")
    if backend == "cpu":
        if x.device.type != "cpu":
            raise RuntimeError(f"backend='cpu' needs CPU tensors, got tensors on {x.device}; use backend='triton'")
        if not cpu_extension_built():
            raise RuntimeError("backend='cpu' needs the C++ extension circleloss_ext._C, which was not built: "
                               "install a C++ compiler (g++) and reinstall with "
                               "`pip install --no-build-isolation -e .`")


_warned_no_cpu_extension = False


def _reference_for_cpu() -> str:
    global _warned_no_cpu_extension
    if not _warned_no_cpu_extension:
        warnings.warn("circleloss_ext: the C++ CPU path (circleloss_ext._C) was not built, so CPU tensors use "
                      "the naive reference; install a C++ compiler and reinstall with "
                      "`pip install --no-build-isolation -e .` for the fused CPU path", RuntimeWarning)
        _warned_no_cpu_extension = True
    return "reference"


def resolve_backend(backend: str, x: Tensor) -> str:
    """The backend that will run: "auto" picks triton for CUDA tensors, cpu for CPU tensors (the
    reference, with one warning, where the C++ extension was not built); float64 always goes to the
    reference (the fused paths compute in float32)."""
    check_backend_runs(backend, x)
    if x.dtype == torch.float64:
        return "reference"
    if backend == "auto":
        if x.device.type == "cuda":
            return "triton"
        if x.device.type == "cpu":
            return "cpu" if cpu_extension_built() else _reference_for_cpu()
        return "reference"
    return backend


class FusedBackend(Protocol):
    """What a fused backend provides: the contract `kernels/` (Triton) and `circleloss_ext._C` (C++)
    both satisfy. A new backend is a module with these three functions, named in `_kernels` and in
    validation.FUSED_BACKENDS, and run through tests/test_parity.py's `fused` fixture.

    The callers (fused_forward, fused_backward below) have checked every size, made rows that take
    no part inert, and pass float32 statistics; operands may have any strides, labels are int64
    (B,) / (N,) in any layout; key_labels None means class-level keys (b_j = j); excluded_keys None, or
    int64 (B,): the key j = excluded_keys[i] is no pair of row i (-1: none; in-batch keys pass i itself).
    """

    def inverse_norms(self, x: Tensor) -> Tensor:
        """float32 (R,): 1 / max(‖x_r‖, 1e-12) for x (R, D), in a fixed reduction order."""

    def circle_forward(self, queries: Tensor, keys: Tensor, query_labels: Tensor, key_labels: Optional[Tensor],
                       inv_norm_q: Tensor, inv_norm_k: Tensor, margin: float, gamma: float,
                       excluded_keys: Optional[Tensor], track_top1: bool,
                       negative_sum: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(LP, LN, top, V): LP, LN float32 (B,), log-sum-exps of each row's positive and negative logits,
        -inf where the row has none. With track_top1, top float32 (2, B) holds each row's largest positive
        and largest negative similarity (-inf where none); with negative_sum, V float32 (B,) the sum of
        each row's negative logits (label smoothing); each an empty tensor otherwise."""

    def circle_backward(self, grad_rows: Tensor, queries: Tensor, keys: Tensor, query_labels: Tensor,
                        key_labels: Optional[Tensor], inv_norm_q: Tensor, inv_norm_k: Tensor, lse_pos: Tensor,
                        lse_neg: Tensor, margin: float, gamma: float, excluded_keys: Optional[Tensor],
                        detach_alpha: bool, need_queries: bool, need_keys: bool, smooth_pos: float,
                        smooth_neg: float) -> tuple[Tensor, Tensor]:
        """(∂L/∂queries, ∂L/∂keys) in the operands' dtypes for L_i = softplus(LP_i + LN_i) - smooth_pos·LP_i
        - smooth_neg·V_i and upstream gradients grad_rows (float32 (B,)); anything (None or empty) where
        not needed."""


def _kernels(backend: str) -> FusedBackend:
    """The module implementing FusedBackend for a fused backend."""
    if backend == "triton":
        from . import kernels
        return kernels
    if backend == "cpu":
        from . import _C
        return _C
    raise ValueError(f"backend={backend!r} has no fused implementation")


def rows_taking_part(lse_pos: Tensor, lse_neg: Tensor) -> Tensor:
    """Rows with a positive and a negative. LP_i (LN_i) is -inf exactly when row i has no positive
    (negative), whatever the values: a row of NaN still takes part, and its NaN propagates."""
    return (lse_pos != _NEG_INF) & (lse_neg != _NEG_INF)


def _check_sizes(queries: Tensor, keys: Tensor, query_labels: Tensor, key_labels: Optional[Tensor],
                 exclude_self: bool, excluded_keys: Optional[Tensor], inv_norm_k: Optional[Tensor] = None,
                 **rows: Tensor) -> None:
    """The sizes the kernels index with (the ops are reachable as torch.ops.circleloss_ext.*): labels,
    inv_norm_k (N,) and the per-row vectors given as keywords (B,)."""
    if queries.dim() != 2 or keys.dim() != 2 or queries.shape[1] != keys.shape[1]:
        raise ValueError(f"queries (B, D) and keys (N, D) must share D, got {tuple(queries.shape)} and "
                         f"{tuple(keys.shape)}")
    if exclude_self and keys.shape[0] != queries.shape[0]:
        raise ValueError("exclude_self: in-batch keys must be the queries (N = B)")
    if exclude_self and excluded_keys is not None:
        raise ValueError("excluded_keys is for reference sets; in-batch keys (exclude_self) leave out i itself")
    if key_labels is None and excluded_keys is not None:
        raise ValueError("excluded_keys is for reference sets; class-level keys (key_labels None) have none")
    if excluded_keys is not None and excluded_keys.dtype != torch.int64:
        raise ValueError(f"excluded_keys must be int64, got {excluded_keys.dtype}")
    B, N = queries.shape[0], keys.shape[0]
    for name, t, n in (("query_labels", query_labels, B), ("key_labels", key_labels, N), ("inv_norm_k", inv_norm_k, N),
                       ("excluded_keys", excluded_keys, B), *((name, t, B) for name, t in rows.items())):
        if t is not None and tuple(t.shape) != (n,):
            raise ValueError(f"{name} must have shape ({n},), got {tuple(t.shape)}")


def smoothed_rows(lse_pos: Tensor, lse_neg: Tensor, negative_sum: Tensor, smooth_pos: float,
                  smooth_neg: float) -> Tensor:
    """L_i = softplus(LP_i + LN_i) - c_p·LP_i - c_n·V_i for the rows that take part, 0 for the others.
    With one positive this is cross-entropy with label smoothing ε over C classes (c_p = ε(1 - 1/C),
    c_n = ε/C; V_i the sum of the negative logits); c_p = c_n = 0 is plain Circle Loss."""
    row_loss = torch.logaddexp(lse_pos + lse_neg, torch.zeros_like(lse_pos))  # softplus, exact beyond 20 too
    if smooth_pos:
        row_loss = row_loss - smooth_pos * lse_pos
    if smooth_neg:
        row_loss = row_loss - smooth_neg * negative_sum
    return torch.where(rows_taking_part(lse_pos, lse_neg), row_loss, 0.0)


def _excluded(queries: Tensor, exclude_self: bool, excluded_keys: Optional[Tensor]) -> Optional[Tensor]:
    """What the backends take: each row's excluded key (i itself in-batch), or None."""
    if exclude_self:
        return torch.arange(queries.shape[0], device=queries.device)
    return excluded_keys


@torch.library.custom_op("circleloss_ext::fused_forward", mutates_args=())
def fused_forward(queries: Tensor, keys: Tensor, query_labels: Tensor, key_labels: Optional[Tensor],
                  margin: float, gamma: float, exclude_self: bool, excluded_keys: Optional[Tensor], track_top1: bool,
                  smooth_pos: float, smooth_neg: float,
                  backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(L, LP, LN, inv_norm_q, inv_norm_k, top, V), all float32: per-row loss (smoothed_rows: 0 for a row
    that takes no part, whatever its values), the statistics backward needs, with track_top1 each row's
    largest positive and negative similarity (2, B), with smooth_neg ≠ 0 the sum of each row's negative
    logits (B,) (each empty otherwise). exclude_self: keys are the queries and (i, i) is no pair;
    excluded_keys (B,) int64: for a reference set, the key that is no pair of row i (-1: none)."""
    _check_sizes(queries, keys, query_labels, key_labels, exclude_self, excluded_keys)
    impl = _kernels(backend)
    inv_norm_q = impl.inverse_norms(queries)
    inv_norm_k = inv_norm_q.clone() if exclude_self else impl.inverse_norms(keys)
    lse_pos, lse_neg, top, negative_sum = impl.circle_forward(queries, keys, query_labels, key_labels, inv_norm_q,
                                                              inv_norm_k, margin, gamma,
                                                              _excluded(queries, exclude_self, excluded_keys),
                                                              track_top1, smooth_neg != 0.0)
    row_loss = smoothed_rows(lse_pos, lse_neg, negative_sum, smooth_pos, smooth_neg)
    return row_loss, lse_pos, lse_neg, inv_norm_q, inv_norm_k, top, negative_sum


@fused_forward.register_fake
def _(queries, keys, query_labels, key_labels, margin, gamma, exclude_self, excluded_keys, track_top1, smooth_pos,
      smooth_neg, backend):
    rows = queries.new_empty(queries.shape[0], dtype=torch.float32)
    top = queries.new_empty((2, queries.shape[0]) if track_top1 else (0,), dtype=torch.float32)
    negative_sum = queries.new_empty(queries.shape[0] if smooth_neg != 0.0 else 0, dtype=torch.float32)
    return rows, torch.empty_like(rows), torch.empty_like(rows), torch.empty_like(rows), \
        keys.new_empty(keys.shape[0], dtype=torch.float32), top, negative_sum


@torch.library.custom_op("circleloss_ext::fused_backward", mutates_args=())
def fused_backward(grad_rows: Tensor, queries: Tensor, keys: Tensor, query_labels: Tensor,
                   key_labels: Optional[Tensor], inv_norm_q: Tensor, inv_norm_k: Tensor, lse_pos: Tensor,
                   lse_neg: Tensor, margin: float, gamma: float, exclude_self: bool, excluded_keys: Optional[Tensor],
                   detach_alpha: bool, need_queries: bool, need_keys: bool, smooth_pos: float, smooth_neg: float,
                   backend: str) -> tuple[Tensor, Tensor]:
    """(∂L/∂queries, ∂L/∂keys) in the inputs' dtypes; an empty tensor stands for a gradient not asked for.

    A row that takes no part reaches no gradient, whatever its values (NaN, inf): its query row is
    zeroed and its inverse norm set to 1 (so its similarities are 0 and every term finite), its upstream
    gradient is 0 and its log-sum-exps +inf (so every G_ij of the row is exactly 0). As a key (in-batch)
    it is untouched.
    """
    _check_sizes(queries, keys, query_labels, key_labels, exclude_self, excluded_keys, inv_norm_k, grad_rows=grad_rows,
                 lse_pos=lse_pos, lse_neg=lse_neg, inv_norm_q=inv_norm_q)
    takes_part = rows_taking_part(lse_pos, lse_neg)
    queries = torch.where(takes_part[:, None], queries, 0.0)
    inv_norm_q = torch.where(takes_part, inv_norm_q, 1.0)
    grad_rows = torch.where(takes_part, grad_rows, 0.0)
    lse_pos = torch.where(takes_part, lse_pos, float("inf"))
    lse_neg = torch.where(takes_part, lse_neg, float("inf"))
    grad_q, grad_k = _kernels(backend).circle_backward(
        grad_rows, queries, keys, query_labels, key_labels, inv_norm_q, inv_norm_k, lse_pos, lse_neg,
        margin, gamma, _excluded(queries, exclude_self, excluded_keys), detach_alpha, need_queries, need_keys,
        smooth_pos, smooth_neg)
    return (grad_q if need_queries else queries.new_empty(0),
            grad_k if need_keys else keys.new_empty(0))


@fused_backward.register_fake
def _(grad_rows, queries, keys, query_labels, key_labels, inv_norm_q, inv_norm_k, lse_pos, lse_neg, margin,
      gamma, exclude_self, excluded_keys, detach_alpha, need_queries, need_keys, smooth_pos, smooth_neg, backend):
    return (torch.empty_like(queries, memory_format=torch.contiguous_format) if need_queries
            else queries.new_empty(0),
            torch.empty_like(keys, memory_format=torch.contiguous_format) if need_keys else keys.new_empty(0))


@dataclass(frozen=True)
class RowStatistics:
    """What a fused backward needs from its forward, per call: LP_i and LN_i (float32 (B,), -inf where
    row i has no positive / negative) and the inverse norms 1/‖q_i‖ (B,) and 1/‖k_j‖ (N,). The custom ops
    pass them as flat tensors (their schema); the autograd Functions hold them as this."""
    lse_pos: Tensor
    lse_neg: Tensor
    inv_norm_q: Tensor
    inv_norm_k: Tensor

    def takes_part(self) -> Tensor:
        return rows_taking_part(self.lse_pos, self.lse_neg)

    def tensors(self) -> tuple[Tensor, ...]:
        """In the order of the constructor's arguments (for ctx.save_for_backward)."""
        return self.lse_pos, self.lse_neg, self.inv_norm_q, self.inv_norm_k


def forward_rows(queries: Tensor, keys: Tensor, query_labels: Tensor, key_labels: Optional[Tensor], margin: float,
                 gamma: float, exclude_self: bool, backend: str, track_top1: bool = False, smooth_pos: float = 0.0,
                 smooth_neg: float = 0.0,
                 excluded_keys: Optional[Tensor] = None) -> tuple[Tensor, RowStatistics, Tensor, Tensor]:
    """(L per row, its RowStatistics, top (2, B) or empty, V (B,) or empty) through the fused_forward op."""
    row_loss, *statistics, top, negative_sum = fused_forward(queries, keys, query_labels, key_labels, margin, gamma,
                                                             exclude_self, excluded_keys, track_top1, smooth_pos,
                                                             smooth_neg, backend)
    return row_loss, RowStatistics(*statistics), top, negative_sum


def top1_accuracy(top: Tensor, takes_part: Tensor) -> Tensor:
    """float32 (): the share of the rows taking part whose nearest key is a positive (top[0] > top[1]:
    the largest positive similarity beats every negative one); 0 when no row takes part."""
    correct = (top[0] > top[1]) & takes_part
    return correct.sum().float() / takes_part.sum().clamp_min(1).float()


def backward_rows(grad_rows: Tensor, queries: Tensor, keys: Tensor, query_labels: Tensor, key_labels: Optional[Tensor],
                  statistics: RowStatistics, margin: float, gamma: float, exclude_self: bool, detach_alpha: bool,
                  need_queries: bool, need_keys: bool, backend: str, smooth_pos: float = 0.0,
                  smooth_neg: float = 0.0, excluded_keys: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """(∂L/∂queries, ∂L/∂keys) through the fused_backward op, from forward's statistics."""
    return fused_backward(grad_rows, queries, keys, query_labels, key_labels, statistics.inv_norm_q,
                          statistics.inv_norm_k, statistics.lse_pos, statistics.lse_neg, margin, gamma, exclude_self,
                          excluded_keys, detach_alpha, need_queries, need_keys, smooth_pos, smooth_neg, backend)
