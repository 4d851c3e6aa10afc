"""circleloss-ext: fused Circle Loss (Sun et al., CVPR 2020) for PyTorch."""
from .api import circle_loss, pairwise_circle_loss, set_workspace_limit, workspace_limit
from .function import CircleLossFunction
from .modules import CircleLoss, PairwiseCircleLoss

__version__ = "0.1.0"
__all__ = ["circle_loss", "pairwise_circle_loss", "CircleLoss", "PairwiseCircleLoss", "CircleLossFunction",
           "set_workspace_limit", "workspace_limit"]
