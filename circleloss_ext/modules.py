"""nn.Modules around the two label forms."""
import math

import torch
from torch import nn

from .api import circle_loss, pairwise_circle_loss


class CircleLoss(nn.Module):
    """Class-level Circle Loss that owns the class matrix W: weight (num_classes, embedding_dim),
    initialised as nn.Linear's weight is. forward(embeddings (B, D), labels int64 (B,))."""

    def __init__(self, num_classes, embedding_dim, *, m=0.25, gamma=256.0, reduction="mean", detach_alpha=True,
                 ignore_index=-100, backend="auto", device=None, dtype=None):
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if not isinstance(embedding_dim, int) or embedding_dim < 1:
            raise ValueError(f"embedding_dim must be a positive int, got {embedding_dim!r}")
        self.num_classes, self.embedding_dim = num_classes, embedding_dim
        self.options = dict(m=m, gamma=gamma, reduction=reduction, detach_alpha=detach_alpha,
                            ignore_index=ignore_index, backend=backend)
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_dim, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's initialisation

    def forward(self, embeddings, labels):
        return circle_loss(embeddings, self.weight, labels, **self.options)

    def extra_repr(self):
        return f"num_classes={self.num_classes}, embedding_dim={self.embedding_dim}, " + \
            ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class PairwiseCircleLoss(nn.Module):
    """Pair-wise Circle Loss with pytorch-metric-learning's call:
    forward(embeddings, labels, ref_emb=None, ref_labels=None)."""

    def __init__(self, *, m=0.4, gamma=80.0, reduction="mean", detach_alpha=True, backend="auto"):
        super().__init__()
        self.options = dict(m=m, gamma=gamma, reduction=reduction, detach_alpha=detach_alpha, backend=backend)

    def forward(self, embeddings, labels, ref_emb=None, ref_labels=None):
        return pairwise_circle_loss(embeddings, labels, ref_embeddings=ref_emb, ref_labels=ref_labels,
                                    **self.options)

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
