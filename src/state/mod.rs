//! Core layer: optimizer-state checkpoints in the safetensors format.
//!
//! A checkpoint is a complete safetensors file. Its tensors are the AdaLomo second-moment
//! estimates (f32, little-endian), named after the registered parameters: `<name>.row` and
//! `<name>.col` for factored state (rank ≥ 2, shapes `[rows]` and `[cols]` of the
//! `[prod(shape[:-1]), shape[-1]]` view), `<name>.v` for per-element state (rank ≤ 1, shape
//! `[numel]`). LOMO has no tensors. Its `__metadata__` (all values are strings) holds:
//!
//! | key | value |
//! |---|---|
//! | `format`, `format_version` | `lomo.optimizer_state`, `1` |
//! | `byte_order` | `little` (files without it are little-endian; any other value is refused) |
//! | `library_version` | the writing library's version (informational) |
//! | `algorithm` | `lomo` or `adalomo` |
//! | `config.<field>` | every `lomo_config` field of the writer (informational) |
//! | `config_fingerprint` | CRC-32 (hex) of the state-defining fields, see [`fingerprint`] |
//! | `params` | JSON `[[name, [dims...]], ...]` in registration order |
//! | `steps`, `skipped_total` | applied and skipped update steps |
//! | `scaler.scale`, `scaler.cur_hysteresis`, `scaler.cur_iter`, `scaler.last_overflow_iter` | dynamic loss-scaler state |
//! | `checksum` | CRC-32 (hex) over the metadata, the tensor table and the data, see [`encode`] |
//!
//! Loading refuses (status `StateMismatch`) a file whose algorithm, parameter names, parameter
//! shapes, `eps1` or `decay_rate` differ from the optimizer's; everything else (learning rate,
//! weight decay and groups, clipping, `eps2`, `clip_threshold`, loss-scale options, rounding,
//! seed, parameter dtypes, registration order, flags) is taken from the loading optimizer.
//! The dynamic scaler's state is restored only when both the file and the optimizer use dynamic
//! scaling (clamped to the optimizer's `min_loss_scale` and `hysteresis`).

mod crc32;
mod decode;
mod encode;

use std::path::Path;

use crate::backend::cuda::snapshot::DeviceCounters;
use crate::config::{Algorithm, Config, LossScaleMode, Rounding};
use crate::error::{Error, Result, Status};
use crate::optimizer::Optimizer;
use crate::param::Param;
use crate::scaler::LossScaler;

pub use crc32::Crc32;
pub use decode::load_bytes;
pub use encode::{encode, encode_into, encoded_size, encoded_to_vec};

/// `format` metadata value.
pub const FORMAT: &str = "lomo.optimizer_state";
/// `format_version` metadata value written by this library (and the newest it reads).
pub const FORMAT_VERSION: u32 = 1;
/// Metadata key and value of the byte order of every number in the file (safetensors is
/// little-endian). Files without the key (written before it existed) are little-endian; a
/// file naming another byte order is refused.
pub const BYTE_ORDER_KEY: &str = "byte_order";
pub const BYTE_ORDER: &str = "little";

/// Writes the optimizer's state to `path` atomically: into a temporary file in the same
/// directory, flushed to disk, then renamed over `path`.
///
/// The state is encoded straight into the file (no copy of the checkpoint in memory). If
/// anything fails — the encoding, a write (disk full), the flush or the rename — the temporary
/// file is removed and `path` keeps its previous contents.
pub fn save(opt: &Optimizer, path: &Path) -> Result<()> {
    check_checkpointable(opt, "saved")?;
    let tmp = tmp_path(path);
    let io = |what: &str, e: std::io::Error| {
        Error::new(Status::IoError, format!("{what} '{}': {e}", tmp.display()))
    };
    let result = (|| {
        use std::io::Write;
        let f = std::fs::File::create(&tmp).map_err(|e| io("cannot create", e))?;
        let mut w = std::io::BufWriter::with_capacity(1 << 16, Faulty(f));
        encode(opt, &mut w).map_err(|e| {
            Error::new(
                e.status(),
                format!("{} (file '{}')", e.message(), tmp.display()),
            )
        })?;
        w.flush().map_err(|e| io("cannot write", e))?;
        let f = w
            .into_inner()
            .map_err(|e| io("cannot write", e.into_error()))?;
        f.0.sync_all().map_err(|e| io("cannot flush", e))?;
        std::fs::rename(&tmp, path).map_err(|e| {
            Error::new(
                Status::IoError,
                format!(
                    "cannot rename '{}' to '{}': {e}",
                    tmp.display(),
                    path.display()
                ),
            )
        })
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    } else {
        // Best effort: make the rename itself durable.
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
        if let Ok(d) = std::fs::File::open(dir.unwrap_or(Path::new("."))) {
            let _ = d.sync_all();
        }
    }
    result
}

/// Reads a checkpoint written by [`save`] and loads it (see [`load_bytes`]). The file is read
/// into a buffer allocated fallibly (`OutOfMemory` with its size if that fails).
pub fn load(opt: &mut Optimizer, path: &Path) -> Result<()> {
    use std::io::Read;
    let io = |e: std::io::Error| {
        Error::new(
            Status::IoError,
            format!("cannot read '{}': {e}", path.display()),
        )
    };
    check_checkpointable(opt, "loaded")?;
    let mut f = std::fs::File::open(path).map_err(io)?;
    let len = f.metadata().map_err(io)?.len();
    let len = usize::try_from(len).unwrap_or(usize::MAX);
    let mut bytes = crate::alloc::with_capacity::<u8>(len, "reading the checkpoint")?;
    f.read_to_end(&mut bytes).map_err(io)?;
    load_bytes(opt, &bytes)
}

/// The checkpoint file's writer: a `File`, through which the fault-injection tests can make a
/// write fail part-way ([`fail_write_after`]), as a full disk does.
struct Faulty(std::fs::File);

thread_local! {
    static WRITE_BUDGET: std::cell::Cell<Option<u64>> = const { std::cell::Cell::new(None) };
}

/// Test hook: checkpoint files written on this thread fail with "No space left on device"
/// (ENOSPC) once `n` more bytes have been written (None: never). Disarms itself after firing.
#[doc(hidden)]
pub fn fail_write_after(n: Option<u64>) {
    WRITE_BUDGET.with(|b| b.set(n));
}

impl std::io::Write for Faulty {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let allowed = WRITE_BUDGET.with(|b| match b.get() {
            None => Ok(buf.len()),
            Some(0) => {
                b.set(None);
                Err(std::io::Error::from_raw_os_error(libc::ENOSPC))
            }
            Some(n) => {
                let k = (buf.len() as u64).min(n);
                b.set(Some(n - k));
                Ok(k as usize)
            }
        })?;
        self.0.write(&buf[..allowed])
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

fn tmp_path(path: &Path) -> std::path::PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp.{}", std::process::id()));
    path.with_file_name(name)
}

/// The configuration fields that define what stored state means; a checkpoint only loads into an
/// optimizer with the same values. For LOMO only the algorithm.
pub(crate) fn state_defining(cfg: &Config) -> Vec<(&'static str, String)> {
    let mut v = vec![("algorithm", cfg.algorithm.as_str().to_owned())];
    if cfg.algorithm == Algorithm::Adalomo {
        v.push(("eps1", fmt_f64(cfg.eps1)));
        v.push(("decay_rate", fmt_f64(cfg.decay_rate)));
    }
    v
}

/// CRC-32 (8 hex digits) of `name=value;` over `state_defining`.
pub fn fingerprint(cfg: &Config) -> String {
    let mut crc = Crc32::new();
    for (k, v) in state_defining(cfg) {
        crc.update(format!("{k}={v};").as_bytes());
    }
    format!("{:08x}", crc.finish())
}

/// The state tensors of an AdaLomo parameter, in the order of its state buffers: (name, element
/// count) — `<name>.row`, `<name>.col` for factored state, `<name>.v` for a vector.
pub(crate) fn state_tensors(p: &Param) -> Vec<(String, usize)> {
    if p.factored {
        vec![
            (format!("{}.row", p.name), p.rows),
            (format!("{}.col", p.name), p.cols),
        ]
    } else {
        vec![(format!("{}.v", p.name), p.numel())]
    }
}

/// Checkpoints are taken between steps.
pub(crate) fn check_checkpointable(opt: &Optimizer, verb: &str) -> Result<()> {
    if opt.state != crate::optimizer::StepState::Idle {
        crate::error::bail!(
            PhaseError,
            "optimizer state can only be {verb} between steps (after lomo_step_end)"
        );
    }
    if opt.accum_micro > 0 {
        crate::error::bail!(
            PhaseError,
            "optimizer state can only be {verb} between optimizer steps: {} micro-batches of              accumulated gradients are pending (accumulation buffers are not part of a              checkpoint; finish the step or lomo_step_cancel)",
            opt.accum_micro
        );
    }
    Ok(())
}

/// The step counters and the loss scaler of a checkpoint.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Counters {
    pub steps: u64,
    pub skipped_total: u64,
    pub scaler: LossScaler,
}

/// The optimizer's counters: the host's, or for CUDA parameters the device's (synchronizes).
pub(crate) fn counters(opt: &Optimizer) -> Result<Counters> {
    let Some(side) = opt.cuda() else {
        return Ok(Counters {
            steps: opt.steps,
            skipped_total: opt.skipped_total,
            scaler: opt.scaler.clone(),
        });
    };
    let c = side.counters()?;
    let mut scaler = LossScaler::new(opt.config());
    scaler.scale = c.scale;
    scaler.cur_hysteresis = c.cur_hysteresis;
    scaler.cur_iter = c.cur_iter;
    scaler.last_overflow_iter = c.last_overflow_iter;
    Ok(Counters {
        steps: c.steps,
        skipped_total: c.skipped_total,
        scaler,
    })
}

/// Installs restored counters (on the device too, for CUDA parameters).
pub(crate) fn restore_counters(opt: &mut Optimizer, c: Counters) -> Result<()> {
    if let Some(side) = opt.cuda() {
        side.restore_counters(&DeviceCounters {
            steps: c.steps,
            skipped_total: c.skipped_total,
            scale: c.scaler.scale,
            cur_hysteresis: c.scaler.cur_hysteresis,
            cur_iter: c.scaler.cur_iter,
            last_overflow_iter: c.scaler.last_overflow_iter,
        })?;
    }
    opt.restore_counters(c.steps, c.skipped_total, c.scaler);
    Ok(())
}

/// f64 as text that parses back to the same bits.
pub(crate) fn fmt_f64(v: f64) -> String {
    format!("{v:?}")
}

pub(crate) fn mode_str(m: LossScaleMode) -> &'static str {
    match m {
        LossScaleMode::None => "none",
        LossScaleMode::Static => "static",
        LossScaleMode::Dynamic => "dynamic",
    }
}

pub(crate) fn rounding_str(r: Rounding) -> &'static str {
    match r {
        Rounding::Nearest => "nearest",
        Rounding::Stochastic => "stochastic",
    }
}

/// Feeds one metadata entry into the checksum (length-prefixed, so the encoding is unambiguous).
pub(crate) fn checksum_entry(crc: &mut Crc32, key: &str, value: &str) {
    for s in [key, value] {
        crc.update(&(s.len() as u64).to_le_bytes());
        crc.update(s.as_bytes());
    }
}

/// Feeds one tensor-table entry into the checksum.
pub(crate) fn checksum_tensor(
    crc: &mut Crc32,
    name: &str,
    dtype: &str,
    shape: &[usize],
    offsets: (usize, usize),
) {
    checksum_entry(crc, name, dtype);
    crc.update(&(shape.len() as u64).to_le_bytes());
    for &d in shape.iter().chain([offsets.0, offsets.1].iter()) {
        crc.update(&(d as u64).to_le_bytes());
    }
}

/// Metadata key of the checksum (not itself covered by it).
pub(crate) const CHECKSUM_KEY: &str = "checksum";
