"""HyperFlow: gradient-free few-shot adaptation by integrating a learned drift."""
from .update import euler_update, euler_update_reference

__all__ = ["euler_update", "euler_update_reference"]
