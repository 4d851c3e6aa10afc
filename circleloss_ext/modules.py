"""nn.Modules around the two label forms.

Hyper-parameters are plain attributes, checked at construction with the functions' messages and read
at every forward: assigning `head.gamma = 32.0` (a margin or scale schedule) takes effect at the next
step, and a bad value assigned later is refused there.
"""
import math
from typing import Optional

import torch
from torch import Tensor, nn

from .api import Backend, Reduction, circle_loss, pairwise_circle_loss
from .validation import (check_bool, check_hyperparameters, check_ignore_index, check_label_smoothing,
                         check_positive_int)


def _keep_accuracy(module: nn.Module, result):
    """The loss; with track_accuracy the accuracy that came with it goes to module.last_accuracy."""
    if not module.track_accuracy:
        return result
    loss, module.last_accuracy = result
    return loss


class CircleLoss(nn.Module):
    """Class-level Circle Loss that owns the class matrix W: weight (num_classes, embedding_dim),
    initialised as nn.Linear's weight is. forward(embeddings (B, D), labels int64 or int32 (B,)).

    m, gamma, reduction, detach_alpha, ignore_index and backend ("auto", "triton", "cpu",
    "reference") mean what they mean for circle_loss, label_smoothing too. track_accuracy=True keeps `last_accuracy`, the
    batch's top-1 accuracy (circle_loss's with_accuracy). For pair-wise labels (metric learning, no
    class matrix) use PairwiseCircleLoss.
    """

    def __init__(self, num_classes: Optional[int] = None, embedding_dim: Optional[int] = None, *, m: float = 0.25,
                 gamma: float = 256.0, reduction: Reduction = "mean", detach_alpha: bool = True,
                 ignore_index: int = -100, backend: Backend = "auto", track_accuracy: bool = False,
                 label_smoothing: float = 0.0, device: Optional[torch.device] = None,
                 dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        if num_classes is None or embedding_dim is None:
            raise TypeError("CircleLoss is the class-level head: it owns the class matrix W and needs "
                            "num_classes and embedding_dim, e.g. CircleLoss(num_classes, embedding_dim, m=0.25, "
                            "gamma=256.0). For pair-wise labels (pytorch-metric-learning's CircleLoss(m=0.4, "
                            "gamma=80)) use circleloss_ext.PairwiseCircleLoss(m=0.4, gamma=80.0)")
        check_positive_int("num_classes", num_classes)
        check_positive_int("embedding_dim", embedding_dim)
        check_hyperparameters(m, gamma, reduction, backend, detach_alpha)
        check_ignore_index(ignore_index)
        check_bool("track_accuracy", track_accuracy)
        check_label_smoothing(label_smoothing)
        self.num_classes, self.embedding_dim = num_classes, embedding_dim
        self.label_smoothing = label_smoothing
        self.track_accuracy, self.last_accuracy = track_accuracy, None
        self.m, self.gamma, self.reduction, self.detach_alpha = m, gamma, reduction, detach_alpha
        self.ignore_index, self.backend = ignore_index, backend
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_dim, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's initialisation

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        result = circle_loss(embeddings, self.weight, labels, m=self.m, gamma=self.gamma, reduction=self.reduction,
                             detach_alpha=self.detach_alpha, ignore_index=self.ignore_index, backend=self.backend,
                             with_accuracy=self.track_accuracy, label_smoothing=self.label_smoothing)
        return _keep_accuracy(self, result)

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, embedding_dim={self.embedding_dim}, m={self.m!r}, "
                f"gamma={self.gamma!r}, reduction={self.reduction!r}, detach_alpha={self.detach_alpha!r}, "
                f"ignore_index={self.ignore_index!r}, backend={self.backend!r}")


class PairwiseCircleLoss(nn.Module):
    """Pair-wise Circle Loss with pytorch-metric-learning's call:
    forward(embeddings, labels, ref_emb=None, ref_labels=None); labels int64 or int32.

    m, gamma, reduction, detach_alpha and backend ("auto", "triton", "cpu", "reference") mean what
    they mean for pairwise_circle_loss. track_accuracy=True keeps `last_accuracy`, the share of rows
    whose nearest key shares their label (precision at 1).
    """

    def __init__(self, *, m: float = 0.4, gamma: float = 80.0, reduction: Reduction = "mean",
                 detach_alpha: bool = True, backend: Backend = "auto", track_accuracy: bool = False) -> None:
        super().__init__()
        check_hyperparameters(m, gamma, reduction, backend, detach_alpha)
        check_bool("track_accuracy", track_accuracy)
        self.m, self.gamma, self.reduction, self.detach_alpha, self.backend = m, gamma, reduction, detach_alpha, \
            backend
        self.track_accuracy, self.last_accuracy = track_accuracy, None

    def forward(self, embeddings: Tensor, labels: Tensor, ref_emb: Optional[Tensor] = None,
                ref_labels: Optional[Tensor] = None) -> Tensor:
        result = pairwise_circle_loss(embeddings, labels, ref_embeddings=ref_emb, ref_labels=ref_labels, m=self.m,
                                      gamma=self.gamma, reduction=self.reduction, detach_alpha=self.detach_alpha,
                                      backend=self.backend, with_accuracy=self.track_accuracy)
        return _keep_accuracy(self, result)

    def extra_repr(self) -> str:
        return (f"m={self.m!r}, gamma={self.gamma!r}, reduction={self.reduction!r}, "
                f"detach_alpha={self.detach_alpha!r}, backend={self.backend!r}")
