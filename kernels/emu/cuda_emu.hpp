// lomo: a small CUDA emulation for the host, so the kernel sources in kernels/ run unchanged on
// CPU threads (tests without a GPU). Only what the kernels use is provided:
//
// - a launch runs the grid's blocks one after another; each block runs on blockDim.x real
//   threads (one std::thread per CUDA thread), so __syncthreads is a real barrier;
// - __shared__ variables are function statics: correct because blocks never overlap and
//   launches are serialized process-wide; dynamic shared memory is one buffer per launch;
// - warp shuffles exchange through a per-warp slot array between two warp barriers (every lane
//   of a warp must take part, as the kernels' full-mask shuffles require);
// - atomics are std::atomic_ref operations; __threadfence is a sequentially consistent fence.
//
// 1-D grids and blocks only; blockDim.x must be a multiple of 32.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#include <atomic>
#include <barrier>
#include <cstddef>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

struct uint3 { unsigned x, y, z; };
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3() = default;
  dim3(unsigned a, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};

inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __shared__ static
#define __restrict__ __restrict

namespace emu {

struct Launch {
  explicit Launch(unsigned threads, size_t smem)
      : block_barrier((std::ptrdiff_t)threads), smem_buf(smem + 16) {
    unsigned warps = threads / 32;
    warp_barriers.reserve(warps);
    for (unsigned w = 0; w < warps; ++w) warp_barriers.emplace_back(new std::barrier<>(32));
    slots.resize((size_t)warps * 32);
  }
  std::barrier<> block_barrier;
  std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
  std::vector<uint64_t> slots;
  std::vector<unsigned char> smem_buf;
};

inline thread_local Launch* current = nullptr;

inline std::mutex& launch_mutex() {
  static std::mutex m;
  return m;
}

// Runs `body` as a grid of `grid` blocks of `block` threads with `smem` bytes of dynamic
// shared memory. Launches are serialized (kernels keep __shared__ data in statics).
inline void launch(dim3 grid, dim3 block, size_t smem, const std::function<void()>& body) {
  std::lock_guard<std::mutex> lock(launch_mutex());
  unsigned n = block.x;
  Launch ctx(n, smem);
  std::vector<std::thread> threads;
  threads.reserve(n);
  for (unsigned t = 0; t < n; ++t) {
    threads.emplace_back([&, t] {
      current = &ctx;
      threadIdx = uint3{t, 0, 0};
      blockDim = block;
      gridDim = grid;
      for (unsigned b = 0; b < grid.x; ++b) {
        blockIdx = uint3{b, 0, 0};
        body();
        ctx.block_barrier.arrive_and_wait();
      }
      current = nullptr;
    });
  }
  for (auto& th : threads) th.join();
}

inline void* dyn_smem() {
  uintptr_t p = (uintptr_t)current->smem_buf.data();
  return (void*)((p + 15) & ~(uintptr_t)15);
}

}  // namespace emu

inline void __syncthreads() { emu::current->block_barrier.arrive_and_wait(); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }

template <typename T>
inline T __shfl_xor_sync(unsigned /*mask*/, T v, int lane_mask) {
  static_assert(sizeof(T) <= 8, "shuffle of at most 8 bytes");
  emu::Launch* c = emu::current;
  unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  uint64_t bits = 0;
  memcpy(&bits, &v, sizeof(T));
  c->slots[warp * 32 + lane] = bits;
  c->warp_barriers[warp]->arrive_and_wait();
  uint64_t other = c->slots[warp * 32 + (lane ^ (unsigned)lane_mask)];
  c->warp_barriers[warp]->arrive_and_wait();
  T out;
  memcpy(&out, &other, sizeof(T));
  return out;
}

inline unsigned atomicAdd(unsigned* p, unsigned v) {
  return std::atomic_ref<unsigned>(*p).fetch_add(v);
}
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  return std::atomic_ref<unsigned long long>(*p).fetch_add(v);
}
inline unsigned atomicOr(unsigned* p, unsigned v) {
  return std::atomic_ref<unsigned>(*p).fetch_or(v);
}
inline unsigned atomicExch(unsigned* p, unsigned v) {
  return std::atomic_ref<unsigned>(*p).exchange(v);
}

// The hardware approximation is within 2 ulps; the emulation returns a value 2 ulps off on purpose
// so that the callers' refinement (div_rn) is exercised by the host tests.
inline float __fdividef(float a, float b) {
  float q = a / b;
  unsigned u;
  memcpy(&u, &q, 4);
  if ((u & 0x7f800000u) != 0x7f800000u && (u & 0x7fffffffu) > 2u) u += (u & 1u) ? 2u : -2u;
  memcpy(&q, &u, 4);
  return q;
}

inline unsigned __float_as_uint(float v) {
  unsigned u;
  memcpy(&u, &v, 4);
  return u;
}
inline float __uint_as_float(unsigned u) {
  float v;
  memcpy(&v, &u, 4);
  return v;
}

#define LOMO_DYN_SMEM(type, name) type* name = static_cast<type*>(emu::dyn_smem())
