// lomo kernels: step bookkeeping on the device (src/optimizer.rs begin/end, src/scaler.rs), so a
// whole training step needs no host synchronization and can be captured in a CUDA graph.
//
//   step_begin:      clears every tensor's per-phase record; NORM: has_norm = 1, skip = 0,
//                    coef = 1; UPDATE: lr = arg, β = 1 − (steps+1)^d (f64 → f32), and
//                    has_norm = 0, skip = 0, coef = 1 when the host says no NORM phase ran in
//                    this step (phase 2; a cancelled step's NORM results must not leak).
//   step_gather:     (distributed) rec = [S, non-finite count] of this rank, all-reduced by the
//                    caller's collective on the stream before the end kernel reads it (reduced).
//   step_norm_end:   S = Σ sum_sq over finite tensors (id order; NORM_DUPLICATE ones count 0),
//                    overflow = any bad,
//                    coef = min(1, C / (sqrt(S) + 1e-6)) (f32) when C > 0 and no overflow,
//                    skip = overflow.
//   step_update_end: overflow = skip ∨ any bad; DeepSpeed's dynamic scaler rule in f64;
//                    steps += 1 (or skipped_total += 1); diagnostics; inv_scale = (f32)(1/scale).
// Single-block kernels; the sums run on one thread in id order, as the CPU backend sums them.
#include "common.cuh"

struct StepArgs {
  LomoStep* step;
  LomoTensor* tensors;
  u32 n_tensors;
  u32 phase;  // 0 NORM, 1 UPDATE after a NORM phase, 2 UPDATE without one
  float lr;
  u32 loss_scale_mode;  // 0 none, 1 static, 2 dynamic
  double clip_grad_norm;
  double decay_rate;  // AdaLomo's β2t exponent (0 for LOMO)
  double scale_factor;
  double min_scale;
  u32 scale_window;
  u32 hysteresis;
  double* rec;  // distributed phase end: [Σg², non-finite count], gathered, then all-reduced
  u32 reduced;  // the end kernels read the (all-reduced) rec instead of the tensor records
  u32 pad;
};

// The phase totals of this rank's tensor records, in id order: Σ sum_sq over the finite
// tensors not marked NORM_DUPLICATE, and the number of non-finite ones.
LOMO_DEV void gather_totals(const StepArgs& a, double* total, u32* nonfinite) {
  double t = 0.0;
  u32 nf = 0;
  for (u32 i = 0; i < a.n_tensors; ++i) {
    if (a.tensors[i].bad) nf += 1;
    else if (!(a.tensors[i].flags & LOMO_TENSOR_NORM_DUPLICATE)) t += a.tensors[i].sum_sq;
  }
  *total = t;
  *nonfinite = nf;
}

// The phase totals as the end kernels use them: gathered here, or the reduced record.
LOMO_DEV void phase_totals(const StepArgs& a, double* total, u32* nonfinite) {
  if (a.reduced) {
    *total = a.rec[0];
    *nonfinite = (u32)a.rec[1];
  } else {
    gather_totals(a, total, nonfinite);
  }
}

// A distributed phase end, before the all-reduce: this rank's totals into rec.
LOMO_DEV void step_gather_body(const StepArgs& a) {
  if (threadIdx.x != 0) return;
  double total;
  u32 nonfinite;
  gather_totals(a, &total, &nonfinite);
  a.rec[0] = total;
  a.rec[1] = (double)nonfinite;
}

LOMO_DEV void step_begin_body(const StepArgs& a) {
  for (u32 i = threadIdx.x; i < a.n_tensors; i += blockDim.x) {
    a.tensors[i].bad = 0;
    a.tensors[i].sum_sq = 0.0;
  }
  if (threadIdx.x != 0) return;
  LomoStep* s = a.step;
  if (a.phase == 0) {
    s->has_norm = 1;
    s->skip = 0;
    s->coef = 1.0f;
  } else {
    s->lr = a.lr;
    const double b = 1.0 - pow((double)(s->steps + 1), a.decay_rate);
    s->beta = (float)b;
    s->omb = (float)(1.0 - b);
    if (a.phase == 2) {
      s->has_norm = 0;
      s->skip = 0;
      s->coef = 1.0f;
    }
  }
}

LOMO_DEV void step_norm_end_body(const StepArgs& a) {
  if (threadIdx.x != 0) return;
  LomoStep* s = a.step;
  double total;
  u32 nonfinite;
  phase_totals(a, &total, &nonfinite);
  const bool overflow = nonfinite > 0;
  float coef = 1.0f;
  if (a.clip_grad_norm > 0.0 && !overflow) {
    const float norm = (float)sqrt(total);
    coef = fminf((float)a.clip_grad_norm / (norm + 1e-6f), 1.0f);
  }
  s->coef = coef;
  s->skip = overflow ? 1u : 0u;
  s->info_grad_norm = overflow ? lomo_nan() : (float)sqrt(total);
  s->info_nonfinite = nonfinite;
}

LOMO_DEV void scaler_update(const StepArgs& a, LomoStep* s, bool overflow) {
  if (a.loss_scale_mode != 2) return;
  if (overflow) {
    if (a.hysteresis == 1 || s->cur_hysteresis == 1) {
      s->scale = fmax(s->scale / a.scale_factor, a.min_scale);
    } else {
      s->cur_hysteresis -= 1;
    }
    s->last_overflow_iter = (long long)s->cur_iter;
  } else {
    const long long stable = (long long)s->cur_iter - s->last_overflow_iter - 1;
    if (stable > 0 && stable % (long long)a.scale_window == 0) {
      s->cur_hysteresis = a.hysteresis;
      // Never past the largest f32 (src/scaler.rs): backing off from infinity stays infinite.
      if (!bad_bits((float)(s->scale * a.scale_factor))) s->scale *= a.scale_factor;
    }
  }
  s->cur_iter += 1;
}

LOMO_DEV void step_update_end_body(const StepArgs& a) {
  if (threadIdx.x != 0) return;
  LomoStep* s = a.step;
  double total;
  u32 nonfinite;
  phase_totals(a, &total, &nonfinite);
  (void)total;
  const bool skipped = s->has_norm && s->skip;
  const bool overflow = skipped || nonfinite > 0;
  const float used = (float)s->scale;
  scaler_update(a, s, overflow);
  if (skipped) s->skipped_total += 1;
  else s->steps += 1;
  s->info_step = s->steps;
  s->info_grad_norm = s->has_norm ? s->info_grad_norm : lomo_nan();
  s->info_clip_coef = skipped ? 0.0f : s->coef;
  s->info_loss_scale = used;
  s->info_next_loss_scale = (float)s->scale;
  s->info_overflow = overflow ? 1u : 0u;
  s->info_skipped = skipped ? 1u : 0u;
  s->info_nonfinite = nonfinite;
  s->inv_scale = (float)(1.0 / s->scale);
  s->scale_f32 = (float)s->scale;
  s->has_norm = 0;
  s->skip = 0;
  s->coef = 1.0f;
}

LOMO_KERNEL(step_begin, StepArgs, step_begin_body(a))
LOMO_KERNEL(step_norm_end, StepArgs, step_norm_end_body(a))
LOMO_KERNEL(step_update_end, StepArgs, step_update_end_body(a))
LOMO_KERNEL(step_gather, StepArgs, step_gather_body(a))
