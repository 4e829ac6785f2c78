// lomo: the emulated kernel table. Each LOMO_KERNEL instantiation registers a trampoline that
// copies the argument struct out of the launch's `void** args` (the cuLaunchKernel convention)
// and runs the kernel through emu::launch.
#pragma once

#include <map>
#include <string>

namespace emu {

typedef void (*Trampoline)(void* fn, unsigned grid, unsigned block, size_t smem, void** args);

struct Entry {
  void* fn;
  Trampoline tramp;
  size_t arg_size;
};

inline std::map<std::string, Entry>& table() {
  static std::map<std::string, Entry> t;
  return t;
}

template <typename A>
void trampoline(void* fn, unsigned grid, unsigned block, size_t smem, void** args) {
  A a;
  memcpy(&a, args[0], sizeof(A));
  void (*f)(A) = reinterpret_cast<void (*)(A)>(fn);
  launch(dim3(grid), dim3(block), smem, [&] { f(a); });
}

template <typename A>
struct Registrar {
  Registrar(const char* name, void (*f)(A)) {
    table()[name] = Entry{reinterpret_cast<void*>(f), &trampoline<A>, sizeof(A)};
  }
};

}  // namespace emu
