"""The package as pip builds and installs it: the wheel's tag and bundled library, the extras
that the examples need, and the refusal of a library older than the package."""

import ast
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import lomo_native
from lomo_native import _native

PKG = Path(__file__).resolve().parents[1]  # bindings/python
REPO = PKG.parent.parent
EXAMPLES = REPO / "examples" / "python"

# import name -> distribution name, for what the examples and lomo_native's modules import
DISTRIBUTIONS = {"torch": "torch", "jax": "jax", "numpy": "numpy", "transformers": "transformers",
                 "matplotlib": "matplotlib", "tqdm": "tqdm", "optax": "optax"}
# Imported by an example only when the user asks for that comparison (finetune_hf.py's lomo-optim
# run): not an install requirement.
OPTIONAL = {"lomo_optim"}


def _pyproject():
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((PKG / "pyproject.toml").read_text())["project"]


def _names(reqs):
    out = set()
    for r in reqs:
        name = r.split(";")[0]
        for sep in "<>=!~[ ":
            name = name.split(sep)[0]
        out.add(name.strip().lower())
    return out


def _third_party_imports(path):
    """Top-level modules a file imports that are neither stdlib nor lomo_native."""
    mods = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            mods |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            mods.add(node.module.split(".")[0])
            if node.module == "lomo_native":
                mods |= {f"lomo_native.{a.name}" for a in node.names}
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lomo_native."):
            mods.add(node.module)
    return {m for m in mods if m not in sys.stdlib_module_names and m != "lomo_native"}


def test_every_import_of_the_package_and_examples_is_a_declared_dependency():
    project = _pyproject()
    base = _names(project["dependencies"])
    extras = {k: _names(v) for k, v in project["optional-dependencies"].items()}
    # each module of the package: what it imports must be in the base or in its extra
    for mod in sorted((PKG / "lomo_native").glob("*.py")):
        need = {DISTRIBUTIONS[m] for m in _third_party_imports(mod) if not m.startswith("lomo_native")}
        # a private module belongs to the extra of its public one (_jax_pytree.py -> [jax])
        extra = mod.stem.lstrip("_").split("_")[0]
        have = base | extras.get(extra, set())
        assert need <= have, f"{mod.name} imports {need - have}, not declared for it"
    # each example runs with the [examples] extra
    examples = sorted(EXAMPLES.glob("*.py"))
    assert examples
    for ex in examples:
        need = set()
        for m in _third_party_imports(ex) - OPTIONAL:
            if m.startswith("lomo_native."):
                need |= extras[m.split(".", 1)[1]]  # lomo_native.torch needs the [torch] extra
            else:
                need.add(DISTRIBUTIONS[m])
        assert need <= base | extras["examples"], f"{ex.name} needs {need - base - extras['examples']}"


def _cc():
    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc:
        pytest.skip("no C compiler")
    return cc


def _load_in_subprocess(library, tmp_path):
    env = dict(os.environ, LOMO_LIBRARY=str(library), PYTHONPATH=str(PKG))
    return subprocess.run(
        [sys.executable, "-c", "import lomo_native; lomo_native.load()"],
        env=env, capture_output=True, text=True, cwd=tmp_path,
    )


def test_a_library_older_than_the_package_is_refused_with_its_path_and_version(tmp_path):
    src = tmp_path / "old.c"
    src.write_text(
        "unsigned int lomo_abi_version(void) { return %d; }\n"
        'const char *lomo_version(void) { return "0.0.7"; }\n' % (_native.ABI_VERSION - 1)
    )
    lib = tmp_path / "liblomo.so"
    subprocess.run([_cc(), "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
    r = _load_in_subprocess(lib, tmp_path)
    assert r.returncode != 0
    assert str(lib) in r.stderr and "0.0.7" in r.stderr, r.stderr
    assert f"ABI {_native.ABI_VERSION - 1}" in r.stderr and "older than lomo_native" in r.stderr


def test_a_library_that_is_not_lomo_is_refused(tmp_path):
    src = tmp_path / "other.c"
    src.write_text("int something_else(void) { return 1; }\n")
    lib = tmp_path / "libother.so"
    subprocess.run([_cc(), "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
    r = _load_in_subprocess(lib, tmp_path)
    assert r.returncode != 0 and str(lib) in r.stderr and "not a lomo library" in r.stderr, r.stderr


def test_the_loaded_library_is_at_least_the_abi_the_package_expects():
    assert _native.load().lomo_abi_version() >= _native.ABI_VERSION


def test_the_package_expects_the_abi_of_the_header_it_declares():
    """The ctypes declarations follow include/lomo.h: the ABI they need is the header's."""
    import re

    header = (PKG.parents[1] / "include" / "lomo.h").read_text()
    abi = int(re.search(r"#define LOMO_ABI_VERSION (\d+)", header).group(1))
    assert _native.ABI_VERSION == abi


def _elf_sections(data):
    """Section names of a 64-bit little-endian ELF file."""
    import struct

    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    def header(i):
        name, = struct.unpack_from("<I", data, shoff + i * shentsize)
        offset, size = struct.unpack_from("<QQ", data, shoff + i * shentsize + 0x18)
        return name, offset, size
    _, stroff, _ = header(shstrndx)
    names = []
    for i in range(shnum):
        name = header(i)[0]
        names.append(data[stroff + name:data.index(b"\0", stroff + name)].decode())
    return names


def test_wheel_is_py3_none_platform_with_a_stripped_library_and_a_clean_source_tree(tmp_path):
    pytest.importorskip("setuptools")
    pytest.importorskip("wheel")
    env = dict(os.environ, LOMO_LIBRARY=lomo_native.library_path())
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path / "dist"), str(PKG)],
        env=env, check=True, cwd=tmp_path,
    )
    (whl,) = (tmp_path / "dist").glob("*.whl")
    assert whl.name.startswith(f"lomo_native-{lomo_native.__version__}-py3-none-"), whl.name
    assert not whl.name.endswith("-any.whl")
    with zipfile.ZipFile(whl) as z:
        lib = z.read("lomo_native/liblomo.so")
    assert lib[:4] == b"\x7fELF" and ".debug_info" not in _elf_sections(lib), "debug info bundled"
    assert not (PKG / "lomo_native" / "liblomo.so").exists(), "the build copied into the source tree"
    # installed from the wheel, the package loads its bundled library
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                    str(site), str(whl)], check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("LOMO_LIBRARY", "PYTHONPATH")}
    env["PYTHONPATH"] = str(site)
    r = subprocess.run(
        [sys.executable, "-c", "import lomo_native as m; print(m.library_path()); print(m.version())"],
        env=env, capture_output=True, text=True, check=True, cwd=tmp_path,
    )
    path, version = r.stdout.split()
    assert Path(path) == site / "lomo_native" / "liblomo.so" and version == lomo_native.version()
