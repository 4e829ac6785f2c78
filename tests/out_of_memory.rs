//! Allocation failure is a status (issue 14, item 1): a registration whose state cannot be
//! allocated is `LOMO_STATUS_OUT_OF_MEMORY` with the byte count in the message, never an abort,
//! and leaves the optimizer as it was; shapes whose element count overflows 64 bits are
//! `LOMO_STATUS_INVALID_ARGUMENT`. On the CPU and the emulated CUDA device.

mod common;
#[path = "state_common/mod.rs"]
mod state_common;

use common::*;
use lomo::ffi::optimizer::lomo_param_count;
use lomo::ffi::state::lomo_memory_stats_get;
use lomo::ffi::types::{lomo_memory_stats, LOMO_DEVICE_CPU};
use lomo::Status;
use state_common::{state_bytes, ADALOMO, LOMO, UPDATE};

fn count(opt: &Opt) -> u32 {
    let mut n = u32::MAX;
    // SAFETY: live handle, valid out pointer.
    check(unsafe { lomo_param_count(opt.0, &mut n) }).unwrap();
    n
}

fn memory(opt: &Opt) -> lomo_memory_stats {
    let mut s = lomo_memory_stats {
        struct_size: std::mem::size_of::<lomo_memory_stats>(),
        ..Default::default()
    };
    // SAFETY: live handle, valid out pointer.
    check(unsafe { lomo_memory_stats_get(opt.0, &mut s) }).unwrap();
    s
}

/// Everything observable about the registry: count, memory, state bytes.
fn snapshot(opt: &Opt) -> (u32, String, Vec<u8>) {
    let m = memory(opt);
    let mem = format!(
        "{} {} {} {} {} {}",
        m.param_count,
        m.param_elements,
        m.param_bytes,
        m.state_bytes,
        m.workspace_bytes,
        m.adamw_bytes
    );
    (count(opt), mem, state_bytes(opt))
}

/// An optimizer with one small trained parameter, so a failed registration has something to
/// disturb.
fn trained(algorithm: u32, device: i32, w: &mut Buf) -> Opt {
    let opt = Opt::new(&config(algorithm)).unwrap();
    let id = opt
        .register_on("w", w.ptr(), F32, &[3, 5], device, 0, 0)
        .unwrap();
    let g = Buf::new(F32, &[0.25; 15]);
    for _ in 0..2 {
        opt.begin(UPDATE, 1e-2).unwrap();
        opt.submit(id, g.f32s.as_ptr().cast(), F32).unwrap();
        opt.end().unwrap();
    }
    opt
}

/// The issue's case: AdaLomo, f32 `[2**40, 4]`: 2^40 row values of 4 bytes.
fn issue_case(device: i32) {
    let mut w = Buf::new(F32, &[0.5; 15]);
    let opt = trained(ADALOMO, device, &mut w);
    let before = snapshot(&opt);
    // The data is never read at registration: a small real buffer stands in for the huge one.
    let mut big = Buf::new(F32, &[0.0; 16]);
    for (shape, bytes) in [
        (&[1i64 << 40, 4][..], 4u64 << 40), // row state
        (&[4, 1i64 << 40][..], 4u64 << 40), // column state
        (&[1i64 << 40][..], 4u64 << 40),    // vector state
        (&[1i64 << 20, 1 << 20, 1 << 20][..], 4u64 << 40),
    ] {
        let err = opt
            .register_on("big", big.ptr(), F32, shape, device, 0, 0)
            .unwrap_err();
        assert_eq!(err.status, Status::OutOfMemory as u32, "{shape:?}: {err:?}");
        assert!(
            err.message.contains(&format!("{bytes} bytes")),
            "{shape:?}: the message names the byte count: {}",
            err.message
        );
        assert_eq!(
            snapshot(&opt),
            before,
            "{shape:?}: the optimizer is unchanged"
        );
    }
    // Still usable: the same name registers once it fits, and steps run.
    let mut small = Buf::new(F32, &[1.0; 8]);
    let id = opt
        .register_on("big", small.ptr(), F32, &[2, 4], device, 0, 0)
        .unwrap();
    let g = Buf::new(F32, &[0.5; 8]);
    opt.begin(UPDATE, 1e-2).unwrap();
    opt.submit(id, g.f32s.as_ptr().cast(), F32).unwrap();
    opt.end().unwrap();
    // (Emulated device memory is host memory: the buffer is read back directly.)
    let w = &small.f32s;
    assert!(w.iter().all(|v| v.is_finite() && *v < 1.0), "{w:?}");
}

#[test]
fn adalomo_state_too_large_for_memory_is_out_of_memory_on_the_cpu() {
    issue_case(LOMO_DEVICE_CPU);
}

#[cfg(feature = "cuda-emulation")] // the emulated device is a test-only feature
#[test]
fn adalomo_state_too_large_for_memory_is_out_of_memory_on_emulated_cuda() {
    std::env::set_var("LOMO_CUDA_EMULATE", "1");
    issue_case(0);
}

#[test]
fn shapes_overflowing_64_bits_are_invalid_arguments() {
    for algorithm in [LOMO, ADALOMO] {
        let mut w = Buf::new(F32, &[0.5; 15]);
        let opt = trained(algorithm, LOMO_DEVICE_CPU, &mut w);
        let before = snapshot(&opt);
        let mut b = Buf::new(F32, &[0.0; 4]);
        for shape in [
            &[1i64 << 32, 1 << 32][..],       // 2^64 elements
            &[i64::MAX, 2][..],               // far past
            &[1i64 << 31, 1 << 31, 2][..],    // 2^63 elements: 2^65 bytes
            &[3, 1i64 << 61][..],             // fits 64 bits, its bytes do not
            &[2, 2, 2, 2, 1i64 << 60, 1][..], // the overflow in the middle of the shape
        ] {
            let err = opt
                .register_on("x", b.ptr(), F32, shape, LOMO_DEVICE_CPU, 0, 0)
                .unwrap_err();
            assert_eq!(
                err.status,
                Status::InvalidArgument as u32,
                "{shape:?}: {err:?}"
            );
            assert!(err.message.contains("64-bit"), "{}", err.message);
            assert_eq!(snapshot(&opt), before);
        }
        // A zero dimension makes the product 0, whatever the other dimensions are: valid.
        let zero = [1i64 << 40, 1 << 40, 0];
        opt.register_on("z", b.ptr(), F32, &zero, LOMO_DEVICE_CPU, 0, 0)
            .unwrap();
    }
}

/// Fails each fallible allocation of a registration in turn (the library's test hook): every
/// failure is OUT_OF_MEMORY and leaves the registry as it was; then the registration succeeds.
fn each_allocation_fails_in_turn(algorithm: u32, device: i32, first: bool) {
    let mut w = Buf::new(F32, &[0.5; 15]);
    let opt = if first {
        Opt::new(&config(algorithm)).unwrap()
    } else {
        trained(algorithm, device, &mut w)
    };
    let before = snapshot(&opt);
    let shapes: [&[i64]; 3] = [&[7, 300], &[70_000], &[3, 2, 40_000]];
    for (i, shape) in shapes.iter().enumerate() {
        let n = shape.iter().product::<i64>() as usize;
        let mut b = Buf::new(F32, &vec![0.5; n]);
        let name = format!("p{i}");
        let before = if i == 0 {
            before.clone()
        } else {
            snapshot(&opt)
        };
        let mut k = 0;
        loop {
            lomo::alloc::fail_after(Some(k));
            let r = opt.register_on(&name, b.ptr(), F32, shape, device, 0, 0);
            lomo::alloc::fail_after(None);
            match r {
                Ok(_) => break,
                Err(e) => {
                    assert_eq!(e.status, Status::OutOfMemory as u32, "{e:?}");
                    assert!(e.message.contains(" bytes for "), "{}", e.message);
                    assert_eq!(snapshot(&opt), before, "allocation {k} of {shape:?}");
                }
            }
            k += 1;
            assert!(k < 100, "a registration makes a handful of allocations");
        }
        assert!(k >= 1, "registration allocates");
    }
    assert_eq!(count(&opt), before.0 + 3);
}

#[test]
fn allocation_failure_mid_registration_leaves_the_registry_as_before_cpu() {
    for algorithm in [LOMO, ADALOMO] {
        each_allocation_fails_in_turn(algorithm, LOMO_DEVICE_CPU, true);
        each_allocation_fails_in_turn(algorithm, LOMO_DEVICE_CPU, false);
    }
}

#[cfg(feature = "cuda-emulation")] // the emulated device is a test-only feature
#[test]
fn allocation_failure_mid_registration_leaves_the_registry_as_before_emulated_cuda() {
    std::env::set_var("LOMO_CUDA_EMULATE", "1");
    for algorithm in [LOMO, ADALOMO] {
        each_allocation_fails_in_turn(algorithm, 0, true);
        each_allocation_fails_in_turn(algorithm, 0, false);
    }
}
