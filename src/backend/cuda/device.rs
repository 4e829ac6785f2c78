//! CUDA backend: the orchestration of one optimizer's CUDA parameters — device records,
//! workspaces, launch geometry and the passes of each phase — over any [`Launcher`].
//!
//! Everything a step needs lives in device memory allocated here at registration: one
//! `LomoStep` (lr, loss scale, clip coefficient, skip/overflow flags, step counter, the dynamic
//! scaler), one `LomoTensor` per parameter (Σg², flags, AdaLomo scalars, carried Σp²) and each
//! parameter's state and workspace. A phase is a handful of launches on the caller's stream and
//! never waits for the device; only [`DeviceOpt::read_step`] (diagnostics) copies back.
//!
//! Launches per tensor and phase: NORM 1; LOMO UPDATE 1 (2 without a NORM phase: pre-check +
//! update); AdaLomo UPDATE 3 (stats, finalize, apply; 2 for rank ≤ 1 tensors).

use std::ffi::c_void;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::abi::*;
use super::launcher::{Geometry, Launcher};
use super::registry::{pair_name, Kernel, Module};
use crate::config::{Algorithm, Config, Rounding};
use crate::dtype::DType;
use crate::error::{bail, Result};

pub const THREADS: u32 = 256;
/// Elements per thread per grid-stride iteration that justify another block.
const ELEMS_PER_THREAD: u64 = 8;

/// What one submission does on the device.
#[derive(Clone, Copy, Debug)]
pub enum Pass {
    Norm,
    Update {
        /// A NORM phase ran in this step (its flags decide; no pre-check launch).
        prechecked: bool,
        lr_mult: f64,
        weight_decay: f64,
    },
}

/// A CUDA parameter's device buffers (all allocated at registration).
#[derive(Debug)]
pub(super) struct DevParam {
    param_id: u32,
    p: DevPtr,
    dtype: DType,
    pub(super) numel: u64,
    pub(super) rows: u64,
    pub(super) cols: u64,
    pub(super) factored: bool,
    carry: bool,
    partials: DevPtr,
    pub(super) state_a: DevPtr,
    pub(super) state_b: DevPtr,
    ws_a: DevPtr,
    ws_r: DevPtr,
    ws_c: DevPtr,
    col_part: DevPtr,
    stats: Geometry,
    elementwise: Geometry,
    finalize: Geometry,
    /// Bytes of this parameter's optimizer state (`state_a`, `state_b`) and workspaces.
    pub(super) state_bytes: u64,
    pub(super) ws_bytes: u64,
}

/// The device side of one optimizer (all of its parameters on one device).
#[derive(Debug)]
pub struct DeviceOpt {
    pub(super) launcher: Arc<dyn Launcher>,
    cfg: Config,
    pub(super) step: DevPtr,
    pub(super) tensors: DevPtr,
    pub(super) cap: usize,
    pub(super) params: Vec<DevParam>,
    allocs: Vec<DevPtr>,
    /// Bytes allocated so far through `alloc`, and the part of them that is optimizer state.
    allocated: u64,
    allocated_state: u64,
    max_blocks: u32,
    /// The stream of the latest launch: read-backs and re-allocations wait for it.
    last_stream: AtomicUsize,
}

impl Drop for DeviceOpt {
    fn drop(&mut self) {
        for &p in &self.allocs {
            self.launcher.free(p);
        }
        self.launcher.free(self.step);
        self.launcher.free(self.tensors);
    }
}

fn blocks_for(units: u64, per_block: u64, max_blocks: u32) -> u32 {
    units.div_ceil(per_block.max(1)).clamp(1, max_blocks as u64) as u32
}

impl DeviceOpt {
    pub fn new(launcher: Arc<dyn Launcher>, cfg: &Config) -> Result<DeviceOpt> {
        let step = launcher.alloc(std::mem::size_of::<LomoStep>())?;
        let scale = cfg.initial_scale();
        let init = LomoStep {
            inv_scale: (1.0 / scale) as f32,
            coef: 1.0,
            scale,
            cur_hysteresis: cfg.hysteresis.max(1),
            last_overflow_iter: -1,
            info_grad_norm: f32::NAN,
            info_clip_coef: 1.0,
            info_loss_scale: scale as f32,
            info_next_loss_scale: scale as f32,
            scale_f32: scale as f32,
            ..LomoStep::default()
        };
        launcher.copy_from_host(step, as_bytes(&init))?;
        let cap = 16;
        let tensors = launcher.alloc(cap * std::mem::size_of::<LomoTensor>())?;
        launcher.copy_from_host(tensors, &vec![0u8; cap * std::mem::size_of::<LomoTensor>()])?;
        let max_blocks = (launcher.sm_count() * 4).clamp(1, 1024);
        Ok(DeviceOpt {
            launcher,
            cfg: cfg.clone(),
            step,
            tensors,
            cap,
            params: Vec::new(),
            allocs: Vec::new(),
            allocated: 0,
            allocated_state: 0,
            max_blocks,
            last_stream: AtomicUsize::new(0),
        })
    }

    /// The device address of the f32 loss scale for the next backward (in the step record).
    pub fn loss_scale_ptr(&self) -> DevPtr {
        self.step + std::mem::offset_of!(LomoStep, scale_f32) as u64
    }

    /// A workspace: contents unspecified (every kernel writes before it reads).
    fn alloc(&mut self, bytes: usize) -> Result<DevPtr> {
        if bytes == 0 {
            return Ok(0);
        }
        let p = self.launcher.alloc(bytes)?;
        self.allocs.push(p);
        self.allocated += bytes as u64;
        Ok(p)
    }

    /// Optimizer state: starts at zero.
    fn alloc_zeroed(&mut self, bytes: usize) -> Result<DevPtr> {
        let p = self.alloc(bytes)?;
        self.allocated_state += bytes as u64;
        if p != 0 {
            self.launcher.copy_from_host(p, &vec![0u8; bytes])?;
        }
        Ok(p)
    }

    fn tensor_ptr(&self, i: usize) -> DevPtr {
        self.tensors + (i * std::mem::size_of::<LomoTensor>()) as u64
    }

    /// Registers a parameter (between steps): allocates its record, state and workspaces.
    #[allow(clippy::too_many_arguments)]
    pub fn register(
        &mut self,
        param_id: u32,
        p: DevPtr,
        dtype: DType,
        numel: u64,
        rows: u64,
        cols: u64,
        factored: bool,
        carry: bool,
    ) -> Result<usize> {
        if self.params.len() == self.cap {
            self.grow()?;
        }
        let mb = self.max_blocks;
        let (allocated, allocated_state) = (self.allocated, self.allocated_state);
        let elementwise = Geometry {
            grid: blocks_for(numel, THREADS as u64 * ELEMS_PER_THREAD, mb),
            block: THREADS,
            smem: 0,
        };
        let ada = self.cfg.algorithm == Algorithm::Adalomo && numel > 0;
        let (mut stats, mut finalize) = (elementwise, elementwise);
        let (mut state_a, mut state_b, mut ws_a, mut ws_r, mut ws_c, mut col_part) =
            (0, 0, 0, 0, 0, 0);
        if ada && factored {
            let grid = rows.clamp(1, mb as u64) as u32;
            let smem_bytes = 8 * cols;
            let smem = if smem_bytes <= self.launcher.max_smem() as u64 {
                smem_bytes as u32
            } else {
                0
            };
            stats = Geometry {
                grid,
                block: THREADS,
                smem,
            };
            finalize = Geometry {
                grid: blocks_for(rows.max(cols), THREADS as u64, mb),
                block: THREADS,
                smem: 0,
            };
            state_a = self.alloc_zeroed(4 * rows as usize)?;
            state_b = self.alloc_zeroed(4 * cols as usize)?;
            ws_a = self.alloc(4 * rows as usize)?;
            ws_r = self.alloc(4 * rows as usize)?;
            ws_c = self.alloc(4 * cols as usize)?;
            col_part = self.alloc(4 * 2 * cols as usize * grid as usize)?;
        } else if ada {
            state_a = self.alloc_zeroed(4 * numel as usize)?;
            ws_a = self.alloc(4 * numel as usize)?;
        }
        let partials = self.alloc(8 * 2 * mb as usize)?;
        let (rows, cols) = if factored { (rows, cols) } else { (numel, 1) };
        self.params.push(DevParam {
            param_id,
            p,
            dtype,
            numel,
            rows,
            cols,
            factored,
            carry,
            partials,
            state_a,
            state_b,
            ws_a,
            ws_r,
            ws_c,
            col_part,
            stats,
            elementwise,
            finalize,
            state_bytes: self.allocated_state - allocated_state,
            ws_bytes: (self.allocated - allocated) - (self.allocated_state - allocated_state),
        });
        Ok(self.params.len() - 1)
    }

    /// Doubles the tensor-record array, keeping the records (registration only).
    fn grow(&mut self) -> Result<()> {
        let sz = std::mem::size_of::<LomoTensor>();
        let mut old = vec![0u8; self.cap * sz];
        self.launcher.copy_to_host(
            &mut old,
            self.tensors,
            self.last_stream.load(Ordering::Relaxed),
        )?;
        let cap = self.cap * 2;
        let fresh = self.launcher.alloc(cap * sz)?;
        old.resize(cap * sz, 0);
        self.launcher.copy_from_host(fresh, &old)?;
        self.launcher.free(self.tensors);
        self.tensors = fresh;
        self.cap = cap;
        Ok(())
    }

    fn launch<A: Copy>(
        &self,
        module: Module,
        name: &str,
        geo: Geometry,
        args: &A,
        stream: usize,
    ) -> Result<()> {
        // The launch copies the argument struct before returning (cuLaunchKernel semantics).
        let mut a = *args;
        let mut ptrs = [(&mut a as *mut A).cast::<c_void>()];
        self.last_stream.store(stream, Ordering::Relaxed);
        self.launcher
            .launch(&Kernel::new(module, name), geo, &mut ptrs, stream)
    }

    fn step_args(&self, phase: u32, lr: f32) -> StepArgs {
        let c = &self.cfg;
        StepArgs {
            step: self.step,
            tensors: self.tensors,
            n_tensors: self.params.len() as u32,
            phase,
            lr,
            loss_scale_mode: c.loss_scale_mode as u32,
            clip_grad_norm: c.clip_grad_norm,
            decay_rate: if c.algorithm == Algorithm::Adalomo {
                c.decay_rate
            } else {
                0.0
            },
            scale_factor: c.scale_factor,
            min_scale: c.min_loss_scale,
            scale_window: c.scale_window,
            hysteresis: c.hysteresis.max(1),
        }
    }

    /// Starts a phase: clears the per-phase records; UPDATE also sets lr and β on the device,
    /// and without a NORM phase in this step (`after_norm` false) clears the NORM results.
    pub fn begin(&self, update: bool, after_norm: bool, lr: f32, stream: usize) -> Result<()> {
        let phase = match (update, after_norm) {
            (false, _) => 0,
            (true, true) => 1,
            (true, false) => 2,
        };
        let a = self.step_args(phase, lr);
        self.launch(
            Module::Step,
            "step_begin",
            Geometry {
                grid: 1,
                block: THREADS,
                smem: 0,
            },
            &a,
            stream,
        )
    }

    /// Ends a phase: NORM forms the clip coefficient and the skip flag; UPDATE advances the
    /// scaler and the step counter.
    pub fn end(&self, update: bool, stream: usize) -> Result<()> {
        let a = self.step_args(update as u32, 0.0);
        let name = if update {
            "step_update_end"
        } else {
            "step_norm_end"
        };
        self.launch(
            Module::Step,
            name,
            Geometry {
                grid: 1,
                block: 32,
                smem: 0,
            },
            &a,
            stream,
        )
    }

    /// Enqueues the passes of one submission of parameter `idx`'s gradient.
    pub fn submit(
        &self,
        idx: usize,
        g: DevPtr,
        g_dtype: DType,
        pass: Pass,
        stream: usize,
    ) -> Result<()> {
        let Some(dp) = self.params.get(idx) else {
            bail!(UnknownParam, "no CUDA parameter with index {idx}");
        };
        if dp.numel == 0 {
            return Ok(());
        }
        let t = self.tensor_ptr(idx);
        let c = &self.cfg;
        let clip_value = if c.clip_grad_value > 0.0 {
            c.clip_grad_value as f32
        } else {
            f32::INFINITY
        };
        let rounding = (c.rounding == Rounding::Stochastic) as u32;
        let norm = |check_only: u32| NormArgs {
            g,
            n: dp.numel,
            step: self.step,
            t,
            partials: dp.partials,
            check_only,
            pad: 0,
        };
        let norm_name = format!("norm_sumsq_{}", g_dtype.as_str());
        match pass {
            Pass::Norm => self.launch(Module::Norm, &norm_name, dp.elementwise, &norm(0), stream),
            Pass::Update {
                prechecked,
                lr_mult,
                weight_decay,
            } => match c.algorithm {
                Algorithm::Lomo => {
                    if !prechecked {
                        self.launch(Module::Norm, &norm_name, dp.elementwise, &norm(1), stream)?;
                    }
                    let a = LomoArgs {
                        p: dp.p,
                        g,
                        n: dp.numel,
                        step: self.step,
                        t,
                        lr_mult,
                        weight_decay,
                        clip_value,
                        param_id: dp.param_id,
                        seed: c.seed,
                        prechecked: prechecked as u32,
                        rounding,
                    };
                    self.launch(
                        Module::Lomo,
                        &pair_name("lomo_update", dp.dtype, g_dtype),
                        dp.elementwise,
                        &a,
                        stream,
                    )
                }
                Algorithm::Adalomo => {
                    let mut a = AdaArgs {
                        p: dp.p,
                        g,
                        rows: dp.rows,
                        cols: dp.cols,
                        state_a: dp.state_a,
                        state_b: dp.state_b,
                        ws_a: dp.ws_a,
                        ws_r: dp.ws_r,
                        ws_c: dp.ws_c,
                        col_part: dp.col_part,
                        partials: dp.partials,
                        step: self.step,
                        t,
                        lr_mult,
                        weight_decay,
                        eps2: c.eps2,
                        clip_threshold: c.clip_threshold,
                        eps1: c.eps1 as f32,
                        clip_value,
                        seed: c.seed,
                        param_id: dp.param_id,
                        rounding,
                        flags: if dp.carry { ADA_CARRY } else { 0 },
                        stats_blocks: dp.stats.grid,
                    };
                    if dp.factored {
                        if dp.stats.smem > 0 {
                            a.flags |= ADA_SMEM;
                        }
                        self.launch(
                            Module::Adalomo,
                            &pair_name("adalomo_stats", dp.dtype, g_dtype),
                            dp.stats,
                            &a,
                            stream,
                        )?;
                        self.launch(Module::Adalomo, "adalomo_finalize", dp.finalize, &a, stream)?;
                        self.launch(
                            Module::Adalomo,
                            &pair_name("adalomo_apply", dp.dtype, g_dtype),
                            dp.stats_apply(),
                            &a,
                            stream,
                        )
                    } else {
                        self.launch(
                            Module::Adalomo,
                            &pair_name("adalomo_vstats", dp.dtype, g_dtype),
                            dp.elementwise,
                            &a,
                            stream,
                        )?;
                        self.launch(
                            Module::Adalomo,
                            &pair_name("adalomo_vapply", dp.dtype, g_dtype),
                            dp.elementwise,
                            &a,
                            stream,
                        )
                    }
                }
            },
        }
    }

    /// The stream of the latest launch (0 before any).
    pub fn last_stream(&self) -> usize {
        self.last_stream.load(Ordering::Relaxed)
    }

    /// Copies the step record back (synchronizes with `stream`).
    pub fn read_step(&self, stream: usize) -> Result<LomoStep> {
        let mut b = vec![0u8; std::mem::size_of::<LomoStep>()];
        self.launcher.copy_to_host(&mut b, self.step, stream)?;
        Ok(from_bytes(&b))
    }
}

impl DevParam {
    /// Apply uses the stats grid (blocks own whole rows) without dynamic shared memory.
    fn stats_apply(&self) -> Geometry {
        Geometry {
            smem: 0,
            ..self.stats
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_tensors_get_one_block_and_large_ones_fill_the_device() {
        let per = THREADS as u64 * ELEMS_PER_THREAD;
        assert_eq!(blocks_for(1, per, 528), 1);
        assert_eq!(blocks_for(4096, per, 528), 2);
        assert_eq!(blocks_for(0, per, 528), 1);
        assert_eq!(blocks_for(4096 * 11008, per, 528), 528);
    }
}
