//! An independent f64 reference of LOMO and AdaLomo (`reference/semantics.md` §2.4, §3.3 with
//! design.md §4) and a driver that runs the CPU backend through the C API against it over two
//! steps (used by tests/reference.rs and tests/fp_environment.rs).

use super::*;

#[derive(Clone, Copy, Debug)]
pub struct Case {
    pub algorithm: u32,
    pub pdtype: u32,
    pub gdtype: u32,
    pub clip_norm: f64,
    pub clip_value: f64,
    pub wd: f64,
    pub scale: f64,
    pub carry: bool,
    /// Parameters are drawn with standard deviation 0.5 · pscale (1: ordinary values).
    pub pscale: f32,
}

/// Reference state of one AdaLomo parameter.
pub enum RefState {
    Factored(Vec<f64>, Vec<f64>),
    Vector(Vec<f64>),
}

pub fn view(shape: &[i64]) -> (usize, usize, bool) {
    let n: usize = shape.iter().map(|&d| d as usize).product();
    if shape.len() >= 2 {
        let c = *shape.last().unwrap() as usize;
        (n.checked_div(c).unwrap_or(0), c, true)
    } else {
        (n, 1, false)
    }
}

/// s[a] ← β·s[a] + (1−β)·mean_{b < n} u(a, b): AdaLomo's row (or column) moving average.
fn ema_of_means(s: &mut [f64], n: usize, beta: f64, u: impl Fn(usize, usize) -> f64) {
    for (a, v) in s.iter_mut().enumerate() {
        let m = (0..n).map(|b| u(a, b)).sum::<f64>() / n as f64;
        *v = beta * *v + (1.0 - beta) * m;
    }
}

/// One reference step over all parameters; returns the new values in f64.
#[allow(clippy::too_many_arguments)]
pub fn reference_step(
    c: &Case,
    shapes: &[Vec<i64>],
    params: &[Vec<f32>],
    grads: &[Vec<f32>],
    states: &mut [RefState],
    lr: f64,
    t: u64,
) -> Vec<Vec<f64>> {
    let s = if c.scale > 0.0 { c.scale } else { 1.0 };
    let unscaled: Vec<Vec<f64>> = grads
        .iter()
        .map(|g| g.iter().map(|&v| v as f64 / s).collect())
        .collect();
    let coef = if c.clip_norm > 0.0 {
        let total: f64 = unscaled.iter().flatten().map(|v| v * v).sum::<f64>().sqrt();
        (c.clip_norm / (total + 1e-6)).min(1.0)
    } else {
        1.0
    };
    let xs: Vec<Vec<f64>> = unscaled
        .iter()
        .map(|g| {
            g.iter()
                .map(|&v| if c.clip_value > 0.0 { v.clamp(-c.clip_value, c.clip_value) } else { v } * coef)
                .collect()
        })
        .collect();
    let mut out = Vec::new();
    for (k, (p, x)) in params.iter().zip(&xs).enumerate() {
        let n = p.len();
        if c.algorithm == 0 {
            out.push(
                p.iter()
                    .zip(x)
                    .map(|(&pv, &xv)| pv as f64 * (1.0 - lr * c.wd) - lr * xv)
                    .collect(),
            );
            continue;
        }
        if n == 0 {
            out.push(vec![]);
            continue;
        }
        let beta = 1.0 - (t as f64).powf(-0.8);
        let eps1 = 1e-30;
        let u: Vec<f64> = match &mut states[k] {
            RefState::Factored(row, col) => {
                let (rows, cols, _) = view(&shapes[k]);
                let u = |i: usize, j: usize| x[i * cols + j].powi(2) + eps1;
                ema_of_means(row, cols, beta, u);
                ema_of_means(col, rows, beta, |j, i| u(i, j));
                let mean_row = row.iter().sum::<f64>() / rows as f64;
                (0..n)
                    .map(|e| x[e] / (row[e / cols] / mean_row * col[e % cols]).sqrt())
                    .collect()
            }
            RefState::Vector(v) => (0..n)
                .map(|e| {
                    v[e] = beta * v[e] + (1.0 - beta) * (x[e].powi(2) + eps1);
                    x[e] / v[e].sqrt()
                })
                .collect(),
        };
        let rms_u = (u.iter().map(|v| v * v).sum::<f64>() / n as f64).sqrt();
        let div = (rms_u / 1.0).max(1.0);
        let rms_p = (p.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / n as f64).sqrt();
        let lr_eff = lr * rms_p.max(1e-3);
        out.push(
            p.iter()
                .zip(&u)
                .map(|(&pv, &uv)| pv as f64 * (1.0 - lr_eff * c.wd) - lr_eff * uv / div)
                .collect(),
        );
    }
    out
}

pub fn run_case(c: Case, shapes: &[Vec<i64>], seed: u64) {
    let mut cfg = config(c.algorithm);
    cfg.clip_grad_norm = c.clip_norm;
    cfg.clip_grad_value = c.clip_value;
    cfg.weight_decay = c.wd;
    cfg.loss_scale_mode = if c.scale > 0.0 { 1 } else { 0 };
    cfg.loss_scale = if c.scale > 0.0 { c.scale } else { 1.0 };
    let opt = Opt::new(&cfg).unwrap();
    let mut rng = Rng::new(seed);
    let mut bufs = Vec::new();
    let mut ids = Vec::new();
    let mut states = Vec::new();
    for (k, shape) in shapes.iter().enumerate() {
        let n: usize = shape.iter().map(|&d| d as usize).product();
        let vals: Vec<f32> = rng.vec(n, 0.5 * c.pscale);
        let mut b = Buf::new(c.pdtype, &vals);
        let flags = if c.carry {
            lomo::ffi::types::LOMO_PARAM_CARRY_RMS
        } else {
            0
        };
        ids.push(
            opt.register_flags(&format!("p{k}"), b.ptr(), c.pdtype, shape, 0, flags)
                .unwrap(),
        );
        bufs.push(b);
        let (rows, cols, factored) = view(shape);
        states.push(if factored {
            RefState::Factored(vec![0.0; rows], vec![0.0; cols])
        } else {
            RefState::Vector(vec![0.0; n])
        });
    }
    for (step, lr) in [(1u64, 0.05f32), (2, 0.02)] {
        let scale = opt.loss_scale() as f64;
        let grads: Vec<Vec<f32>> = bufs
            .iter()
            .map(|b| {
                (0..b.len())
                    .map(|_| Buf::round(c.gdtype, (rng.normal() as f64 * 0.3 * scale) as f32))
                    .collect()
            })
            .collect();
        let before: Vec<Vec<f32>> = bufs.iter().map(Buf::values).collect();
        let want = reference_step(&c, shapes, &before, &grads, &mut states, lr as f64, step);
        let mut gbufs: Vec<Buf> = grads.iter().map(|g| Buf::new(c.gdtype, g)).collect();
        if c.clip_norm > 0.0 {
            opt.begin(0, 0.0).unwrap();
            for (k, g) in gbufs.iter_mut().enumerate() {
                opt.submit(ids[k], g.ptr(), c.gdtype).unwrap();
            }
            opt.end().unwrap();
        }
        opt.begin(1, lr).unwrap();
        for (k, g) in gbufs.iter_mut().enumerate().rev() {
            opt.submit(ids[k], g.ptr(), c.gdtype).unwrap();
        }
        opt.end().unwrap();
        for (k, b) in bufs.iter().enumerate() {
            for (i, (&got, &w)) in b.values().iter().zip(&want[k]).enumerate() {
                // One ulp of the parameter dtype (rounding), plus f32 arithmetic on the update
                // itself: 1e-5 of the step taken (results can cancel to near zero).
                let delta = (w - before[k][i] as f64).abs();
                let rounded = Buf::round(c.pdtype, w as f32);
                let ulp = if c.pdtype == F32 {
                    1e-6 * w.abs()
                } else {
                    (rounded as f64 - w).abs().max(ulp_of(c.pdtype, w))
                };
                let ok = (got as f64 - w).abs() <= ulp + 1e-5 * delta + 1e-12;
                assert!(
                    ok,
                    "{c:?} shape {:?} step {step} [{i}]: got {got:e}, want {w:e}",
                    shapes[k]
                );
            }
        }
        let info = opt.info();
        assert_eq!(info.step, step);
        assert_eq!(info.overflow, 0);
    }
}

/// One unit in the last place of `dtype` at `v`.
pub fn ulp_of(dtype: u32, v: f64) -> f64 {
    let (bits, min_exp) = if dtype == F16 { (10, -14) } else { (7, -126) };
    2f64.powi((v.abs().log2().floor() as i32).max(min_exp) - bits)
}

pub fn shapes() -> Vec<Vec<i64>> {
    vec![
        vec![],
        vec![37],
        vec![1, 1],
        vec![3, 4097],
        vec![2, 3, 4],
        vec![5, 7, 11],
        vec![0],
        vec![4, 0],
    ]
}
