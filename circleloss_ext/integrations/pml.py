"""pytorch-metric-learning (PML) with the fused Circle Loss: drop-in `CircleLoss` and `CrossBatchMemory`.

    from circleloss_ext.integrations.pml import CircleLoss, CrossBatchMemory

    loss_fn = CircleLoss(m=0.4, gamma=80)                   # PML's constructor and call
    loss = loss_fn(embeddings, labels)                      # fused: no B × B matrix
    memory = CrossBatchMemory(loss_fn, embedding_size=128, memory_size=16384)
    loss = memory(embeddings, labels)                       # fused against the memory: no B × M matrix

`CircleLoss` is a subclass of `pytorch_metric_learning.losses.CircleLoss`: the same constructor
(m, gamma, and PML's distance, reducer, embedding_regularizer, ...) and call (embeddings, labels,
indices_tuple, ref_emb, ref_labels), so PML's reducers, `MultipleLosses`, `SelfSupervisedLoss`, its
stats and `get_default_*` work as with PML's own. With PML's `CosineSimilarity` (its default for CircleLoss), each row's loss comes from

  * the fused kernels (circleloss_ext.pairwise_circle_loss, `backend` as there) when there is no
    `indices_tuple`: every pair of the batch (or of the batch against ref_emb);
  * the mined pairs alone when there is one (pairs (a1, p, a2, n) or triplets (a, p, n), as a miner
    gives them): their similarities as gathered dot products, O(pairs · D), and each row's log-sum-exp
    over its own positive and negative pairs (a pair mined twice counts once, as in PML's masks),
    where PML builds dense B × N masks. Its per-row sums use index_add: the same bits on CPUs; on
    CUDA the order of those additions (atomics) may vary in the last bits, as in PML.

With any other distance PML's own code runs. Either way the reducer receives the per-row losses PML's CircleLoss
gives it, so reducers (default AvgNonZeroReducer, which averages the rows whose loss is not 0) see
the same input as with PML. As in PML, `ref_labels is labels` (the in-batch call) leaves out each
row's pair with itself.

`CrossBatchMemory` is a subclass of PML's: with our CircleLoss, no miner, no `indices_tuple` and no
`enqueue_mask`, it passes each row's own slot in the memory (where the current batch was just
written) to the fused loss instead of building PML's tuple of every (batch, memory) pair minus the
own slots; otherwise it is PML's. Our CircleLoss inside PML's own CrossBatchMemory receives that
tuple and gives PML's values.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    from pytorch_metric_learning import losses as pml_losses
    from pytorch_metric_learning.distances import CosineSimilarity
    from pytorch_metric_learning.utils import common_functions as pml_common
    from pytorch_metric_learning.utils import loss_and_miner_utils as pml_pairs
except ImportError as error:  # an optional dependency
    raise ImportError("circleloss_ext.integrations.pml needs pytorch-metric-learning: pip install "
                      "pytorch-metric-learning (or this package's extra: pip install -e '.[pml]')") from error

from ..api import pairwise_circle_loss


class CircleLoss(pml_losses.CircleLoss):
    """PML's CircleLoss(m=0.4, gamma=80, **kwargs), fused where it can be (see the module docstring).
    backend: "auto" (triton for CUDA tensors, cpu for CPU tensors), "triton", "cpu" or "reference"."""

    def __init__(self, m: float = 0.4, gamma: float = 80, backend: str = "auto", **kwargs) -> None:
        super().__init__(m=m, gamma=gamma, **kwargs)
        self.backend = backend
        self.own_slots: Optional[Tensor] = None  # set by CrossBatchMemory for one call
        self.fused_calls = 0  # calls computed by the fused kernels (for monitoring and tests)
        self.mined_calls = 0  # calls computed from mined pairs alone

    def unfused_reason(self) -> Optional[str]:
        """Why calls run PML's own code, or None when they run fused (or from the mined pairs)."""
        distance = self.distance
        if type(distance) is not CosineSimilarity or distance.p != 2 or distance.power != 1:
            return f"the distance {distance!r} (the fused paths compute cosine similarity)"
        return None

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        if self.unfused_reason() is not None or (labels is None and indices_tuple is None):
            return super().compute_loss(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        if indices_tuple is not None:
            return self._mined_loss(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        slots = self.own_slots
        options = dict(m=float(self.m), gamma=float(self.gamma), reduction="none", backend=self.backend)
        if ref_labels is labels and ref_emb is embeddings and slots is None:  # in-batch: (i, i) left out
            rows = pairwise_circle_loss(embeddings, labels, **options)
        else:
            if ref_labels is labels and slots is None:  # PML leaves out (i, i) whenever ref_labels is labels
                slots = torch.arange(embeddings.shape[0], device=embeddings.device)
            rows = pairwise_circle_loss(embeddings, labels, ref_embeddings=ref_emb, ref_labels=ref_labels,
                                        ref_self_index=slots, **options)
        self.fused_calls += 1
        return self._row_losses(rows.to(embeddings.dtype), embeddings)

    @staticmethod
    def _row_losses(rows, embeddings):
        """PML's loss dictionary of per-row losses, as its CircleLoss returns it."""
        return {"loss": {"losses": rows, "indices": pml_common.torch_arange_from_size(embeddings),
                         "reduction_type": "element"}}

    def _mined_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        """Circle Loss over the mined pairs only: O(pairs · D) gathered similarities, no B × N mask."""
        a1, p, a2, n = pml_pairs.convert_to_pairs(indices_tuple, labels, ref_labels)
        if all(len(x) <= 1 for x in (a1, p, a2, n)):
            return self.zero_losses()  # as PML's GenericPairLoss
        rows, keys = F.normalize(embeddings, dim=1), F.normalize(ref_emb, dim=1)
        B, N = embeddings.shape[0], ref_emb.shape[0]
        lse = []
        for anchors, others, positive in ((a1, p, True), (a2, n, False)):
            pairs = torch.unique(anchors * N + others)  # a pair mined twice counts once
            anchors, others = pairs // N, pairs % N
            s = (rows[anchors] * keys[others]).sum(dim=1)
            if positive:  # -γ α^p (s - Δ_p), α^p = relu(O_p - s) detached, as PML's CircleLoss
                logit = -self.gamma * torch.relu(self.op - s.detach()) * (s - self.delta_p)
            else:  # γ α^n (s - Δ_n), α^n = relu(s - O_n) detached
                logit = self.gamma * torch.relu(s.detach() - self.on) * (s - self.delta_n)
            lse.append(_row_logsumexp(logit, anchors, B))
        has_both = torch.isfinite(lse[0]) & torch.isfinite(lse[1])
        losses = torch.where(has_both, F.softplus(lse[0] + lse[1]), 0.0)
        self.mined_calls += 1
        return self._row_losses(losses, embeddings)


def _row_logsumexp(values: Tensor, rows: Tensor, num_rows: int) -> Tensor:
    """log Σ exp(values) per row, over the values whose row is `rows` (-inf for rows with none)."""
    top = torch.full((num_rows,), float("-inf"), dtype=values.dtype, device=values.device)
    top = top.scatter_reduce(0, rows, values.detach(), reduce="amax")
    shift = torch.where(torch.isfinite(top), top, 0.0)
    total = torch.zeros(num_rows, dtype=values.dtype, device=values.device).index_add(
        0, rows, torch.exp(values - shift[rows]))
    return shift + torch.log(total)


class CrossBatchMemory(pml_losses.CrossBatchMemory):
    """PML's CrossBatchMemory(loss, embedding_size, memory_size=1024, miner=None); with our CircleLoss
    and nothing mined, the memory is scored by the fused loss with each row's own slot left out."""

    def forward(self, embeddings, labels, indices_tuple=None, enqueue_mask=None):
        if not (isinstance(self.loss, CircleLoss) and self.miner is None and indices_tuple is None
                and enqueue_mask is None and len(embeddings) <= len(self.embedding_memory)
                and self.loss.unfused_reason() is None):
            return super().forward(embeddings, labels, indices_tuple, enqueue_mask)
        # PML's bookkeeping: the batch goes into the memory (detached), the memory filled so far is the
        # reference set, and curr_batch_idx says where each row of the batch now sits in it
        self.reset_stats()
        labels = pml_common.to_device(labels, device=embeddings.device)
        self.embedding_memory = pml_common.to_device(self.embedding_memory, device=embeddings.device,
                                                     dtype=embeddings.dtype)
        self.label_memory = pml_common.to_device(self.label_memory, device=embeddings.device, dtype=labels.dtype)
        self.add_to_memory(embeddings, labels, len(embeddings))
        filled = len(self.embedding_memory) if self.has_been_filled else self.queue_idx
        memory, memory_labels = self.embedding_memory[:filled], self.label_memory[:filled]
        self.loss.own_slots = self.curr_batch_idx
        try:
            return self.loss(embeddings, labels, None, memory, memory_labels)
        finally:
            self.loss.own_slots = None
