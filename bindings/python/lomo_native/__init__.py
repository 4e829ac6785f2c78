"""lomo_native: LOMO and AdaLomo fused into the backward pass, from Python.

* ``lomo_native.Optimizer`` — the C library's optimizer at the NumPy / raw-pointer level.
* ``lomo_native.torch.Lomo`` / ``lomo_native.torch.AdaLomo`` — drop-ins for ``lomo_optim``.
* ``lomo_native.transformers.LomoTrainer`` — a ``transformers.Trainer`` with the fused step.
* ``lomo_native._native`` — ``load()`` (the ctypes library with every signature declared),
  ``LomoError``.
"""

from ._native import LomoError, library_path, load
from .core import Optimizer, StepInfo

__version__ = "0.1.0"

__all__ = ["LomoError", "Optimizer", "StepInfo", "load", "library_path", "version", "cuda_available"]


def version() -> str:
    """Version of the loaded C library."""
    return load().lomo_version().decode()


def cuda_available() -> bool:
    """Whether the loaded library can register CUDA parameters."""
    return bool(load().lomo_cuda_available())
