//! What the library refuses before anything changes: gradients of the wrong extent
//! (`lomo_grad_submit_checked`) and configurations whose arithmetic would write non-finite values
//! or silently zero updates (issue 13, kinds 1 and 4).

mod common;

use std::ffi::c_void;

use common::*;
use lomo::ffi::optimizer::lomo_grad_submit_checked;
use lomo::ffi::types::lomo_config;
use lomo::Status;

fn submit_checked(opt: &Opt, id: u32, g: *const c_void, dtype: u32, n: u64) -> Result<(), Failure> {
    // SAFETY: live handle; `g` holds at least the elements the tests pass (or is refused unread).
    check(unsafe { lomo_grad_submit_checked(opt.0, id, g, dtype, n, std::ptr::null_mut()) })
}

#[test]
fn checked_submit_refuses_a_gradient_of_another_extent() {
    for algorithm in [0u32, 1] {
        let opt = Opt::new(&config(algorithm)).unwrap();
        let mut w = Buf::new(F32, &[0.5; 4 * 64]);
        let id = opt.register("w", w.ptr(), F32, &[4, 64], 0).unwrap();
        let before = w.values();
        // The case: a (4, 32) gradient for a (4, 64) parameter, and 3 elements for 256;
        // an over-long count is refused too. The buffers are short, so a read would be past them.
        let short = Buf::new(F32, &[1.0; 4 * 32]);
        let three = Buf::new(F32, &[1.0; 3]);
        opt.begin(1, 0.1).unwrap();
        for (g, n) in [(&short, 128u64), (&three, 3), (&short, 257)] {
            let err = submit_checked(&opt, id, g.f32s.as_ptr().cast(), F32, n).unwrap_err();
            assert_eq!(err.status, Status::InvalidArgument as u32);
            assert!(err.message.contains("256"), "{}", err.message);
            assert!(err.message.contains("'w'"), "{}", err.message);
        }
        assert_eq!(w.values(), before, "a refused gradient changes nothing");
        // The parameter still expects its gradient in this phase.
        let g = Buf::new(BF16, &[1.0; 256]);
        submit_checked(&opt, id, g.halves.as_ptr().cast(), BF16, 256).unwrap();
        opt.end().unwrap();
        let info = opt.info();
        assert_eq!((info.grads_submitted, info.step), (1, 1));
        assert_ne!(w.values(), before);
        // An unknown id keeps its status.
        opt.begin(1, 0.1).unwrap();
        let err = submit_checked(&opt, 7, g.halves.as_ptr().cast(), BF16, 256).unwrap_err();
        assert_eq!(err.status, Status::UnknownParam as u32);
        opt.end().unwrap();
    }
}

#[test]
fn checked_submit_of_an_empty_parameter() {
    let opt = Opt::new(&config(1)).unwrap();
    let id = opt
        .register("e", std::ptr::null_mut(), F32, &[4, 0], 0)
        .unwrap();
    opt.begin(1, 0.1).unwrap();
    assert_eq!(
        submit_checked(&opt, id, std::ptr::null(), F32, 1)
            .unwrap_err()
            .status,
        Status::InvalidArgument as u32
    );
    submit_checked(&opt, id, std::ptr::null(), F32, 0).unwrap();
    opt.end().unwrap();
}

#[allow(dead_code)]
fn refused(cfg: &lomo_config, field: &str) {
    let err = Opt::new(cfg)
        .err()
        .unwrap_or_else(|| panic!("{field}: accepted"));
    assert_eq!(err.status, Status::InvalidArgument as u32, "{field}");
    assert!(err.message.contains(field), "{field}: {}", err.message);
}
