"""insightface's arcface_torch, with Circle Loss as its margin: a drop-in `PartialFC_V2`.

Face trainers built on arcface_torch make their head as

    margin_loss = CombinedMarginLoss(64, 1.0, 0.5, 0.0)          # ArcFace
    module_partial_fc = PartialFC_V2(margin_loss, 512, num_classes, sample_rate, fp16)
    loss = module_partial_fc(local_embeddings, local_labels)

With this module the same lines train with Circle Loss, fused (no B × C logits on any rank):

    from circleloss_ext.integrations.insightface import CircleMargin, PartialFC_V2
    module_partial_fc = PartialFC_V2(CircleMargin(m=0.25, gamma=256.0), 512, num_classes, sample_rate, fp16)

What matches insightface's PartialFC_V2: the constructor's order and defaults; each rank owns the
same contiguous class rows (`num_classes // W`, one more on the first `num_classes % W` ranks) in a
parameter `weight` of shape (num_local, embedding_size), so `state_dict()` loads into insightface's
module and back; the weight starts as N(0, 0.01); labels (B,) or (B, 1), int64 or int32; with
sample_rate < 1 each step keeps every class of the shard that is positive in the global batch plus
random others, `int(sample_rate · num_local)` rows in all (never fewer than the positives);
`fp16=True` runs the products in fp16 under autocast while the weight stays fp32; the loss is the
mean over the global batch, and the local embeddings' gradient is W times their share, for a
DDP-wrapped backbone. It is `ShardedCircleLoss` underneath (circleloss_ext.distributed), whose
docstring has the details; the draw of the sampled rows comes from its own per-rank generator rather
than the global torch RNG.

`CircleMargin` is also a margin in insightface's own convention, `margin(cosines, labels) -> logits`
(labels (B, 1) holding the column of each row's class, -1 where the class is not in the columns),
so it runs inside insightface's PartialFC_V2 too: that materialises the logits, as the naive loss
does, and is how the tests check this module against it.
"""
import torch
from torch import Tensor

from ..distributed import ShardedCircleLoss
from ..validation import check_bool, check_margin_and_scale


class CircleMargin:
    """Circle Loss as a margin on cosine logits (Sun et al. 2020, the class-level form).

    m, gamma: the margin and scale of circleloss_ext.circle_loss; detach_alpha: treat the weights α as
    constants in the gradient (the paper's choice, the default).
    Called on cosines (B, C) and labels (B, 1) it returns the logits whose cross-entropy is Circle Loss:
    γ·α^n·(s - m) for every other class and γ·α^p·(s - (1 - m)) for the row's own class.
    """

    def __init__(self, m: float = 0.25, gamma: float = 256.0, detach_alpha: bool = True) -> None:
        check_margin_and_scale(m, gamma)
        check_bool("detach_alpha", detach_alpha)
        self.m, self.gamma, self.detach_alpha = float(m), float(gamma), detach_alpha

    def __call__(self, logits: Tensor, labels: Tensor) -> Tensor:
        s = logits
        alpha_n = torch.relu(s + self.m)
        if self.detach_alpha:
            alpha_n = alpha_n.detach()
        out = self.gamma * alpha_n * (s - self.m)
        rows = torch.where(labels.reshape(-1) != -1)[0]
        columns = labels.reshape(-1)[rows]
        positive = s[rows, columns]
        alpha_p = torch.relu(1.0 + self.m - positive)
        if self.detach_alpha:
            alpha_p = alpha_p.detach()
        out = out.index_put((rows, columns), self.gamma * alpha_p * (positive - (1.0 - self.m)))
        return out

    def __repr__(self) -> str:
        return f"CircleMargin(m={self.m}, gamma={self.gamma}, detach_alpha={self.detach_alpha})"


class PartialFC_V2(ShardedCircleLoss):
    """insightface's PartialFC_V2(margin_loss, embedding_size, num_classes, sample_rate, fp16) with a
    CircleMargin, computed by the fused kernels. forward(local_embeddings (b, D), local_labels (b,) or
    (b, 1)) -> the global batch's mean loss. Every rank constructs it (collectively) and runs every forward.
    track_accuracy=True (keyword only; not in insightface's signature) keeps `last_accuracy`, the global
    batch's top-1 accuracy over all classes, computed in the fused forward."""

    def __init__(self, margin_loss: CircleMargin, embedding_size: int, num_classes: int, sample_rate: float = 1.0,
                 fp16: bool = False, *, track_accuracy: bool = False) -> None:
        if not isinstance(margin_loss, CircleMargin):
            raise TypeError(f"margin_loss must be a circleloss_ext.integrations.insightface.CircleMargin, got "
                            f"{type(margin_loss).__name__}: ArcFace and CosFace margins are not Circle Loss (use "
                            "insightface's own PartialFC_V2 for them)")
        check_bool("fp16", fp16)
        super().__init__(num_classes, embedding_size, m=margin_loss.m, gamma=margin_loss.gamma,
                         sample_rate=sample_rate, detach_alpha=margin_loss.detach_alpha, track_accuracy=track_accuracy)
        self.margin_softmax, self.embedding_size, self.fp16 = margin_loss, embedding_size, fp16
        self.num_local = self.class_stop - self.class_start
        self.num_sample = int(sample_rate * self.num_local)
        with torch.no_grad():  # insightface's initialisation, from this rank's generator
            init = torch.Generator(device=self.weight.device).manual_seed(self._rank_seed())
            self.weight.normal_(0.0, 0.01, generator=init)

    def _sample_count(self, rows: int) -> int:
        return max(1, self.num_sample)  # insightface's int(sample_rate · num_local); at least one row

    def forward(self, local_embeddings: Tensor, local_labels: Tensor) -> Tensor:
        if isinstance(local_labels, Tensor) and local_labels.dim() == 2 and local_labels.shape[1] == 1:
            local_labels = local_labels.reshape(-1)
        with torch.autocast(self.weight.device.type, dtype=torch.float16, enabled=self.fp16):
            return super().forward(local_embeddings, local_labels)
