//! Fuzz target `state`: checkpoint bytes into `lomo_state_deserialize`. The first byte picks the
//! loading optimizer (AdaLomo or LOMO, CPU or the emulated CUDA device, dynamic loss scaling or
//! not); the rest is the file. Seeds are valid checkpoints of these optimizers
//! (`fuzz/corpus/state/`, written by [`seeds`]).
//!
//! Invariants: no panic; the status is OK, STATE_MISMATCH or OUT_OF_MEMORY; a refused file
//! leaves the state bytes unchanged; an accepted file round-trips (its re-serialized state loads
//! again to the same bytes) and a step after it writes finite values.

use std::ffi::c_void;
use std::ptr::null_mut;

use lomo::ffi::optimizer::*;
use lomo::ffi::state::*;
use lomo::ffi::types::*;
use lomo::Status;

use super::Bytes;

/// The loading optimizers' parameters: (name, shape).
const PARAMS: [(&str, &[i64]); 3] = [("w", &[6, 4]), ("b", &[6]), ("s", &[])];

struct Opt {
    opt: *mut lomo_optimizer,
    ids: Vec<u32>,
    bufs: Vec<Vec<f32>>,
}

impl Drop for Opt {
    fn drop(&mut self) {
        // SAFETY: a live handle, freed once.
        unsafe { lomo_optimizer_free(self.opt) };
    }
}

/// Optimizer `kind`: bit 0 AdaLomo, bit 1 dynamic loss scaling, bit 2 emulated CUDA.
fn optimizer(kind: u8) -> Opt {
    if kind & 4 != 0 {
        super::emulate_cuda();
    }
    // SAFETY: valid pointers throughout; buffers outlive the optimizer (dropped after it).
    unsafe {
        let mut c: lomo_config = std::mem::zeroed();
        assert_eq!(lomo_config_init(&mut c, (kind & 1) as u32), Status::Ok);
        if kind & 2 != 0 {
            c.loss_scale_mode = 2;
        }
        let mut opt = null_mut();
        assert_eq!(lomo_optimizer_new(&c, &mut opt), Status::Ok);
        let mut o = Opt {
            opt,
            ids: vec![],
            bufs: vec![],
        };
        for (i, (name, shape)) in PARAMS.iter().enumerate() {
            let n = shape.iter().product::<i64>() as usize;
            o.bufs
                .push((0..n).map(|j| 0.1 * (i + j) as f32 - 0.3).collect());
            let cname = std::ffi::CString::new(*name).unwrap();
            let desc = lomo_param_desc {
                struct_size: std::mem::size_of::<lomo_param_desc>(),
                name: cname.as_ptr(),
                data: o.bufs[i].as_mut_ptr().cast(),
                dtype: 0,
                ndim: shape.len() as u32,
                shape: shape.as_ptr(),
                device: if kind & 4 != 0 { 0 } else { -1 },
                group: 0,
                flags: 0,
            };
            let mut id = 0;
            assert_eq!(lomo_param_register(opt, &desc, &mut id), Status::Ok);
            o.ids.push(id);
        }
        o
    }
}

impl Opt {
    fn train(&self, steps: usize, scale: f32) {
        for s in 0..steps {
            // SAFETY: live handle; gradients hold each parameter's element count.
            unsafe {
                assert_eq!(lomo_step_begin(self.opt, 1, 1e-2, null_mut()), Status::Ok);
                for (id, b) in self.ids.iter().zip(&self.bufs) {
                    let g: Vec<f32> = (0..b.len())
                        .map(|j| scale * ((j + s) as f32 * 0.37).sin())
                        .collect();
                    let st =
                        lomo_grad_submit(self.opt, *id, g.as_ptr().cast::<c_void>(), 0, null_mut());
                    assert_eq!(st, Status::Ok);
                }
                assert_eq!(lomo_step_end(self.opt, null_mut()), Status::Ok);
            }
        }
    }

    fn state(&self) -> Vec<u8> {
        let mut n = 0;
        // SAFETY: live handle, valid out pointers, `buf` holds `n` bytes.
        unsafe {
            assert_eq!(lomo_state_size(self.opt, &mut n), Status::Ok);
            let mut buf = vec![0u8; n];
            let mut w = 0;
            assert_eq!(
                lomo_state_serialize(self.opt, buf.as_mut_ptr(), n, &mut w),
                Status::Ok
            );
            buf
        }
    }

    fn load(&self, bytes: &[u8]) -> Status {
        // SAFETY: live handle; `bytes` readable for its length.
        unsafe { lomo_state_deserialize(self.opt, bytes.as_ptr(), bytes.len()) }
    }
}

/// Valid seeds: for each optimizer kind, its checkpoint after a few steps (with an overflow
/// for the dynamic scaler), prefixed with the kind byte; plus the checkpoint of one kind
/// offered to the others.
pub fn seeds() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for kind in 0..8u8 {
        let o = optimizer(kind);
        o.train(3, 1.0);
        if kind & 2 != 0 {
            o.train(1, f32::INFINITY);
        }
        let st = o.state();
        for k in [kind, kind ^ 1, kind ^ 4, kind | 8] {
            let mut s = vec![first_byte(k)];
            s.extend_from_slice(&st);
            out.push(s);
        }
    }
    out
}

/// The first input byte that selects optimizer `kind` (bit 3: fix the checksum).
fn first_byte(kind: u8) -> u8 {
    (kind & 3) | (kind & 8) | if kind & 4 != 0 { 0x70 } else { 0 }
}

/// The optimizer kind a first input byte selects: the emulated CUDA device for 1 byte in 8 (it
/// runs ten times slower than the CPU).
fn kind_of(byte: u8) -> u8 {
    (byte & 3) | if byte & 0x70 == 0x70 { 4 } else { 0 }
}

/// `file` with its `checksum` recomputed (README "Checkpoints"), so mutations reach the checks
/// behind the checksum; None if the header is not a JSON object of the expected shape.
fn fix_checksum(file: &[u8]) -> Option<Vec<u8>> {
    use serde_json::{Map, Value};
    let n = u64::from_le_bytes(file.get(..8)?.try_into().ok()?) as usize;
    let header = file.get(8..8usize.checked_add(n)?)?;
    let data = &file[8 + n..];
    let mut h: Map<String, Value> = serde_json::from_slice(header).ok()?;
    let meta = h.get_mut("__metadata__")?.as_object_mut()?;
    meta.remove("checksum");
    let mut crc = lomo::state::Crc32::new();
    let entry = |crc: &mut lomo::state::Crc32, k: &str, v: &str| {
        for s in [k, v] {
            crc.update(&(s.len() as u64).to_le_bytes());
            crc.update(s.as_bytes());
        }
    };
    let mut keys: Vec<&String> = meta.keys().collect();
    keys.sort();
    for k in keys {
        entry(&mut crc, k, meta[k].as_str()?);
    }
    let mut tensors: Vec<(&String, &Value)> =
        h.iter().filter(|(k, _)| *k != "__metadata__").collect();
    tensors.sort_by_key(|(_, t)| t["data_offsets"][0].as_u64().unwrap_or(0));
    for (name, t) in tensors {
        entry(&mut crc, name, t["dtype"].as_str()?);
        let shape = t["shape"].as_array()?;
        crc.update(&(shape.len() as u64).to_le_bytes());
        for d in shape.iter().chain(t["data_offsets"].as_array()?) {
            crc.update(&d.as_u64()?.to_le_bytes());
        }
    }
    crc.update(data);
    let sum = format!("{:08x}", crc.finish());
    h.get_mut("__metadata__")?
        .as_object_mut()?
        .insert("checksum".into(), sum.into());
    let mut json = serde_json::to_string(&h).ok()?;
    while json.len() % 8 != 0 {
        json.push(' ');
    }
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(json.as_bytes());
    out.extend_from_slice(data);
    Some(out)
}

/// Runs one fuzz input.
pub fn run(data: &[u8]) {
    let mut b = Bytes::new(data);
    let byte = b.u8();
    let kind = kind_of(byte);
    let raw = b.rest();
    // Bit 3: recompute the checksum of the mutated file first.
    let fixed = if byte & 8 != 0 {
        fix_checksum(raw)
    } else {
        None
    };
    let file = fixed.as_deref().unwrap_or(raw);
    let o = optimizer(kind);
    o.train(1, 0.5);
    let before = o.state();
    let st = o.load(file) as u32;
    assert!(
        [0, Status::StateMismatch as u32, Status::OutOfMemory as u32].contains(&st),
        "status {st}"
    );
    if st != 0 {
        assert!(o.state() == before, "a refused file changed the state");
        return;
    }
    let after = o.state();
    assert_eq!(
        o.load(&after),
        Status::Ok,
        "the loaded state does not load again"
    );
    assert!(o.state() == after, "loading a state is not idempotent");
    o.train(1, 0.5);
    for b in &o.bufs {
        assert!(
            b.iter().all(|v| v.is_finite()),
            "a step after a load wrote {b:?}"
        );
    }
}
