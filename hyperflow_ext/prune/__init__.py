"""Hyperflows: pruning by flow. Differentiable masked layers and the fused flow step."""
from .flow_ops import flow_step, flow_step_reference
from .functional import masked_conv2d, masked_linear

__all__ = ["flow_step", "flow_step_reference", "masked_conv2d", "masked_linear"]
