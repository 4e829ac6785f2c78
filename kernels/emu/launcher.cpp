// lomo: the host build of the kernel sources (compiled by build.rs with LOMO_EMU) and the C entry
// points the Rust emulated launcher calls (src/backend/cuda/emu.rs).
#include "../norm.cu"
#include "../lomo.cu"
#include "../adalomo.cu"
#include "../adalomo_finalize.cu"
#include "../step.cu"
#include "../xla.cu"
#include "../accum.cu"

extern "C" {

// Launches kernel `name` with `grid` blocks of `block` threads, `smem` bytes of dynamic shared
// memory and cuLaunchKernel-style `args` (args[0] points to the argument struct). Returns 0 on
// success, 1 for an unknown kernel, 2 for an unsupported block size.
int lomo_emu_launch(const char* name, unsigned grid, unsigned block, size_t smem, void** args) {
  auto it = emu::table().find(name);
  if (it == emu::table().end()) return 1;
  if (block == 0 || block % 32 != 0 || block > 1024) return 2;
  if (grid == 0) return 0;
  it->second.tramp(it->second.fn, grid, block, smem, args);
  return 0;
}

// sizeof the argument struct of kernel `name` (0 if unknown): the Rust side checks its mirrors.
size_t lomo_emu_arg_size(const char* name) {
  auto it = emu::table().find(name);
  return it == emu::table().end() ? 0 : it->second.arg_size;
}

size_t lomo_emu_sizeof_step() { return sizeof(LomoStep); }
size_t lomo_emu_sizeof_tensor() { return sizeof(LomoTensor); }

}  // extern "C"
