//! CUDA backend: [`CudaStep`], the [`Backend`] implementation on a device. Every method
//! enqueues kernels on the context's stream and returns: nothing waits for the device, so a
//! whole step can be captured in a CUDA graph. The step record is a device `LomoStep` that the
//! phase kernels fill — `kernels/step.cu` for an optimizer ([`StepRecord::Optimizer`]),
//! `kernels/xla.cu` for an XLA call whose scalars are device operands ([`StepRecord::Xla`]) —
//! and the passes ([`super::passes::Tensor`]) read; each tensor record is a device `LomoTensor`.
//! Launches per tensor: NORM 1, LOMO 1 (+1 pre-check), AdaLomo 3 (2 for rank ≤ 1; a piece of
//! rows one more; a piece of columns 5: stats, stats and finalize of its second round, the
//! scalars, apply). A distributed phase end adds one launch (`step_gather`) before the
//! all-reduce of the phase record, which the end kernel then reads.

use super::abi::{DevPtr, StepArgs, XlaArgs};
use super::launcher::{Geometry, Launcher};
use super::multi::{self, Item};
use super::passes::{self, Records, Tensor, UpdateOpts, THREADS};
use super::registry::Module;
use crate::backend::interface::{AccumOp, Backend, PhaseBegin, Record, TensorUpdate};
use crate::backend::RawBuf;
use crate::config::Config;
use crate::error::{bail, Result};

/// f64 values of an optimizer's distributed scratch (`StepArgs::rec`, device memory): the phase
/// record `[Σg², non-finite count]` first, then room for a staged host record (the agreement
/// record of `LOMO_DIST_CHECK`, 10 values).
pub const SCRATCH_F64: usize = 16;
/// f64 values of the phase record.
pub const PHASE_RECORD: usize = 2;

/// Where a CUDA step's scalars come from, and the arguments of its phase kernels.
#[derive(Clone, Copy, Debug)]
pub enum StepRecord {
    /// An optimizer's record, advanced by `step_begin` / `step_norm_end` / `step_update_end`
    /// (`phase` and `lr` are set per call).
    Optimizer(StepArgs),
    /// An XLA call's record, prepared from its operands by `xla_prepare` and read back into its
    /// results by `xla_norm_finish` / `xla_update_finish`.
    Xla(XlaArgs),
}

/// The CUDA backend in one call: launcher, configuration, stream and step record.
#[derive(Clone, Copy)]
pub struct CudaStep<'c> {
    pub launcher: &'c dyn Launcher,
    /// Read: value clip, rounding, seed, AdaLomo's eps1, eps2, clip_threshold.
    pub cfg: &'c Config,
    /// The caller's stream (`CUstream`; 0 = the legacy default stream).
    pub stream: usize,
    pub record: StepRecord,
}

/// One tensor on the device: its passes (layout, workspaces, parameter) and records.
#[derive(Clone, Copy, Debug)]
pub struct CudaTensor {
    pub tensor: Tensor,
    pub rec: Records,
}

impl CudaStep<'_> {
    fn opts(&self, u: &TensorUpdate) -> UpdateOpts {
        UpdateOpts::new(
            self.cfg,
            u.param_id,
            u.lr_multiplier,
            u.weight_decay,
            u.carry,
            u.prechecked,
        )
    }

    /// A single-block kernel of the step record (`block` threads).
    fn record_kernel<A: Copy>(&self, module: Module, name: &str, block: u32, a: &A) -> Result<()> {
        let geo = Geometry {
            grid: 1,
            block,
            smem: 0,
        };
        passes::launch(self.launcher, module, name, geo, a, self.stream)
    }
}

fn dev(g: &RawBuf) -> DevPtr {
    g.addr as DevPtr
}

fn item(t: &CudaTensor, g: &RawBuf) -> Item {
    Item {
        tensor: t.tensor,
        rec: t.rec,
        g: dev(g),
        g_dtype: g.dtype,
    }
}

impl Backend for CudaStep<'_> {
    type Tensor<'t> = CudaTensor;

    fn accumulate(&self, acc: &RawBuf, g: Option<&RawBuf>, op: &AccumOp) -> Result<()> {
        super::accum::accumulate(self.launcher, acc, g, op, self.stream)
    }

    fn phase_begin(&self, b: &PhaseBegin) -> Result<()> {
        match self.record {
            StepRecord::Optimizer(args) => {
                let a = StepArgs {
                    phase: match (b.update, b.after_norm) {
                        (false, _) => 0,
                        (true, true) => 1,
                        (true, false) => 2,
                    },
                    lr: b.lr as f32,
                    ..args
                };
                self.record_kernel(Module::Step, "step_begin", THREADS, &a)
            }
            StepRecord::Xla(a) => self.record_kernel(Module::Xla, "xla_prepare", THREADS, &a),
        }
    }

    fn norm(&self, t: &mut CudaTensor, g: &RawBuf) -> Result<()> {
        let l = self.launcher;
        t.tensor.norm(l, t.rec, dev(g), g.dtype, false, self.stream)
    }

    fn check_finite(&self, t: &mut CudaTensor, g: &RawBuf) -> Result<()> {
        let l = self.launcher;
        t.tensor.norm(l, t.rec, dev(g), g.dtype, true, self.stream)
    }

    fn lomo(&self, t: &mut CudaTensor, g: &RawBuf, u: &TensorUpdate) -> Result<()> {
        let o = self.opts(u);
        let l = self.launcher;
        t.tensor.lomo(l, t.rec, dev(g), g.dtype, &o, self.stream)
    }

    fn norm_many(&self, ts: &mut [CudaTensor], gs: &[RawBuf], check_only: bool) -> Result<()> {
        let items: multi::Items = ts.iter().zip(gs).map(|(t, g)| item(t, g)).collect();
        multi::norm_many(self.launcher, &items, check_only, self.stream)
    }

    fn lomo_many(&self, ts: &mut [CudaTensor], gs: &[RawBuf], us: &[TensorUpdate]) -> Result<()> {
        let items: multi::Items = ts.iter().zip(gs).map(|(t, g)| item(t, g)).collect();
        let opts: multi::Opts = us.iter().map(|u| self.opts(u)).collect();
        multi::lomo_many(self.launcher, &items, &opts, self.stream)
    }

    fn ada_stats(&self, t: &mut CudaTensor, g: &RawBuf, u: &TensorUpdate) -> Result<()> {
        let o = self.opts(u);
        let l = self.launcher;
        t.tensor
            .ada_stats(l, t.rec, dev(g), g.dtype, &o, self.stream)
    }

    fn ada_apply(&self, t: &mut CudaTensor, g: &RawBuf, u: &TensorUpdate) -> Result<()> {
        let o = self.opts(u);
        let l = self.launcher;
        t.tensor
            .ada_apply(l, t.rec, dev(g), g.dtype, &o, self.stream)
    }

    /// A piece of columns takes a second round after its first record was reduced
    /// ([`Tensor::ada_cols_second`](super::passes::Tensor)); pieces of rows and whole tensors
    /// are complete after one reduction.
    fn ada_next_round(&self, t: &mut CudaTensor, g: &RawBuf, u: &TensorUpdate) -> Result<bool> {
        let cols = t.tensor.ada_cols();
        match t.tensor.piece.as_mut() {
            Some(p) if cols && p.round == 0 => p.round = 1,
            _ => return Ok(false),
        }
        let o = self.opts(u);
        let l = self.launcher;
        t.tensor
            .ada_cols_second(l, t.rec, dev(g), g.dtype, &o, self.stream)?;
        Ok(true)
    }

    fn partials<'s>(&self, t: &'s mut CudaTensor) -> Option<Record<'s>> {
        let cols = t.tensor.ada_cols();
        t.tensor.piece.map(|p| {
            let (addr, count) = p.reduced(cols);
            Record::Device {
                addr,
                count,
                stream: self.stream,
            }
        })
    }

    fn phase_record(&self, update: bool) -> Result<Option<Record<'_>>> {
        let StepRecord::Optimizer(args) = self.record else {
            bail!(
                Unsupported,
                "an XLA call's step is never distributed (its scalars are its operands)"
            );
        };
        let a = StepArgs {
            phase: update as u32,
            ..args
        };
        self.record_kernel(Module::Step, "step_gather", 32, &a)?;
        Ok(Some(Record::Device {
            addr: args.rec,
            count: PHASE_RECORD,
            stream: self.stream,
        }))
    }

    fn reduce_host(
        &self,
        rec: &mut [f64],
        reduce: &mut dyn FnMut(Record<'_>) -> Result<()>,
    ) -> Result<()> {
        let StepRecord::Optimizer(args) = self.record else {
            bail!(Unsupported, "an XLA call's step is never distributed");
        };
        if rec.len() > SCRATCH_F64 - PHASE_RECORD {
            bail!(
                InvalidArgument,
                "a host record of {} values is too long to stage",
                rec.len()
            );
        }
        // After the phase record, so that a staged record never overwrites it.
        let addr = args.rec + 8 * PHASE_RECORD as u64;
        let bytes: Vec<u8> = rec.iter().flat_map(|v| v.to_ne_bytes()).collect();
        self.launcher.copy_from_host(addr, &bytes)?;
        reduce(Record::Device {
            addr,
            count: rec.len(),
            stream: self.stream,
        })?;
        let mut back = vec![0u8; bytes.len()];
        self.launcher.copy_to_host(&mut back, addr, self.stream)?;
        for (v, b) in rec.iter_mut().zip(back.chunks_exact(8)) {
            *v = f64::from_ne_bytes(b.try_into().expect("8 bytes"));
        }
        Ok(())
    }

    fn phase_end(&self, update: bool, reduced: bool) -> Result<()> {
        match self.record {
            StepRecord::Optimizer(args) => {
                let a = StepArgs {
                    phase: update as u32,
                    lr: 0.0,
                    reduced: reduced as u32,
                    ..args
                };
                let name = if update {
                    "step_update_end"
                } else {
                    "step_norm_end"
                };
                self.record_kernel(Module::Step, name, 32, &a)
            }
            StepRecord::Xla(a) => {
                let name = if update {
                    "xla_update_finish"
                } else {
                    "xla_norm_finish"
                };
                self.record_kernel(Module::Xla, name, 32, &a)
            }
        }
    }
}
