//! `lomo_memory_stats_get` through the C API, against byte counts derived here from the shapes:
//! AdaLomo's state is rows + cols f32 values per factored tensor and numel per vector tensor;
//! AdamW needs m and v in f32, an f32 master copy of 16-bit parameters and a gradient buffer in
//! the parameter dtype (README "Memory").

mod common;

use common::*;
use lomo::ffi::state::lomo_memory_stats_get;
use lomo::ffi::types::{lomo_memory_stats, LOMO_DEVICE_CPU};
use lomo::Status;

fn stats(opt: &Opt) -> lomo_memory_stats {
    let mut s = lomo_memory_stats {
        struct_size: std::mem::size_of::<lomo_memory_stats>(),
        ..Default::default()
    };
    // SAFETY: live handle, valid out pointer.
    check(unsafe { lomo_memory_stats_get(opt.0, &mut s) }).unwrap();
    s
}

/// (name, shape, dtype)
const PARAMS: [(&str, &[i64], u32); 5] = [
    ("w", &[64, 48], BF16),
    ("w3", &[2, 3, 10], F32),
    ("b", &[48], BF16),
    ("s", &[], F16),
    ("e", &[0, 5], F32),
];

fn build(algorithm: u32) -> (Opt, Vec<Buf>) {
    let opt = Opt::new(&config(algorithm)).unwrap();
    let mut bufs = Vec::new();
    for (name, shape, dtype) in PARAMS {
        let n = shape.iter().product::<i64>() as usize;
        let mut b = Buf::new(dtype, &vec![0.1; n]);
        opt.register(name, b.ptr(), dtype, shape, 0).unwrap();
        bufs.push(b);
    }
    (opt, bufs)
}

#[test]
fn counts_match_the_shapes() {
    let size = |d: u32| if d == F32 { 4u64 } else { 2 };
    let numel = |s: &[i64]| s.iter().product::<i64>() as u64;
    let elements: u64 = PARAMS.iter().map(|p| numel(p.1)).sum();
    let param_bytes: u64 = PARAMS.iter().map(|p| numel(p.1) * size(p.2)).sum();
    let adamw: u64 = PARAMS
        .iter()
        .map(|p| numel(p.1) * (8 + if p.2 == F32 { 0 } else { 4 } + size(p.2)))
        .sum();
    // AdaLomo: w [64,48] → 64 + 48; w3 [2,3,10] → 6 + 10; b → 48; s → 1; e [0,5] → 0 + 5.
    let ada_state = 4 * ((64 + 48) + (6 + 10) + 48 + 1 + 5);

    for (algorithm, state) in [(0, 0), (1, ada_state)] {
        let (opt, _bufs) = build(algorithm);
        let s = stats(&opt);
        assert_eq!(s.param_count, 5);
        assert_eq!(s.param_elements, elements);
        assert_eq!(s.param_bytes, param_bytes);
        assert_eq!(s.state_bytes, state, "algorithm {algorithm}");
        assert_eq!(s.adamw_bytes, adamw);
        assert_eq!(s.adamw_bytes, 64 * 48 * 14 + 60 * 12 + 48 * 14 + 14);
        if algorithm == 0 {
            assert_eq!(s.workspace_bytes, 0, "LOMO needs no workspace");
        } else {
            assert!(s.workspace_bytes > 0);
        }
        assert_eq!(s.device_count, 1);
        let d = s.devices[0];
        assert_eq!(d.device, LOMO_DEVICE_CPU);
        assert_eq!(
            (d.param_count as u64, d.param_elements, d.param_bytes),
            (s.param_count, s.param_elements, s.param_bytes)
        );
        assert_eq!(
            (d.state_bytes, d.workspace_bytes, d.adamw_bytes),
            (s.state_bytes, s.workspace_bytes, s.adamw_bytes)
        );
        assert!(s.devices[1..]
            .iter()
            .all(|d| d.param_count == 0 && d.state_bytes == 0));
    }
}

#[test]
fn empty_optimizer_and_bad_arguments() {
    let opt = Opt::new(&config(1)).unwrap();
    let s = stats(&opt);
    assert_eq!((s.param_count, s.state_bytes, s.device_count), (0, 0, 0));
    let mut bad = lomo_memory_stats {
        struct_size: 8,
        ..Default::default()
    };
    // SAFETY: live handle; wrong struct_size is rejected before anything is written.
    let st = unsafe { lomo_memory_stats_get(opt.0, &mut bad) };
    assert_eq!(st, Status::InvalidArgument);
    assert_eq!(bad.struct_size, 8);
    // SAFETY: NULL is rejected.
    let st = unsafe { lomo_memory_stats_get(opt.0, std::ptr::null_mut()) };
    assert_eq!(st, Status::NullArgument);
}
