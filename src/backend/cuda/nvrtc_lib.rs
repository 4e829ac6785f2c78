//! CUDA backend: the NVRTC library, opened here rather than through cudarc, whose list of names
//! stops at `libnvrtc.so.12` — a machine with only CUDA 13's NVRTC (`libnvrtc.so.13`, as in
//! CUDA 13 images and pip's `nvidia-cuda-nvrtc` 13.x) would otherwise have none.
//!
//! Which file: `LOMO_NVRTC_PATH` when set (a path, or a name for the loader to search), else the
//! first of [`CANDIDATES`] the dynamic loader finds. Only the entry points lomo calls are
//! resolved; their C signatures are the same in NVRTC 11, 12 and 13. The library stays loaded
//! for the life of the process.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::sync::OnceLock;

/// `nvrtcProgram`.
pub type Program = *mut c_void;

/// `NVRTC_SUCCESS`.
pub const SUCCESS: c_int = 0;

/// Names tried in order when `LOMO_NVRTC_PATH` is not set.
pub const CANDIDATES: [&str; 4] = [
    "libnvrtc.so",
    "libnvrtc.so.13",
    "libnvrtc.so.12",
    "libnvrtc.so.11",
];

/// The resolved NVRTC entry points (C signatures from `nvrtc.h`).
#[derive(Debug)]
pub struct Nvrtc {
    /// The name or path that was opened.
    pub origin: String,
    pub version: unsafe extern "C" fn(*mut c_int, *mut c_int) -> c_int,
    pub error_string: unsafe extern "C" fn(c_int) -> *const c_char,
    #[allow(clippy::type_complexity)]
    pub create_program: unsafe extern "C" fn(
        *mut Program,
        *const c_char,
        *const c_char,
        c_int,
        *const *const c_char,
        *const *const c_char,
    ) -> c_int,
    pub compile_program: unsafe extern "C" fn(Program, c_int, *const *const c_char) -> c_int,
    pub destroy_program: unsafe extern "C" fn(*mut Program) -> c_int,
    pub get_program_log_size: unsafe extern "C" fn(Program, *mut usize) -> c_int,
    pub get_program_log: unsafe extern "C" fn(Program, *mut c_char) -> c_int,
    pub get_cubin_size: unsafe extern "C" fn(Program, *mut usize) -> c_int,
    pub get_cubin: unsafe extern "C" fn(Program, *mut c_char) -> c_int,
}

impl Nvrtc {
    /// NVRTC's text for a result code.
    pub fn describe(&self, r: c_int) -> String {
        // SAFETY: nvrtcGetErrorString accepts any code and returns a static string (or NULL).
        let p = unsafe { (self.error_string)(r) };
        if p.is_null() {
            return format!("NVRTC error {r}");
        }
        // SAFETY: a non-NULL result is a static NUL-terminated string.
        let s = unsafe { CStr::from_ptr(p) }.to_string_lossy();
        format!("{s} ({r})")
    }
}

/// The names to try: `LOMO_NVRTC_PATH` alone when given, else [`CANDIDATES`].
pub fn names(env: Option<&str>) -> Vec<String> {
    match env {
        Some(p) if !p.is_empty() => vec![p.to_owned()],
        _ => CANDIDATES.iter().map(|s| (*s).to_owned()).collect(),
    }
}

/// NVRTC, loaded on first use; None when no candidate opens or lacks an entry point.
pub fn get() -> Option<&'static Nvrtc> {
    static LIB: OnceLock<Option<Nvrtc>> = OnceLock::new();
    LIB.get_or_init(|| {
        let env = std::env::var("LOMO_NVRTC_PATH").ok();
        names(env.as_deref()).into_iter().find_map(|n| open(&n))
    })
    .as_ref()
}

// The target of each transmute is the type of the `Nvrtc` field it initializes.
#[allow(clippy::missing_transmute_annotations)]
fn open(name: &str) -> Option<Nvrtc> {
    let c = CString::new(name).ok()?;
    // SAFETY: dlopen with a valid C string; the handle is never closed (the functions below
    // must stay valid for the process).
    let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if h.is_null() {
        return None;
    }
    let sym = |s: &str| -> Option<*mut c_void> {
        let cs = CString::new(s).ok()?;
        // SAFETY: `h` is a live handle from dlopen; `cs` is NUL-terminated.
        let p = unsafe { libc::dlsym(h, cs.as_ptr()) };
        (!p.is_null()).then_some(p)
    };
    macro_rules! func {
        ($name:literal) => {
            // SAFETY: the symbol is NVRTC's function of this name, whose C signature is the
            // field's type (nvrtc.h, unchanged across NVRTC 11–13).
            unsafe { std::mem::transmute::<*mut c_void, _>(sym($name)?) }
        };
    }
    Some(Nvrtc {
        origin: name.to_owned(),
        version: func!("nvrtcVersion"),
        error_string: func!("nvrtcGetErrorString"),
        create_program: func!("nvrtcCreateProgram"),
        compile_program: func!("nvrtcCompileProgram"),
        destroy_program: func!("nvrtcDestroyProgram"),
        get_program_log_size: func!("nvrtcGetProgramLogSize"),
        get_program_log: func!("nvrtcGetProgramLog"),
        get_cubin_size: func!("nvrtcGetCUBINSize"),
        get_cubin: func!("nvrtcGetCUBIN"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_environment_overrides_the_candidates() {
        assert_eq!(names(Some("/x/libnvrtc.so.13")), vec!["/x/libnvrtc.so.13"]);
        let all = names(None);
        assert_eq!(all, names(Some("")));
        assert!(all.contains(&"libnvrtc.so.13".to_owned()));
        assert!(all.contains(&"libnvrtc.so.12".to_owned()));
    }

    #[test]
    fn a_missing_library_is_none_not_a_crash() {
        assert!(open("/nonexistent/libnvrtc.so.99").is_none());
        // A library without NVRTC's symbols is refused too.
        assert!(open("libc.so.6").is_none());
    }
}
