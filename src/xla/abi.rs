//! XLA FFI layer: `#[repr(C)]` mirrors of the parts of `xla/ffi/api/c_api.h` (API 0.5, as shipped
//! with jaxlib 0.12) that the handlers use. Only what is read or written is typed; the rest of the
//! function table is kept as opaque pointers so the layout stays exact.
//!
//! C enums are `int`-sized; they are mirrored as `i32` (never as Rust enums, since XLA may pass
//! values this file does not know). Struct sizes follow `XLA_FFI_STRUCT_SIZE(type, last_field)`:
//! the size up to and including the declared last field, so XLA may hand us larger structs
//! (appended fields) and every check is `>=`.
#![allow(non_camel_case_types, non_snake_case)]

use std::ffi::{c_char, c_void};
use std::mem::{offset_of, size_of};

/// The FFI API version these handlers are written against (jaxlib 0.12: 0.5).
pub(crate) const XLA_FFI_API_MAJOR: i32 = 0;
pub(crate) const XLA_FFI_API_MINOR: i32 = 5;
/// The oldest minor version whose layout of every struct and table entry mirrored here is the
/// same as in 0.5 (checked against jaxlib 0.10.2's `c_api.h`, API 0.3). A framework of a minor
/// version in `[XLA_FFI_API_MINOR_OLDEST, XLA_FFI_API_MINOR)` is answered with its own version.
pub(crate) const XLA_FFI_API_MINOR_OLDEST: i32 = 3;

/// `XLA_FFI_InternalExtension_Type`.
pub(crate) const XLA_FFI_EXTENSION_METADATA: i32 = 1;

/// `XLA_FFI_ExecutionStage`.
pub(crate) const XLA_FFI_STAGE_EXECUTE: i32 = 3;

/// `XLA_FFI_ArgType` / `XLA_FFI_RetType`.
pub(crate) const XLA_FFI_BUFFER: i32 = 1;

/// `XLA_FFI_AttrType`.
pub(crate) const XLA_FFI_ATTR_SCALAR: i32 = 3;
pub(crate) const XLA_FFI_ATTR_STRING: i32 = 4;

/// `XLA_FFI_Error_Code` values used here.
pub(crate) const XLA_FFI_ERROR_INVALID_ARGUMENT: i32 = 3;
pub(crate) const XLA_FFI_ERROR_RESOURCE_EXHAUSTED: i32 = 8;
pub(crate) const XLA_FFI_ERROR_UNIMPLEMENTED: i32 = 12;
pub(crate) const XLA_FFI_ERROR_INTERNAL: i32 = 13;

/// `XLA_FFI_DataType` values used here.
pub mod dtype {
    pub(crate) const PRED: i32 = 1;
    pub(crate) const S8: i32 = 2;
    pub(crate) const S16: i32 = 3;
    pub(crate) const S32: i32 = 4;
    pub(crate) const S64: i32 = 5;
    pub(crate) const U8: i32 = 6;
    pub(crate) const U16: i32 = 7;
    pub(crate) const U32: i32 = 8;
    pub(crate) const U64: i32 = 9;
    pub(crate) const F16: i32 = 10;
    pub(crate) const F32: i32 = 11;
    pub(crate) const F64: i32 = 12;
    pub(crate) const BF16: i32 = 16;

    /// A short name for messages ("f32", "bf16", ...), or "dtype <n>".
    pub(crate) fn name(d: i32) -> String {
        match d {
            PRED => "bool".into(),
            S8 => "s8".into(),
            S16 => "s16".into(),
            S32 => "s32".into(),
            S64 => "s64".into(),
            U8 => "u8".into(),
            U16 => "u16".into(),
            U32 => "u32".into(),
            U64 => "u64".into(),
            F16 => "f16".into(),
            F32 => "f32".into(),
            F64 => "f64".into(),
            BF16 => "bf16".into(),
            n => format!("dtype {n}"),
        }
    }
}

/// `XLA_FFI_InternalExtension`: the head of every extension in a call frame's chain.
#[repr(C)]
pub struct XLA_FFI_InternalExtension {
    pub struct_size: usize,
    pub type_: i32,
    pub next: *mut XLA_FFI_InternalExtension,
}

/// `XLA_FFI_Api_Version`.
#[repr(C)]
pub struct XLA_FFI_Api_Version {
    pub struct_size: usize,
    pub extension_start: *mut XLA_FFI_InternalExtension,
    pub major_version: i32,
    pub minor_version: i32,
}
pub(crate) const XLA_FFI_API_VERSION_STRUCT_SIZE: usize =
    offset_of!(XLA_FFI_Api_Version, minor_version) + size_of::<i32>();

/// Opaque `XLA_FFI_Error` (owned by XLA once returned).
#[repr(C)]
pub struct XLA_FFI_Error {
    _private: [u8; 0],
}

/// Opaque `XLA_FFI_ExecutionContext` / `XLA_FFI_InvokeContext`.
#[repr(C)]
pub struct XLA_FFI_ExecutionContext {
    _private: [u8; 0],
}

/// `XLA_FFI_Error_Create_Args` (the message is copied by XLA).
#[repr(C)]
pub struct XLA_FFI_Error_Create_Args {
    pub struct_size: usize,
    pub extension_start: *mut XLA_FFI_InternalExtension,
    pub message: *const c_char,
    pub errc: i32,
}
pub(crate) const XLA_FFI_ERROR_CREATE_ARGS_STRUCT_SIZE: usize =
    offset_of!(XLA_FFI_Error_Create_Args, errc) + size_of::<i32>();

/// `XLA_FFI_Stream_Get_Args`: the platform stream (`CUstream` on the CUDA platform).
#[repr(C)]
pub struct XLA_FFI_Stream_Get_Args {
    pub struct_size: usize,
    pub extension_start: *mut XLA_FFI_InternalExtension,
    pub ctx: *mut XLA_FFI_ExecutionContext,
    pub stream: *mut c_void,
}
pub(crate) const XLA_FFI_STREAM_GET_ARGS_STRUCT_SIZE: usize =
    offset_of!(XLA_FFI_Stream_Get_Args, stream) + size_of::<*mut c_void>();

pub type XLA_FFI_Error_Create_Fn =
    unsafe extern "C" fn(args: *mut XLA_FFI_Error_Create_Args) -> *mut XLA_FFI_Error;
pub type XLA_FFI_Stream_Get_Fn =
    unsafe extern "C" fn(args: *mut XLA_FFI_Stream_Get_Args) -> *mut XLA_FFI_Error;

/// `XLA_FFI_Api`: the function table (order of API 0.5; append-only). Entries this library does
/// not call are opaque pointers.
#[repr(C)]
pub struct XLA_FFI_Api {
    pub struct_size: usize,
    pub extension_start: *mut XLA_FFI_InternalExtension,
    pub api_version: XLA_FFI_Api_Version,
    pub internal_api: *const c_void,
    pub XLA_FFI_Error_Create: Option<XLA_FFI_Error_Create_Fn>,
    pub XLA_FFI_Error_GetDetails: *const c_void,
    pub XLA_FFI_Error_Destroy: *const c_void,
    pub XLA_FFI_Handler_Register: *const c_void,
    pub XLA_FFI_Stream_Get: Option<XLA_FFI_Stream_Get_Fn>,
    pub XLA_FFI_Type_Register: *const c_void,
    pub XLA_FFI_InvokeContext_Get: *const c_void,
    pub XLA_FFI_State_Set: *const c_void,
    pub XLA_FFI_State_Get: *const c_void,
    pub XLA_FFI_DeviceMemory_Allocate: *const c_void,
    pub XLA_FFI_DeviceMemory_Free: *const c_void,
    pub XLA_FFI_ThreadPool_Schedule: *const c_void,
    pub XLA_FFI_ThreadPool_NumThreads: *const c_void,
    pub XLA_FFI_Future_Create: *const c_void,
    pub XLA_FFI_Future_SetAvailable: *const c_void,
    pub XLA_FFI_Future_SetError: *const c_void,
    pub XLA_FFI_RunId_Get: *const c_void,
    pub XLA_FFI_DeviceOrdinal_Get: *const c_void,
    pub XLA_FFI_InvokeContext_FindExtension: *const c_void,
    pub XLA_FFI_CustomOptions_Get: *const c_void,
}

/// How much of `XLA_FFI_Api` must be present to read `api_version`.
pub(crate) const XLA_FFI_API_SIZE_FOR_VERSION: usize =
    offset_of!(XLA_FFI_Api, api_version) + size_of::<XLA_FFI_Api_Version>();
/// How much of `XLA_FFI_Api` must be present to read `XLA_FFI_Error_Create`.
pub(crate) const XLA_FFI_API_SIZE_FOR_ERROR_CREATE: usize =
    offset_of!(XLA_FFI_Api, XLA_FFI_Error_Create) + size_of::<usize>();
/// How much of `XLA_FFI_Api` must be present to read `XLA_FFI_Stream_Get`.
pub(crate) const XLA_FFI_API_SIZE_FOR_STREAM_GET: usize =
    offset_of!(XLA_FFI_Api, XLA_FFI_Stream_Get) + size_of::<usize>();

/// `XLA_FFI_Buffer`: one array argument or result.
#[repr(C)]
pub struct XLA_FFI_Buffer {
    pub struct_size: usize,
    pub extension_start: *mut XLA_FFI_InternalExtension,
    pub dtype: i32,
    pub data: *mut c_void,
    pub rank: i64,
    pub dims: *mut i64,
}
pub(crate) const XLA_FFI_BUFFER_STRUCT_SIZE: usize =
    offset_of!(XLA_FFI_Buffer, dims) + size_of::<*mut i64>();

/// `XLA_FFI_Args`.
#[repr(C)]
pub struct XLA_FFI_Args {
    pub struct_size: usize,
    pub extension_start: *mut XLA_FFI_InternalExtension,
    pub size: i64,
    pub types: *mut i32,
    pub args: *mut *mut c_void,
}
pub(crate) const XLA_FFI_ARGS_STRUCT_SIZE: usize =
    offset_of!(XLA_FFI_Args, args) + size_of::<*mut c_void>();

/// `XLA_FFI_Rets`.
#[repr(C)]
pub struct XLA_FFI_Rets {
    pub struct_size: usize,
    pub extension_start: *mut XLA_FFI_InternalExtension,
    pub size: i64,
    pub types: *mut i32,
    pub rets: *mut *mut c_void,
}
pub(crate) const XLA_FFI_RETS_STRUCT_SIZE: usize =
    offset_of!(XLA_FFI_Rets, rets) + size_of::<*mut c_void>();

/// `XLA_FFI_ByteSpan`: a string that is not NUL-terminated.
#[repr(C)]
pub struct XLA_FFI_ByteSpan {
    pub ptr: *const c_char,
    pub len: usize,
}

/// `XLA_FFI_Scalar`: a scalar attribute.
#[repr(C)]
pub struct XLA_FFI_Scalar {
    pub dtype: i32,
    pub value: *mut c_void,
}

/// `XLA_FFI_Attrs`: named attributes, sorted by name.
#[repr(C)]
pub struct XLA_FFI_Attrs {
    pub struct_size: usize,
    pub extension_start: *mut XLA_FFI_InternalExtension,
    pub size: i64,
    pub types: *mut i32,
    pub names: *mut *mut XLA_FFI_ByteSpan,
    pub attrs: *mut *mut c_void,
}
pub(crate) const XLA_FFI_ATTRS_STRUCT_SIZE: usize =
    offset_of!(XLA_FFI_Attrs, attrs) + size_of::<*mut c_void>();

/// `XLA_FFI_CallFrame`: everything one handler invocation receives.
#[repr(C)]
pub struct XLA_FFI_CallFrame {
    pub struct_size: usize,
    pub extension_start: *mut XLA_FFI_InternalExtension,
    pub api: *const XLA_FFI_Api,
    pub ctx: *mut XLA_FFI_ExecutionContext,
    pub stage: i32,
    pub args: XLA_FFI_Args,
    pub rets: XLA_FFI_Rets,
    pub attrs: XLA_FFI_Attrs,
    pub future: *mut c_void,
}
/// The declared last field is `attrs`, so `future` is not part of the required size.
pub(crate) const XLA_FFI_CALL_FRAME_STRUCT_SIZE: usize =
    offset_of!(XLA_FFI_CallFrame, attrs) + size_of::<XLA_FFI_Attrs>();

/// `XLA_FFI_Metadata`: what a handler reports about itself at registration.
#[repr(C)]
pub struct XLA_FFI_Metadata {
    pub struct_size: usize,
    pub api_version: XLA_FFI_Api_Version,
    pub traits: u32,
    pub state_type_id: i64,
}
pub(crate) const XLA_FFI_METADATA_STRUCT_SIZE: usize =
    offset_of!(XLA_FFI_Metadata, traits) + size_of::<u32>();

/// `XLA_FFI_Metadata_Extension`: the extension XLA chains into the registration probe.
#[repr(C)]
pub struct XLA_FFI_Metadata_Extension {
    pub extension_base: XLA_FFI_InternalExtension,
    pub metadata: *mut XLA_FFI_Metadata,
}
pub(crate) const XLA_FFI_METADATA_EXTENSION_STRUCT_SIZE: usize =
    offset_of!(XLA_FFI_Metadata_Extension, metadata) + size_of::<*mut XLA_FFI_Metadata>();

#[cfg(test)]
mod tests {
    use super::*;

    /// Sizes computed by hand from c_api.h for LP64 (x86-64, aarch64).
    #[test]
    #[cfg(target_pointer_width = "64")]
    fn struct_sizes_match_c_api_h() {
        assert_eq!(XLA_FFI_API_VERSION_STRUCT_SIZE, 24);
        assert_eq!(XLA_FFI_ERROR_CREATE_ARGS_STRUCT_SIZE, 28);
        assert_eq!(XLA_FFI_STREAM_GET_ARGS_STRUCT_SIZE, 32);
        assert_eq!(XLA_FFI_BUFFER_STRUCT_SIZE, 48);
        assert_eq!(XLA_FFI_ARGS_STRUCT_SIZE, 40);
        assert_eq!(XLA_FFI_RETS_STRUCT_SIZE, 40);
        assert_eq!(XLA_FFI_ATTRS_STRUCT_SIZE, 48);
        assert_eq!(offset_of!(XLA_FFI_CallFrame, args), 40);
        assert_eq!(XLA_FFI_CALL_FRAME_STRUCT_SIZE, 168);
        assert_eq!(size_of::<XLA_FFI_CallFrame>(), 176);
        assert_eq!(XLA_FFI_METADATA_STRUCT_SIZE, 36);
        assert_eq!(XLA_FFI_METADATA_EXTENSION_STRUCT_SIZE, 32);
        // Header, version, internal pointer, then 20 function pointers.
        assert_eq!(size_of::<XLA_FFI_Api>(), 8 + 8 + 24 + 8 + 20 * 8);
        assert_eq!(offset_of!(XLA_FFI_Api, XLA_FFI_Error_Create), 48);
        assert_eq!(offset_of!(XLA_FFI_Api, XLA_FFI_Stream_Get), 80);
    }
}
