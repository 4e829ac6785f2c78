//! Core layer: reading a checkpoint and loading it into an optimizer.
//!
//! Everything is parsed and checked before anything is changed: a file that is truncated,
//! corrupted or made for a different optimizer is an error and leaves the optimizer as it was.

use std::collections::{HashMap, HashSet};
use std::str::FromStr;

use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::{Dtype, SafeTensors};

use super::{checksum_entry, checksum_tensor, fingerprint, fmt_f64, mode_str, state_defining};
use super::{restore_counters, state_tensors, Counters};
use super::{Crc32, BYTE_ORDER, BYTE_ORDER_KEY, CHECKSUM_KEY, FORMAT, FORMAT_VERSION};
use crate::backend::cpu::adalomo::AdaState;
use crate::config::{Algorithm, LossScaleMode};
use crate::error::{bail, Error, Result, Status};
use crate::optimizer::Optimizer;
use crate::scaler::LossScaler;

fn corrupt(what: impl std::fmt::Display) -> Error {
    Error::new(
        Status::StateMismatch,
        format!("the checkpoint is truncated or corrupted: {what}"),
    )
}

/// A parsed safetensors file.
struct File<'a> {
    meta: HashMap<String, String>,
    /// Tensors in file order.
    tensors: Vec<(String, TensorInfo)>,
    data: &'a [u8],
}

impl<'a> File<'a> {
    fn parse(bytes: &'a [u8]) -> Result<File<'a>> {
        check_header_byte_order(bytes)?;
        // The parser runs on untrusted input; contain any panic it might raise on absurd offsets.
        let parsed = std::panic::catch_unwind(|| SafeTensors::read_metadata(bytes));
        let (n, metadata): (usize, Metadata) = match parsed {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => return Err(corrupt(format!("not a valid safetensors file ({e:?})"))),
            Err(_) => return Err(corrupt("not a valid safetensors file")),
        };
        let mut tensors: Vec<(String, TensorInfo)> = metadata
            .tensors()
            .into_iter()
            .map(|(k, v)| (k, v.clone()))
            .collect();
        // File order; empty tensors share an offset, and the encoder writes them (as every
        // tensor) in name order, so ties go by name. The map's own order is a hash order,
        // different from run to run: a checksum over it failed at random on such files.
        tensors.sort_by(|(a, ta), (b, tb)| ta.data_offsets.cmp(&tb.data_offsets).then(a.cmp(b)));
        Ok(File {
            meta: metadata.metadata().clone().unwrap_or_default(),
            tensors,
            data: &bytes[8 + n..],
        })
    }

    fn get(&self, key: &str) -> Result<&str> {
        self.meta
            .get(key)
            .map(String::as_str)
            .ok_or_else(|| corrupt(format!("metadata '{key}' is missing")))
    }

    fn num<T: FromStr>(&self, key: &str) -> Result<T> {
        let s = self.get(key)?;
        s.parse()
            .map_err(|_| corrupt(format!("metadata '{key}' = '{s}' is not a number")))
    }

    fn verify_checksum(&self) -> Result<()> {
        let mut keys: Vec<&String> = self.meta.keys().filter(|k| *k != CHECKSUM_KEY).collect();
        keys.sort();
        let mut crc = Crc32::new();
        for k in keys {
            checksum_entry(&mut crc, k, &self.meta[k]);
        }
        for (name, t) in &self.tensors {
            checksum_tensor(
                &mut crc,
                name,
                &format!("{:?}", t.dtype),
                &t.shape,
                t.data_offsets,
            );
        }
        crc.update(self.data);
        let want = self.get(CHECKSUM_KEY)?;
        let got = format!("{:08x}", crc.finish());
        if want != got {
            return Err(corrupt(format!(
                "checksum {got} does not match the recorded {want}"
            )));
        }
        Ok(())
    }
}

/// Safetensors files, lomo's included, are little-endian: the first 8 bytes are the header's
/// length as a little-endian u64. A file whose length only makes sense read big-endian was
/// written with the other byte order; say so instead of "corrupted".
fn check_header_byte_order(bytes: &[u8]) -> Result<()> {
    let Some(head) = bytes.get(..8) else {
        return Ok(());
    };
    let head: [u8; 8] = head.try_into().unwrap_or_default();
    let room = (bytes.len() - 8) as u64;
    let (le, be) = (u64::from_le_bytes(head), u64::from_be_bytes(head));
    if le > room && be > 0 && be <= room && bytes.get(8) == Some(&b'{') {
        bail!(
            StateMismatch,
            "the checkpoint was written with big-endian byte order (its header length reads \
             {be} bytes big-endian, {le} little-endian): lomo checkpoints, like every \
             safetensors file, are little-endian"
        );
    }
    Ok(())
}

/// The largest step counter a checkpoint may hold (2^62: unreachable by training, far from the
/// wrap-around of the counters, which would restart AdaLomo at t = 0 and write NaN).
const MAX_COUNTER: u64 = 1 << 62;

fn mismatch(msg: String) -> Error {
    Error::new(Status::StateMismatch, msg)
}

/// Checks that the file's parameter list names exactly the registered parameters, with the
/// same shapes (matched by name; registration order may differ).
fn check_params(opt: &Optimizer, file: &File<'_>) -> Result<()> {
    let list: Vec<(String, Vec<usize>)> = serde_json::from_str(file.get("params")?)
        .map_err(|e| corrupt(format!("metadata 'params' is not a parameter list ({e})")))?;
    let saved: HashMap<&str, &[usize]> = list
        .iter()
        .map(|(n, s)| (n.as_str(), s.as_slice()))
        .collect();
    if saved.len() != list.len() {
        return Err(corrupt("metadata 'params' names a parameter twice"));
    }
    let mut problems = Vec::new();
    for p in opt.params() {
        match saved.get(p.name.as_str()) {
            None => problems.push(format!(
                "'{}' is registered but not in the checkpoint",
                p.name
            )),
            Some(s) if *s != p.shape.as_slice() => problems.push(format!(
                "'{}' has shape {:?} in the checkpoint but {:?} here",
                p.name, s, p.shape
            )),
            Some(_) => {}
        }
    }
    let registered: HashSet<&str> = opt.params().iter().map(|p| p.name.as_str()).collect();
    for (name, _) in &list {
        if !registered.contains(name.as_str()) {
            problems.push(format!("'{name}' is in the checkpoint but not registered"));
        }
    }
    if !problems.is_empty() {
        let n = problems.len();
        problems.truncate(5);
        let more = if n > 5 {
            format!(" (and {} more)", n - 5)
        } else {
            String::new()
        };
        return Err(mismatch(format!(
            "the checkpoint's parameters do not match the registered ones: {}{more}",
            problems.join("; ")
        )));
    }
    Ok(())
}

/// For every parameter (in id order), the bytes of its state tensors (empty for LOMO).
fn state_slices<'a>(opt: &Optimizer, file: &File<'a>) -> Result<Vec<Vec<&'a [u8]>>> {
    let by_name: HashMap<&str, &TensorInfo> =
        file.tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut used = 0;
    let mut out = Vec::with_capacity(opt.params().len());
    for p in opt.params() {
        let mut slices = Vec::new();
        if opt.algorithm() == Algorithm::Adalomo {
            for (name, len) in state_tensors(p) {
                let Some(t) = by_name.get(name.as_str()) else {
                    return Err(mismatch(format!("the checkpoint has no tensor '{name}'")));
                };
                if t.dtype != Dtype::F32 || t.shape != [len] {
                    return Err(mismatch(format!(
                        "tensor '{name}' is {:?} {:?} in the checkpoint, expected F32 [{len}]",
                        t.dtype, t.shape
                    )));
                }
                let bytes = &file.data[t.data_offsets.0..t.data_offsets.1];
                if let Some(bad) = f32s(bytes).find(|v| !(v.is_finite() && *v >= 0.0)) {
                    return Err(corrupt(format!("tensor '{name}' holds {bad}")));
                }
                slices.push(bytes);
                used += 1;
            }
        }
        out.push(slices);
    }
    if used != file.tensors.len() {
        let expected: HashSet<String> = opt
            .params()
            .iter()
            .filter(|_| opt.algorithm() == Algorithm::Adalomo)
            .flat_map(|p| state_tensors(p).into_iter().map(|(n, _)| n))
            .collect();
        let extra = file
            .tensors
            .iter()
            .map(|(n, _)| n)
            .find(|n| !expected.contains(*n));
        return Err(mismatch(format!(
            "the checkpoint has an unexpected tensor '{}'",
            extra.map_or("?", |s| s.as_str())
        )));
    }
    Ok(out)
}

/// The loss scaler to continue with: the optimizer's options, the file's dynamic state.
fn restored_scaler(opt: &Optimizer, file: &File<'_>) -> Result<LossScaler> {
    let mut s = LossScaler::new(opt.config());
    let file_mode = file.get("config.loss_scale_mode")?;
    let scale: f64 = file.num("scaler.scale")?;
    let cur_hysteresis: u32 = file.num("scaler.cur_hysteresis")?;
    let cur_iter: u64 = file.num("scaler.cur_iter")?;
    let last_overflow_iter: i64 = file.num("scaler.last_overflow_iter")?;
    if !(scale.is_finite() && scale > 0.0)
        || cur_hysteresis == 0
        || cur_iter > MAX_COUNTER
        || last_overflow_iter < -1
        || last_overflow_iter >= cur_iter as i64 && last_overflow_iter != -1
    {
        return Err(corrupt("the loss-scaler state is inconsistent"));
    }
    if s.mode == LossScaleMode::Dynamic && file_mode == mode_str(LossScaleMode::Dynamic) {
        s.scale = scale.max(s.min_scale);
        s.cur_hysteresis = cur_hysteresis.min(s.hysteresis);
        s.cur_iter = cur_iter;
        s.last_overflow_iter = last_overflow_iter;
    }
    Ok(s)
}

/// Loads a checkpoint (the bytes of a complete file) into `opt`, between steps only.
///
/// Errors: `PhaseError` during a step; `StateMismatch` for a truncated, corrupted or foreign
/// file, or one written for a different algorithm, parameter set, shapes, `eps1` or
/// `decay_rate`. On any error `opt` is unchanged.
pub fn load_bytes(opt: &mut Optimizer, bytes: &[u8]) -> Result<()> {
    load_checked(opt, bytes, true)
}

/// [`load_bytes`]; `rollback`: on a failed device write, restore the previous state.
fn load_checked(opt: &mut Optimizer, bytes: &[u8], rollback: bool) -> Result<()> {
    super::check_checkpointable(opt, "loaded")?;
    let file = File::parse(bytes)?;
    match file.meta.get("format") {
        Some(f) if f == FORMAT => {}
        _ => bail!(
            StateMismatch,
            "not a lomo optimizer-state checkpoint (no '{FORMAT}' format in its metadata)"
        ),
    }
    match file.meta.get(BYTE_ORDER_KEY).map(String::as_str) {
        None | Some(BYTE_ORDER) => {}
        Some(other) => bail!(
            StateMismatch,
            "the checkpoint was written with byte order '{other}': this library reads \
             '{BYTE_ORDER}' (safetensors files are little-endian)"
        ),
    }
    let version: u32 = file.num("format_version")?;
    if version != FORMAT_VERSION {
        bail!(
            StateMismatch,
            "checkpoint format version {version} is not supported (this library reads version \
             {FORMAT_VERSION})"
        );
    }
    file.verify_checksum()?;
    for (key, ours) in state_defining(opt.config()) {
        let meta_key = if key == "algorithm" {
            key.to_owned()
        } else {
            format!("config.{key}")
        };
        let theirs = file.get(&meta_key)?;
        let same = match key {
            "algorithm" => theirs == ours,
            _ => theirs.parse::<f64>().map(fmt_f64).ok().as_deref() == Some(ours.as_str()),
        };
        if !same {
            bail!(
                StateMismatch,
                "the checkpoint was written with {key} = {theirs}, this optimizer has {ours} \
                 (the algorithm, eps1 and decay_rate must match to load optimizer state)"
            );
        }
    }
    if file.get("config_fingerprint")? != fingerprint(opt.config()) {
        return Err(corrupt(
            "the configuration fingerprint does not match its fields",
        ));
    }
    check_params(opt, &file)?;
    let slices = state_slices(opt, &file)?;
    let steps: u64 = file.num("steps")?;
    let skipped_total: u64 = file.num("skipped_total")?;
    if steps > MAX_COUNTER || skipped_total > MAX_COUNTER {
        return Err(corrupt(format!(
            "the step counters ({steps} applied, {skipped_total} skipped) are out of range \
             (at most {MAX_COUNTER})"
        )));
    }
    let scaler = restored_scaler(opt, &file)?;

    let counters = Counters {
        steps,
        skipped_total,
        scaler,
    };
    if opt.is_cuda() {
        return commit_cuda(opt, &slices, counters, rollback);
    }

    // Everything is checked: commit (cannot fail).
    for (p, slices) in opt.params.iter_mut().zip(slices) {
        let Some(ada) = p.inner.get_mut().ada.as_mut() else {
            continue;
        };
        let dsts: Vec<&mut Vec<f32>> = match &mut ada.state {
            AdaState::Factored { row, col } => vec![row, col],
            AdaState::Vector { v } => vec![v],
        };
        for (dst, src) in dsts.into_iter().zip(slices) {
            for (d, v) in dst.iter_mut().zip(f32s(src)) {
                *d = v;
            }
        }
        // The carried Σp² described the values before the load; recompute it next step.
        ada.carried_psq = None;
    }
    restore_counters(opt, counters)
}

/// The little-endian f32 values of `bytes` in a fallibly allocated vector.
fn f32_vec(bytes: &[u8]) -> Result<Vec<f32>> {
    let mut v = crate::alloc::with_capacity(bytes.len() / 4, "the checkpoint's state on the host")?;
    v.extend(f32s(bytes));
    Ok(v)
}

fn f32s(bytes: &[u8]) -> impl Iterator<Item = f32> + '_ {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// Commits checked state to a CUDA optimizer through host → device copies. A copy can fail (a
/// device error); then the state taken before the first write is put back, so a failed load
/// leaves the optimizer as it was whenever the device still accepts copies.
fn commit_cuda(
    opt: &mut Optimizer,
    slices: &[Vec<&[u8]>],
    counters: Counters,
    rollback: bool,
) -> Result<()> {
    let backup = if rollback {
        Some(super::encoded_to_vec(opt)?)
    } else {
        None
    };
    let result = write_cuda(opt, slices, counters);
    if let (Err(_), Some(backup)) = (&result, backup) {
        let _ = load_checked(opt, &backup, false);
    }
    result
}

fn write_cuda(opt: &mut Optimizer, slices: &[Vec<&[u8]>], counters: Counters) -> Result<()> {
    if let Some(side) = opt.cuda() {
        // Every host buffer first, so that running out of memory changes nothing on the device.
        let mut host = crate::alloc::with_capacity(slices.len(), "the checkpoint's state")?;
        for s in slices {
            let a = s.first().map_or(Ok(Vec::new()), |a| f32_vec(a))?;
            let b = s.get(1).map_or(Ok(Vec::new()), |b| f32_vec(b))?;
            host.push((!s.is_empty()).then_some((a, b)));
        }
        for (id, h) in host.iter().enumerate() {
            if let Some((a, b)) = h {
                side.write_state(id as u32, a, b)?;
            }
        }
    }
    restore_counters(opt, counters)
}
