"""Class-sharded Circle Loss over torch.distributed (model parallelism over the class dimension, as
insightface's Partial FC does for softmax losses).

Rank r of W owns the contiguous rows [class_start, class_stop) of the class matrix. Each step the
embeddings and labels of the global batch are all-gathered; every rank scores the global batch
against its rows only (the fused kernels, never a B × C tensor) and keeps per-row partial
log-sum-exps LP_r, LN_r; all-reduces (max, then sum of exp) turn them into the global LP, LN; and
backward runs the fused backward of each shard against those global statistics. No rank ever holds
another rank's rows or their gradients.
"""
import json
import math
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops, reference
from .api import Backend, autocast_operands, autocasting, smoothing_coefficients
from .ops import resolve_backend
from .validation import (LABEL_DTYPES, as_index_labels, check_bool, check_hyperparameters, check_ignore_index,
                         check_label_smoothing, check_matrix, check_positive_int)

_NEG_INF = float("-inf")


def shard_range(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """[class_start, class_stop) of rank: num_classes // W rows, one more for the first num_classes % W ranks."""
    base, extra = divmod(num_classes, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def _all_reduce_lse(lse: torch.Tensor, group) -> torch.Tensor:
    """log Σ_r exp(lse_r) over the ranks, elementwise; -inf where every rank has -inf."""
    top = lse.clone()
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    shift = torch.where(top > _NEG_INF, top, torch.zeros_like(top))
    total = torch.exp(lse - shift)
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return shift + torch.log(total)


_SETTINGS_BYTES = 4096  # room for one rank's settings and error message, as JSON


def _all_gather_json(payload, group, world_size: int) -> list:
    """Every rank's payload (JSON-serialisable), through one all-gather of a fixed-size byte tensor on
    the group's device. (dist.all_gather_object was tried first: its pickled tensors left gloo ranks
    aborting at interpreter exit, "terminate called without an active exception", in 2 of 16 runs.)"""
    data = json.dumps(payload).encode()
    if len(data) > _SETTINGS_BYTES - 4:
        raise ValueError(f"ShardedCircleLoss settings take {len(data)} bytes as JSON, more than {_SETTINGS_BYTES - 4}")
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
    framed = len(data).to_bytes(4, "little") + data
    buffer = torch.zeros(_SETTINGS_BYTES, dtype=torch.uint8)
    buffer[:len(framed)] = torch.tensor(list(framed), dtype=torch.uint8)
    every = _all_gather(buffer.to(device)[None], group, world_size).cpu()
    rows = [bytes(row.tolist()) for row in every]
    return [json.loads(row[4:4 + int.from_bytes(row[:4], "little")]) for row in rows]


def _comparable(value):
    """A setting as it travels between ranks (JSON): numbers, bools and strings as they are (compared
    by value, so m=1 and m=1.0 agree), anything else by its repr."""
    return value if isinstance(value, (bool, int, float, str)) else repr(value)


# torch 2.13 renamed the single-tensor collectives; 2.11 (and NCCL builds before 2.12) have the old names.
_gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _all_gather(x: torch.Tensor, group, world_size: int) -> torch.Tensor:
    """The ranks' x (same shape on every rank) stacked along dim 0, in rank order: one collective into
    one buffer."""
    out = x.new_empty((world_size * x.shape[0], *x.shape[1:]))
    _gather_into(out, x.contiguous(), group=group)
    return out


def _sum_own_rows(x: torch.Tensor, group, world_size: int) -> torch.Tensor:
    """Σ over ranks of x (world_size·b, ...), of which each rank receives only its own b rows."""
    out = x.new_empty((x.shape[0] // world_size, *x.shape[1:]))
    _reduce_scatter(out, x.contiguous(), group=group)
    return out


class _ShardPartial:
    """Partial statistics of the global batch against one shard, and their backward, on one backend.

    Fused backends go through the custom ops; the reference materialises the shard's similarities
    and differentiates a surrogate whose gradient is the shard's part of the global gradient:
    Σ_i σ_i (e^(LP_i^r - LP_i) + e^(LN_i^r - LN_i)) with σ, LP, LN held constant.
    """

    def __init__(self, backend, margin, gamma, detach_alpha):
        self.backend, self.margin, self.gamma, self.detach_alpha = backend, margin, gamma, detach_alpha

    def _reference_lse(self, queries, keys, labels):
        """(LP^r, LN^r, V^r) of the shard from its materialised similarities."""
        return reference.circle_lse_of_similarities(
            reference.cosine_similarities(queries, keys), labels, torch.arange(keys.shape[0], device=keys.device),
            margin=self.margin, gamma=self.gamma, exclude_self=False, detach_alpha=self.detach_alpha,
            with_negative_sum=True)

    def forward(self, queries, keys, labels, track_top1, smooth_pos, smooth_neg):
        """(LP^r, LN^r, what backward needs, top^r, V^r): the shard's partial statistics; top^r (2, B) the
        largest positive and negative similarity within the shard with track_top1, V^r (B,) the sum of
        the shard's negative logits when label smoothing is on (smooth_neg ≠ 0); else empty."""
        if self.backend == "reference":
            with torch.no_grad():
                lse_pos, lse_neg, sums = self._reference_lse(queries, keys, labels)
            top = reference.nearest_similarities(queries, keys, labels, torch.arange(keys.shape[0], device=keys.device),
                                                 exclude_self=False) if track_top1 else lse_pos.new_empty(0)
            return lse_pos, lse_neg, (), top, sums
        # (the shard's own row losses are not used: the global ones come from the combined statistics)
        _, statistics, top, sums = ops.forward_rows(queries, keys, labels, None, self.margin, self.gamma, False,
                                                    self.backend, track_top1, smooth_pos, smooth_neg)
        return statistics.lse_pos, statistics.lse_neg, (statistics.inv_norm_q, statistics.inv_norm_k), top, sums

    def backward(self, grad_rows, queries, keys, labels, lse_pos, lse_neg, saved, need_keys, smooth_pos=0.0,
                 smooth_neg=0.0):
        if self.backend == "reference":
            # rows that take no part reach no gradient (the fused op sees to that itself)
            grad_rows = torch.where(ops.rows_taking_part(lse_pos, lse_neg), grad_rows, 0.0)
            row_scale = torch.sigmoid(lse_pos + lse_neg) * grad_rows
            safe_pos = torch.where(lse_pos > _NEG_INF, lse_pos, torch.zeros_like(lse_pos))
            safe_neg = torch.where(lse_neg > _NEG_INF, lse_neg, torch.zeros_like(lse_neg))
            with torch.enable_grad():
                q, k = queries.detach().requires_grad_(), keys.detach().requires_grad_()
                part_pos, part_neg, part_sum = self._reference_lse(q, k, labels)
                surrogate = (row_scale * (torch.exp(part_pos - safe_pos) + torch.exp(part_neg - safe_neg))).sum()
                if smooth_pos or smooth_neg:  # - c_p·LP^r (where the positive is in this shard) - c_n·V^r
                    own = torch.where(part_pos > _NEG_INF, part_pos, torch.zeros_like(part_pos))
                    surrogate = surrogate - (grad_rows * (smooth_pos * own + smooth_neg * part_sum)).sum()
                return torch.autograd.grad(surrogate, (q, k))
        # the shard's inverse norms with the global log-sum-exps: the shard's part of the global gradient
        statistics = ops.RowStatistics(lse_pos, lse_neg, *saved)
        grad_q, grad_k = ops.backward_rows(grad_rows, queries, keys, labels, None, statistics, self.margin, self.gamma,
                                           False, self.detach_alpha, True, need_keys, self.backend, smooth_pos,
                                           smooth_neg)
        return grad_q, (grad_k if need_keys else None)


class _ShardedCircleLossFunction(torch.autograd.Function):
    """Circle Loss of the gathered batch; see ShardedCircleLoss for the reductions and the gradient contract."""

    @staticmethod
    def forward(ctx, local_embeddings, keys, labels, partial, group, rank, world_size, reduction, track_top1,
                label_smoothing, num_classes):
        """(the loss, the global batch's top-1 accuracy or an empty tensor); labels: the gathered batch's
        labels as indices into keys (-1 for classes outside them); num_classes: the classes scored over
        all ranks this step (label smoothing spreads over them)."""
        queries = _all_gather(local_embeddings, group, world_size)
        smooth_pos, smooth_neg = smoothing_coefficients(label_smoothing, num_classes)
        part_pos, part_neg, saved, top, part_sum = partial.forward(queries, keys, labels, track_top1, smooth_pos,
                                                                   smooth_neg)
        lse_pos = _all_reduce_lse(part_pos, group)
        lse_neg = _all_reduce_lse(part_neg, group)
        takes_part = ops.rows_taking_part(lse_pos, lse_neg)
        negative_sum = part_sum
        if label_smoothing > 0:
            negative_sum = part_sum.clone()
            dist.all_reduce(negative_sum, group=group)
        accuracy = top.new_empty(0)
        if track_top1:  # the nearest class over all shards
            dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
            accuracy = ops.top1_accuracy(top, takes_part)
        ctx.mark_non_differentiable(accuracy)
        row_loss = ops.smoothed_rows(lse_pos, lse_neg, negative_sum, smooth_pos, smooth_neg)
        count = takes_part.sum().clamp_min(1)
        ctx.save_for_backward(queries, keys, labels, lse_pos, lse_neg, count, *saved)
        ctx.partial, ctx.group, ctx.rank, ctx.world_size, ctx.reduction = partial, group, rank, world_size, reduction
        ctx.smoothing = (smooth_pos, smooth_neg)
        if reduction == "none":
            rows = local_embeddings.shape[0]
            return row_loss[rank * rows:(rank + 1) * rows], accuracy
        return row_loss.sum() / count if reduction == "mean" else row_loss.sum(), accuracy

    @staticmethod
    def backward(ctx, grad_out, _grad_accuracy):
        queries, keys, labels, lse_pos, lse_neg, count, *saved = ctx.saved_tensors
        if ctx.reduction == "none":  # each rank's upstream gradients of its own rows, for every shard
            grad_rows = _all_gather(grad_out.to(lse_pos.dtype), ctx.group, ctx.world_size)
        else:
            scale = grad_out / count if ctx.reduction == "mean" else grad_out
            grad_rows = scale.to(lse_pos.dtype).expand(queries.shape[0]).contiguous()
        grad_q, grad_k = ctx.partial.backward(grad_rows, queries, keys, labels, lse_pos, lse_neg, saved,
                                              ctx.needs_input_grad[1], *ctx.smoothing)
        # every shard's part of dL/dq, summed, each rank receiving its own rows; times W because DDP
        # then averages the backbone's gradients over the ranks
        grad_local = _sum_own_rows(grad_q, ctx.group, ctx.world_size) * ctx.world_size
        return grad_local, grad_k, None, None, None, None, None, None, None, None, None


class ShardedCircleLoss(nn.Module):
    """Class-level Circle Loss with the class matrix sharded over the ranks of a process group.

    Rank r of W owns rows [class_start, class_stop) of W (num_classes // W of them, one more on the
    first num_classes % W ranks), exposed as `weight`, `class_start`, `class_stop`.

    forward(local_embeddings (b, D), local_labels int64 or int32 (b,), global class ids in [0, num_classes)
    or ignore_index) returns, in float32:
      * reduction "mean" (default): the mean over the global batch's W·b rows that take part (rows
        labelled ignore_index do not), the same on every rank;
      * "sum": their sum, the same on every rank;
      * "none": the losses of this rank's own b rows (0 for ignored rows).
    Every rank must call it with the same b. Under torch.autocast the products run in the autocast
    dtype (16-bit embeddings from an autocast backbone with an fp32 weight, as Partial FC trains), and
    the weight's gradient comes back in fp32.

    Gradient contract, for the objective L = the loss ("mean", "sum") or the sum over ranks of each
    rank's function of its own rows ("none"):
      * `weight` receives exactly ∂L/∂(its rows);
      * local_embeddings receive W · ∂L/∂(local rows), so that a backbone wrapped in
        DistributedDataParallel, which averages its gradients over the W ranks, gets exactly the
        gradient of single-process training on the concatenated batch. Wrap the backbone in DDP,
        not this module (its parameters differ per rank by design). Each rank receives only its own
        rows' gradient (one reduce-scatter of the global batch's B × D).

    sample_rate < 1 is Partial FC's negative-class sampling: each step keeps every class of the
    shard that is positive anywhere in the global batch, plus a random subset of the other rows of
    the shard, up to ceil(sample_rate · shard rows) in all (never fewer than the positives). Rows not
    sampled get exactly zero gradient; `last_sampled` holds the local indices sampled by the last
    forward. The draw comes from a generator seeded with (seed, rank): reproducible for a seed; the
    positives, decided by the gathered labels, are the same on every rank. The initial rows (nn.Linear's
    initialisation) are drawn from (seed, rank) too, so shards differ from each other.

    label_smoothing ε as circle_loss's, over the num_classes classes (with sample_rate < 1: over the
    classes scored this step, as a cross-entropy over the sampled logits would).

    track_accuracy=True keeps `last_accuracy` (float32, no gradient): the share of the global batch's rows
    whose own class has the highest cosine among all classes of all shards, from the fused forward
    (O(B) more memory, one all-reduce of 2·B floats).

    backend: "auto" (triton for CUDA tensors, cpu for CPU tensors, the reference for float64),
    "triton", "cpu" or "reference". Works over NCCL with CUDA tensors and gloo with CPU tensors.

    Construction is collective: every rank must construct the module, with the same num_classes,
    embedding_dim, m, gamma, sample_rate, detach_alpha, reduction, ignore_index, track_accuracy, label_smoothing,
    backend, dtype and
    device type (checked by
    one all-gather; any mismatch or bad argument raises the same error on every rank). Every forward
    is collective too: a rank that skips one leaves the others waiting for the process group's
    timeout (docs/distributed.md).
    """

    def __init__(self, num_classes: int, embedding_dim: int, *, process_group: Optional[dist.ProcessGroup] = None,
                 m: float = 0.25, gamma: float = 256.0, sample_rate: float = 1.0, detach_alpha: bool = True,
                 reduction: str = "mean", ignore_index: int = -100, track_accuracy: bool = False,
                 label_smoothing: float = 0.0, backend: Backend = "auto", seed: int = 0,
                 device: Optional[torch.device] = None,
                 dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("ShardedCircleLoss needs an initialised process group: call "
                               "torch.distributed.init_process_group first (e.g. under torchrun)")
        self.group = process_group
        self.rank = dist.get_rank(process_group)
        self.world_size = dist.get_world_size(process_group)
        factory = torch.empty(0, device=device, dtype=dtype)  # where and how the rows will be made
        settings = dict(num_classes=num_classes, embedding_dim=embedding_dim, m=m, gamma=gamma,
                        sample_rate=sample_rate, detach_alpha=detach_alpha, reduction=reduction,
                        ignore_index=ignore_index, track_accuracy=track_accuracy,
                        label_smoothing=label_smoothing, backend=backend,
                        dtype=str(factory.dtype),
                        device_type=factory.device.type)
        self._agree_across_ranks(settings)
        self.num_classes, self.embedding_dim = num_classes, embedding_dim
        self.class_start, self.class_stop = shard_range(num_classes, self.world_size, self.rank)
        self.m, self.gamma, self.sample_rate, self.detach_alpha, self.backend = m, gamma, sample_rate, detach_alpha, \
            backend
        self.reduction, self.ignore_index, self.track_accuracy = reduction, ignore_index, track_accuracy
        self.label_smoothing = label_smoothing
        self.last_accuracy = None
        self.weight = nn.Parameter(torch.empty(self.class_stop - self.class_start, embedding_dim, device=device,
                                               dtype=dtype))
        self.seed = seed
        init = torch.Generator(device=self.weight.device).manual_seed(self._rank_seed())
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5), generator=init)  # nn.Linear's, as CircleLoss
        self.generator = None  # the sampling generator, made on the weight's device at the first draw
        self.last_sampled = None

    def _check_settings(self, num_classes, embedding_dim, m, gamma, sample_rate, detach_alpha, reduction,
                        ignore_index, track_accuracy, label_smoothing, backend, **_):
        check_hyperparameters(m, gamma, reduction, backend, detach_alpha)
        check_ignore_index(ignore_index)
        check_bool("track_accuracy", track_accuracy)
        check_label_smoothing(label_smoothing)
        check_positive_int("embedding_dim", embedding_dim)
        if isinstance(sample_rate, bool) or not (isinstance(sample_rate, (int, float)) and 0 < sample_rate <= 1):
            raise ValueError(f"sample_rate must lie in (0, 1], got {sample_rate!r}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < self.world_size:
            raise ValueError(f"num_classes must be an int of at least the world size {self.world_size}, "
                             f"got {num_classes!r}")

    def _agree_across_ranks(self, settings: dict) -> None:
        """Every rank checks its own settings, then one all-gather of them (and of any error) lets every
        rank raise the same error: a bad setting on one rank, or settings that differ between ranks
        (a class owned by no rank, a mean over different scales, a collective of mismatched shapes)."""
        try:
            self._check_settings(**settings)
            error = None
        except (TypeError, ValueError) as caught:
            error = [type(caught).__name__, str(caught)[:1000]]
        comparable = {name: _comparable(value) for name, value in settings.items()}
        every = _all_gather_json([comparable, error], self.group, self.world_size)
        for rank, (_, rank_error) in enumerate(every):
            if rank_error is not None:
                kind, message = rank_error
                raise (TypeError if kind == "TypeError" else ValueError)(f"ShardedCircleLoss on rank {rank}: "
                                                                        f"{message}")
        for name in settings:
            values = [rank_settings[name] for rank_settings, _ in every]
            if any(value != values[0] for value in values[1:]):
                raise ValueError(f"ShardedCircleLoss: every rank must pass the same {name}; got {values} by rank")

    def _rank_seed(self) -> int:
        """Seeds differ per rank, so shards start (and sample) differently even under one global seed."""
        return self.seed * 1_000_003 + self.rank

    def _check_batch(self, embeddings, labels):
        """Shapes locally, then one small all-gather so that every rank raises the same error."""
        check_matrix("local_embeddings", embeddings)
        if not isinstance(labels, torch.Tensor) or labels.dtype not in LABEL_DTYPES or \
                labels.shape != embeddings.shape[:1]:
            raise ValueError(f"local_labels must be an int64 or int32 tensor of shape ({embeddings.shape[0]},)")
        out_of_range = ((labels < 0) | (labels >= self.num_classes)).logical_and(labels != self.ignore_index).any()
        facts = torch.stack([torch.tensor(embeddings.shape[0]), torch.tensor(embeddings.shape[1]),
                             out_of_range.cpu().long()]).to(self.weight.device)
        every = _all_gather(facts[None], self.group, self.world_size).tolist()
        sizes = [f[0] for f in every]
        if len(set(sizes)) > 1:
            raise ValueError(f"every rank must pass the same number of local_embeddings rows; got {sizes} by rank")
        dims = [f[1] for f in every]
        if any(d != self.embedding_dim for d in dims):
            raise ValueError(f"local_embeddings must have embedding_dim = {self.embedding_dim} columns; got {dims} "
                             "by rank")
        bad = [r for r, f in enumerate(every) if f[2]]
        if bad:
            raise ValueError(f"local_labels must lie in [0, num_classes={self.num_classes}) or equal ignore_index="
                             f"{self.ignore_index}; ranks {bad} passed labels outside")

    def _sample(self, labels):
        """(the shard rows used this step, or None for all; the global labels as indices into them,
        -1 for classes outside)."""
        rows = self.class_stop - self.class_start
        local = labels - self.class_start
        in_shard = (local >= 0) & (local < rows) & (labels != self.ignore_index)
        if self.sample_rate >= 1:
            return None, torch.where(in_shard, local, -1)
        keep = self._sample_count(rows)
        if self.generator is None or self.generator.device != self.weight.device:
            self.generator = torch.Generator(device=self.weight.device).manual_seed(self._rank_seed() + 1)
        score = torch.rand(rows, generator=self.generator, device=self.weight.device)
        score[local[in_shard]] = 2.0  # positives outrank every random score
        keep = max(keep, int((score == 2.0).sum()))
        sampled = torch.topk(score, keep, sorted=False).indices.sort().values
        position = torch.full((rows,), -1, dtype=torch.int64, device=self.weight.device)
        position[sampled] = torch.arange(keep, device=self.weight.device)
        return sampled, torch.where(in_shard, position[local.clamp(0, rows - 1)], -1)

    def _sample_count(self, rows: int) -> int:
        """Rows of the shard a sampled step keeps (before adding positives beyond it): ceil(sample_rate · rows)."""
        return max(1, math.ceil(self.sample_rate * rows))

    def forward(self, local_embeddings: Tensor, local_labels: Tensor) -> Tensor:
        self._check_batch(local_embeddings, local_labels)
        local_labels = as_index_labels(local_labels)
        if local_embeddings.device != self.weight.device or \
                (local_embeddings.dtype != self.weight.dtype and not autocasting(local_embeddings)):
            raise ValueError(f"local_embeddings ({local_embeddings.dtype}, {local_embeddings.device}) must match "
                             f"weight ({self.weight.dtype}, {self.weight.device}), or run under torch.autocast")
        sampled, shard_labels = self._sample(_all_gather(local_labels, self.group, self.world_size))
        self.last_sampled = sampled
        keys = self.weight if sampled is None else self.weight.index_select(0, sampled)
        (local_embeddings, keys), _ = autocast_operands(local_embeddings, keys)  # as nn.Linear's operands
        partial = _ShardPartial(resolve_backend(self.backend, local_embeddings), float(self.m), float(self.gamma),
                                self.detach_alpha)
        num_classes = self.num_classes
        if self.label_smoothing > 0 and sampled is not None:  # the smoothing spreads over the classes scored
            scored = torch.tensor([keys.shape[0]], device=keys.device)
            dist.all_reduce(scored, group=self.group)
            num_classes = int(scored.item())
        loss, accuracy = _ShardedCircleLossFunction.apply(local_embeddings, keys, shard_labels, partial, self.group,
                                                          self.rank, self.world_size, self.reduction,
                                                          self.track_accuracy, float(self.label_smoothing),
                                                          num_classes)
        self.last_accuracy = accuracy if self.track_accuracy else None
        return loss

    def shard_state(self) -> dict:
        """This rank's part of a checkpoint: its rows and where they sit in the full class matrix."""
        return {"weight": self.weight.detach().cpu(), "class_start": self.class_start, "class_stop": self.class_stop,
                "num_classes": self.num_classes}

    @torch.no_grad()
    def load_shards(self, shard_states: list) -> None:
        """Fill this rank's rows from the shard_state() of every rank of a checkpoint saved with any world
        size (re-sharding): the saved ranges must cover [class_start, class_stop)."""
        for state in shard_states:
            if state["num_classes"] != self.num_classes:
                raise ValueError(f"the checkpoint has num_classes={state['num_classes']}, this module "
                                 f"{self.num_classes}")
        covered = 0
        for state in shard_states:
            start, stop = max(state["class_start"], self.class_start), min(state["class_stop"], self.class_stop)
            if start < stop:
                rows = state["weight"][start - state["class_start"]:stop - state["class_start"]]
                self.weight[start - self.class_start:stop - self.class_start] = rows.to(self.weight)
                covered += stop - start
        if covered != self.class_stop - self.class_start:
            raise ValueError(f"the shards given cover {covered} of this rank's "
                             f"{self.class_stop - self.class_start} rows [{self.class_start}, {self.class_stop})")

    def extra_repr(self):
        return (f"num_classes={self.num_classes}, embedding_dim={self.embedding_dim}, rank={self.rank}/"
                f"{self.world_size}, rows=[{self.class_start}, {self.class_stop}), m={self.m}, gamma={self.gamma}, "
                f"sample_rate={self.sample_rate}, reduction={self.reduction!r}, backend={self.backend!r}")
