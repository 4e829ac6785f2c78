//! The fuzz harnesses, shared by the libFuzzer targets (`fuzz/fuzz_targets/`, nightly,
//! `cargo fuzz`) and the stable regression test (`tests/fuzz_regressions.rs`, which replays the
//! committed seeds and every crasher ever found). Each `run(data)` decodes the fuzzer's bytes
//! into calls on the library and panics when an invariant of docs/RELIABILITY.md breaks.
#![allow(dead_code)]

pub mod capi;
pub mod state;
pub mod xla;

/// The fuzzer's bytes as a stream of choices; reads past the end give zeros.
pub struct Bytes<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Bytes<'a> {
    pub fn new(data: &'a [u8]) -> Bytes<'a> {
        Bytes { data, at: 0 }
    }
    pub fn is_empty(&self) -> bool {
        self.at >= self.data.len()
    }
    pub fn u8(&mut self) -> u8 {
        let v = self.data.get(self.at).copied().unwrap_or(0);
        self.at += 1;
        v
    }
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    pub fn u64(&mut self) -> u64 {
        (self.u32() as u64) | ((self.u32() as u64) << 32)
    }
    /// One of `table`.
    pub fn pick<T: Copy>(&mut self, table: &[T]) -> T {
        table[self.u8() as usize % table.len()]
    }
    /// True with probability 1/n.
    pub fn one_in(&mut self, n: u8) -> bool {
        self.u8() % n == 0
    }
    /// The rest of the bytes.
    pub fn rest(&mut self) -> &'a [u8] {
        let r = self.data.get(self.at..).unwrap_or(&[]);
        self.at = self.data.len();
        r
    }
}

/// Small deterministic generator for buffer contents (xorshift64*).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn pick<T: Copy>(&mut self, table: &[T]) -> T {
        table[(self.next() >> 33) as usize % table.len()]
    }
}

/// Host memory standing in for a caller's buffer: 8-byte aligned, `bytes` long.
#[derive(Clone, Debug, PartialEq)]
pub struct Mem(pub Vec<u64>);

impl Mem {
    pub fn new(bytes: usize) -> Mem {
        Mem(vec![0; bytes.div_ceil(8).max(1)])
    }
    pub fn ptr(&mut self) -> *mut u8 {
        self.0.as_mut_ptr().cast()
    }
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: a Vec<u64>'s storage viewed as bytes.
        unsafe { std::slice::from_raw_parts(self.0.as_ptr().cast(), self.0.len() * 8) }
    }
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above; u8 has no invalid values.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr().cast(), self.0.len() * 8) }
    }
}

/// Element `i` of a buffer of `dtype` (0 f32, 1 f16, 2 bf16) as f32.
pub fn get(m: &Mem, dtype: u32, i: usize) -> f32 {
    let b = m.bytes();
    match dtype {
        0 => f32::from_le_bytes(b[4 * i..4 * i + 4].try_into().unwrap()),
        1 => half::f16::from_le_bytes([b[2 * i], b[2 * i + 1]]).to_f32(),
        _ => half::bf16::from_le_bytes([b[2 * i], b[2 * i + 1]]).to_f32(),
    }
}

/// Sets element `i` (rounded to nearest for the 16-bit types).
pub fn set(m: &mut Mem, dtype: u32, i: usize, v: f32) {
    let b = m.bytes_mut();
    match dtype {
        0 => b[4 * i..4 * i + 4].copy_from_slice(&v.to_le_bytes()),
        1 => b[2 * i..2 * i + 2].copy_from_slice(&half::f16::from_f32(v).to_le_bytes()),
        _ => b[2 * i..2 * i + 2].copy_from_slice(&half::bf16::from_f32(v).to_le_bytes()),
    }
}

/// Bytes of one element of a valid dtype (4 for anything else, for sizing buffers).
pub fn elem(dtype: u32) -> usize {
    match dtype {
        1 | 2 => 2,
        _ => 4,
    }
}

/// Selects the emulated CUDA device for this process (CUDA parameters, host memory).
pub fn emulate_cuda() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| std::env::set_var("LOMO_CUDA_EMULATE", "1"));
}
