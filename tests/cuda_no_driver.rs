//! Without a CUDA driver (and without LOMO_CUDA_EMULATE), registering a CUDA parameter fails with
//! LOMO_STATUS_NO_CUDA and a message that says what is missing; nothing panics or aborts. Skipped
//! where a driver with a device is present.

mod common;

use common::*;
use lomo::ffi::optimizer::lomo_param_register;
use lomo::ffi::types::lomo_param_desc;

#[test]
fn cuda_parameter_without_driver_is_no_cuda() {
    if std::env::var("LOMO_CUDA_EMULATE").as_deref() == Ok("1")
        || lomo::ffi::api::lomo_cuda_available()
    {
        eprintln!("SKIPPED: a CUDA device (or the emulation) is available here");
        return;
    }
    let opt = Opt::new(&config(1)).unwrap();
    let mut data = vec![0f32; 8];
    let name = std::ffi::CString::new("w").unwrap();
    let shape = [2i64, 4];
    let desc = lomo_param_desc {
        struct_size: std::mem::size_of::<lomo_param_desc>(),
        name: name.as_ptr(),
        data: data.as_mut_ptr().cast(),
        dtype: F32,
        ndim: 2,
        shape: shape.as_ptr(),
        device: 0,
        group: 0,
        flags: 0,
    };
    let mut id = 77u32;
    // SAFETY: valid pointers for the duration of the call.
    let r = check(unsafe { lomo_param_register(opt.0, &desc, &mut id) }).unwrap_err();
    assert_eq!(r.status, lomo::Status::NoCuda as u32);
    assert!(
        r.message.contains("CUDA") && r.message.contains("device 0"),
        "{}",
        r.message
    );
    assert_eq!(id, 77, "outputs are written only on success");
    // The optimizer is unchanged and still usable for CPU parameters.
    opt.register("cpu", data.as_mut_ptr().cast(), F32, &[8], 0)
        .unwrap();
}
