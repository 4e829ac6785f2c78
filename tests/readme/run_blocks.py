#!/usr/bin/env python3
"""Runs every code block of README.md, in order, as a reader would (run by scripts/test.sh).

    python3 tests/readme/run_blocks.py [--site DIR]... [--keep] [--list]

The blocks become one bash script, run in a scratch directory that stands for the reader's clone
(symbolic links to the repository's top-level entries, so the build reuses `target/`) with a
scratch HOME (what the README installs into `~/...` lands there; cargo, rustup and pip keep
their real caches). By the language of a block's info string:

- `sh`: the commands, as written (`set -euo pipefail`: any failure fails the run). The one
  command that cannot run inside the test suite is `scripts/test.sh`, which is what runs this
  script: it is checked to be the caller (LOMO_IN_TEST_SH=1) instead of being run again.
- `c`, `cpp` with `file=NAME`: written to NAME, for the `sh` blocks after them to compile.
- `python`: run with the `python` on PATH at that point (the README's virtual environment).
- `text`: not run (layout listings and the like); at most MAX_TEXT_BLOCKS of them.

Any other language, or a `c`/`cpp` block without `file=`, is an error: every block runs.

`--site DIR` (scripts/test.sh passes its test environments' site-packages): a virtual
environment that the README creates (`python3 -m venv ...`) gets DIR appended to its path by a
.pth file when DIR is for the same Python version, so that pip finds torch, transformers, jax
there already installed and the README's `pip install` commands run without downloading
gigabytes on every test run (and where download.pytorch.org is out of reach). Everything the
README installs itself (lomo-native, built from the clone) comes first on the path.
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MAX_TEXT_BLOCKS = 2
FENCE = re.compile(r"^```(.*)$")


def blocks(text):
    """(line number, language, attributes, body) of every fenced block."""
    out, cur = [], None
    for n, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if cur is None and m:
            info = m.group(1).split()
            if not info:
                raise SystemExit(f"README.md:{n}: a code block without a language")
            attrs = dict(a.split("=", 1) for a in info[1:] if "=" in a)
            cur = (n, info[0], attrs, [])
        elif cur is not None and line.startswith("```"):
            out.append((cur[0], cur[1], cur[2], "\n".join(cur[3]) + "\n"))
            cur = None
        elif cur is not None:
            cur[3].append(line)
    if cur is not None:
        raise SystemExit(f"README.md:{cur[0]}: unclosed code block")
    return out


def heredoc(path, body):
    tag = "LOMO_README_BLOCK_END"
    assert tag not in body
    return f"cat > {path} <<'{tag}'\n{body}{tag}\n"


TEST_SH = re.compile(r"^(\s*)scripts/test\.sh(\s+#.*)?$")


PREAMBLE = r"""set -euo pipefail
# `python3 -m venv DIR` as written, then the test environments' packages appended (see --site).
python3() {
    command python3 "$@" || return
    if [ "${1:-}" = -m ] && [ "${2:-}" = venv ] && [ -n "${LOMO_README_SITES:-}" ]; then
        local dir="${@: -1}" ver site
        ver=$("$dir/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
        for site in $LOMO_README_SITES; do
            case "$site" in */python"$ver"/site-packages)
                echo "$site" >> "$dir/lib/python$ver/site-packages/lomo-readme-test-envs.pth"
                # The new environment's own (older) setuptools would hide the test
                # environment's, which torch requires: pip would then fetch one.
                if [ -d "$site/setuptools" ]; then
                    "$dir/bin/python" -m pip uninstall -q -y setuptools >/dev/null 2>&1 || true
                fi;;
            esac
        done
    fi
}
"""


def script(readme):
    parts, text_blocks = [], 0
    for i, (line, lang, attrs, body) in enumerate(blocks(readme)):
        where = f"README.md:{line}"
        parts.append(f"echo '== {where} ({lang})'\n")
        if lang == "text":
            text_blocks += 1
            continue
        if lang == "sh":
            for cmd in body.splitlines():
                if TEST_SH.match(cmd):
                    cmd = ('[ "${LOMO_IN_TEST_SH:-}" = 1 ] || { echo "'
                           f'{where}: scripts/test.sh is what runs this check; run it" >&2; exit 1; }}')
                parts.append(cmd + "\n")
        elif lang in ("c", "cpp"):
            if "file" not in attrs:
                raise SystemExit(f"{where}: a {lang} block needs file=NAME (the sh block compiles it)")
            parts.append(heredoc(attrs["file"], body))
        elif lang == "python":
            name = f"readme_block_{i}.py"
            parts.append(heredoc(name, body))
            parts.append(f"python {name}\n")
        else:
            raise SystemExit(f"{where}: a '{lang}' block cannot be run (use sh, c, cpp, python or text)")
    if text_blocks > MAX_TEXT_BLOCKS:
        raise SystemExit(f"README.md has {text_blocks} text blocks (not run); at most {MAX_TEXT_BLOCKS}")
    return PREAMBLE + "".join(parts)


def main():
    readme = (REPO / "README.md").read_text()
    body = script(readme)
    if "--list" in sys.argv:
        print(body)
        return 0
    work = Path(tempfile.mkdtemp(prefix="lomo-readme-"))
    try:
        clone = work / "clone"
        home = work / "home"
        clone.mkdir()
        home.mkdir()
        for entry in REPO.iterdir():
            if entry.name != ".git" and not entry.name.startswith(".venv"):
                (clone / entry.name).symlink_to(entry)
        real_home = Path(os.environ.get("HOME", str(Path.home())))
        env = dict(os.environ)
        env.update(
            HOME=str(home),
            CARGO_HOME=os.environ.get("CARGO_HOME", str(real_home / ".cargo")),
            RUSTUP_HOME=os.environ.get("RUSTUP_HOME", str(real_home / ".rustup")),
            PIP_CACHE_DIR=os.environ.get("PIP_CACHE_DIR", str(real_home / ".cache" / "pip")),
            PIP_DISABLE_PIP_VERSION_CHECK="1",
        )
        for var in ("LOMO_LIBRARY", "PYTHONPATH", "VIRTUAL_ENV", "LOMO_CUDA_EMULATE"):
            env.pop(var, None)
        args = sys.argv[1:]
        sites = [args[i + 1] for i, a in enumerate(args) if a == "--site" and i + 1 < len(args)]
        env["LOMO_README_SITES"] = " ".join(str(Path(s).resolve()) for s in sites)
        (work / "readme.sh").write_text(body)
        r = subprocess.run(["bash", str(work / "readme.sh")], cwd=clone, env=env)
        if r.returncode != 0:
            print(f"README blocks: FAILED (exit {r.returncode}); the script is {work}/readme.sh "
                  "(rerun with --keep to keep it)", file=sys.stderr)
            return 1
        print("README blocks: all ran")
        return 0
    finally:
        if "--keep" not in sys.argv:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
