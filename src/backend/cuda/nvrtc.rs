//! CUDA backend: NVRTC — compiles a kernel module to a CUBIN for one exact architecture.
//!
//! NVRTC is loaded dynamically (cudarc). `LOMO_NVRTC_PATH` may name the library file (e.g. pip's
//! `site-packages/nvidia/cuda_nvrtc/lib/libnvrtc.so.12`): it is opened first with RTLD_GLOBAL,
//! so cudarc's `dlopen("libnvrtc.so.12")` finds it by SONAME. cudarc panics when the library is
//! missing, so [`available`] probes once (and catches panics) before anything else is called.
//!
//! Options: `--fmad=false` (every fused multiply-add is explicit, as in the CPU backend),
//! `--ptxas-options=-v` (registers and spills per kernel in the log), C++17, no fast math.

use std::ffi::{c_char, c_int, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::OnceLock;

use cudarc::nvrtc::sys;

use super::registry::{Module, COMMON_HEADER};
use crate::error::{bail, Result};

/// Whether NVRTC can be loaded (probed once).
pub fn available() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    *PRESENT.get_or_init(|| {
        if let Some(path) = std::env::var_os("LOMO_NVRTC_PATH") {
            if let Ok(c) = CString::new(path.to_string_lossy().as_bytes()) {
                // SAFETY: dlopen with a valid C string; the handle is kept for the process.
                unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
            }
        }
        // SAFETY: only tries to open the library; a panic is caught.
        catch_unwind(|| unsafe { sys::is_culib_present() }).unwrap_or(false)
    })
}

/// NVRTC's version `(major, minor)`.
pub fn version() -> Result<(i32, i32)> {
    if !available() {
        bail!(
            NoCuda,
            "NVRTC (libnvrtc.so) was not found; set LOMO_NVRTC_PATH or LD_LIBRARY_PATH"
        );
    }
    let (mut major, mut minor): (c_int, c_int) = (0, 0);
    // SAFETY: valid out pointers; the library is present.
    let r = catch_unwind(AssertUnwindSafe(|| unsafe {
        sys::nvrtcVersion(&mut major, &mut minor)
    }));
    match r {
        Ok(sys::nvrtcResult::NVRTC_SUCCESS) => Ok((major, minor)),
        _ => bail!(CompileError, "nvrtcVersion failed"),
    }
}

/// A compiled module.
#[derive(Debug)]
pub struct Compiled {
    pub cubin: Vec<u8>,
    /// NVRTC's log, including ptxas's per-kernel report.
    pub log: String,
}

/// The options for `arch` (e.g. "sm_90").
pub fn options(arch: &str) -> Vec<String> {
    vec![
        format!("--gpu-architecture={arch}"),
        "--fmad=false".into(),
        "-std=c++17".into(),
        "--ptxas-options=-v".into(),
    ]
}

/// Compiles `module` for `arch` (a real architecture, `sm_XY`).
pub fn compile(module: Module, arch: &str) -> Result<Compiled> {
    if !available() {
        bail!(
            NoCuda,
            "NVRTC (libnvrtc.so) was not found; set LOMO_NVRTC_PATH or LD_LIBRARY_PATH"
        );
    }
    match catch_unwind(AssertUnwindSafe(|| compile_inner(module, arch))) {
        Ok(r) => r,
        Err(_) => bail!(
            CompileError,
            "NVRTC panicked while compiling {} for {arch}",
            module.file_name()
        ),
    }
}

fn check(r: sys::nvrtcResult, what: &str) -> Result<()> {
    if r != sys::nvrtcResult::NVRTC_SUCCESS {
        bail!(CompileError, "{what} failed: {r:?}");
    }
    Ok(())
}

fn compile_inner(module: Module, arch: &str) -> Result<Compiled> {
    let src = CString::new(module.source()).expect("sources have no NUL");
    let name = CString::new(module.file_name()).expect("no NUL");
    let header = CString::new(COMMON_HEADER).expect("no NUL");
    let header_name = CString::new("common.cuh").expect("no NUL");
    let headers = [header.as_ptr()];
    let names = [header_name.as_ptr()];
    let mut prog: sys::nvrtcProgram = std::ptr::null_mut();
    // SAFETY: every pointer is a valid NUL-terminated string that outlives the call.
    check(
        unsafe {
            sys::nvrtcCreateProgram(
                &mut prog,
                src.as_ptr(),
                name.as_ptr(),
                1,
                headers.as_ptr(),
                names.as_ptr(),
            )
        },
        "nvrtcCreateProgram",
    )?;
    let opts: Vec<CString> = options(arch)
        .into_iter()
        .map(|o| CString::new(o).expect("no NUL"))
        .collect();
    let opt_ptrs: Vec<*const c_char> = opts.iter().map(|o| o.as_ptr()).collect();
    // SAFETY: `prog` was created above; the options outlive the call.
    let compiled =
        unsafe { sys::nvrtcCompileProgram(prog, opt_ptrs.len() as c_int, opt_ptrs.as_ptr()) };
    let log = program_log(prog);
    let result = if compiled != sys::nvrtcResult::NVRTC_SUCCESS {
        Err(crate::error::Error::new(
            crate::error::Status::CompileError,
            format!(
                "NVRTC could not compile {} for {arch}: {compiled:?}\n{log}",
                module.file_name()
            ),
        ))
    } else {
        cubin(prog).map(|cubin| Compiled { cubin, log })
    };
    // SAFETY: `prog` is destroyed exactly once.
    unsafe { sys::nvrtcDestroyProgram(&mut prog) };
    result
}

fn program_log(prog: sys::nvrtcProgram) -> String {
    let mut n = 0usize;
    // SAFETY: `prog` is a live program; `n` is a valid out pointer.
    if unsafe { sys::nvrtcGetProgramLogSize(prog, &mut n) } != sys::nvrtcResult::NVRTC_SUCCESS {
        return String::new();
    }
    let mut buf = vec![0u8; n.max(1)];
    // SAFETY: `buf` holds the `n` bytes NVRTC reported.
    unsafe { sys::nvrtcGetProgramLog(prog, buf.as_mut_ptr().cast()) };
    String::from_utf8_lossy(&buf)
        .trim_end_matches('\0')
        .to_owned()
}

fn cubin(prog: sys::nvrtcProgram) -> Result<Vec<u8>> {
    let mut n = 0usize;
    // SAFETY: `prog` compiled successfully; `n` is a valid out pointer.
    check(
        unsafe { sys::nvrtcGetCUBINSize(prog, &mut n) },
        "nvrtcGetCUBINSize",
    )?;
    if n == 0 {
        bail!(
            CompileError,
            "NVRTC produced no CUBIN (virtual architecture?)"
        );
    }
    let mut buf = vec![0u8; n];
    // SAFETY: `buf` holds the `n` bytes NVRTC reported.
    check(
        unsafe { sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr().cast()) },
        "nvrtcGetCUBIN",
    )?;
    Ok(buf)
}

/// Per-kernel resource usage parsed from ptxas's `-v` report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelUsage {
    pub name: String,
    pub registers: u32,
    pub spill_stores: u32,
    pub spill_loads: u32,
}

/// Parses the `--ptxas-options=-v` part of an NVRTC log.
pub fn parse_usage(log: &str) -> Vec<KernelUsage> {
    let mut out: Vec<KernelUsage> = Vec::new();
    let num_before = |line: &str, key: &str| -> Option<u32> {
        let i = line.find(key)?;
        line[..i].split_whitespace().last()?.parse().ok()
    };
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest.split('\'').next().unwrap_or("").to_owned();
            out.push(KernelUsage {
                name,
                registers: 0,
                spill_stores: 0,
                spill_loads: 0,
            });
        } else if let Some(k) = out.last_mut() {
            if let Some(v) = num_before(line, "bytes spill stores") {
                k.spill_stores = v;
            }
            if let Some(v) = num_before(line, "bytes spill loads") {
                k.spill_loads = v;
            }
            if let Some(v) = num_before(line, "registers") {
                k.registers = v;
            }
        }
    }
    out
}

/// The CUBIN of `module` for `arch`, from the on-disk cache when present, else compiled (and
/// stored). The cache key covers the sources, the options, the architecture and NVRTC's version;
/// the directory is `$LOMO_CACHE_DIR`, else `$XDG_CACHE_HOME/lomo`, else `~/.cache/lomo`.
/// Cache failures are never errors (the module is compiled instead).
pub fn cubin_cached(module: Module, arch: &str) -> Result<Vec<u8>> {
    let path = cache_path(module, arch);
    if let Some(p) = &path {
        if let Ok(bytes) = std::fs::read(p) {
            if bytes.starts_with(b"\x7fELF") {
                return Ok(bytes);
            }
        }
    }
    let compiled = compile(module, arch)?;
    if let Some(p) = &path {
        if let Some(dir) = p.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let tmp = p.with_extension(format!("tmp{}", std::process::id()));
        if std::fs::write(&tmp, &compiled.cubin).is_ok() {
            let _ = std::fs::rename(&tmp, p);
        }
    }
    Ok(compiled.cubin)
}

fn cache_path(module: Module, arch: &str) -> Option<std::path::PathBuf> {
    use std::hash::{Hash, Hasher};
    let dir = std::env::var_os("LOMO_CACHE_DIR")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            std::env::var_os("XDG_CACHE_HOME").map(|d| std::path::PathBuf::from(d).join("lomo"))
        })
        .or_else(|| {
            std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".cache/lomo"))
        })?;
    let (major, minor) = version().ok()?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (
        module.source(),
        COMMON_HEADER,
        options(arch),
        env!("CARGO_PKG_VERSION"),
    )
        .hash(&mut h);
    Some(dir.join(format!(
        "{}-{arch}-nvrtc{major}.{minor}-{:016x}.cubin",
        module.file_name().trim_end_matches(".cu"),
        h.finish()
    )))
}
