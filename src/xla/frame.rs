//! XLA FFI layer: the one boundary every handler goes through, and safe views of a call frame.
//!
//! [`boundary`] checks the call frame, answers XLA's metadata (version) query, runs the handler
//! under `catch_unwind` and turns an [`XlaError`] or a panic into an `XLA_FFI_Error` created
//! with the frame's `XLA_FFI_Error_Create`. [`Frame`] decodes arguments, results and attributes,
//! checking every `struct_size` against the sizes of `c_api.h` (with `>=`, since XLA may append
//! fields).

use std::ffi::{c_void, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

use super::abi::*;
use crate::error::{Error, Status};

/// A handler failure: an `XLA_FFI_Error_Code` and a message for the Python user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XlaError {
    pub code: i32,
    pub message: String,
    /// An error XLA itself returned (e.g. from `XLA_FFI_Stream_Get`), handed back unchanged.
    pub from_xla: Option<*mut XLA_FFI_Error>,
}

impl XlaError {
    pub fn invalid(message: impl Into<String>) -> XlaError {
        XlaError {
            code: XLA_FFI_ERROR_INVALID_ARGUMENT,
            message: message.into(),
            from_xla: None,
        }
    }
    pub fn unimplemented(message: impl Into<String>) -> XlaError {
        XlaError {
            code: XLA_FFI_ERROR_UNIMPLEMENTED,
            message: message.into(),
            from_xla: None,
        }
    }
    pub fn internal(message: impl Into<String>) -> XlaError {
        XlaError {
            code: XLA_FFI_ERROR_INTERNAL,
            message: message.into(),
            from_xla: None,
        }
    }
}

impl From<Error> for XlaError {
    fn from(e: Error) -> XlaError {
        let code = match e.status() {
            Status::NullArgument | Status::InvalidArgument => XLA_FFI_ERROR_INVALID_ARGUMENT,
            Status::NoCuda | Status::Unsupported => XLA_FFI_ERROR_UNIMPLEMENTED,
            Status::OutOfMemory => XLA_FFI_ERROR_RESOURCE_EXHAUSTED,
            _ => XLA_FFI_ERROR_INTERNAL,
        };
        XlaError {
            code,
            message: e.message().to_owned(),
            from_xla: None,
        }
    }
}

pub type XResult<T> = Result<T, XlaError>;

/// Returns early with an INVALID_ARGUMENT [`XlaError`] and a formatted message.
macro_rules! invalid {
    ($($fmt:tt)+) => {
        return Err($crate::xla::frame::XlaError::invalid(format!($($fmt)+)))
    };
}
pub(crate) use invalid;

/// Creates an `XLA_FFI_Error` through the API table; NULL if the table cannot create errors
/// (never the case with a conforming XLA).
///
/// # Safety
/// `api` is NULL or points to XLA's live API table.
pub unsafe fn create_error(api: *const XLA_FFI_Api, err: &XlaError) -> *mut XLA_FFI_Error {
    if let Some(raw) = err.from_xla {
        return raw;
    }
    // SAFETY: a non-NULL `api` is XLA's table (caller's contract).
    let Some(api) = (unsafe { api.as_ref() }) else {
        return std::ptr::null_mut();
    };
    if api.struct_size < XLA_FFI_API_SIZE_FOR_ERROR_CREATE {
        return std::ptr::null_mut();
    }
    let Some(create) = api.XLA_FFI_Error_Create else {
        return std::ptr::null_mut();
    };
    let message = CString::new(err.message.replace('\0', " ")).unwrap_or_default();
    let mut args = XLA_FFI_Error_Create_Args {
        struct_size: XLA_FFI_ERROR_CREATE_ARGS_STRUCT_SIZE,
        extension_start: std::ptr::null_mut(),
        message: message.as_ptr(),
        errc: err.code,
    };
    // SAFETY: `args` is a valid Error_Create_Args; XLA copies the message before returning.
    unsafe { create(&mut args) }
}

/// The boundary of every exported handler: frame checks, the metadata query, `catch_unwind`,
/// error conversion. The handler runs in the IEEE floating-point environment (XLA's CPU runtime
/// sets flush-to-zero; a caller may set a rounding direction), restored after
/// (`backend::cpu::fpenv`). `name` prefixes panic messages.
///
/// # Safety
/// `frame` is NULL or the call frame XLA passed to the handler.
pub unsafe fn boundary(
    frame: *mut XLA_FFI_CallFrame,
    name: &str,
    handler: impl FnOnce(&Frame<'_>) -> XResult<()>,
) -> *mut XLA_FFI_Error {
    if frame.is_null() {
        return std::ptr::null_mut();
    }
    // SAFETY: `frame` is XLA's call frame; its first two words (struct_size, extension_start)
    // and `api` exist in every version, and `api` is read only after the size check below.
    let api = unsafe {
        if (*frame).struct_size >= std::mem::offset_of!(XLA_FFI_CallFrame, ctx) {
            (*frame).api
        } else {
            std::ptr::null()
        }
    };
    let result = catch_unwind(AssertUnwindSafe(|| {
        crate::backend::cpu::fpenv::ieee(|| {
            // SAFETY: as above; `Frame::new` checks the size before reading further fields.
            let frame = unsafe { Frame::new(frame) }?;
            // SAFETY: the extension chain belongs to this frame.
            if unsafe { frame.answer_metadata_query() }? {
                return Ok(());
            }
            if frame.raw.stage != XLA_FFI_STAGE_EXECUTE {
                invalid!(
                    "{name}: called for execution stage {} (only EXECUTE = 3 is registered)",
                    frame.raw.stage
                );
            }
            handler(&frame)
        })
    }));
    let err = match result {
        Ok(Ok(())) => return std::ptr::null_mut(),
        Ok(Err(e)) => e,
        Err(payload) => XlaError::internal(format!(
            "panic in {name}: {}",
            crate::error::panic_message(payload.as_ref())
        )),
    };
    // SAFETY: `api` is NULL or XLA's table; creating the error must not unwind into XLA.
    catch_unwind(|| unsafe { create_error(api, &err) }).unwrap_or(std::ptr::null_mut())
}

/// A checked view of one call frame.
pub struct Frame<'a> {
    pub raw: &'a XLA_FFI_CallFrame,
}

/// One array argument or result.
#[derive(Clone, Copy, Debug)]
pub struct Buffer<'a> {
    pub dtype: i32,
    pub data: *mut c_void,
    pub dims: &'a [i64],
}

impl Buffer<'_> {
    /// Element count; an error for negative dimensions or overflow.
    pub fn numel(&self, what: &str) -> XResult<usize> {
        let mut n: usize = 1;
        for &d in self.dims {
            let Ok(d) = usize::try_from(d) else {
                invalid!("{what}: negative dimension {d} in shape {:?}", self.dims);
            };
            n = match n.checked_mul(d) {
                Some(n) => n,
                None => invalid!("{what}: shape {:?} overflows 64 bits", self.dims),
            };
        }
        // Its bytes (at most 8 per element) must fit in 64 bits too.
        if n.checked_mul(8).is_none() {
            invalid!("{what}: shape {:?} overflows 64 bits", self.dims);
        }
        Ok(n)
    }

    /// `f32[4,3]` for messages.
    pub fn describe(&self) -> String {
        let dims: Vec<String> = self.dims.iter().map(|d| d.to_string()).collect();
        format!("{}[{}]", dtype::name(self.dtype), dims.join(","))
    }
}

/// A decoded attribute value.
#[derive(Clone, Debug, PartialEq)]
pub enum AttrValue {
    Float(f64),
    Int(i128),
    Str(String),
    /// An attribute kind the handlers never take (array, dictionary), with its type code.
    Other(i32),
}

impl<'a> Frame<'a> {
    /// Checks the frame's `struct_size` and those of its argument, result and attribute lists.
    ///
    /// # Safety
    /// `frame` is the non-NULL call frame XLA passed to the handler.
    pub unsafe fn new(frame: *mut XLA_FFI_CallFrame) -> XResult<Frame<'a>> {
        // SAFETY: non-NULL (checked by the caller) and valid for the call.
        let size = unsafe { (*frame).struct_size };
        if size < XLA_FFI_CALL_FRAME_STRUCT_SIZE {
            invalid!(
                "XLA_FFI_CallFrame is {size} bytes, expected at least \
                 {XLA_FFI_CALL_FRAME_STRUCT_SIZE}: this jaxlib is older than the FFI API 0.5 \
                 lomo was written against"
            );
        }
        // SAFETY: the size check shows every mirrored field is present.
        let raw = unsafe { &*frame };
        for (what, got, want) in [
            (
                "XLA_FFI_Args",
                raw.args.struct_size,
                XLA_FFI_ARGS_STRUCT_SIZE,
            ),
            (
                "XLA_FFI_Rets",
                raw.rets.struct_size,
                XLA_FFI_RETS_STRUCT_SIZE,
            ),
            (
                "XLA_FFI_Attrs",
                raw.attrs.struct_size,
                XLA_FFI_ATTRS_STRUCT_SIZE,
            ),
        ] {
            if got < want {
                invalid!("{what} is {got} bytes, expected at least {want}");
            }
        }
        Ok(Frame { raw })
    }

    /// The API version to report: 0.5, or the framework's own version when it is an older one
    /// with the same layout of everything mirrored in `abi.rs` (0.3, 0.4).
    fn reported_minor(&self) -> i32 {
        // SAFETY: a non-NULL `api` is XLA's table; its size is checked before `api_version`.
        let framework = unsafe { self.raw.api.as_ref() }
            .filter(|api| api.struct_size >= XLA_FFI_API_SIZE_FOR_VERSION)
            .map(|api| (api.api_version.major_version, api.api_version.minor_version));
        match framework {
            Some((XLA_FFI_API_MAJOR, minor))
                if (XLA_FFI_API_MINOR_OLDEST..XLA_FFI_API_MINOR).contains(&minor) =>
            {
                minor
            }
            _ => XLA_FFI_API_MINOR,
        }
    }

    /// If the frame carries XLA's metadata extension, fills in the API version (see
    /// [`Frame::reported_minor`]) and the traits (none: not command-buffer compatible) and
    /// returns true.
    ///
    /// # Safety
    /// The extension chain of the frame is XLA's.
    unsafe fn answer_metadata_query(&self) -> XResult<bool> {
        let ext = self.raw.extension_start;
        // SAFETY: a non-NULL extension_start points to an extension header (size, type, next).
        if ext.is_null() || unsafe { (*ext).type_ } != XLA_FFI_EXTENSION_METADATA {
            return Ok(false);
        }
        // SAFETY: the type says this is an XLA_FFI_Metadata_Extension; sizes are checked first.
        unsafe {
            let size = (*ext).struct_size;
            if size < XLA_FFI_METADATA_EXTENSION_STRUCT_SIZE {
                invalid!(
                    "XLA_FFI_Metadata_Extension is {size} bytes, expected at least \
                     {XLA_FFI_METADATA_EXTENSION_STRUCT_SIZE}"
                );
            }
            let md = (*ext.cast::<XLA_FFI_Metadata_Extension>()).metadata;
            if md.is_null() {
                invalid!("XLA_FFI_Metadata_Extension.metadata is NULL");
            }
            if (*md).struct_size < XLA_FFI_METADATA_STRUCT_SIZE {
                invalid!(
                    "XLA_FFI_Metadata is {} bytes, expected at least \
                     {XLA_FFI_METADATA_STRUCT_SIZE}",
                    (*md).struct_size
                );
            }
            (*md).api_version = XLA_FFI_Api_Version {
                struct_size: XLA_FFI_API_VERSION_STRUCT_SIZE,
                extension_start: std::ptr::null_mut(),
                major_version: XLA_FFI_API_MAJOR,
                minor_version: self.reported_minor(),
            };
            (*md).traits = 0;
        }
        Ok(true)
    }

    pub fn num_args(&self) -> usize {
        self.raw.args.size.max(0) as usize
    }

    pub fn num_rets(&self) -> usize {
        self.raw.rets.size.max(0) as usize
    }

    /// Argument `i` (the caller checked `i < num_args()`).
    pub fn arg(&self, i: usize, what: &str) -> XResult<Buffer<'a>> {
        let a = &self.raw.args;
        // SAFETY: `types` and `args` hold `size` entries (c_api.h) and `i < size`.
        unsafe { decode_buffer(i, a.size, a.types, a.args, what) }
    }

    /// Result `i` (the caller checked `i < num_rets()`).
    pub fn ret(&self, i: usize, what: &str) -> XResult<Buffer<'a>> {
        let r = &self.raw.rets;
        // SAFETY: as for `arg`.
        unsafe { decode_buffer(i, r.size, r.types, r.rets, what) }
    }

    /// All attributes, decoded, in XLA's (name-sorted) order.
    pub fn attrs(&self) -> XResult<Vec<(String, AttrValue)>> {
        let a = &self.raw.attrs;
        let n = a.size.max(0) as usize;
        let mut out = crate::alloc::with_capacity(n, "the attribute list")?;
        for i in 0..n {
            // SAFETY: `types`, `names` and `attrs` hold `size` entries (c_api.h); each name is a
            // ByteSpan and each value matches its type tag.
            unsafe {
                let ty = *a.types.add(i);
                let name_span = &**a.names.add(i);
                let bytes = std::slice::from_raw_parts(name_span.ptr.cast::<u8>(), name_span.len);
                let name = String::from_utf8_lossy(bytes).into_owned();
                let value = *a.attrs.add(i);
                let v = match ty {
                    XLA_FFI_ATTR_SCALAR => decode_scalar(&*value.cast::<XLA_FFI_Scalar>(), &name)?,
                    XLA_FFI_ATTR_STRING => {
                        let s = &*value.cast::<XLA_FFI_ByteSpan>();
                        let b = std::slice::from_raw_parts(s.ptr.cast::<u8>(), s.len);
                        AttrValue::Str(String::from_utf8_lossy(b).into_owned())
                    }
                    other => AttrValue::Other(other),
                };
                out.push((name, v));
            }
        }
        Ok(out)
    }
}

/// # Safety
/// `types` and `ptrs` hold `size` entries; `i < size`; each entry is an `XLA_FFI_Buffer`.
unsafe fn decode_buffer<'a>(
    i: usize,
    size: i64,
    types: *const i32,
    ptrs: *const *mut c_void,
    what: &str,
) -> XResult<Buffer<'a>> {
    if i as i64 >= size {
        invalid!("{what}: missing (only {size} given)");
    }
    // SAFETY: `i < size` per the check above; the arrays hold `size` entries.
    let (ty, p) = unsafe { (*types.add(i), *ptrs.add(i)) };
    if ty != XLA_FFI_BUFFER {
        invalid!("{what}: expected an array buffer, got XLA_FFI_ArgType {ty}");
    }
    let b = p.cast::<XLA_FFI_Buffer>();
    // SAFETY: the type tag says `p` is an XLA_FFI_Buffer; its size is checked before the rest.
    unsafe {
        if (*b).struct_size < XLA_FFI_BUFFER_STRUCT_SIZE {
            invalid!(
                "{what}: XLA_FFI_Buffer is {} bytes, expected at least \
                 {XLA_FFI_BUFFER_STRUCT_SIZE}",
                (*b).struct_size
            );
        }
        let rank = (*b).rank;
        if !(0..=64).contains(&rank) {
            invalid!("{what}: rank {rank} is out of range");
        }
        let dims = if rank == 0 {
            &[][..]
        } else {
            std::slice::from_raw_parts((*b).dims, rank as usize)
        };
        Ok(Buffer {
            dtype: (*b).dtype,
            data: (*b).data,
            dims,
        })
    }
}

/// # Safety
/// `s.value` points to one element of `s.dtype`.
unsafe fn decode_scalar(s: &XLA_FFI_Scalar, name: &str) -> XResult<AttrValue> {
    let p = s.value;
    // SAFETY: `p` holds one value of the tagged type (c_api.h).
    let v = unsafe {
        match s.dtype {
            dtype::F32 => AttrValue::Float(p.cast::<f32>().read_unaligned() as f64),
            dtype::F64 => AttrValue::Float(p.cast::<f64>().read_unaligned()),
            dtype::PRED | dtype::U8 => AttrValue::Int(p.cast::<u8>().read() as i128),
            dtype::S8 => AttrValue::Int(p.cast::<i8>().read() as i128),
            dtype::S16 => AttrValue::Int(p.cast::<i16>().read_unaligned() as i128),
            dtype::U16 => AttrValue::Int(p.cast::<u16>().read_unaligned() as i128),
            dtype::S32 => AttrValue::Int(p.cast::<i32>().read_unaligned() as i128),
            dtype::U32 => AttrValue::Int(p.cast::<u32>().read_unaligned() as i128),
            dtype::S64 => AttrValue::Int(p.cast::<i64>().read_unaligned() as i128),
            dtype::U64 => AttrValue::Int(p.cast::<u64>().read_unaligned() as i128),
            d => invalid!(
                "attribute '{name}': scalar of {} is not supported",
                dtype::name(d)
            ),
        }
    };
    Ok(v)
}
