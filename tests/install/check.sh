#!/usr/bin/env bash
# The installation for C and C++ users, as a user meets it (run by scripts/test.sh):
#   tests/install/check.sh STAGE_DIR
# installs into STAGE_DIR/prefix with scripts/install.sh (LOMO_NO_BUILD=1: the release library
# must already be built), checks the installed files (SONAME and links, no debug info, no C++
# runtime or CUDA emulation in the release library), then builds tests/install/pkgconfig.c
# with the two commands install.sh prints (shared with an rpath; static) and runs each, builds
# examples/cpp through the CMake package (lomo::lomo) and a C program through lomo::lomo_static.
set -euo pipefail
cd "$(dirname "$0")/../.."
stage="$1"
prefix="$stage/prefix"
fail() { echo "install check: $*" >&2; exit 1; }

out="$(LOMO_NO_BUILD=1 scripts/install.sh "$prefix")"
echo "$out"
lib="$prefix/lib"
version="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)"
so="$lib/liblomo.so.$version"
[[ -f "$so" && ! -L "$so" ]] || fail "$so is missing"
soname="$(readelf -d "$so" | sed -n 's/.*Library soname: \[\(.*\)\]/\1/p')"
[[ "$soname" == liblomo.so.0.* || "$soname" == liblomo.so.[1-9]* ]] || fail "SONAME '$soname'"
[[ "$(readlink "$lib/$soname")" == "liblomo.so.$version" ]] || fail "$lib/$soname link"
[[ "$(readlink "$lib/liblomo.so")" == "$soname" ]] || fail "$lib/liblomo.so link"
for f in "$so" "$lib/liblomo.a"; do
    if readelf -S -W "$f" 2>/dev/null | grep -q '\.debug_info'; then fail "$f has debug info"; fi
done
if readelf -d "$so" | grep -q 'libstdc++'; then fail "$so needs libstdc++"; fi
if nm -D "$so" | grep -q 'lomo_emu_'; then fail "$so contains the CUDA emulation"; fi
if nm "$lib/liblomo.a" 2>/dev/null | grep -q 'lomo_emu_'; then fail "liblomo.a contains the CUDA emulation"; fi

# The two C commands install.sh printed, on the test program, exactly as printed.
shared_cmd="$(echo "$out" | sed -n 's/^  C, shared: //p')"
static_cmd="$(echo "$out" | sed -n 's/^  C, static: //p')"
[[ -n "$shared_cmd" && -n "$static_cmd" ]] || fail "install.sh printed no C commands"
src="$PWD/tests/install/pkgconfig.c"
(cd "$stage" && eval "${shared_cmd/prog.c/-std=c99 -Wall -Wextra -Werror -o prog_shared $src}")
readelf -d "$stage/prog_shared" | grep -q "NEEDED.*\[$soname\]" || fail "prog_shared does not load $soname"
env -u LD_LIBRARY_PATH "$stage/prog_shared"
# glibc warns that a static program's dlopen/getaddrinfo need its shared libraries at run time.
(cd "$stage" && eval "${static_cmd/prog.c/-std=c99 -Wall -Wextra -o prog_static $src}") 2>"$stage/static.log" \
    || { cat "$stage/static.log" >&2; fail "static link failed"; }
if readelf -d "$stage/prog_static" 2>/dev/null | grep -q NEEDED; then fail "prog_static is not static"; fi
"$stage/prog_static"

# CMake: the C++ example (shared) and the C program (static library, dynamic libc).
cmake -S examples/cpp -B "$stage/build-cpp" -DCMAKE_PREFIX_PATH="$prefix" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$stage/build-cpp" >/dev/null
(cd "$stage/build-cpp" && ./trainer)
cmake -S tests/install -B "$stage/build-static" -DCMAKE_PREFIX_PATH="$prefix" >/dev/null
cmake --build "$stage/build-static" >/dev/null
if readelf -d "$stage/build-static/static_prog" | grep -q 'liblomo'; then
    fail "lomo::lomo_static linked the shared library"
fi
"$stage/build-static/static_prog"
echo "install check: OK (shared, static, CMake shared and static)"
