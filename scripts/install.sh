#!/usr/bin/env bash
# Installs lomo for C and C++ users:  scripts/install.sh [PREFIX]   (default: /usr/local)
#
#   PREFIX/lib/liblomo.so.X.Y.Z (SONAME liblomo.so.0.Y while the version is 0.x, else
#       liblomo.so.X), with the links liblomo.so.<soname version> and liblomo.so
#   PREFIX/lib/liblomo.a                     the static library (no C++ runtime needed)
#   PREFIX/include/lomo.h (C API), PREFIX/include/lomo.hpp (C++17 wrapper)
#   PREFIX/lib/pkgconfig/lomo.pc             pkg-config --cflags --libs lomo
#   PREFIX/lib/cmake/lomo/lomoConfig.cmake   find_package(lomo) -> lomo::lomo (shared),
#                                            lomo::lomo_static
#
# Builds the release library with cargo first (set LOMO_NO_BUILD=1 to install an existing
# target/release build). Both libraries are installed without debug info (LOMO_KEEP_DEBUG=1
# keeps what the build has). Re-running overwrites the previous installation.
set -euo pipefail
cd "$(dirname "$0")/.."

prefix="${1:-/usr/local}"
mkdir -p "$prefix"
prefix="$(cd "$prefix" && pwd)"
version="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)"
major="${version%%.*}"
minor="${version#*.}"; minor="${minor%%.*}"
# The SONAME that build.rs gives the library: the part of the version that keeps the ABI.
if [[ "$major" == 0 ]]; then soversion="0.$minor"; else soversion="$major"; fi

if [[ -z "${LOMO_NO_BUILD:-}" ]]; then
    cargo build --release --lib
fi

install -d "$prefix/lib" "$prefix/include" "$prefix/lib/pkgconfig" "$prefix/lib/cmake/lomo"
rm -f "$prefix/lib/liblomo.so" "$prefix/lib/liblomo.so.$soversion" "$prefix/lib/liblomo.so.$version"
install -m 0755 target/release/liblomo.so "$prefix/lib/liblomo.so.$version"
ln -s "liblomo.so.$version" "$prefix/lib/liblomo.so.$soversion"
ln -s "liblomo.so.$soversion" "$prefix/lib/liblomo.so"
install -m 0644 target/release/liblomo.a "$prefix/lib/liblomo.a"
if [[ -z "${LOMO_KEEP_DEBUG:-}" ]] && command -v strip >/dev/null; then
    # The release profile builds without debug info; the static library still carries the
    # standard library's (about a quarter of its size).
    strip --strip-debug "$prefix/lib/liblomo.so.$version" "$prefix/lib/liblomo.a"
fi
install -m 0644 include/lomo.h include/lomo.hpp "$prefix/include/"

cat > "$prefix/lib/pkgconfig/lomo.pc" <<PC
prefix=$prefix
exec_prefix=\${prefix}
libdir=\${exec_prefix}/lib
includedir=\${prefix}/include

Name: lomo
Description: LOMO and AdaLomo optimizer steps fused into the backward pass (C API)
Version: $version
Libs: -L\${libdir} -llomo
# Static linking (liblomo.a): the system libraries it needs, as
# \`cargo rustc --release --lib --crate-type staticlib -- --print native-static-libs\` lists them,
# less -lgcc_s and -lc, which the compiler driver adds (with -static: libgcc_eh).
Libs.private: -lpthread -lm -ldl -lrt -lutil
Cflags: -I\${includedir}
PC

cat > "$prefix/lib/cmake/lomo/lomoConfig.cmake" <<'CMAKE'
# lomo CMake package: find_package(lomo) defines
#   lomo::lomo         the shared library liblomo.so with include/lomo.h and include/lomo.hpp
#   lomo::lomo_static  the static library liblomo.a (links threads, dl, m, rt and util)
# lomo.hpp needs C++17 (target_compile_features(<target> PRIVATE cxx_std_17)).
get_filename_component(_lomo_prefix "${CMAKE_CURRENT_LIST_DIR}/../../.." ABSOLUTE)
if(NOT TARGET lomo::lomo)
  add_library(lomo::lomo SHARED IMPORTED)
  set_target_properties(lomo::lomo PROPERTIES
    IMPORTED_LOCATION "${_lomo_prefix}/lib/liblomo.so.@VERSION@"
    IMPORTED_SONAME "liblomo.so.@SOVERSION@"
    INTERFACE_INCLUDE_DIRECTORIES "${_lomo_prefix}/include")
endif()
if(NOT TARGET lomo::lomo_static)
  include(CMakeFindDependencyMacro)
  find_dependency(Threads)
  add_library(lomo::lomo_static STATIC IMPORTED)
  set_target_properties(lomo::lomo_static PROPERTIES
    IMPORTED_LOCATION "${_lomo_prefix}/lib/liblomo.a"
    INTERFACE_INCLUDE_DIRECTORIES "${_lomo_prefix}/include"
    INTERFACE_LINK_LIBRARIES "Threads::Threads;${CMAKE_DL_LIBS};m;rt;util")
endif()
set(lomo_INCLUDE_DIRS "${_lomo_prefix}/include")
set(lomo_LIBRARIES lomo::lomo)
unset(_lomo_prefix)
CMAKE
sed -i "s/@VERSION@/$version/; s/@SOVERSION@/$soversion/" "$prefix/lib/cmake/lomo/lomoConfig.cmake"

cat > "$prefix/lib/cmake/lomo/lomoConfigVersion.cmake" <<CMAKE
# Compatible: same major version (for 0.x: same minor), not older than requested, 64-bit.
set(PACKAGE_VERSION "$version")
if(PACKAGE_FIND_VERSION VERSION_GREATER PACKAGE_VERSION)
  set(PACKAGE_VERSION_COMPATIBLE FALSE)
elseif(NOT PACKAGE_FIND_VERSION_MAJOR STREQUAL "$major")
  set(PACKAGE_VERSION_COMPATIBLE FALSE)
elseif("$major" STREQUAL "0" AND PACKAGE_FIND_VERSION_COUNT GREATER 1
       AND NOT PACKAGE_FIND_VERSION_MINOR STREQUAL "$minor")
  set(PACKAGE_VERSION_COMPATIBLE FALSE)
else()
  set(PACKAGE_VERSION_COMPATIBLE TRUE)
  if(PACKAGE_FIND_VERSION STREQUAL PACKAGE_VERSION)
    set(PACKAGE_VERSION_EXACT TRUE)
  endif()
endif()
if(NOT CMAKE_SIZEOF_VOID_P STREQUAL "8")
  set(PACKAGE_VERSION "\${PACKAGE_VERSION} (64-bit)")
  set(PACKAGE_VERSION_UNSUITABLE TRUE)
endif()
CMAKE

pc="PKG_CONFIG_PATH=$prefix/lib/pkgconfig pkg-config"
echo "lomo $version installed to $prefix"
echo "  C, shared: cc prog.c \$($pc --cflags --libs lomo) -Wl,-rpath,$prefix/lib"
echo "  C, static: cc -static prog.c \$($pc --static --cflags --libs lomo)"
echo "  CMake:     cmake -DCMAKE_PREFIX_PATH=$prefix ...   find_package(lomo) + lomo::lomo"
echo "             (lomo::lomo_static for the static library)"
