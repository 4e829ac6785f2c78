"""Loads liblomo.so (minimal placeholder; the full ctypes table lives in the package's own
_native.py). Exposes ``load() -> ctypes.CDLL`` and ``LomoError``."""

import ctypes
import os
import pathlib

_LIB = None


class LomoError(RuntimeError):
    """A lomo call failed; the message is the library's explanation."""


def _candidates():
    env = os.environ.get("LOMO_LIBRARY")
    if env:
        yield pathlib.Path(env)
        return
    here = pathlib.Path(__file__).resolve().parent
    yield here / "liblomo.so"
    yield here.parents[2] / "target" / "release" / "liblomo.so"


def load() -> ctypes.CDLL:
    """The loaded liblomo.so (``LOMO_LIBRARY``, else the package dir, else target/release)."""
    global _LIB
    if _LIB is None:
        tried = []
        for path in _candidates():
            tried.append(str(path))
            if path.is_file():
                _LIB = ctypes.CDLL(str(path))
                break
        else:
            raise LomoError(
                "liblomo.so not found (tried: %s); build it with `cargo build --release` or "
                "set LOMO_LIBRARY" % ", ".join(tried)
            )
    return _LIB
