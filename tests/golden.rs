//! Golden values of lomo-optim 0.1.1 (`tests/data/lomo_optim_golden.json`, copied from
//! `shared/reference`) reproduced through the C API: all 8 configurations, f32 within rtol 1e-6
//! and bf16 within 1 ulp. Gradients come from an independent re-implementation of the models'
//! forward and backward passes (Linear, or Linear–Tanh–Linear, MSE loss) that rounds every op to
//! the parameter dtype as PyTorch does.

mod common;

use common::*;
use serde_json::Value;

/// Rounds to bf16 when `bf` (emulating one PyTorch bf16 op), else keeps f32.
fn r(bf: bool, v: f32) -> f32 {
    if bf {
        from_bf16(bf16(v))
    } else {
        v
    }
}

/// y = x Wᵀ + b, accumulated in f32 and rounded once.
fn linear(
    bf: bool,
    x: &[f32],
    n: usize,
    w: &[f32],
    b: &[f32],
    out_f: usize,
    in_f: usize,
) -> Vec<f32> {
    let mut y = vec![0f32; n * out_f];
    for i in 0..n {
        for o in 0..out_f {
            let mut acc = 0f32;
            for k in 0..in_f {
                acc = x[i * in_f + k].mul_add(w[o * in_f + k], acc);
            }
            y[i * out_f + o] = r(bf, acc + b[o]);
        }
    }
    y
}

/// Gradients of (dW, db, dx) for y = x Wᵀ + b given dy.
fn linear_back(
    bf: bool,
    x: &[f32],
    dy: &[f32],
    w: &[f32],
    n: usize,
    out_f: usize,
    in_f: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let mut dw = vec![0f32; out_f * in_f];
    let mut db = vec![0f32; out_f];
    let mut dx = vec![0f32; n * in_f];
    for o in 0..out_f {
        for k in 0..in_f {
            let mut acc = 0f32;
            for i in 0..n {
                acc = dy[i * out_f + o].mul_add(x[i * in_f + k], acc);
            }
            dw[o * in_f + k] = r(bf, acc);
        }
        db[o] = r(bf, (0..n).map(|i| dy[i * out_f + o]).sum());
    }
    for i in 0..n {
        for k in 0..in_f {
            let mut acc = 0f32;
            for o in 0..out_f {
                acc = dy[i * out_f + o].mul_add(w[o * in_f + k], acc);
            }
            dx[i * in_f + k] = r(bf, acc);
        }
    }
    (dw, db, dx)
}

/// dL/dŷ of L = mean((ŷ − y)²), op by op as autograd does it, times the loss scale.
fn mse_grad(bf: bool, out: &[f32], y: &[f32], scale: f32) -> Vec<f32> {
    let g0 = r(bf, scale / out.len() as f32);
    out.iter()
        .zip(y)
        .map(|(&o, &t)| r(bf, g0 * r(bf, 2.0 * r(bf, o - t))))
        .collect()
}

/// Gradients of every parameter, in `named_parameters()` order.
fn grads(
    model: &str,
    bf: bool,
    params: &[Vec<f32>],
    x: &[f32],
    y: &[f32],
    scale: f32,
) -> Vec<Vec<f32>> {
    let n = 8;
    if model == "linear" {
        let out = linear(bf, x, n, &params[0], &params[1], 3, 4);
        let dy = mse_grad(bf, &out, y, scale);
        let (dw, db, _) = linear_back(bf, x, &dy, &params[0], n, 3, 4);
        vec![dw, db]
    } else {
        let z = linear(bf, x, n, &params[0], &params[1], 6, 4);
        let h: Vec<f32> = z.iter().map(|&v| r(bf, v.tanh())).collect();
        let out = linear(bf, &h, n, &params[2], &params[3], 3, 6);
        let dy = mse_grad(bf, &out, y, scale);
        let (dw2, db2, dh) = linear_back(bf, &h, &dy, &params[2], n, 3, 6);
        let dz: Vec<f32> = dh
            .iter()
            .zip(&h)
            .map(|(&g, &hv)| r(bf, g * (1.0 - hv * hv)))
            .collect();
        let (dw1, db1, _) = linear_back(bf, x, &dz, &params[0], n, 6, 4);
        vec![dw1, db1, dw2, db2]
    }
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn run_case(name: &str, case: &Value) {
    let algorithm = if case["optimizer"] == "lomo" { 0 } else { 1 };
    let bf = case["dtype"] == "torch.bfloat16";
    let dtype = if bf { BF16 } else { F32 };
    let kw = &case["kwargs"];
    let mut cfg = config(algorithm);
    cfg.clip_grad_norm = kw
        .get("clip_grad_norm")
        .and_then(Value::as_f64)
        .unwrap_or(0.0);
    cfg.clip_grad_value = kw
        .get("clip_grad_value")
        .and_then(Value::as_f64)
        .unwrap_or(0.0);
    cfg.weight_decay = kw
        .get("weight_decay")
        .and_then(Value::as_f64)
        .unwrap_or(0.0);
    let opt = Opt::new(&cfg).unwrap();
    let names: Vec<String> = case["initial_params"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    let model = case["model"].as_str().unwrap();
    // serde_json's map is sorted; restore named_parameters() order.
    let order: Vec<&str> = if model == "linear" {
        vec!["weight", "bias"]
    } else {
        vec!["0.weight", "0.bias", "2.weight", "2.bias"]
    };
    assert_eq!(names.len(), order.len());
    let mut bufs: Vec<Buf> = Vec::new();
    let mut ids = Vec::new();
    for n in &order {
        let p = &case["initial_params"][*n];
        let shape: Vec<i64> = p["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_i64().unwrap())
            .collect();
        let mut b = Buf::new(dtype, &floats(&p["values"]));
        ids.push(opt.register(n, b.ptr(), dtype, &shape, 0).unwrap());
        bufs.push(b);
    }
    let lrs = floats(&case["lr_per_step"]);
    for (step, lr) in lrs.iter().enumerate() {
        let x: Vec<f32> = floats(&case["x_per_step"][step])
            .iter()
            .map(|&v| r(bf, v))
            .collect();
        let y: Vec<f32> = floats(&case["y_per_step"][step])
            .iter()
            .map(|&v| r(bf, v))
            .collect();
        let scale = opt.loss_scale();
        let params: Vec<Vec<f32>> = bufs.iter().map(Buf::values).collect();
        let gs = grads(model, bf, &params, &x, &y, scale);
        let mut gbufs: Vec<Buf> = gs.iter().map(|g| Buf::new(dtype, g)).collect();
        // Submission order follows gradient availability (reverse of registration).
        if cfg.clip_grad_norm > 0.0 {
            opt.begin(0, 0.0).unwrap();
            for k in (0..ids.len()).rev() {
                opt.submit(ids[k], gbufs[k].ptr(), dtype).unwrap();
            }
            opt.end().unwrap();
        }
        opt.begin(1, *lr).unwrap();
        for k in (0..ids.len()).rev() {
            opt.submit(ids[k], gbufs[k].ptr(), dtype).unwrap();
        }
        opt.end().unwrap();
        for (k, n) in order.iter().enumerate() {
            let want = floats(&case["params_per_step"][step][*n]);
            let got = bufs[k].values();
            for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
                if bf {
                    assert!(
                        ulps(BF16, g, w) <= 1.0,
                        "{name} step {step} {n}[{i}]: got {g}, want {w}"
                    );
                } else {
                    let tol = 1e-6 * w.abs() + 1e-7;
                    assert!(
                        (g - w).abs() <= tol,
                        "{name} step {step} {n}[{i}]: got {g:e}, want {w:e}"
                    );
                }
            }
        }
    }
}

#[test]
fn lomo_optim_golden_values() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/lomo_optim_golden.json"
    ))
    .expect("golden file");
    let golden: Value = serde_json::from_str(&text).unwrap();
    let cases = golden.as_object().unwrap();
    assert_eq!(cases.len(), 8);
    for (name, case) in cases {
        run_case(name, case);
    }
}
