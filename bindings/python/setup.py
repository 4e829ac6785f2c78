"""Build step of lomo-native: bundle liblomo.so into the package.

The library is built with ``cargo build --release`` at the repository root (two levels up) and
copied into ``lomo_native/``. Set ``LOMO_LIBRARY`` at build time to bundle a prebuilt
``liblomo.so`` instead (cargo is then not needed).
"""

import os
import shutil
import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent


def _library() -> Path:
    prebuilt = os.environ.get("LOMO_LIBRARY")
    if prebuilt:
        return Path(prebuilt)
    if not (REPO / "Cargo.toml").is_file():
        raise SystemExit(
            f"lomo-native: no Cargo.toml at {REPO}; build from the lomo repository "
            "(pip install ./bindings/python) or set LOMO_LIBRARY to a built liblomo.so")
    subprocess.run(["cargo", "build", "--release", "--lib"], cwd=REPO, check=True)
    return REPO / "target" / "release" / "liblomo.so"


class BuildWithLibrary(build_py):
    def run(self):
        lib = _library()
        if not lib.is_file():
            raise SystemExit(f"lomo-native: {lib} does not exist")
        shutil.copy2(lib, HERE / "lomo_native" / "liblomo.so")
        super().run()


class BinaryDistribution(Distribution):
    """The wheel carries a native library: tag it for the platform, not as pure Python."""

    def has_ext_modules(self):
        return True


setup(cmdclass={"build_py": BuildWithLibrary}, distclass=BinaryDistribution)
