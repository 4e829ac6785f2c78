//! Test support for the handlers without JAX: hand-built call frames, a fake `XLA_FFI_Api`
//! (its `Error_Create` records the code and message; its `Stream_Get` returns a sentinel derived
//! from the frame's execution context), host memory standing in for buffers, and element
//! comparisons.

#![allow(clippy::vec_box, clippy::type_complexity)]
// boxes keep the addresses the frame points to
// Much of it serves the CUDA handler tests, which need the `cuda-emulation` feature.
#![cfg_attr(not(feature = "cuda-emulation"), allow(dead_code))]

use std::ffi::{c_void, CStr};

use super::abi::*;
use crate::backend::cuda::side;
use crate::dtype::DType;

/// The shapes of tests/common/parity.rs: the issue's, plus 16×64 (rows allow 16-byte
/// vector access, column sums in shared memory), 3×4104 (one whole register segment of 4096
/// columns and a partial one) and 2×8192 (column sums in global slabs).
pub const SHAPES: [&[i64]; 8] = [
    &[1],
    &[31],
    &[4097],
    &[3, 4097],
    &[3, 5, 7],
    &[16, 64],
    &[3, 4104],
    &[2, 8192],
];

pub const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::Bf16];

/// Absolute slack for values an update brought close to zero (tests/common/parity.rs).
pub const ATOL: f64 = 1e-7;

/// What the fake `Error_Create` received.
pub struct Recorded {
    pub code: i32,
    pub message: String,
}

unsafe extern "C" fn fake_error_create(args: *mut XLA_FFI_Error_Create_Args) -> *mut XLA_FFI_Error {
    // SAFETY: called by the code under test with valid args.
    let (code, message) = unsafe {
        assert!((*args).struct_size >= XLA_FFI_ERROR_CREATE_ARGS_STRUCT_SIZE);
        (
            (*args).errc,
            CStr::from_ptr((*args).message)
                .to_string_lossy()
                .into_owned(),
        )
    };
    Box::into_raw(Box::new(Recorded { code, message })).cast()
}

thread_local! {
    /// The execution context of the last stream query on this thread (calls run their handlers
    /// on the calling thread; per thread, so tests running in parallel do not see each other's).
    pub static STREAM_CTX: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// The stream of a call is a sentinel derived from its execution context (`Call::frame.ctx`),
/// so tests can give their calls distinct streams.
unsafe extern "C" fn fake_stream_get(args: *mut XLA_FFI_Stream_Get_Args) -> *mut XLA_FFI_Error {
    // SAFETY: called by the code under test with valid args.
    unsafe {
        STREAM_CTX.with(|c| c.set((*args).ctx as usize));
        (*args).stream = ((*args).ctx as usize ^ 0x5eed_0000) as *mut c_void;
    }
    std::ptr::null_mut()
}

pub fn take_error(e: *mut XLA_FFI_Error) -> Option<Recorded> {
    // SAFETY: errors in these tests all come from `fake_error_create`.
    (!e.is_null()).then(|| *unsafe { Box::from_raw(e.cast::<Recorded>()) })
}

fn fake_api() -> Box<XLA_FFI_Api> {
    // SAFETY: all-zero is a valid XLA_FFI_Api (NULL pointers, None function pointers).
    let mut api: Box<XLA_FFI_Api> = Box::new(unsafe { std::mem::zeroed() });
    api.struct_size = std::mem::size_of::<XLA_FFI_Api>();
    api.XLA_FFI_Error_Create = Some(fake_error_create);
    api.XLA_FFI_Stream_Get = Some(fake_stream_get);
    api
}

/// Owns everything a call frame points to.
pub struct Call {
    pub _api: Box<XLA_FFI_Api>,
    _dims: Vec<Box<[i64]>>,
    pub _bufs: Vec<Box<XLA_FFI_Buffer>>,
    _arg_types: Vec<i32>,
    _arg_ptrs: Vec<*mut c_void>,
    _ret_types: Vec<i32>,
    _ret_ptrs: Vec<*mut c_void>,
    _names: Vec<Box<XLA_FFI_ByteSpan>>,
    _name_ptrs: Vec<*mut XLA_FFI_ByteSpan>,
    _scalars: Vec<Box<XLA_FFI_Scalar>>,
    _values: Vec<Box<[u8; 8]>>,
    _attr_types: Vec<i32>,
    _attr_ptrs: Vec<*mut c_void>,
    pub frame: Box<XLA_FFI_CallFrame>,
}

/// (dtype, data, dims) of one buffer.
pub type Arr = (i32, *mut c_void, Vec<i64>);

/// A scalar attribute value.
#[derive(Clone, Copy, Debug)]
pub enum Attr {
    F64(f64),
    S64(i64),
}

pub fn call(args: &[Arr], rets: &[Arr], attrs: &[(&'static str, f64)]) -> Call {
    let attrs: Vec<(&'static str, Attr)> = attrs.iter().map(|&(n, v)| (n, Attr::F64(v))).collect();
    call_with(args, rets, &attrs)
}

/// A call frame with these operands, results and scalar attributes (stage EXECUTE, ctx 0xc7c).
pub fn call_with(args: &[Arr], rets: &[Arr], attrs: &[(&'static str, Attr)]) -> Call {
    let api = fake_api();
    let (mut dims, mut bufs) = (Vec::new(), Vec::new());
    let mut mk = |a: &Arr| -> *mut c_void {
        let mut d: Box<[i64]> = a.2.clone().into_boxed_slice();
        let b = Box::new(XLA_FFI_Buffer {
            struct_size: XLA_FFI_BUFFER_STRUCT_SIZE,
            extension_start: std::ptr::null_mut(),
            dtype: a.0,
            data: a.1,
            rank: a.2.len() as i64,
            dims: d.as_mut_ptr(),
        });
        dims.push(d);
        let p = &*b as *const XLA_FFI_Buffer as *mut c_void;
        bufs.push(b);
        p
    };
    let mut arg_ptrs: Vec<*mut c_void> = args.iter().map(&mut mk).collect();
    let mut ret_ptrs: Vec<*mut c_void> = rets.iter().map(&mut mk).collect();
    let mut arg_types = vec![XLA_FFI_BUFFER; args.len()];
    let mut ret_types = vec![XLA_FFI_BUFFER; rets.len()];
    let mut names: Vec<Box<XLA_FFI_ByteSpan>> = attrs
        .iter()
        .map(|(n, _)| {
            Box::new(XLA_FFI_ByteSpan {
                ptr: n.as_ptr().cast(),
                len: n.len(),
            })
        })
        .collect();
    let mut name_ptrs: Vec<*mut XLA_FFI_ByteSpan> =
        names.iter_mut().map(|b| &mut **b as *mut _).collect();
    let mut values: Vec<Box<[u8; 8]>> = attrs
        .iter()
        .map(|(_, v)| {
            Box::new(match *v {
                Attr::F64(x) => x.to_ne_bytes(),
                Attr::S64(x) => x.to_ne_bytes(),
            })
        })
        .collect();
    let mut scalars: Vec<Box<XLA_FFI_Scalar>> = values
        .iter_mut()
        .zip(attrs)
        .map(|(v, (_, a))| {
            Box::new(XLA_FFI_Scalar {
                dtype: match a {
                    Attr::F64(_) => dtype::F64,
                    Attr::S64(_) => dtype::S64,
                },
                value: v.as_mut_ptr().cast(),
            })
        })
        .collect();
    let mut attr_ptrs: Vec<*mut c_void> = scalars
        .iter_mut()
        .map(|s| (&mut **s as *mut XLA_FFI_Scalar).cast())
        .collect();
    let mut attr_types = vec![XLA_FFI_ATTR_SCALAR; attrs.len()];
    let frame = Box::new(XLA_FFI_CallFrame {
        struct_size: XLA_FFI_CALL_FRAME_STRUCT_SIZE,
        extension_start: std::ptr::null_mut(),
        api: &*api,
        ctx: 0xc7c as *mut XLA_FFI_ExecutionContext,
        stage: XLA_FFI_STAGE_EXECUTE,
        args: XLA_FFI_Args {
            struct_size: XLA_FFI_ARGS_STRUCT_SIZE,
            extension_start: std::ptr::null_mut(),
            size: args.len() as i64,
            types: arg_types.as_mut_ptr(),
            args: arg_ptrs.as_mut_ptr(),
        },
        rets: XLA_FFI_Rets {
            struct_size: XLA_FFI_RETS_STRUCT_SIZE,
            extension_start: std::ptr::null_mut(),
            size: rets.len() as i64,
            types: ret_types.as_mut_ptr(),
            rets: ret_ptrs.as_mut_ptr(),
        },
        attrs: XLA_FFI_Attrs {
            struct_size: XLA_FFI_ATTRS_STRUCT_SIZE,
            extension_start: std::ptr::null_mut(),
            size: attrs.len() as i64,
            types: attr_types.as_mut_ptr(),
            names: name_ptrs.as_mut_ptr(),
            attrs: attr_ptrs.as_mut_ptr(),
        },
        future: std::ptr::null_mut(),
    });
    Call {
        _api: api,
        _dims: dims,
        _bufs: bufs,
        _arg_types: arg_types,
        _arg_ptrs: arg_ptrs,
        _ret_types: ret_types,
        _ret_ptrs: ret_ptrs,
        _names: names,
        _name_ptrs: name_ptrs,
        _scalars: scalars,
        _values: values,
        _attr_types: attr_types,
        _attr_ptrs: attr_ptrs,
        frame,
    }
}

pub fn arr<T>(dtype: i32, v: &mut [T], dims: &[i64]) -> Arr {
    (dtype, v.as_mut_ptr().cast(), dims.to_vec())
}

/// Host memory standing in for one buffer (8-byte aligned).
pub struct Mem {
    words: Vec<u64>,
    pub bytes: usize,
}

impl Mem {
    pub fn filled(bytes: usize, word: u64) -> Mem {
        Mem {
            words: vec![word; bytes.div_ceil(8).max(1)],
            bytes,
        }
    }

    pub fn from_bytes(b: &[u8]) -> Mem {
        let mut m = Mem::filled(b.len(), 0);
        m.bytes_mut().copy_from_slice(b);
        m
    }

    pub fn ptr(&mut self) -> *mut c_void {
        self.words.as_mut_ptr().cast()
    }

    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `words` holds at least `bytes` initialized bytes.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr().cast(), self.bytes) }
    }

    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, uniquely borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.words.as_mut_ptr().cast(), self.bytes) }
    }

    pub fn encode(dtype: DType, v: &[f32]) -> Mem {
        let mut b = Vec::with_capacity(v.len() * dtype.size());
        for &x in v {
            match dtype {
                DType::F32 => b.extend(x.to_ne_bytes()),
                DType::F16 => b.extend(half::f16::from_f32(x).to_bits().to_ne_bytes()),
                DType::Bf16 => b.extend(half::bf16::from_f32(x).to_bits().to_ne_bytes()),
            }
        }
        Mem::from_bytes(&b)
    }

    pub fn decode(&self, dtype: DType) -> Vec<f32> {
        match dtype {
            DType::F32 => self
                .bytes()
                .chunks_exact(4)
                .map(|c| f32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            DType::F16 => self
                .bytes()
                .chunks_exact(2)
                .map(|c| half::f16::from_bits(u16::from_ne_bytes([c[0], c[1]])).to_f32())
                .collect(),
            DType::Bf16 => self
                .bytes()
                .chunks_exact(2)
                .map(|c| half::bf16::from_bits(u16::from_ne_bytes([c[0], c[1]])).to_f32())
                .collect(),
        }
    }
}

pub fn code(d: DType) -> i32 {
    match d {
        DType::F32 => dtype::F32,
        DType::F16 => dtype::F16,
        DType::Bf16 => dtype::BF16,
    }
}

/// xorshift64*: uniform values in (−a, a).
pub struct Rng(pub u64);

impl Rng {
    pub fn vec(&mut self, n: usize, a: f32) -> Vec<f32> {
        (0..n)
            .map(|_| {
                self.0 ^= self.0 >> 12;
                self.0 ^= self.0 << 25;
                self.0 ^= self.0 >> 27;
                let u =
                    (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40) as f32 / (1u64 << 24) as f32;
                (2.0 * u - 1.0) * a
            })
            .collect()
    }
}

pub fn close(dtype: DType, cpu: f32, dev: f32) -> bool {
    if cpu.is_nan() || dev.is_nan() {
        return false;
    }
    if cpu == dev {
        return true;
    }
    let diff = (cpu - dev).abs() as f64;
    match dtype {
        DType::F32 => diff <= 2e-6 * (cpu.abs().max(dev.abs()) as f64) + ATOL,
        _ => diff <= ulp(dtype, cpu).min(ulp(dtype, dev)).max(ATOL),
    }
}

/// The spacing of `dtype` values at `v` (subnormal spacing below the smallest normal).
pub fn ulp(dtype: DType, v: f32) -> f64 {
    let (bits, min_exp) = if dtype == DType::F16 {
        (10, -14)
    } else {
        (7, -126)
    };
    let e = (v.abs() as f64).log2().floor().max(min_exp as f64) as i32;
    2f64.powi(e - bits)
}

pub fn rel_close(a: f32, b: f32, rel: f64) -> bool {
    !a.is_nan() && !b.is_nan() && ((a - b).abs() as f64) <= rel * (a.abs().max(b.abs()) as f64)
}

/// Runs `handler` on the frame, under the emulation when `cuda`.
pub fn invoke(
    c: &mut Call,
    handler: unsafe extern "C" fn(*mut XLA_FFI_CallFrame) -> *mut XLA_FFI_Error,
    cuda: bool,
) -> Option<Recorded> {
    let _emu = cuda.then(side::emulate_on_this_thread);
    // SAFETY: a complete fake frame whose buffers outlive the call.
    take_error(unsafe { handler(&mut *c.frame) })
}
