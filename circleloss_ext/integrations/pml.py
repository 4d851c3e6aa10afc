"""pytorch-metric-learning (PML) with the fused Circle Loss: drop-in `CircleLoss` and `CrossBatchMemory`.

    from circleloss_ext.integrations.pml import CircleLoss, CrossBatchMemory

    loss_fn = CircleLoss(m=0.4, gamma=80)                   # PML's constructor and call
    loss = loss_fn(embeddings, labels)                      # fused: no B × B matrix
    memory = CrossBatchMemory(loss_fn, embedding_size=128, memory_size=16384)
    loss = memory(embeddings, labels)                       # fused against the memory: no B × M matrix

`CircleLoss` is a subclass of `pytorch_metric_learning.losses.CircleLoss`: the same constructor
(m, gamma, and PML's distance, reducer, embedding_regularizer, ...) and call (embeddings, labels,
indices_tuple, ref_emb, ref_labels), so PML's reducers, `MultipleLosses`, `SelfSupervisedLoss`, its
stats and `get_default_*` work as with PML's own. It computes each row's loss with the fused kernels
(circleloss_ext.pairwise_circle_loss, `backend` as there) whenever the configuration allows:

  * the distance is PML's `CosineSimilarity` (PML's default for CircleLoss) with its defaults;
  * no `indices_tuple` (a miner's pairs go to PML's own code: values as PML, with its B × N masks).

PML's own code runs otherwise. Either way the reducer receives the per-row losses PML's CircleLoss
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
from torch import Tensor

try:
    from pytorch_metric_learning import losses as pml_losses
    from pytorch_metric_learning.distances import CosineSimilarity
    from pytorch_metric_learning.utils import common_functions as pml_common
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
        self.fused_calls = 0  # how many computations ran fused (for monitoring and tests)

    def unfused_reason(self, indices_tuple) -> Optional[str]:
        """Why a call would run PML's own code, or None when it runs fused."""
        if indices_tuple is not None:
            return "an indices_tuple (mined pairs or triplets)"
        distance = self.distance
        if type(distance) is not CosineSimilarity or distance.p != 2 or distance.power != 1:
            return f"the distance {distance!r} (the fused path computes cosine similarity)"
        return None

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        if labels is None or self.unfused_reason(indices_tuple) is not None:
            return super().compute_loss(embeddings, labels, indices_tuple, ref_emb, ref_labels)
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
        return {"loss": {"losses": rows.to(embeddings.dtype),
                         "indices": pml_common.torch_arange_from_size(embeddings),
                         "reduction_type": "element"}}


class CrossBatchMemory(pml_losses.CrossBatchMemory):
    """PML's CrossBatchMemory(loss, embedding_size, memory_size=1024, miner=None); with our CircleLoss
    and nothing mined, the memory is scored by the fused loss with each row's own slot left out."""

    def forward(self, embeddings, labels, indices_tuple=None, enqueue_mask=None):
        if not (isinstance(self.loss, CircleLoss) and self.miner is None and indices_tuple is None
                and enqueue_mask is None and len(embeddings) <= len(self.embedding_memory)
                and self.loss.unfused_reason(None) is None):
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
