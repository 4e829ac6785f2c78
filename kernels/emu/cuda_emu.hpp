// lomo: a small CUDA emulation for the host, so the kernel sources in kernels/ run unchanged on
// the CPU (tests without a GPU). Only what the kernels use is provided:
//
// - a launch runs the grid's blocks one after another; the blockDim.x threads of a block are
//   cooperative fibers on the launching OS thread (started with makecontext, then switched with
//   _setjmp/_longjmp, which avoid swapcontext's signal-mask system calls), switched only at
//   __syncthreads and warp shuffles, so barriers are real (every thread must arrive) and cheap;
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
#include <setjmp.h>
#include <ucontext.h>

#include <atomic>
#include <cstddef>
#include <functional>
#include <mutex>
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

// A barrier over `n` fibers: arrive, then yield until the generation moves on.
struct Barrier {
  unsigned n = 0, count = 0;
  unsigned long long gen = 0;
};

struct Launch {
  unsigned n = 0;
  ucontext_t sched;
  jmp_buf sched_jb;
  std::vector<ucontext_t> ctx;
  struct Jmp { jmp_buf b; };
  std::vector<Jmp> jb;
  std::vector<char> started;
  std::vector<char> done;
  unsigned cur = 0;
  Barrier block;
  std::vector<Barrier> warps;
  std::vector<uint64_t> slots;
  std::vector<unsigned char> smem_buf;
  const std::function<void()>* body = nullptr;
};

inline thread_local Launch* current = nullptr;

inline std::mutex& launch_mutex() {
  static std::mutex m;
  return m;
}

// Back to the scheduler; it resumes the other fibers, then this one.
inline void yield() {
  Launch* c = current;
  if (_setjmp(c->jb[c->cur].b) == 0) _longjmp(c->sched_jb, 1);
}

inline void wait(Barrier& b) {
  unsigned long long gen = b.gen;
  if (++b.count == b.n) {
    b.count = 0;
    b.gen += 1;
    return;
  }
  while (b.gen == gen) yield();
}

inline void fiber_main() {
  Launch* c = current;
  (*c->body)();
  c->done[c->cur] = 1;
  _longjmp(c->sched_jb, 1);
}

// Runs fiber `t` until its next yield or its end.
__attribute__((noinline)) inline void resume(Launch& L, unsigned t) {
  L.cur = t;
  threadIdx = uint3{t, 0, 0};
  if (_setjmp(L.sched_jb) == 0) {
    if (!L.started[t]) {
      L.started[t] = 1;
      swapcontext(&L.sched, &L.ctx[t]);
    } else {
      _longjmp(L.jb[t].b, 1);
    }
  }
}

// Fiber stacks, reused by every launch (launches are serialized).
inline std::vector<std::vector<char>>& stack_pool() {
  static std::vector<std::vector<char>> pool;
  return pool;
}

// Runs `body` as a grid of `grid` blocks of `block` threads with `smem` bytes of dynamic
// shared memory. Launches are serialized (kernels keep __shared__ data in statics).
inline void launch(dim3 grid, dim3 block, size_t smem, const std::function<void()>& body) {
  std::lock_guard<std::mutex> lock(launch_mutex());
  const size_t stack_bytes = 64 * 1024;
  Launch L;
  L.n = block.x;
  L.ctx.resize(L.n);
  L.jb.resize(L.n);
  L.started.assign(L.n, 0);
  L.done.assign(L.n, 0);
  L.block.n = L.n;
  L.warps.resize(L.n / 32);
  for (auto& w : L.warps) w.n = 32;
  L.slots.resize(L.n);
  L.smem_buf.resize(smem + 16);
  L.body = &body;
  auto& stacks = stack_pool();
  while (stacks.size() < L.n) stacks.emplace_back(stack_bytes);
  Launch* saved = current;
  current = &L;
  blockDim = block;
  gridDim = grid;
  for (unsigned b = 0; b < grid.x; ++b) {
    blockIdx = uint3{b, 0, 0};
    for (unsigned t = 0; t < L.n; ++t) {
      getcontext(&L.ctx[t]);
      L.ctx[t].uc_stack.ss_sp = stacks[t].data();
      L.ctx[t].uc_stack.ss_size = stack_bytes;
      L.ctx[t].uc_link = nullptr;
      makecontext(&L.ctx[t], fiber_main, 0);
      L.done[t] = 0;
      L.started[t] = 0;
    }
    unsigned alive = L.n;
    while (alive > 0) {
      alive = 0;
      for (unsigned t = 0; t < L.n; ++t) {
        if (L.done[t]) continue;
        resume(L, t);
        if (!L.done[t]) alive += 1;
      }
    }
  }
  current = saved;
}

inline void* dyn_smem() {
  uintptr_t p = (uintptr_t)current->smem_buf.data();
  return (void*)((p + 15) & ~(uintptr_t)15);
}

}  // namespace emu

inline void __syncthreads() { emu::wait(emu::current->block); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }

template <typename T>
inline T __shfl_xor_sync(unsigned /*mask*/, T v, int lane_mask) {
  static_assert(sizeof(T) <= 8, "shuffle of at most 8 bytes");
  emu::Launch* c = emu::current;
  unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  uint64_t bits = 0;
  memcpy(&bits, &v, sizeof(T));
  c->slots[warp * 32 + lane] = bits;
  emu::wait(c->warps[warp]);
  uint64_t other = c->slots[warp * 32 + (lane ^ (unsigned)lane_mask)];
  emu::wait(c->warps[warp]);
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
