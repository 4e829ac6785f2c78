//! Checkpoints and memory accounting of CUDA parameters, through the C API, with the CUDA
//! backend on the emulated launcher (`LOMO_CUDA_EMULATE=1`: the kernels compiled for the host,
//! host memory standing in for device memory; state and counters really live in the backend's
//! "device" buffers and step record and are copied through the host).
//!
//! - bit-identical resume (N steps = K steps, save, new optimizer, load, N − K steps) for LOMO
//!   and AdaLomo, factored / vector / empty state, dynamic scaling with real overflows, carried
//!   Σp², stochastic rounding, norm clipping;
//! - checkpoints move between CPU and CUDA optimizers unchanged (the format has no device);
//! - refused, truncated and corrupted loads leave the CUDA optimizer unchanged;
//! - memory statistics report the device allocations.

mod common;
mod state_common;

use common::*;
use lomo::ffi::state::lomo_memory_stats_get;
use lomo::ffi::types::{lomo_memory_stats, LOMO_DEVICE_CPU};
use lomo::Status;
use state_common::*;

const DEV: i32 = 0;

fn emulate() {
    std::env::set_var("LOMO_CUDA_EMULATE", "1");
}

fn adalomo_mixed_case() -> Case {
    let mut cfg = config(ADALOMO);
    dynamic(&mut cfg, 3, 2);
    cfg.clip_grad_norm = 1.0;
    cfg.weight_decay = 0.02;
    cfg.rounding = 1;
    cfg.seed = 9;
    let mut w = spec("layer.0.weight", &[16, 12], BF16, F16);
    w.flags = 1; // LOMO_PARAM_CARRY_RMS: the carried Σp² must be forgotten by a load
    let mut bias = spec("layer.0.bias", &[16], BF16, F16);
    bias.group = 1;
    Case {
        algorithm: ADALOMO,
        cfg,
        specs: vec![
            w,
            bias,
            spec("head", &[5, 2, 8], BF16, BF16),
            spec("big", &[3, 4097], F32, F32),
            spec("scalar", &[], F32, F32),
            spec("empty", &[0, 4], F32, F32),
        ],
        grad_mag: 0.7,
        inf_steps: vec![4],
    }
}

#[test]
fn lomo_dynamic_scaling_resumes_bit_identically_on_cuda() {
    emulate();
    let case = lomo_dynamic_case();
    check_resume_on(&case, false, true, DEV);
    check_resume_on(&case, true, true, DEV);
}

#[test]
fn adalomo_resumes_bit_identically_on_cuda() {
    emulate();
    let case = adalomo_mixed_case();
    check_resume_on(&case, false, true, DEV);
    check_resume_on(&case, true, true, DEV);
    let mut plain = adalomo_case();
    plain.specs.push(spec("w3", &[3, 5, 7], F32, F32));
    check_resume_on(&plain, false, true, DEV);
}

#[test]
fn loading_into_a_used_cuda_optimizer_resumes_identically() {
    emulate();
    check_used_load_on(DEV);
}

/// A checkpoint written by an optimizer on `from` loads into one on `to` and re-serializes to
/// the same bytes; the loaded optimizer then trains like the writer would have.
fn moves(case: &Case, from: i32, to: i32) {
    let mut a = Model::init(case);
    let (opt_a, ids_a) = optimizer_on(case, &case.cfg, &mut a, &natural(case), from);
    train(case, &opt_a, &ids_a, &a, 0, K);
    let ckpt = state_bytes(&opt_a);
    let mut b = a.copy();
    let (opt_b, ids_b) = optimizer_on(case, &case.cfg, &mut b, &natural(case), to);
    load_bytes(&opt_b, &ckpt).unwrap();
    assert_eq!(state_bytes(&opt_b), ckpt, "{from} -> {to}: same bytes");
    let (ia, ib) = (opt_a.info(), opt_b.info());
    assert_eq!((ia.step, ia.skipped_total), (ib.step, ib.skipped_total));
    assert_eq!(opt_a.loss_scale(), opt_b.loss_scale());
    // Both continue; the backends agree to rounding (bf16 parameters: an ulp now and then).
    train(case, &opt_a, &ids_a, &a, K, N);
    train(case, &opt_b, &ids_b, &b, K, N);
    for (x, y) in a.bufs.iter().zip(&b.bufs) {
        for (p, q) in x.values().iter().zip(y.values()) {
            assert!(
                (p - q).abs() <= 2e-2 * p.abs().max(q.abs()) + 1e-3,
                "{from} -> {to}: {p} vs {q}"
            );
        }
    }
}

#[test]
fn checkpoints_move_between_cpu_and_cuda() {
    emulate();
    let case = adalomo_mixed_case();
    moves(&case, LOMO_DEVICE_CPU, DEV);
    moves(&case, DEV, LOMO_DEVICE_CPU);
    moves(&lomo_dynamic_case(), DEV, LOMO_DEVICE_CPU);
}

#[test]
fn refused_and_damaged_loads_leave_the_cuda_optimizer_unchanged() {
    emulate();
    let base = adalomo_case();
    let ckpt = trained_checkpoint(&base, 3);
    let mut transposed = adalomo_case();
    transposed.specs[0].shape = vec![4, 6];
    refuses_on(&transposed, &ckpt, "shape", DEV);
    let mut lomo = adalomo_case();
    lomo.algorithm = LOMO;
    lomo.cfg = config(LOMO);
    refuses_on(&lomo, &ckpt, "algorithm", DEV);

    let mut m = Model::init(&base);
    let (opt, ids) = optimizer_on(&base, &base.cfg, &mut m, &natural(&base), DEV);
    train(&base, &opt, &ids, &m, 0, 2);
    let before = state_bytes(&opt);
    assert_ne!(before, ckpt);
    for len in (0..ckpt.len()).step_by(7) {
        let err = load_bytes(&opt, &ckpt[..len]).unwrap_err();
        assert_eq!(err.status, Status::StateMismatch as u32, "prefix {len}");
    }
    let mut bad = ckpt.clone();
    let last = bad.len() - 2;
    bad[last] ^= 0x40; // inside the last state tensor: the checksum catches it
    assert_eq!(
        load_bytes(&opt, &bad).unwrap_err().status,
        Status::StateMismatch as u32
    );
    assert_eq!(state_bytes(&opt), before, "unchanged after failed loads");
    assert_eq!(opt.info().step, 2);

    // Between steps only.
    opt.begin(UPDATE, 0.01).unwrap();
    assert_eq!(
        load_bytes(&opt, &ckpt).unwrap_err().status,
        Status::PhaseError as u32
    );
    opt.end().unwrap();
    load_bytes(&opt, &ckpt).unwrap();
    assert_eq!(state_bytes(&opt), ckpt);
}

fn stats(opt: &Opt) -> lomo_memory_stats {
    let mut s = lomo_memory_stats {
        struct_size: std::mem::size_of::<lomo_memory_stats>(),
        ..Default::default()
    };
    // SAFETY: live handle, valid out pointer.
    check(unsafe { lomo_memory_stats_get(opt.0, &mut s) }).unwrap();
    s
}

#[test]
fn memory_stats_report_the_device_allocations() {
    emulate();
    // (name, shape, dtype): the state is rows + cols f32 per factored tensor and numel per
    // vector tensor; an empty tensor gets no device state.
    let params: [(&str, &[i64], u32); 4] = [
        ("w", &[64, 48], BF16),
        ("b", &[48], BF16),
        ("s", &[], F16),
        ("e", &[0, 5], F32),
    ];
    let ada_state = 4 * ((64 + 48) + 48 + 1);
    for (algorithm, state) in [(LOMO, 0), (ADALOMO, ada_state)] {
        let opt = Opt::new(&config(algorithm)).unwrap();
        let mut bufs = Vec::new();
        for (name, shape, dtype) in params {
            let n = shape.iter().product::<i64>() as usize;
            let mut b = Buf::new(dtype, &vec![0.1; n]);
            opt.register_on(name, b.ptr(), dtype, shape, DEV, 0, 0)
                .unwrap();
            bufs.push(b);
        }
        let s = stats(&opt);
        assert_eq!(s.param_count, 4);
        assert_eq!(s.param_elements, 64 * 48 + 48 + 1);
        assert_eq!(s.param_bytes, 2 * (64 * 48 + 48 + 1));
        assert_eq!(s.state_bytes, state, "algorithm {algorithm}");
        assert_eq!(s.adamw_bytes, (64 * 48 + 48 + 1) * 14);
        // Records, per-tensor partial sums and (AdaLomo) row/column workspaces.
        assert!(s.workspace_bytes > 0);
        assert_eq!(s.device_count, 1);
        let d = s.devices[0];
        assert_eq!(d.device, DEV);
        assert_eq!(
            (d.state_bytes, d.workspace_bytes, d.adamw_bytes),
            (s.state_bytes, s.workspace_bytes, s.adamw_bytes)
        );
    }
}
