//! The main job: train a small model on the CPU through the C API exactly as a C trainer would.
//!
//! A two-layer MLP (64 → 256 → 10, tanh, softmax cross-entropy) learns to classify inputs
//! labelled by a random teacher network. Its backward pass is written by hand and hands each
//! parameter's gradient to `lomo_grad_submit_checked` as soon as it is complete, so only one gradient
//! buffer per layer is alive at a time. It trains once with LOMO (with global gradient-norm
//! clipping, i.e. two backward passes per step) and once with AdaLomo (bf16 weights, one
//! backward pass), printing the loss and the optimizer's memory next to AdamW's.
//!
//! Run: `cargo run --release --example quickstart`

use std::ffi::{c_void, CString};
use std::ptr::null_mut;

use lomo::ffi::api::lomo_last_error_message;
use lomo::ffi::optimizer::*;
use lomo::ffi::types::*;
use lomo::Status;

const IN: usize = 64;
const HID: usize = 256;
const OUT: usize = 10;
const BATCH: usize = 128;
const STEPS: usize = 300;

fn check(st: Status) {
    if st != Status::Ok {
        let mut buf = [0u8; 512];
        // SAFETY: buf is writable for its length.
        let n = unsafe { lomo_last_error_message(buf.as_mut_ptr().cast(), buf.len()) };
        panic!(
            "{}: {}",
            st.as_str(),
            String::from_utf8_lossy(&buf[..n.min(511)])
        );
    }
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.next() * scale).collect()
    }
}

/// Parameters stored as f32 or bf16 (the dtype the optimizer updates in place).
enum Store {
    F32(Vec<f32>),
    Bf16(Vec<u16>),
}

impl Store {
    fn new(vals: Vec<f32>, bf16: bool) -> Store {
        if bf16 {
            Store::Bf16(
                vals.iter()
                    .map(|&v| half::bf16::from_f32(v).to_bits())
                    .collect(),
            )
        } else {
            Store::F32(vals)
        }
    }
    fn get(&self, i: usize) -> f32 {
        match self {
            Store::F32(v) => v[i],
            Store::Bf16(v) => half::bf16::from_bits(v[i]).to_f32(),
        }
    }
    fn ptr(&mut self) -> *mut c_void {
        match self {
            Store::F32(v) => v.as_mut_ptr().cast(),
            Store::Bf16(v) => v.as_mut_ptr().cast(),
        }
    }
    fn dtype(&self) -> u32 {
        match self {
            Store::F32(_) => lomo::DType::F32 as u32,
            Store::Bf16(_) => lomo::DType::Bf16 as u32,
        }
    }
}

struct Mlp {
    w1: Store,
    b1: Store,
    w2: Store,
    b2: Store,
}

impl Mlp {
    /// Forward pass; returns the hidden activations and the logits.
    fn forward(&self, x: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let mut h = vec![0f32; BATCH * HID];
        let mut z = vec![0f32; BATCH * OUT];
        for n in 0..BATCH {
            for j in 0..HID {
                let mut a = self.b1.get(j);
                for i in 0..IN {
                    a += x[n * IN + i] * self.w1.get(j * IN + i);
                }
                h[n * HID + j] = a.tanh();
            }
            for k in 0..OUT {
                let mut a = self.b2.get(k);
                for j in 0..HID {
                    a += h[n * HID + j] * self.w2.get(k * HID + j);
                }
                z[n * OUT + k] = a;
            }
        }
        (h, z)
    }
}

/// Mean cross-entropy and its gradient with respect to the logits (times `scale`).
fn cross_entropy(z: &[f32], labels: &[usize], scale: f32) -> (f32, Vec<f32>) {
    let mut loss = 0f32;
    let mut dz = vec![0f32; z.len()];
    for n in 0..BATCH {
        let row = &z[n * OUT..(n + 1) * OUT];
        let m = row.iter().cloned().fold(f32::MIN, f32::max);
        let sum: f32 = row.iter().map(|v| (v - m).exp()).sum();
        loss += (sum.ln() + m - row[labels[n]]) / BATCH as f32;
        for k in 0..OUT {
            let p = (row[k] - m).exp() / sum;
            dz[n * OUT + k] = (p - (k == labels[n]) as u32 as f32) / BATCH as f32 * scale;
        }
    }
    (loss, dz)
}

/// Backward pass that submits each gradient the moment it is complete (last layer first).
fn backward(opt: *mut lomo_optimizer, ids: &[u32; 4], m: &Mlp, x: &[f32], h: &[f32], dz: &[f32]) {
    let submit = |id: u32, g: &[f32]| {
        // SAFETY: `opt` is live and `g` holds `g.len()` f32 values (the library checks that
        // this is the parameter's element count before reading).
        check(unsafe {
            lomo_grad_submit_checked(
                opt,
                id,
                g.as_ptr().cast(),
                lomo::DType::F32 as u32,
                g.len() as u64,
                null_mut(),
            )
        })
    };
    // Layer 2 first: its gradients are complete before anything of layer 1 is.
    let (dw2, db2) = linear_grads(dz, h, OUT, HID);
    submit(ids[3], &db2);
    // dh must use W2 before its update: compute it, then submit dW2 (and drop that buffer).
    let dpre = hidden_grad(m, h, dz);
    submit(ids[2], &dw2);
    drop(dw2);
    let (dw1, db1) = linear_grads(&dpre, x, HID, IN);
    submit(ids[1], &db1);
    submit(ids[0], &dw1);
}

/// dW = dyᵀ·input and db = Σ dy for a linear layer with `out` outputs and `inp` inputs.
fn linear_grads(dy: &[f32], input: &[f32], out: usize, inp: usize) -> (Vec<f32>, Vec<f32>) {
    let mut dw = vec![0f32; out * inp];
    let mut db = vec![0f32; out];
    for n in 0..BATCH {
        for k in 0..out {
            let d = dy[n * out + k];
            db[k] += d;
            for j in 0..inp {
                dw[k * inp + j] += d * input[n * inp + j];
            }
        }
    }
    (dw, db)
}

/// Gradient at the hidden pre-activations: (dz W2) ⊙ (1 − h²).
fn hidden_grad(m: &Mlp, h: &[f32], dz: &[f32]) -> Vec<f32> {
    let mut d = vec![0f32; BATCH * HID];
    for n in 0..BATCH {
        for j in 0..HID {
            let mut a = 0f32;
            for k in 0..OUT {
                a += dz[n * OUT + k] * m.w2.get(k * HID + j);
            }
            d[n * HID + j] = a * (1.0 - h[n * HID + j] * h[n * HID + j]);
        }
    }
    d
}

fn train(algorithm: lomo::Algorithm, bf16: bool, lr: f32) {
    let mut cfg = std::mem::MaybeUninit::<lomo_config>::zeroed();
    // SAFETY: cfg is writable storage for a lomo_config.
    let mut cfg = unsafe {
        check(lomo_config_init(cfg.as_mut_ptr(), algorithm as u32));
        cfg.assume_init()
    };
    let clip = algorithm == lomo::Algorithm::Lomo;
    if clip {
        cfg.clip_grad_norm = 0.4;
    }
    cfg.weight_decay = 1e-4;
    let mut opt = null_mut();
    // SAFETY: valid pointers.
    check(unsafe { lomo_optimizer_new(&cfg, &mut opt) });
    // Biases and other vectors go to group 1: no weight decay.
    // SAFETY: `opt` is live.
    check(unsafe { lomo_group_set(opt, 1, 1.0, 0.0) });

    let mut rng = Rng(0x5eed);
    let mut m = Mlp {
        w1: Store::new(rng.vec(HID * IN, (1.0 / IN as f32).sqrt()), bf16),
        b1: Store::new(vec![0.0; HID], bf16),
        w2: Store::new(rng.vec(OUT * HID, (1.0 / HID as f32).sqrt()), bf16),
        b2: Store::new(vec![0.0; OUT], bf16),
    };
    let teacher = rng.vec(OUT * IN, 1.0);
    let specs: [(&str, usize, usize, u32); 4] = [
        ("w1", HID, IN, 0),
        ("b1", HID, 0, 1),
        ("w2", OUT, HID, 0),
        ("b2", OUT, 0, 1),
    ];
    let mut ids = [0u32; 4];
    for (k, (name, rows, cols, group)) in specs.iter().enumerate() {
        let store = match k {
            0 => &mut m.w1,
            1 => &mut m.b1,
            2 => &mut m.w2,
            _ => &mut m.b2,
        };
        let shape: Vec<i64> = if *cols > 0 {
            vec![*rows as i64, *cols as i64]
        } else {
            vec![*rows as i64]
        };
        let cname = CString::new(*name).unwrap();
        let desc = lomo_param_desc {
            struct_size: std::mem::size_of::<lomo_param_desc>(),
            name: cname.as_ptr(),
            data: store.ptr(),
            dtype: store.dtype(),
            ndim: shape.len() as u32,
            shape: shape.as_ptr(),
            device: LOMO_DEVICE_CPU,
            group: *group,
            flags: 0,
        };
        // SAFETY: desc points to live data for the duration of the call; the buffer outlives opt.
        check(unsafe { lomo_param_register(opt, &desc, &mut ids[k]) });
    }

    println!(
        "== {} ({} weights, {} clipping, {} backward pass{} per step)",
        algorithm.as_str(),
        if bf16 { "bf16" } else { "f32" },
        if clip { "global-norm" } else { "no global" },
        if clip { 2 } else { 1 },
        if clip { "es" } else { "" }
    );
    let mut first = None;
    let mut last = 0.0;
    for step in 0..STEPS {
        let x = rng.vec(BATCH * IN, 1.0);
        let labels: Vec<usize> = (0..BATCH)
            .map(|n| {
                let s = |k: usize| {
                    (0..IN)
                        .map(|i| teacher[k * IN + i] * x[n * IN + i])
                        .sum::<f32>()
                };
                (0..OUT).max_by(|&a, &b| s(a).total_cmp(&s(b))).unwrap()
            })
            .collect();
        let mut scale = 0f32;
        // SAFETY: `opt` is live.
        check(unsafe { lomo_loss_scale(opt, &mut scale) });
        let (h, z) = m.forward(&x);
        let (loss, dz) = cross_entropy(&z, &labels, scale);
        let lr_t = lr * (1.0 - step as f32 / STEPS as f32);
        if clip {
            // First backward: the optimizer only accumulates the global gradient norm.
            // SAFETY: `opt` is live.
            check(unsafe { lomo_step_begin(opt, lomo::Phase::Norm as u32, lr_t, null_mut()) });
            backward(opt, &ids, &m, &x, &h, &dz);
            check(unsafe { lomo_step_end(opt, null_mut()) });
        }
        // SAFETY: `opt` is live.
        check(unsafe { lomo_step_begin(opt, lomo::Phase::Update as u32, lr_t, null_mut()) });
        backward(opt, &ids, &m, &x, &h, &dz);
        check(unsafe { lomo_step_end(opt, null_mut()) });
        first.get_or_insert(loss);
        last = loss;
        if step % 50 == 0 || step == STEPS - 1 {
            let mut info = lomo_step_info {
                struct_size: std::mem::size_of::<lomo_step_info>(),
                ..Default::default()
            };
            // SAFETY: `opt` is live, `info` is writable.
            check(unsafe { lomo_step_info_get(opt, &mut info) });
            // Without clipping there is no NORM phase: no norm and no coefficient to show.
            let shown = |v: f32, clip: bool| {
                if clip && !v.is_nan() {
                    format!("{v:.4}")
                } else {
                    "-".to_string()
                }
            };
            println!(
                "step {:4}  loss {:.4}  grad-norm {:>8}  clip {:>6}",
                step,
                loss,
                shown(info.grad_norm, clip),
                shown(info.clip_coef, clip)
            );
        }
    }
    assert!(last < first.unwrap() * 0.7, "the loss should fall");
    print_memory(opt);
    // SAFETY: created above, freed once.
    unsafe { lomo_optimizer_free(opt) };
}

fn print_memory(opt: *mut lomo_optimizer) {
    let mut st = lomo::ffi::types::lomo_memory_stats {
        struct_size: std::mem::size_of::<lomo::ffi::types::lomo_memory_stats>(),
        ..Default::default()
    };
    // SAFETY: `opt` is live, `st` is writable.
    check(unsafe { lomo::ffi::state::lomo_memory_stats_get(opt, &mut st) });
    let kib = |b: u64| b as f64 / 1024.0;
    println!(
        "memory: {} parameters, {} elements, {:.1} KiB of weights (the trainer's)",
        st.param_count,
        st.param_elements,
        kib(st.param_bytes)
    );
    println!(
        "        optimizer state {:.1} KiB + workspace {:.1} KiB; AdamW with f32 master weights \
         would need {:.1} KiB (m, v, master copy, gradient buffers)",
        kib(st.state_bytes),
        kib(st.workspace_bytes),
        kib(st.adamw_bytes)
    );
}

fn main() {
    train(lomo::Algorithm::Lomo, false, 0.5);
    println!();
    train(lomo::Algorithm::Adalomo, true, 0.02);
}
