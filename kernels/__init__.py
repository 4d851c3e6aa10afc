"""Triton kernels of circleloss-ext (installed as circleloss_ext.kernels).

Only `@triton.jit` code and the helpers that size and launch it live here.
"""
from .backward import circle_backward, set_workspace_limit, workspace_limit
from .forward import circle_forward
from .row_norm import inverse_norms

__all__ = ["circle_backward", "circle_forward", "inverse_norms", "set_workspace_limit", "workspace_limit"]
