//! Core layer: the one error type of the library and its stable status numbers.
//!
//! Every fallible core function returns [`Result<T>`]. The FFI layer turns an [`Error`] into a
//! `lomo_status` with [`Error::status`] and keeps [`Error::message`] as the thread's last error.
//! Status numbers are part of the ABI: they are never renumbered or reused.

use std::fmt;

/// Stable status numbers (`lomo_status` in C). 0 is success.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Status {
    /// The call succeeded.
    Ok = 0,
    /// A required pointer argument was NULL.
    NullArgument = 1,
    /// An argument is out of range or inconsistent (bad enum value, bad shape, bad config field).
    InvalidArgument = 2,
    /// The call is not valid in the optimizer's current step phase (see `lomo_step_begin`).
    PhaseError = 3,
    /// A gradient for this parameter was already submitted in the current phase.
    DuplicateGradient = 4,
    /// No parameter with this id is registered.
    UnknownParam = 5,
    /// The gradient's device does not match the parameter's device.
    DeviceMismatch = 6,
    /// CUDA was requested but no usable driver or NVRTC was found.
    NoCuda = 7,
    /// A CUDA driver call failed.
    CudaError = 8,
    /// A kernel failed to compile.
    CompileError = 9,
    /// A file could not be read or written.
    IoError = 10,
    /// A checkpoint does not match the optimizer (algorithm, names, shapes) or is corrupted.
    StateMismatch = 11,
    /// An allocation of host or device memory failed; the message gives the bytes asked for.
    /// The call changed nothing.
    OutOfMemory = 12,
    /// The operation is not supported by this build or backend.
    Unsupported = 13,
    /// A Rust panic was caught at the boundary; the optimizer should be discarded.
    Panic = 14,
    /// A communicator callback (`lomo_comm`) returned non-zero; the message carries its code. The
    /// failed call changed nothing (a step can be cancelled with `lomo_step_cancel`).
    CommError = 15,
    /// `LOMO_DIST_CHECK` found the ranks disagreeing (submissions, lr, configuration, step); every
    /// rank of the norm group gets this status from the same call.
    DistMismatch = 16,
}

impl Status {
    /// All statuses in numeric order (used by tests and `lomo_status_str`).
    pub fn all() -> [Status; 17] {
        [
            Status::Ok,
            Status::NullArgument,
            Status::InvalidArgument,
            Status::PhaseError,
            Status::DuplicateGradient,
            Status::UnknownParam,
            Status::DeviceMismatch,
            Status::NoCuda,
            Status::CudaError,
            Status::CompileError,
            Status::IoError,
            Status::StateMismatch,
            Status::OutOfMemory,
            Status::Unsupported,
            Status::Panic,
            Status::CommError,
            Status::DistMismatch,
        ]
    }

    /// Static, human-readable name of a status, as a C string.
    pub fn as_cstr(self) -> &'static std::ffi::CStr {
        match self {
            Status::Ok => c"ok",
            Status::NullArgument => c"null argument",
            Status::InvalidArgument => c"invalid argument",
            Status::PhaseError => c"call not valid in the current step phase",
            Status::DuplicateGradient => c"gradient already submitted in this phase",
            Status::UnknownParam => c"unknown parameter id",
            Status::DeviceMismatch => c"device mismatch",
            Status::NoCuda => c"CUDA is not available",
            Status::CudaError => c"CUDA driver error",
            Status::CompileError => c"kernel compilation failed",
            Status::IoError => c"I/O error",
            Status::StateMismatch => c"optimizer state does not match",
            Status::OutOfMemory => c"out of memory",
            Status::Unsupported => c"unsupported",
            Status::Panic => c"internal panic",
            Status::CommError => c"communicator callback failed",
            Status::DistMismatch => c"ranks disagree",
        }
    }

    /// Static, human-readable name of a status.
    pub fn as_str(self) -> &'static str {
        self.as_cstr().to_str().unwrap_or("?")
    }

    /// The status with this number, if any.
    pub fn from_u32(v: u32) -> Option<Status> {
        Status::all().get(v as usize).copied()
    }
}

/// A failure: a status plus a message that says what was wrong and how to fix it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Error {
    status: Status,
    message: String,
}

impl Error {
    pub fn new(status: Status, message: impl Into<String>) -> Error {
        debug_assert!(status != Status::Ok);
        Error {
            status,
            message: message.into(),
        }
    }
    pub fn status(&self) -> Status {
        self.status
    }
    pub fn message(&self) -> &str {
        &self.message
    }
    pub fn invalid(message: impl Into<String>) -> Error {
        Error::new(Status::InvalidArgument, message)
    }
    pub fn phase(message: impl Into<String>) -> Error {
        Error::new(Status::PhaseError, message)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.status.as_str(), self.message)
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;

/// The message of a caught panic (for the boundaries that turn panics into errors).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic payload".to_owned()
    }
}

/// Returns early with an [`Error`] of the given status and formatted message.
macro_rules! bail {
    ($status:ident, $($fmt:tt)+) => {
        return Err($crate::error::Error::new($crate::error::Status::$status, format!($($fmt)+)))
    };
}
pub(crate) use bail;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_numbers_are_dense_and_stable() {
        for (i, s) in Status::all().iter().enumerate() {
            assert_eq!(*s as u32, i as u32);
            assert_eq!(Status::from_u32(i as u32), Some(*s));
        }
        assert_eq!(Status::from_u32(Status::all().len() as u32), None);
        assert_eq!(Status::Panic as u32, 14);
    }
}
