"""circleloss-ext: fused Circle Loss (Sun et al., CVPR 2020) for PyTorch."""
import os

# In a source checkout the Triton kernels sit beside this package in kernels/; setup.py installs them
# as circleloss_ext/kernels. Let `circleloss_ext.kernels` resolve in both layouts.
_checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if not os.path.isdir(os.path.join(__path__[0], "kernels")) and \
        os.path.isfile(os.path.join(_checkout, "kernels", "__init__.py")):
    __path__.append(_checkout)

from .api import circle_loss, pairwise_circle_loss  # noqa: E402
from .function import CircleLossFunction  # noqa: E402
from .modules import CircleLoss, PairwiseCircleLoss  # noqa: E402

__version__ = "0.1.0"
__all__ = ["circle_loss", "pairwise_circle_loss", "CircleLoss", "PairwiseCircleLoss", "CircleLossFunction"]
