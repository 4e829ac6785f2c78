//! Fuzz target `xla`: XLA FFI call frames (arguments, results, attributes, struct sizes,
//! execution stage, metadata queries) decoded from the fuzzer's bytes and handed to the six
//! exported handlers (`lomo_xla_*`, Host platform, and `lomo_xla_*_cuda` on the emulated CUDA
//! device), through their decoding layer (`xla::frame`, `xla::ops`) into the updates.
//!
//! Frames follow each op's operand layout most of the time, with fuzzed deviations (dtype, rank,
//! dims, counts, aliasing, attribute names, kinds and values), so both the checks and the
//! updates behind them run. Buffers with a data pointer are the harness's host memory, sized for
//! their dims (a frame whose dims exceed what the harness allocates gets NULL data, which the
//! handlers must refuse).
//!
//! Invariants: no panic (the boundary would report "panic in ..."); an error carries a message;
//! a successful update writes its `finite` result as 0 or 1.

use std::ffi::{c_char, c_void, CStr};
use std::mem::{offset_of, size_of};
use std::ptr::null_mut;

use lomo::xla::abi::*;

use super::{elem, set, Bytes, Mem, Rng};

// c_api.h's enum values (stable in the FFI API).
const BUFFER: i32 = 1;
const ATTR_SCALAR: i32 = 3;
const ATTR_STRING: i32 = 4;
const EXECUTE: i32 = 3;
const METADATA_EXT: i32 = 1;
const PRED: i32 = 1;
const S8: i32 = 2;
const S16: i32 = 3;
const S32: i32 = 4;
const S64: i32 = 5;
const U8: i32 = 6;
const U16: i32 = 7;
const U32: i32 = 8;
const U64: i32 = 9;
const F16: i32 = 10;
const F32: i32 = 11;
const F64: i32 = 12;
const BF16: i32 = 16;

const DIMS: [i64; 10] = [0, 1, 2, 3, 4, 5, 7, 8, 16, 33];
const HUGE: [i64; 4] = [-1, 1 << 40, 1 << 62, i64::MAX];
const FLOATS: [i32; 3] = [F32, F16, BF16];
const ANY_DTYPE: [i32; 12] = [F32, F16, BF16, PRED, S32, S64, U32, U64, F64, S8, 0, 99];
const VALUES: [f32; 12] = [
    0.0, -0.0, 1e-3, -1e-3, 0.5, -0.5, 1.0, -1.0, 3.0, 1e3, -1e3, 1e-40,
];
const STATE: [f32; 5] = [0.0, 1e-30, 1e-3, 1.0, 1e3];
const NONFINITE: [f32; 3] = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY];
const ATTR_NAMES: [&str; 13] = [
    "clip_grad_norm",
    "weight_decay",
    "clip_grad_value",
    "lr_multiplier",
    "rounding",
    "seed",
    "param_id",
    "eps1",
    "eps2",
    "clip_threshold",
    "decay_rate",
    "bogus",
    "",
];
const MAX_NUMEL: usize = 4096;

/// What the fake `XLA_FFI_Error_Create` received.
struct Recorded {
    code: i32,
    message: String,
}

unsafe extern "C" fn error_create(args: *mut XLA_FFI_Error_Create_Args) -> *mut XLA_FFI_Error {
    // SAFETY: called by the handler with valid args and a NUL-terminated message.
    let (code, message) = unsafe {
        (
            (*args).errc,
            CStr::from_ptr((*args).message)
                .to_string_lossy()
                .into_owned(),
        )
    };
    Box::into_raw(Box::new(Recorded { code, message })).cast()
}

unsafe extern "C" fn stream_get(args: *mut XLA_FFI_Stream_Get_Args) -> *mut XLA_FFI_Error {
    // SAFETY: called by the handler with valid args.
    unsafe { (*args).stream = 0x5eed as *mut c_void };
    null_mut()
}

fn api() -> Box<XLA_FFI_Api> {
    // SAFETY: all-zero is a valid XLA_FFI_Api (NULL pointers, None functions).
    let mut api: Box<XLA_FFI_Api> = Box::new(unsafe { std::mem::zeroed() });
    api.struct_size = size_of::<XLA_FFI_Api>();
    api.api_version.struct_size = offset_of!(XLA_FFI_Api_Version, minor_version) + 4;
    api.api_version.minor_version = 5;
    api.XLA_FFI_Error_Create = Some(error_create);
    api.XLA_FFI_Stream_Get = Some(stream_get);
    api
}

/// One array: dtype, dims, and the memory behind it (None: NULL data).
struct Arr {
    dtype: i32,
    dims: Vec<i64>,
    rank: i64,
    mem: Option<Mem>,
    /// Points into another array's memory (aliasing) instead of `mem`.
    alias: Option<usize>,
}

fn numel(dims: &[i64]) -> Option<usize> {
    if dims.iter().any(|&d| d < 0) {
        return None;
    }
    dims.iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d as usize))
}

fn shape(b: &mut Bytes<'_>) -> Vec<i64> {
    (0..b.u8() % 4)
        .map(|_| {
            if b.one_in(16) {
                b.pick(&HUGE)
            } else {
                b.pick(&DIMS)
            }
        })
        .collect()
}

/// An array of `dtype` and `dims`, deviating now and then; filled from `table`.
fn arr(b: &mut Bytes<'_>, dtype: i32, dims: Vec<i64>, table: &[f32]) -> Arr {
    let dtype = if b.one_in(24) {
        b.pick(&ANY_DTYPE)
    } else {
        dtype
    };
    let dims = if b.one_in(24) { shape(b) } else { dims };
    let rank = match b.u8() % 64 {
        0 => 65,
        1 => -1,
        _ => dims.len() as i64,
    };
    let n = numel(&dims).filter(|&n| n <= MAX_NUMEL);
    let mem = n.map(|n| {
        let mut m = Mem::new(n.max(1) * 8);
        let mut rng = Rng(b.u16() as u64 * 0x9E37_79B9 + 1);
        let fdtype = match dtype {
            F16 => 1,
            BF16 => 2,
            _ => 0,
        };
        let n_set = if matches!(dtype, F32 | F16 | BF16) {
            n
        } else {
            0
        };
        for i in 0..n_set {
            set(&mut m, fdtype, i, rng.pick(table));
        }
        if n_set > 0 && b.one_in(8) {
            set(
                &mut m,
                fdtype,
                (rng.next() as usize) % n_set,
                rng.pick(&NONFINITE),
            );
        }
        debug_assert!(n * elem(fdtype) <= m.bytes().len());
        m
    });
    Arr {
        dtype,
        dims,
        rank,
        mem,
        alias: None,
    }
}

/// A 0-d operand of `dtype` holding one of `values`.
fn scalar(b: &mut Bytes<'_>, dtype: i32, values: &[f64]) -> Arr {
    let v = b.pick(values);
    let mut a = arr(b, dtype, vec![], &[0.0]);
    if let Some(m) = a.mem.as_mut() {
        let bytes = m.bytes_mut();
        match a.dtype {
            F32 => bytes[..4].copy_from_slice(&(v as f32).to_le_bytes()),
            S32 => bytes[..4].copy_from_slice(&(v as i32).to_le_bytes()),
            U32 => bytes[..4].copy_from_slice(&(v as u32).to_le_bytes()),
            S64 => bytes[..8].copy_from_slice(&(v as i64).to_le_bytes()),
            U64 => bytes[..8].copy_from_slice(&(v as u64).to_le_bytes()),
            _ => {}
        }
    }
    a
}

/// Operands and results of one op, laid out as `ops.rs` documents them (then fuzzed).
fn layout(b: &mut Bytes<'_>, op: u8) -> (Vec<Arr>, Vec<Arr>) {
    let p_dtype = b.pick(&FLOATS);
    let dims = shape(b);
    let scalars = |b: &mut Bytes<'_>| -> Vec<Arr> {
        let step_dtype = b.pick(&[S32, S64, U32, U64, F32]);
        vec![
            scalar(b, F32, &[0.0, 1e-3, 1e-2, -1.0, f64::NAN, f64::INFINITY]),
            scalar(b, F32, &[1.0, 1024.0, 0.0, -1.0, f64::NAN]),
            scalar(b, F32, &[1.0, 0.5, 0.0, -1.0, f64::NAN, f64::INFINITY]),
            scalar(b, step_dtype, &[1.0, 2.0, 0.0, -1.0, 1e9]),
        ]
    };
    match op % 3 {
        0 => {
            let mut args = vec![scalar(b, F32, &[1.0, 1024.0, 0.0, f64::NAN])];
            for _ in 0..b.u8() % 4 {
                let d = shape(b);
                let dt = b.pick(&FLOATS);
                args.push(arr(b, dt, d, &VALUES));
            }
            let rets = vec![
                scalar(b, F32, &[0.0]),
                scalar(b, F32, &[0.0]),
                scalar(b, PRED, &[0.0]),
            ];
            (args, rets)
        }
        1 => {
            let g_dtype = b.pick(&FLOATS);
            let mut args = vec![
                arr(b, p_dtype, dims.clone(), &VALUES),
                arr(b, g_dtype, dims.clone(), &VALUES),
            ];
            args.extend(scalars(b));
            let rets = vec![arr(b, p_dtype, dims, &VALUES), scalar(b, PRED, &[0.0])];
            (args, rets)
        }
        _ => {
            let factored = dims.len() >= 2;
            let g_dtype = b.pick(&FLOATS);
            let mut args = vec![
                arr(b, p_dtype, dims.clone(), &VALUES),
                arr(b, g_dtype, dims.clone(), &VALUES),
            ];
            let mut rets = vec![arr(b, p_dtype, dims.clone(), &VALUES)];
            if factored {
                let (lead, last) = dims.split_at(dims.len() - 1);
                let rows = numel(lead).map_or(-1, |n| n as i64);
                for d in [vec![rows], last.to_vec()] {
                    args.push(arr(b, F32, d.clone(), &STATE));
                    rets.push(arr(b, F32, d, &STATE));
                }
            } else {
                args.push(arr(b, F32, dims.clone(), &STATE));
                rets.push(arr(b, F32, dims, &STATE));
            }
            args.extend(scalars(b));
            rets.push(scalar(b, PRED, &[0.0]));
            (args, rets)
        }
    }
}

fn attr_value(b: &mut Bytes<'_>) -> (i32, i32, [u8; 8], &'static str) {
    let kind = b.pick(&[ATTR_SCALAR, ATTR_SCALAR, ATTR_SCALAR, ATTR_STRING, 1, 5]);
    let dtype = b.pick(&[
        F64, F64, F32, S64, S32, U8, PRED, S8, S16, U16, U32, U64, F16, 99,
    ]);
    let v: [u8; 8] = match dtype {
        F64 => b
            .pick(&[0.0, 1.0, -1.0, 1e-3, 0.5, f64::NAN, f64::INFINITY, 1e300])
            .to_le_bytes(),
        F32 => b
            .pick(&[0.0f32, 1.0, -1.0, 1e-3, f32::NAN])
            .to_le_bytes()
            .repeat(2)[..8]
            .try_into()
            .unwrap(),
        _ => b.pick(&[0i64, 1, -1, 7, i64::MAX, 1 << 32]).to_le_bytes(),
    };
    let s = b.pick(&["nearest", "stochastic", "x", ""]);
    (kind, dtype, v, s)
}

/// Runs one fuzz input.
pub fn run(data: &[u8]) {
    let mut b = Bytes::new(data);
    let op = b.u8() % 6;
    let cuda = op >= 3;
    if cuda {
        super::emulate_cuda();
    }
    let (mut args, mut rets) = layout(&mut b, op);
    // Deviations in the counts.
    match b.u8() % 16 {
        0 => {
            args.pop();
        }
        1 => {
            rets.pop();
        }
        2 => args.push(scalar(&mut b, F32, &[1.0])),
        _ => {}
    }
    // Aliasing, as XLA does for donated operands: results share their operand's memory.
    let pairs: &[(usize, usize)] = match op % 3 {
        0 => &[],
        1 => &[(0, 0)],
        _ if args.len() == 8 => &[(0, 0), (2, 1), (3, 2)],
        _ => &[(0, 0), (2, 1)],
    };
    for &(a, r) in pairs {
        if b.one_in(2) && a < args.len() && r < rets.len() && args[a].mem.is_some() {
            rets[r].alias = Some(a);
        }
    }
    // The gradient sometimes lives in a result's memory (the handlers must copy it first).
    let grad_in_ret = op % 3 != 0 && b.one_in(8) && !rets.is_empty() && rets[0].mem.is_some();

    // Owned memory behind the frame.
    let api = api();
    let mut arg_dims: Vec<Vec<i64>> = args.iter().map(|a| a.dims.clone()).collect();
    let mut ret_dims: Vec<Vec<i64>> = rets.iter().map(|a| a.dims.clone()).collect();
    let arg_data: Vec<*mut c_void> = args
        .iter_mut()
        .map(|a| a.mem.as_mut().map_or(null_mut(), |m| m.ptr().cast()))
        .collect();
    let mut ret_data: Vec<*mut c_void> = rets
        .iter_mut()
        .map(|a| a.mem.as_mut().map_or(null_mut(), |m| m.ptr().cast()))
        .collect();
    for (i, r) in rets.iter().enumerate() {
        if let Some(a) = r.alias {
            ret_data[i] = arg_data[a];
        }
    }
    let mut arg_data = arg_data;
    if grad_in_ret && args.len() > 1 {
        arg_data[1] = ret_data[0];
    }
    let buffer = |dtype: i32, rank: i64, dims: &mut Vec<i64>, data: *mut c_void| {
        Box::new(XLA_FFI_Buffer {
            struct_size: offset_of!(XLA_FFI_Buffer, dims) + size_of::<*mut i64>(),
            extension_start: null_mut(),
            dtype,
            data,
            rank,
            dims: if dims.is_empty() {
                null_mut()
            } else {
                dims.as_mut_ptr()
            },
        })
    };
    let mut arg_bufs: Vec<Box<XLA_FFI_Buffer>> = args
        .iter()
        .zip(arg_dims.iter_mut())
        .zip(&arg_data)
        .map(|((a, d), &p)| buffer(a.dtype, d.len() as i64, d, p))
        .collect();
    let mut ret_bufs: Vec<Box<XLA_FFI_Buffer>> = rets
        .iter()
        .zip(ret_dims.iter_mut())
        .zip(&ret_data)
        .map(|((a, d), &p)| buffer(a.dtype, d.len() as i64, d, p))
        .collect();
    // A rank beyond the dims we hold is refused before the dims are read (rank 65 / -1).
    for (bufs, src) in [(&mut arg_bufs, &args), (&mut ret_bufs, &rets)] {
        for (buf, a) in bufs.iter_mut().zip(src.iter()) {
            if a.rank > 64 || a.rank < 0 {
                buf.rank = a.rank;
            }
        }
    }
    if b.one_in(32) && !arg_bufs.is_empty() {
        arg_bufs[0].struct_size = 16;
    }
    let mut arg_types: Vec<i32> = (0..args.len())
        .map(|_| if b.one_in(48) { 2 } else { BUFFER })
        .collect();
    let mut ret_types: Vec<i32> = vec![BUFFER; rets.len()];
    let mut arg_ptrs: Vec<*mut c_void> = arg_bufs
        .iter_mut()
        .map(|x| (&mut **x as *mut XLA_FFI_Buffer).cast())
        .collect();
    let mut ret_ptrs: Vec<*mut c_void> = ret_bufs
        .iter_mut()
        .map(|x| (&mut **x as *mut XLA_FFI_Buffer).cast())
        .collect();

    // Attributes.
    let n_attrs = b.u8() % 5;
    let mut names: Vec<Box<XLA_FFI_ByteSpan>> = Vec::new();
    let mut values: Vec<Box<[u8; 8]>> = Vec::new();
    let mut strings: Vec<Box<XLA_FFI_ByteSpan>> = Vec::new();
    let mut scalars: Vec<Box<XLA_FFI_Scalar>> = Vec::new();
    let mut attr_types: Vec<i32> = Vec::new();
    let mut attr_ptrs: Vec<*mut c_void> = Vec::new();
    for _ in 0..n_attrs {
        let name = b.pick(&ATTR_NAMES);
        names.push(Box::new(XLA_FFI_ByteSpan {
            ptr: name.as_ptr().cast::<c_char>(),
            len: name.len(),
        }));
        let (kind, dtype, v, s) = attr_value(&mut b);
        attr_types.push(kind);
        let mut v = Box::new(v);
        let p: *mut c_void = match kind {
            ATTR_SCALAR => {
                let mut sc = Box::new(XLA_FFI_Scalar {
                    dtype,
                    value: v.as_mut_ptr().cast(),
                });
                let p = (&mut *sc as *mut XLA_FFI_Scalar).cast();
                scalars.push(sc);
                p
            }
            ATTR_STRING => {
                let mut sp = Box::new(XLA_FFI_ByteSpan {
                    ptr: s.as_ptr().cast(),
                    len: s.len(),
                });
                let p = (&mut *sp as *mut XLA_FFI_ByteSpan).cast();
                strings.push(sp);
                p
            }
            _ => v.as_mut_ptr().cast(), // kinds the handlers never read
        };
        values.push(v);
        attr_ptrs.push(p);
    }
    let mut name_ptrs: Vec<*mut XLA_FFI_ByteSpan> =
        names.iter_mut().map(|n| &mut **n as *mut _).collect();

    // The metadata query XLA makes at registration, now and then.
    let mut metadata = XLA_FFI_Metadata {
        struct_size: offset_of!(XLA_FFI_Metadata, traits) + 4,
        api_version: XLA_FFI_Api_Version {
            struct_size: 0,
            extension_start: null_mut(),
            major_version: 0,
            minor_version: 0,
        },
        traits: 7,
        state_type_id: 0,
    };
    let mut ext = XLA_FFI_Metadata_Extension {
        extension_base: XLA_FFI_InternalExtension {
            struct_size: offset_of!(XLA_FFI_Metadata_Extension, metadata) + 8,
            type_: METADATA_EXT,
            next: null_mut(),
        },
        metadata: &mut metadata,
    };
    let query = b.one_in(24);
    let args_size = if b.one_in(32) {
        8
    } else {
        offset_of!(XLA_FFI_Args, args) + 8
    };
    let mut frame = XLA_FFI_CallFrame {
        struct_size: if b.one_in(32) {
            24
        } else {
            offset_of!(XLA_FFI_CallFrame, attrs) + size_of::<XLA_FFI_Attrs>()
        },
        extension_start: if query {
            (&mut ext as *mut XLA_FFI_Metadata_Extension).cast()
        } else {
            null_mut()
        },
        api: &*api,
        ctx: 0xc7c as *mut XLA_FFI_ExecutionContext,
        stage: if b.one_in(32) { 1 } else { EXECUTE },
        args: XLA_FFI_Args {
            struct_size: args_size,
            extension_start: null_mut(),
            size: arg_ptrs.len() as i64,
            types: arg_types.as_mut_ptr(),
            args: arg_ptrs.as_mut_ptr(),
        },
        rets: XLA_FFI_Rets {
            struct_size: offset_of!(XLA_FFI_Rets, rets) + 8,
            extension_start: null_mut(),
            size: ret_ptrs.len() as i64,
            types: ret_types.as_mut_ptr(),
            rets: ret_ptrs.as_mut_ptr(),
        },
        attrs: XLA_FFI_Attrs {
            struct_size: offset_of!(XLA_FFI_Attrs, attrs) + 8,
            extension_start: null_mut(),
            size: attr_ptrs.len() as i64,
            types: attr_types.as_mut_ptr(),
            names: name_ptrs.as_mut_ptr(),
            attrs: attr_ptrs.as_mut_ptr(),
        },
        future: null_mut(),
    };
    // An unwritten `finite` result shows as 0xAA.
    if let Some(&last) = ret_data.last().filter(|p| !p.is_null()) {
        // SAFETY: our own memory (at least 8 bytes).
        unsafe { *last.cast::<u8>() = 0xAA };
    }
    if b.one_in(16) {
        lomo::alloc::fail_after(Some(b.u8() as u64 % 4));
    }
    // SAFETY: the frame and everything it points to live until the handler returns.
    let err = unsafe {
        match op {
            0 => lomo::xla::lomo_xla_grad_sum_sq(&mut frame),
            1 => lomo::xla::lomo_xla_lomo_update(&mut frame),
            2 => lomo::xla::lomo_xla_adalomo_update(&mut frame),
            3 => lomo::xla::lomo_xla_grad_sum_sq_cuda(&mut frame),
            4 => lomo::xla::lomo_xla_lomo_update_cuda(&mut frame),
            _ => lomo::xla::lomo_xla_adalomo_update_cuda(&mut frame),
        }
    };
    lomo::alloc::fail_after(None);
    if err.is_null() {
        if query {
            assert_eq!(metadata.traits, 0, "a metadata query was answered");
            return;
        }
        // Success: the `finite` result (the last) holds 0 or 1.
        if let Some(&last) = ret_data.last().filter(|p| !p.is_null()) {
            // SAFETY: our own memory (at least 8 bytes).
            let v = unsafe { *last.cast::<u8>() };
            assert!(v <= 1, "finite result {v}");
        }
    } else {
        // SAFETY: every error comes from `error_create`.
        let rec = unsafe { Box::from_raw(err.cast::<Recorded>()) };
        assert!(
            !rec.message.starts_with("panic in"),
            "handler panicked: {}",
            rec.message
        );
        assert!(
            !rec.message.is_empty() && rec.code > 0,
            "error without a message"
        );
    }
    drop((arg_dims, ret_dims, values, strings, scalars, names));
}
