//! CUDA backend: is a caller's buffer memory this device's kernels may read and write?
//!
//! Asked of the driver (`cuPointerGetAttributes`) for the first and the last byte of every
//! parameter at registration and every gradient at submission, before anything is enqueued: a
//! host-side lookup that never waits for the device and is legal during stream capture (Triton's
//! launcher makes the same query for every pointer argument of every launch, and torch.compile
//! captures those launches in CUDA graphs; `gpu_check.py parity` checks it on hardware). A wrong
//! pointer would otherwise fault inside a kernel, leaving a sticky error that kills the caller's
//! whole CUDA context. What cannot be seen: a buffer shorter than its shape that still lies
//! inside a larger allocation.

use std::ffi::c_void;

use cudarc::driver::sys;

use super::abi::DevPtr;
use super::driver::check;
use crate::error::{bail, Result};

/// What the driver knows of one address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PointerInfo {
    /// `CUmemorytype` (1 host, 2 device, 3 array, 4 unified), 0 when the driver does not know
    /// the address (plain host memory, freed memory).
    pub memory_type: u32,
    pub ordinal: i32,
    /// The context the memory was allocated in; 0 for stream-ordered and VMM allocations.
    pub context: usize,
    pub managed: bool,
}

/// Where the kernels run: the device and its primary context.
#[derive(Clone, Copy, Debug)]
pub struct Expected {
    pub ordinal: i32,
    pub context: usize,
}

const DEVICE: u32 = sys::CUmemorytype::CU_MEMORYTYPE_DEVICE as u32;

/// The driver's answer for `ptr` (`cuPointerGetAttributes`, which, unlike
/// `cuPointerGetAttribute`, succeeds for unknown addresses and reports memory type 0).
pub fn query(ptr: DevPtr) -> Result<PointerInfo> {
    use sys::CUpointer_attribute as A;
    let mut attrs = [
        A::CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
        A::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
        A::CU_POINTER_ATTRIBUTE_CONTEXT,
        A::CU_POINTER_ATTRIBUTE_IS_MANAGED,
    ];
    // Each value is written into the low bytes of a zeroed 8-byte slot (an enum, an int, a
    // pointer, a boolean: all at most 8 bytes; the host is little-endian), so a value the
    // driver leaves unwritten reads as 0.
    let mut vals = [0u64; 4];
    let mut data: [*mut c_void; 4] = [std::ptr::null_mut(); 4];
    for (d, v) in data.iter_mut().zip(vals.iter_mut()) {
        *d = (v as *mut u64).cast();
    }
    // SAFETY: the driver is initialized (the caller holds a launcher); `attrs` and `data` have
    // one entry per attribute and every data slot has room for the attribute's value.
    let r = unsafe {
        sys::cuPointerGetAttributes(
            attrs.len() as u32,
            attrs.as_mut_ptr(),
            data.as_mut_ptr(),
            ptr,
        )
    };
    check(r, format_args!("cuPointerGetAttributes of {ptr:#x}"))?;
    Ok(PointerInfo {
        memory_type: vals[0] as u32,
        ordinal: vals[1] as u32 as i32,
        context: vals[2] as usize,
        managed: vals[3] as u32 != 0,
    })
}

/// Checks that `bytes` bytes at `ptr` can be used by kernels on `expect`'s device, asking
/// `query` about both ends; `what` names the buffer in the message. Memory the driver does not
/// know is `InvalidArgument`; device memory of another device or context is `DeviceMismatch`.
/// Managed memory and pinned host memory are reachable from every device and pass.
pub fn check_buffer(
    expect: &Expected,
    ptr: DevPtr,
    bytes: u64,
    what: &str,
    query: impl Fn(DevPtr) -> Result<PointerInfo>,
) -> Result<()> {
    if bytes == 0 {
        return Ok(());
    }
    let Some(last) = ptr.checked_add(bytes - 1) else {
        bail!(
            InvalidArgument,
            "{what} at {ptr:#x} of {bytes} bytes wraps around the address space"
        );
    };
    for (addr, end) in [(ptr, "first"), (last, "last")] {
        let info = query(addr)?;
        if info.memory_type == 0 {
            bail!(
                InvalidArgument,
                "{what} of {bytes} bytes at {ptr:#x}: its {end} byte ({addr:#x}) is not memory \
                 CUDA knows (host memory from malloc, freed memory, or a buffer shorter than \
                 its shape): pass device memory of CUDA device {}",
                expect.ordinal
            );
        }
        if info.memory_type != DEVICE || info.managed {
            continue;
        }
        if info.ordinal != expect.ordinal {
            bail!(
                DeviceMismatch,
                "{what} at {ptr:#x} is memory of CUDA device {}, but this optimizer's \
                 parameters are on device {}",
                info.ordinal,
                expect.ordinal
            );
        }
        if info.context != 0 && info.context != expect.context {
            bail!(
                DeviceMismatch,
                "{what} at {ptr:#x} was allocated in a CUDA context other than device {}'s \
                 primary context (the one the CUDA runtime, PyTorch and JAX use), where lomo's \
                 kernels run",
                expect.ordinal
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Status;

    const PRIMARY: usize = 0x5000;
    const EXPECT: Expected = Expected {
        ordinal: 1,
        context: PRIMARY,
    };

    fn device(ordinal: i32, context: usize) -> PointerInfo {
        PointerInfo {
            memory_type: DEVICE,
            ordinal,
            context,
            managed: false,
        }
    }

    /// A fake address space: [0x1000, 0x2000) device memory of device 1 in its primary
    /// context, [0x2000, 0x3000) device 0's, [0x3000, 0x4000) device 1's in another context,
    /// [0x4000, 0x5000) a stream-ordered pool of device 1 (no context), [0x6000, 0x7000)
    /// managed, [0x7000, 0x8000) pinned host memory; everything else unknown.
    fn fake(ptr: DevPtr) -> Result<PointerInfo> {
        Ok(match ptr {
            0x1000..=0x1fff => device(1, PRIMARY),
            0x2000..=0x2fff => device(0, 0x9000),
            0x3000..=0x3fff => device(1, 0x9999),
            0x4000..=0x4fff => device(1, 0),
            0x6000..=0x6fff => PointerInfo {
                managed: true,
                ..device(0, 0x9000)
            },
            0x7000..=0x7fff => PointerInfo {
                memory_type: 1,
                ..device(0, 0x9000)
            },
            _ => PointerInfo {
                memory_type: 0,
                ordinal: 0,
                context: 0,
                managed: false,
            },
        })
    }

    fn status(ptr: DevPtr, bytes: u64) -> Status {
        match check_buffer(&EXPECT, ptr, bytes, "the buffer", fake) {
            Ok(()) => Status::Ok,
            Err(e) => e.status(),
        }
    }

    #[test]
    fn accepts_memory_the_device_can_use() {
        assert_eq!(status(0x1000, 0x1000), Status::Ok);
        assert_eq!(
            status(0x4100, 0x100),
            Status::Ok,
            "pool memory has no context"
        );
        assert_eq!(status(0x6000, 0x1000), Status::Ok, "managed");
        assert_eq!(status(0x7000, 0x10), Status::Ok, "pinned host");
        assert_eq!(status(0, 0), Status::Ok, "empty buffers are never read");
    }

    #[test]
    fn refuses_unknown_memory_at_either_end() {
        assert_eq!(
            status(0x9_0000, 4),
            Status::InvalidArgument,
            "malloc'd host memory"
        );
        assert_eq!(
            status(0x4f00, 0x200),
            Status::InvalidArgument,
            "runs past the end"
        );
        assert_eq!(
            status(0x500, 0x1000),
            Status::InvalidArgument,
            "starts before"
        );
        assert_eq!(status(u64::MAX - 2, 8), Status::InvalidArgument, "wraps");
    }

    #[test]
    fn refuses_other_devices_and_contexts() {
        assert_eq!(status(0x2000, 0x10), Status::DeviceMismatch);
        assert_eq!(status(0x3000, 0x10), Status::DeviceMismatch);
        assert_eq!(
            status(0x1ff0, 0x20),
            Status::DeviceMismatch,
            "last byte on device 0"
        );
        let e = check_buffer(&EXPECT, 0x3000, 4, "the gradient", fake).unwrap_err();
        assert!(e.message().contains("the gradient") && e.message().contains("primary"));
    }
}
