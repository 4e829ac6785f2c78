"""lomo_native: LOMO and AdaLomo fused into the backward pass, from Python.

* ``lomo_native.Optimizer`` — the C library's optimizer at the NumPy / raw-pointer level.
* ``lomo_native.torch.Lomo`` / ``lomo_native.torch.AdaLomo`` — drop-ins for ``lomo_optim``.
* ``lomo_native.transformers.LomoTrainer`` — a ``transformers.Trainer`` with the fused step.
* ``lomo_native._native`` — ``load()`` (the ctypes library with every signature declared),
  ``LomoError``.
"""

__version__ = "0.1.0"  # before the imports: _native names it in its version check

from ._native import LomoError, library_path, load  # noqa: E402
from .core import Optimizer, StepInfo  # noqa: E402

__all__ = ["LomoError", "Optimizer", "StepInfo", "load", "library_path", "version", "cuda_available"]


def version() -> str:
    """Version of the loaded C library."""
    return load().lomo_version().decode()


def cuda_available() -> bool:
    """Whether the loaded library can register CUDA parameters."""
    return bool(load().lomo_cuda_available())
