// lomo kernels for the XLA FFI handlers (src/xla/cuda.rs): the per-step scalars of a custom call
// are 0-d device arrays, so they become the LomoStep / LomoTensor records here, on the stream,
// exactly as the Host handler (src/xla/cpu.rs) derives them on the CPU — no host round trip.
//
//   xla_prepare        every LomoTensor of the call ← 0;  inv_scale = (f32)(1 / (f64)loss_scale);
//                      grad_sum_sq: skip = ¬(loss_scale finite ∧ > 0);
//                      updates:     lr, coef = clip_coef, steps = step − 1,
//                                   β = 1 − step^d (f64 → f32), 1 − β (f64 → f32),
//                                   skip = ¬valid ∨ clip_coef not finite, where valid =
//                                   lr finite ∧ ≥ 0, loss_scale finite ∧ > 0, step ≥ 1,
//                                   ¬(clip_coef < 0)   (the Host handler's argument errors:
//                                   they cannot be raised without a host synchronization, so an
//                                   invalid step is skipped and reports finite = false).
//   xla_norm_finish    S = Σ_i sum_sq_i (f64, operand order);  finite = ¬skip ∧ no gradient bad;
//                      sum_sq = (f32)S;  clip_coef = min(1, (f32)C / ((f32)sqrt(S) + 1e-6)) (f32)
//                      when C > 0, else 1;  both NaN when not finite  (= step.cu step_norm_end).
//   xla_update_finish  finite = ¬skip ∧ ¬bad.
// Single-block kernels; the sums run on one thread in operand order.
#include "common.cuh"

struct XlaArgs {
  LomoStep* step;
  LomoTensor* tensors;
  const float* lr;            // updates
  const float* loss_scale;
  const float* clip_coef;     // updates
  const void* step_in;        // updates: the step operand, of type step_dtype
  float* sum_sq_out;          // grad_sum_sq
  float* clip_coef_out;       // grad_sum_sq
  unsigned char* finite_out;  // the PRED result (one byte)
  double decay_rate;          // AdaLomo's β exponent (0 for LOMO)
  double clip_grad_norm;      // grad_sum_sq (0 = off)
  u32 n_tensors;
  u32 step_dtype;             // 0 s32, 1 s64, 2 u32, 3 u64
  u32 update;                 // 1: an update's scalars; 0: grad_sum_sq
  u32 pad;
};

// The step operand as u64, and whether it is >= 1.
LOMO_DEV bool xla_step(const XlaArgs& a, u64* out) {
  switch (a.step_dtype) {
    case 0: {
      const int v = *static_cast<const int*>(a.step_in);
      *out = (u64)v;
      return v >= 1;
    }
    case 1: {
      const long long v = *static_cast<const long long*>(a.step_in);
      *out = (u64)v;
      return v >= 1;
    }
    case 2: {
      const u32 v = *static_cast<const u32*>(a.step_in);
      *out = (u64)v;
      return v >= 1;
    }
    default: {
      const u64 v = *static_cast<const u64*>(a.step_in);
      *out = v;
      return v >= 1;
    }
  }
}

LOMO_DEV void xla_prepare_body(const XlaArgs& a) {
  for (u32 i = threadIdx.x; i < a.n_tensors; i += blockDim.x) a.tensors[i] = LomoTensor();
  if (threadIdx.x != 0) return;
  LomoStep s = LomoStep();
  const float scale = *a.loss_scale;
  bool valid = !bad_bits(scale) && scale > 0.0f;
  s.inv_scale = (float)(1.0 / (double)scale);
  s.coef = 1.0f;
  if (a.update) {
    const float lr = *a.lr, coef = *a.clip_coef;
    u64 step = 0;
    valid = valid && !bad_bits(lr) && lr >= 0.0f;
    valid = xla_step(a, &step) && valid;
    valid = valid && !(coef < 0.0f);
    s.lr = lr;
    s.coef = coef;
    s.steps = valid ? step - 1 : 0;
    const double b = 1.0 - pow((double)(s.steps + 1), a.decay_rate);
    s.beta = (float)b;
    s.omb = (float)(1.0 - b);
    s.skip = (!valid || bad_bits(coef)) ? 1u : 0u;
  } else {
    s.skip = valid ? 0u : 1u;
  }
  *a.step = s;
}

LOMO_DEV void xla_norm_finish_body(const XlaArgs& a) {
  if (threadIdx.x != 0) return;
  double total = 0.0;
  bool bad = false;
  for (u32 i = 0; i < a.n_tensors; ++i) {
    if (a.tensors[i].bad) bad = true;
    else total += a.tensors[i].sum_sq;
  }
  const bool finite = !a.step->skip && !bad;
  float sum = lomo_nan(), coef = lomo_nan();
  if (finite) {
    sum = (float)total;
    coef = 1.0f;
    if (a.clip_grad_norm > 0.0) {
      const float norm = (float)sqrt(total);
      coef = fminf((float)a.clip_grad_norm / (norm + 1e-6f), 1.0f);
    }
  }
  *a.sum_sq_out = sum;
  *a.clip_coef_out = coef;
  *a.finite_out = finite ? 1 : 0;
}

LOMO_DEV void xla_update_finish_body(const XlaArgs& a) {
  if (threadIdx.x != 0) return;
  *a.finite_out = (!a.step->skip && !a.tensors[0].bad) ? 1 : 0;
}

LOMO_KERNEL(xla_prepare, XlaArgs, xla_prepare_body(a))
LOMO_KERNEL(xla_norm_finish, XlaArgs, xla_norm_finish_body(a))
LOMO_KERNEL(xla_update_finish, XlaArgs, xla_update_finish_body(a))
