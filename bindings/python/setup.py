"""Build step of lomo-native: bundle liblomo.so into the package.

The library is built with ``cargo build --release --lib`` at the repository root (two levels up)
and copied into the build directory (never into the source tree, where a stale copy would shadow
a fresh build for ``PYTHONPATH=bindings/python`` runs), without debug info. Set ``LOMO_LIBRARY``
at build time to bundle a prebuilt ``liblomo.so`` instead (cargo is then not needed).

The wheel is tagged ``py3-none-<platform>``: the Python code is plain ctypes (any Python 3, no
CPython ABI), the bundled library is native.
"""

import os
import shutil
import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

try:
    from setuptools.command.bdist_wheel import bdist_wheel
except ImportError:  # setuptools < 70.1
    from wheel.bdist_wheel import bdist_wheel

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
        # Earlier versions copied the library into the source tree; such a copy would now be
        # loaded before target/release by a source checkout, so it goes.
        stale = HERE / "lomo_native" / "liblomo.so"
        if stale.is_file():
            stale.unlink()
        super().run()
        dest = Path(self.build_lib) / "lomo_native" / "liblomo.so"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(lib, dest)
        dest.chmod(0o755)
        strip = shutil.which("strip")
        if strip:
            subprocess.run([strip, "--strip-debug", str(dest)], check=True)

    def get_outputs(self, include_bytecode=True):
        return super().get_outputs(include_bytecode) + [
            str(Path(self.build_lib) / "lomo_native" / "liblomo.so")
        ]


class BinaryDistribution(Distribution):
    """The wheel carries a native library: a platform wheel (files in platlib), not pure."""

    def has_ext_modules(self):
        return True


class PlatformWheel(bdist_wheel):
    """py3-none-<platform>: a native library, but no Python extension module."""

    def get_tag(self):
        _, _, platform = super().get_tag()
        return "py3", "none", platform


setup(
    cmdclass={"build_py": BuildWithLibrary, "bdist_wheel": PlatformWheel},
    distclass=BinaryDistribution,
)
