//! Core layer: writing a checkpoint (see the module docs of [`crate::state`] for the format).
//!
//! The bytes are deterministic: the same optimizer state always encodes to the same file, so
//! [`encoded_size`] is exact and `lomo_state_serialize` writes what `lomo_state_save` writes.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::io::Write;

use super::{checksum_entry, checksum_tensor, counters, fingerprint, fmt_f64, mode_str};
use super::{rounding_str, state_tensors, Counters};
use super::{Crc32, BYTE_ORDER, BYTE_ORDER_KEY, CHECKSUM_KEY, FORMAT, FORMAT_VERSION};
use crate::backend::cpu::adalomo::AdaState;
use crate::config::Algorithm;
use crate::error::{Error, Result, Status};
use crate::optimizer::Optimizer;

/// One state tensor: a name and f32 values (shape `[values.len()]`), borrowed from a CPU
/// parameter or copied from the device.
struct Tensor<'a> {
    name: String,
    values: Cow<'a, [f32]>,
}

/// Calls `f` with the little-endian bytes of `values`, a bounded chunk at a time.
fn for_le_chunks(values: &[f32], mut f: impl FnMut(&[u8])) {
    let mut buf = [0u8; 16 * 1024];
    for chunk in values.chunks(buf.len() / 4) {
        for (d, v) in buf.chunks_exact_mut(4).zip(chunk) {
            d.copy_from_slice(&v.to_le_bytes());
        }
        f(&buf[..chunk.len() * 4]);
    }
}

fn metadata(opt: &Optimizer, counters: &Counters) -> BTreeMap<&'static str, String> {
    let c = opt.config();
    let s = &counters.scaler;
    let params: Vec<(&str, &[usize])> = opt
        .params()
        .iter()
        .map(|p| (p.name.as_str(), p.shape.as_slice()))
        .collect();
    let params = serde_json::to_string(&params).expect("names and shapes serialize");
    BTreeMap::from([
        ("format", FORMAT.to_owned()),
        ("format_version", FORMAT_VERSION.to_string()),
        (BYTE_ORDER_KEY, BYTE_ORDER.to_owned()),
        ("library_version", env!("CARGO_PKG_VERSION").to_owned()),
        ("algorithm", c.algorithm.as_str().to_owned()),
        ("config.weight_decay", fmt_f64(c.weight_decay)),
        ("config.clip_grad_norm", fmt_f64(c.clip_grad_norm)),
        ("config.clip_grad_value", fmt_f64(c.clip_grad_value)),
        (
            "config.loss_scale_mode",
            mode_str(c.loss_scale_mode).to_owned(),
        ),
        ("config.loss_scale", fmt_f64(c.loss_scale)),
        ("config.scale_factor", fmt_f64(c.scale_factor)),
        ("config.scale_window", c.scale_window.to_string()),
        ("config.min_loss_scale", fmt_f64(c.min_loss_scale)),
        ("config.hysteresis", c.hysteresis.to_string()),
        ("config.eps1", fmt_f64(c.eps1)),
        ("config.eps2", fmt_f64(c.eps2)),
        ("config.clip_threshold", fmt_f64(c.clip_threshold)),
        ("config.decay_rate", fmt_f64(c.decay_rate)),
        ("config.rounding", rounding_str(c.rounding).to_owned()),
        ("config.seed", c.seed.to_string()),
        ("config_fingerprint", fingerprint(c)),
        ("params", params),
        ("steps", counters.steps.to_string()),
        ("skipped_total", counters.skipped_total.to_string()),
        ("scaler.scale", fmt_f64(s.scale)),
        ("scaler.cur_hysteresis", s.cur_hysteresis.to_string()),
        ("scaler.cur_iter", s.cur_iter.to_string()),
        (
            "scaler.last_overflow_iter",
            s.last_overflow_iter.to_string(),
        ),
    ])
}

fn json_str(s: &str) -> String {
    serde_json::to_string(s).expect("strings serialize")
}

/// The byte range of each tensor's data: one after another, in order.
fn offsets(entries: &[(&str, usize)]) -> Vec<(usize, usize)> {
    let mut end = 0usize;
    entries
        .iter()
        .map(|(_, len)| {
            let o = (end, end + 4 * len);
            end = o.1;
            o
        })
        .collect()
}

/// The safetensors header: the metadata, then one F32 entry per (name, element count) in the
/// given order, padded with spaces to a multiple of 8 bytes.
fn header(meta: &BTreeMap<&'static str, String>, entries: &[(&str, usize)]) -> String {
    let mut header = String::from("{\"__metadata__\":{");
    for (i, (k, v)) in meta.iter().enumerate() {
        let sep = if i > 0 { "," } else { "" };
        header += &format!("{sep}{}:{}", json_str(k), json_str(v));
    }
    header.push('}');
    for ((name, len), (a, b)) in entries.iter().zip(offsets(entries)) {
        header += &format!(
            ",{}:{{\"dtype\":\"F32\",\"shape\":[{len}],\"data_offsets\":[{a},{b}]}}",
            json_str(name)
        );
    }
    header.push('}');
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    header
}

/// Writes the checkpoint of `opt` to `out`. Only between steps (else `PhaseError`).
pub fn encode<W: Write>(opt: &Optimizer, out: &mut W) -> Result<()> {
    super::check_checkpointable(opt, "saved")?;
    // Hold every parameter's lock while reading, so the file is one consistent snapshot.
    let guards: Vec<_> = opt.params().iter().map(|p| p.inner.lock()).collect();
    let mut tensors = Vec::new();
    for (id, (p, g)) in opt.params().iter().zip(&guards).enumerate() {
        // The parameter's state buffers: borrowed from the host, or copied from the device.
        let values: Vec<Cow<'_, [f32]>> = match (opt.cuda(), g.ada.as_ref().map(|a| &a.state)) {
            (_, Some(AdaState::Factored { row, col })) => vec![row.into(), col.into()],
            (_, Some(AdaState::Vector { v })) => vec![v.into()],
            (Some(side), None) if opt.algorithm() == Algorithm::Adalomo => {
                let (a, b) = side.read_state(id as u32)?;
                vec![a.into(), b.into()]
            }
            (_, None) => Vec::new(),
        };
        for ((name, _), values) in state_tensors(p).into_iter().zip(values) {
            tensors.push(Tensor { name, values });
        }
    }
    let counters = counters(opt)?;
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    let entries: Vec<(&str, usize)> = tensors
        .iter()
        .map(|t| (t.name.as_str(), t.values.len()))
        .collect();

    let mut meta = metadata(opt, &counters);
    let mut crc = Crc32::new();
    for (k, v) in &meta {
        checksum_entry(&mut crc, k, v);
    }
    for ((name, len), o) in entries.iter().zip(offsets(&entries)) {
        checksum_tensor(&mut crc, name, "F32", &[*len], o);
    }
    for t in &tensors {
        for_le_chunks(&t.values, |b| crc.update(b));
    }
    meta.insert(CHECKSUM_KEY, format!("{:08x}", crc.finish()));
    let header = header(&meta, &entries);

    let io = |e: std::io::Error| Error::new(Status::IoError, format!("writing the state: {e}"));
    out.write_all(&(header.len() as u64).to_le_bytes())
        .map_err(io)?;
    out.write_all(header.as_bytes()).map_err(io)?;
    let mut result = Ok(());
    for t in &tensors {
        for_le_chunks(&t.values, |b| {
            if result.is_ok() {
                result = out.write_all(b);
            }
        });
    }
    result.map_err(io)
}

/// The exact size in bytes of the checkpoint [`encode`] would write now, from the shapes and
/// the counters alone: no state values are read (for CUDA parameters, no state is copied from
/// the device; only the small step record is).
pub fn encoded_size(opt: &Optimizer) -> Result<usize> {
    super::check_checkpointable(opt, "saved")?;
    let mut owned: Vec<(String, usize)> = if opt.algorithm() == Algorithm::Adalomo {
        opt.params().iter().flat_map(state_tensors).collect()
    } else {
        Vec::new()
    };
    owned.sort();
    let entries: Vec<(&str, usize)> = owned.iter().map(|(n, l)| (n.as_str(), *l)).collect();
    let mut meta = metadata(opt, &counters(opt)?);
    // Any checksum has these 8 hex digits' width.
    meta.insert(CHECKSUM_KEY, format!("{:08x}", 0u32));
    let data: usize = entries.iter().map(|(_, len)| 4 * len).sum();
    Ok(8 + header(&meta, &entries).len() + data)
}

/// The checkpoint as a byte vector (allocated fallibly, at its exact size).
pub fn encoded_to_vec(opt: &Optimizer) -> Result<Vec<u8>> {
    let mut v = crate::alloc::with_capacity(encoded_size(opt)?, "the checkpoint")?;
    encode(opt, &mut v)?;
    Ok(v)
}

/// Encodes the checkpoint into `buf`, which must hold at least [`encoded_size`] bytes; returns
/// the number of bytes written. Nothing is written when the call fails (the size is checked and
/// the state gathered before the first byte is written).
pub fn encode_into(opt: &Optimizer, buf: &mut [u8]) -> Result<usize> {
    let n = encoded_size(opt)?;
    if buf.len() < n {
        crate::error::bail!(
            InvalidArgument,
            "buffer of {} bytes is too small: the state needs {n} (lomo_state_size)",
            buf.len()
        );
    }
    let mut w = &mut buf[..n];
    encode(opt, &mut w)?;
    debug_assert!(w.is_empty());
    Ok(n)
}
