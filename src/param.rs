//! Core layer: the parameter registry entry — a caller-owned buffer, its shape, group and the
//! per-parameter optimizer state.

use parking_lot::Mutex;

use crate::backend::cpu::adalomo::{AdaState, AdaWorkspace};
use crate::backend::RawBuf;
use crate::config::Algorithm;
use crate::dtype::DType;
use crate::error::{bail, Error, Result};

/// Where a buffer lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda(i32),
}

impl Device {
    /// `-1` is the CPU, `n >= 0` is CUDA device `n`.
    pub fn from_raw(v: i32) -> Result<Device> {
        match v {
            -1 => Ok(Device::Cpu),
            n if n >= 0 => Ok(Device::Cuda(n)),
            n => bail!(
                InvalidArgument,
                "device {n} is not valid (use -1 for the CPU or a CUDA ordinal)"
            ),
        }
    }
    pub fn raw(self) -> i32 {
        match self {
            Device::Cpu => -1,
            Device::Cuda(n) => n,
        }
    }
}

/// Per-parameter option: carry Σp² of the values written by the previous AdaLomo step instead of
/// re-reading the parameter (saves one read of p per step). Valid only while nothing else writes
/// the parameter; it is recomputed on the first step and after a state load. The C API's
/// `LOMO_PARAM_CARRY_RMS` is defined from it (`src/ffi/types.rs`).
pub(crate) const PARAM_FLAG_CARRY_RMS: u32 = 1;
/// Every flag a parameter may carry.
pub(crate) const PARAM_FLAGS_ALL: u32 = PARAM_FLAG_CARRY_RMS;

/// What a caller registers (already converted from C, not yet validated).
#[derive(Clone, Debug)]
pub struct ParamDesc<'a> {
    pub name: &'a str,
    pub addr: usize,
    pub dtype: DType,
    pub shape: &'a [i64],
    pub device: Device,
    pub group: u32,
    pub flags: u32,
}

/// AdaLomo state of one parameter plus its scratch memory.
#[derive(Debug)]
pub struct AdaParam {
    pub state: AdaState,
    pub ws: AdaWorkspace,
    /// Σp² of the values written by the last apply (with `PARAM_FLAG_CARRY_RMS`).
    pub carried_psq: Option<f64>,
}

/// Mutable per-parameter data, locked by the submitting thread.
#[derive(Debug)]
pub struct ParamInner {
    /// Phase epoch of the last submission (duplicate detection).
    pub epoch: u64,
    /// NORM phase: Σ(g/S)² of the last submission.
    pub sum_sq: f64,
    /// Whether the last submitted gradient was finite.
    pub finite: bool,
    /// AdaLomo state of a CPU parameter (None for LOMO and for CUDA parameters).
    pub ada: Option<AdaParam>,
    /// A piece's partial statistics, all-reduced over its group (sized by
    /// `lomo_param_set_shard`, so steps allocate nothing; empty for a whole tensor).
    pub dist_rec: Vec<f64>,
    /// AdaLomo on a non-contiguous layout (`lomo_param_set_strides`): its logical-order scratch.
    pub strided: Option<crate::strided::Strided>,
    /// Gradient accumulation buffer (`lomo_accum_enable`), when accumulation is on.
    pub accum: Option<crate::optimizer::AccumBuf>,
}

/// One registered parameter.
#[derive(Debug)]
pub struct Param {
    pub name: String,
    pub buf: RawBuf,
    pub shape: Vec<usize>,
    pub device: Device,
    pub group: u32,
    pub flags: u32,
    /// `[rows, cols]` of the AdaLomo view: `[prod(shape[:-1]), shape[-1]]`, or `[numel, 1]`.
    pub rows: usize,
    pub cols: usize,
    pub factored: bool,
    /// Where this buffer lies in a tensor held by several ranks (`lomo_param_set_shard`).
    pub shard: Option<crate::dist::Shard>,
    pub inner: Mutex<ParamInner>,
}

impl Param {
    /// Validates a description and allocates the parameter's state and workspace.
    pub fn new(desc: &ParamDesc<'_>, algorithm: Algorithm) -> Result<Param> {
        if desc.name.is_empty() {
            bail!(InvalidArgument, "parameter name must not be empty");
        }
        if desc.shape.len() > 32 {
            bail!(
                InvalidArgument,
                "parameter '{}': rank {} exceeds 32",
                desc.name,
                desc.shape.len()
            );
        }
        if desc.flags & !PARAM_FLAGS_ALL != 0 {
            bail!(
                InvalidArgument,
                "parameter '{}': unknown flags {:#x}",
                desc.name,
                desc.flags
            );
        }
        let mut shape = Vec::with_capacity(desc.shape.len()); // rank <= 32
        for (i, &d) in desc.shape.iter().enumerate() {
            if d < 0 {
                bail!(
                    InvalidArgument,
                    "parameter '{}': shape[{i}] = {d} is negative",
                    desc.name
                );
            }
            shape.push(d as usize);
        }
        // The element count, and its bytes at 4 per element, must fit in 64 bits (a zero
        // dimension makes the product 0 whatever the others are).
        let numel = if shape.contains(&0) {
            0
        } else {
            match shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d)) {
                Some(n) if n.checked_mul(4).is_some() => n,
                _ => bail!(
                    InvalidArgument,
                    "parameter '{}': the element count of shape {:?} overflows 64-bit sizes",
                    desc.name,
                    desc.shape
                ),
            }
        };
        if numel > 0 && desc.addr == 0 {
            bail!(
                NullArgument,
                "parameter '{}': data is NULL but the shape has {numel} elements",
                desc.name
            );
        }
        if desc.addr % desc.dtype.size() != 0 {
            bail!(
                InvalidArgument,
                "parameter '{}': data address {:#x} is not aligned to {} bytes",
                desc.name,
                desc.addr,
                desc.dtype.size()
            );
        }
        let factored = shape.len() >= 2;
        let (rows, cols) = if factored {
            let cols = *shape.last().unwrap_or(&1);
            (numel.checked_div(cols).unwrap_or(0), cols)
        } else {
            (numel, 1)
        };
        // CUDA parameters keep their state and workspaces on the device (backend::cuda).
        let ada = if algorithm == Algorithm::Adalomo && desc.device == Device::Cpu {
            let in_param = |e: Error| {
                Error::new(
                    e.status(),
                    format!("parameter '{}': {}", desc.name, e.message()),
                )
            };
            Some(AdaParam {
                state: AdaState::zeros(rows, cols, factored).map_err(in_param)?,
                ws: AdaWorkspace::new(rows, cols, factored).map_err(in_param)?,
                carried_psq: None,
            })
        } else {
            None
        };
        let mut name = String::new();
        name.try_reserve_exact(desc.name.len()).map_err(|_| {
            crate::alloc::out_of_memory(desc.name.len() as u128, "a parameter name")
        })?;
        name.push_str(desc.name);
        Ok(Param {
            name,
            buf: RawBuf {
                addr: desc.addr,
                dtype: desc.dtype,
                numel,
            },
            shape,
            device: desc.device,
            group: desc.group,
            flags: desc.flags,
            rows,
            cols,
            factored,
            shard: None,
            inner: Mutex::new(ParamInner {
                epoch: 0,
                sum_sq: 0.0,
                finite: true,
                ada,
                dist_rec: Vec::new(),
                strided: None,
                accum: None,
            }),
        })
    }

    pub fn numel(&self) -> usize {
        self.buf.numel
    }

    /// Checks a gradient's element count, as the caller states it, against this parameter's
    /// (`lomo_grad_submit_checked`): a buffer of another extent is refused before it is read.
    pub fn check_grad_count(&self, count: u64) -> Result<()> {
        if count != self.grad_numel() as u64 {
            bail!(
                InvalidArgument,
                "gradient for '{}' has {count} elements, but {} are expected (shape {:?}{})",
                self.name,
                self.grad_numel(),
                self.shape,
                if self.grad_numel() != self.numel() {
                    "; LOMO_GRAD_REDUCE_SCATTER takes the gradient of the whole tensor"
                } else {
                    ""
                }
            );
        }
        Ok(())
    }

    /// Elements of the gradient `lomo_grad_submit` takes: the whole tensor's with
    /// `LOMO_GRAD_REDUCE_SCATTER`, else the parameter's.
    pub fn grad_numel(&self) -> usize {
        match self.shard {
            Some(s) if s.grad_mode == crate::dist::GradMode::ReduceScatter => s.global_numel,
            _ => self.numel(),
        }
    }

    /// A gradient buffer for this parameter at `addr` with `dtype`.
    pub fn grad_buf(&self, addr: usize, dtype: DType) -> Result<RawBuf> {
        if addr == 0 && self.grad_numel() > 0 {
            bail!(NullArgument, "gradient for '{}' is NULL", self.name);
        }
        if addr % dtype.size() != 0 {
            bail!(
                InvalidArgument,
                "gradient for '{}' at {addr:#x} is not aligned to {} bytes",
                self.name,
                dtype.size()
            );
        }
        Ok(RawBuf {
            addr,
            dtype,
            numel: self.grad_numel(),
        })
    }
}
