//! CUDA backend: NVRTC — compiles a kernel module to a CUBIN for one exact architecture.
//!
//! NVRTC is loaded dynamically by [`super::nvrtc_lib`] (`LOMO_NVRTC_PATH`, else `libnvrtc.so`,
//! `.so.13`, `.so.12`, `.so.11`), so NVRTC 12 (e.g. pip's `nvidia-cuda-nvrtc-cu12`) and 13 both
//! work and a missing library is an error status, never a crash.
//!
//! Options: `--fmad=false` (every fused multiply-add is explicit, as in the CPU backend),
//! `--ptxas-options=-v` (registers and spills per kernel in the log), C++17, no fast math.

use std::ffi::{c_char, c_int, CString};

use super::nvrtc_lib::{self, Nvrtc, Program, SUCCESS};
use super::registry::{Module, COMMON_HEADER};
use crate::error::{bail, Result};

/// Whether NVRTC can be loaded (probed once).
pub fn available() -> bool {
    nvrtc_lib::get().is_some()
}

fn lib() -> Result<&'static Nvrtc> {
    match nvrtc_lib::get() {
        Some(l) => Ok(l),
        None => bail!(
            NoCuda,
            "NVRTC (libnvrtc.so, .so.13 or .so.12) was not found; set LOMO_NVRTC_PATH to the \
             library file or LD_LIBRARY_PATH to its folder"
        ),
    }
}

/// NVRTC's version `(major, minor)`.
pub fn version() -> Result<(i32, i32)> {
    let l = lib()?;
    let (mut major, mut minor): (c_int, c_int) = (0, 0);
    // SAFETY: valid out pointers.
    let r = unsafe { (l.version)(&mut major, &mut minor) };
    if r != SUCCESS {
        bail!(CompileError, "nvrtcVersion failed: {}", l.describe(r));
    }
    Ok((major, minor))
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
    let l = lib()?;
    let src = CString::new(module.source()).expect("sources have no NUL");
    let name = CString::new(module.file_name()).expect("no NUL");
    let header = CString::new(COMMON_HEADER).expect("no NUL");
    let header_name = CString::new("common.cuh").expect("no NUL");
    let headers = [header.as_ptr()];
    let names = [header_name.as_ptr()];
    let mut prog: Program = std::ptr::null_mut();
    // SAFETY: every pointer is a valid NUL-terminated string that outlives the call.
    let r = unsafe {
        (l.create_program)(
            &mut prog,
            src.as_ptr(),
            name.as_ptr(),
            1,
            headers.as_ptr(),
            names.as_ptr(),
        )
    };
    if r != SUCCESS {
        bail!(CompileError, "nvrtcCreateProgram failed: {}", l.describe(r));
    }
    let opts: Vec<CString> = options(arch)
        .into_iter()
        .map(|o| CString::new(o).expect("no NUL"))
        .collect();
    let opt_ptrs: Vec<*const c_char> = opts.iter().map(|o| o.as_ptr()).collect();
    // SAFETY: `prog` was created above; the options are valid C strings for the call.
    let compiled = unsafe { (l.compile_program)(prog, opt_ptrs.len() as c_int, opt_ptrs.as_ptr()) };
    let log = program_log(l, prog);
    let result = if compiled != SUCCESS {
        Err(crate::error::Error::new(
            crate::error::Status::CompileError,
            format!(
                "NVRTC ({}) could not compile {} for {arch}: {}\n{log}",
                l.origin,
                module.file_name(),
                l.describe(compiled)
            ),
        ))
    } else {
        cubin(l, prog).map(|cubin| Compiled { cubin, log })
    };
    // SAFETY: `prog` was created above and is destroyed once.
    unsafe { (l.destroy_program)(&mut prog) };
    result
}

fn program_log(l: &Nvrtc, prog: Program) -> String {
    let mut n = 0usize;
    // SAFETY: `prog` is live; valid out pointer.
    if unsafe { (l.get_program_log_size)(prog, &mut n) } != SUCCESS {
        return String::new();
    }
    let mut buf = vec![0u8; n.max(1)];
    // SAFETY: `buf` holds the `n` bytes NVRTC reported.
    unsafe { (l.get_program_log)(prog, buf.as_mut_ptr().cast()) };
    String::from_utf8_lossy(&buf)
        .trim_end_matches('\0')
        .to_owned()
}

fn cubin(l: &Nvrtc, prog: Program) -> Result<Vec<u8>> {
    let mut n = 0usize;
    // SAFETY: `prog` is live and compiled; valid out pointer.
    let r = unsafe { (l.get_cubin_size)(prog, &mut n) };
    if r != SUCCESS {
        bail!(CompileError, "nvrtcGetCUBINSize failed: {}", l.describe(r));
    }
    if n == 0 {
        bail!(
            CompileError,
            "NVRTC produced no CUBIN (virtual architecture?)"
        );
    }
    let mut buf = vec![0u8; n];
    // SAFETY: `buf` holds the `n` bytes NVRTC reported.
    let r = unsafe { (l.get_cubin)(prog, buf.as_mut_ptr().cast()) };
    if r != SUCCESS {
        bail!(CompileError, "nvrtcGetCUBIN failed: {}", l.describe(r));
    }
    Ok(buf)
}

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
