//! Core layer: the one element-type enum shared by the C API, the backends and the bindings.

use crate::error::{Error, Result};

/// Element type of a parameter or gradient buffer. Math is always done in f32.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32 = 0,
    F16 = 1,
    Bf16 = 2,
}

impl DType {
    /// Every element type, in numeric order.
    pub fn all() -> [DType; 3] {
        [DType::F32, DType::F16, DType::Bf16]
    }

    /// Size of one element in bytes.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::Bf16 => 2,
        }
    }

    /// The suffix used everywhere for this type: kernel symbols, Python maps, test ids.
    pub fn as_str(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::Bf16 => "bf16",
        }
    }

    /// Parses the suffix form (`"f32"`, `"f16"`, `"bf16"`).
    pub fn parse(s: &str) -> Option<DType> {
        DType::all().into_iter().find(|d| d.as_str() == s)
    }
}

impl TryFrom<u32> for DType {
    type Error = Error;
    fn try_from(v: u32) -> Result<DType> {
        DType::all().get(v as usize).copied().ok_or_else(|| {
            Error::invalid(format!("unknown dtype {v} (expected 0=f32, 1=f16, 2=bf16)"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        for d in DType::all() {
            assert_eq!(DType::try_from(d as u32).unwrap(), d);
            assert_eq!(DType::parse(d.as_str()), Some(d));
        }
        assert!(DType::try_from(3).is_err());
    }
}
