"""lomo_native: LOMO and AdaLomo from liblomo.so (minimal placeholder package init)."""

from ._native import LomoError, load

__all__ = ["LomoError", "load"]
