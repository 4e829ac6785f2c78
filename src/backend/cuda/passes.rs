//! CUDA backend: one tensor's passes — launch geometry, workspace sizes, and the launches of the
//! NORM and UPDATE kernels — over any [`Launcher`]. Shared by the optimizer orchestration
//! ([`super::device::DeviceOpt`], buffers allocated at registration) and the XLA handlers
//! (`src/xla/cuda.rs`, XLA's buffers plus pooled workspaces).
//!
//! Launches per tensor and pass: NORM 1; LOMO 1 (2 when no clean NORM phase checked the
//! gradient: a non-finite pre-check, then the update); AdaLomo 3 (stats, finalize, apply; 2 for
//! rank ≤ 1 tensors). Which of them run, and in which order, is the core's decision
//! (`crate::orchestrate`, through [`super::step::CudaStep`]). Every kernel reads its per-step scalars from a device `LomoStep` and
//! writes its per-tensor results into a device `LomoTensor` ([`Records`]).

use std::ffi::c_void;

use super::abi::*;
use super::launcher::{Geometry, Launcher};
use super::registry::{pair_name, Kernel, Module};
use crate::config::{Config, Rounding};
use crate::dtype::DType;
use crate::error::Result;

pub const THREADS: u32 = 256;
/// Elements per thread per grid-stride iteration that justify another block.
const ELEMS_PER_THREAD: u64 = 8;

pub(crate) fn blocks_for(units: u64, per_block: u64, max_blocks: u32) -> u32 {
    units.div_ceil(per_block.max(1)).clamp(1, max_blocks as u64) as u32
}

/// The most blocks one kernel of a pass gets on `launcher`'s device (4 per multiprocessor).
pub fn max_blocks(launcher: &dyn Launcher) -> u32 {
    (launcher.sm_count() * 4).clamp(1, 1024)
}

/// A tensor as the kernels see it: `numel` elements, viewed as `[rows, cols]` when factored
/// (AdaLomo, rank ≥ 2) and as `[numel, 1]` otherwise.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Shape {
    pub numel: u64,
    pub rows: u64,
    pub cols: u64,
    pub factored: bool,
}

impl Shape {
    pub fn vector(numel: u64) -> Shape {
        Shape {
            numel,
            rows: numel,
            cols: 1,
            factored: false,
        }
    }

    /// `[rows, cols]` (factored) or `[numel]`.
    pub fn new(numel: u64, rows: u64, cols: u64, factored: bool) -> Shape {
        if factored {
            Shape {
                numel,
                rows,
                cols,
                factored,
            }
        } else {
            Shape::vector(numel)
        }
    }
}

/// Bytes of each buffer a tensor's passes need (0 = not needed).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Sizes {
    pub partials: usize,
    /// Optimizer state: AdaLomo's row state (factored) or v (vector).
    pub state_a: usize,
    /// Optimizer state: AdaLomo's column state (factored).
    pub state_b: usize,
    pub ws_a: usize,
    pub ws_r: usize,
    pub ws_c: usize,
    pub col_part: usize,
}

impl Sizes {
    /// Bytes of optimizer state.
    pub fn state(&self) -> usize {
        self.state_a + self.state_b
    }
    /// Bytes of workspace.
    pub fn workspace(&self) -> usize {
        self.partials + self.ws_a + self.ws_r + self.ws_c + self.col_part
    }
}

/// The launch geometry of one tensor's passes on one device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub shape: Shape,
    /// AdaLomo (state, statistics) rather than LOMO / NORM only.
    pub ada: bool,
    pub elementwise: Geometry,
    /// AdaLomo factored: the row kernels (blocks own whole rows).
    pub stats: Geometry,
    /// AdaLomo factored: the finalize kernel (tiles of 32 columns; rows over all threads).
    pub finalize: Geometry,
    max_blocks: u32,
}

impl Layout {
    /// `max_blocks` and `max_smem` from the device ([`max_blocks`], `Launcher::max_smem`).
    pub fn new(shape: Shape, ada: bool, max_blocks: u32, max_smem: u32) -> Layout {
        Layout::build(shape, ada && shape.numel > 0, false, max_blocks, max_smem)
    }

    /// The layout of a piece of rows of a tensor held by several ranks: an AdaLomo piece keeps
    /// the (replicated) column state even when it holds no rows, and its finalize grid depends
    /// on the columns alone, so every rank sums Σu² in the same order (bit-identical scalars).
    pub fn piece(shape: Shape, ada: bool, max_blocks: u32, max_smem: u32) -> Layout {
        let keep = shape.numel > 0 || (shape.factored && shape.cols > 0);
        Layout::build(shape, ada && keep, true, max_blocks, max_smem)
    }

    /// The layout of a piece of columns: every row is here, so the passes are the whole
    /// tensor's; an AdaLomo piece keeps the (replicated) row state even when it holds no
    /// columns.
    pub fn cols_piece(shape: Shape, ada: bool, max_blocks: u32, max_smem: u32) -> Layout {
        let keep = shape.numel > 0 || (shape.factored && shape.rows > 0);
        Layout::build(shape, ada && keep, false, max_blocks, max_smem)
    }

    fn build(shape: Shape, ada: bool, piece: bool, max_blocks: u32, max_smem: u32) -> Layout {
        let mb = max_blocks;
        let elementwise = Geometry {
            grid: blocks_for(shape.numel, THREADS as u64 * ELEMS_PER_THREAD, mb),
            block: THREADS,
            smem: 0,
        };
        let (mut stats, mut finalize) = (elementwise, elementwise);
        if ada && shape.factored {
            let smem_bytes = 8 * shape.cols;
            // Half the device's blocks: the stats kernel keeps two blocks per multiprocessor
            // resident (kernels/adalomo.cu), so they run in one wave, and each block's column
            // partials (8·cols bytes, written and read once more) are amortized over more rows.
            stats = Geometry {
                grid: shape.rows.clamp(1, (mb / 2).max(1) as u64) as u32,
                block: THREADS,
                smem: if smem_bytes <= max_smem as u64 {
                    smem_bytes as u32
                } else {
                    0
                },
            };
            // Tiles of 32 columns (one per block) and rows over all threads.
            let rows_blocks = if piece {
                0
            } else {
                shape.rows.div_ceil(THREADS as u64)
            };
            finalize = Geometry {
                grid: shape.cols.div_ceil(32).max(rows_blocks).clamp(1, mb as u64) as u32,
                block: THREADS,
                smem: 0,
            };
        }
        Layout {
            shape,
            ada,
            elementwise,
            stats,
            finalize,
            max_blocks: mb,
        }
    }

    pub fn sizes(&self) -> Sizes {
        let (rows, cols, numel) = (
            self.shape.rows as usize,
            self.shape.cols as usize,
            self.shape.numel as usize,
        );
        let mut s = Sizes {
            partials: 8 * 2 * self.max_blocks as usize,
            ..Sizes::default()
        };
        // Saturating: a size past the address space (shapes from XLA are not bounded by the
        // core's checks) fails as an allocation (OUT_OF_MEMORY) instead of wrapping.
        let f32s = |n: usize| n.saturating_mul(4);
        if self.ada && self.shape.factored {
            s.state_a = f32s(rows);
            s.state_b = f32s(cols);
            s.ws_a = f32s(rows);
            s.ws_r = f32s(rows);
            s.ws_c = f32s(cols);
            s.col_part = f32s(cols)
                .saturating_mul(2)
                .saturating_mul(self.stats.grid as usize);
        } else if self.ada {
            s.state_a = f32s(numel);
            s.ws_a = f32s(numel);
        }
        s
    }

    /// Apply: blocks own whole rows, up to all of the device's blocks (a streaming pass; its
    /// grid need not be the stats grid), without dynamic shared memory.
    pub(super) fn stats_apply(&self) -> Geometry {
        Geometry {
            grid: self.shape.rows.clamp(1, self.max_blocks as u64) as u32,
            block: THREADS,
            smem: 0,
        }
    }
}

/// Device buffers of one tensor's passes (sized by [`Layout::sizes`]; 0 where not needed).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bufs {
    pub partials: DevPtr,
    pub state_a: DevPtr,
    pub state_b: DevPtr,
    pub ws_a: DevPtr,
    pub ws_r: DevPtr,
    pub ws_c: DevPtr,
    pub col_part: DevPtr,
}

/// The device records a pass reads and writes: the step record and this tensor's record.
#[derive(Clone, Copy, Debug)]
pub struct Records {
    pub step: DevPtr,
    pub t: DevPtr,
}

/// The per-tensor options of an UPDATE pass.
#[derive(Clone, Copy, Debug)]
pub struct UpdateOpts {
    pub lr_mult: f64,
    pub weight_decay: f64,
    /// +inf when value clipping is off.
    pub clip_value: f32,
    pub stochastic: bool,
    pub seed: u64,
    pub param_id: u32,
    pub eps1: f32,
    pub eps2: f64,
    pub clip_threshold: f64,
    /// AdaLomo: carry Σp² of the written values to the next step.
    pub carry: bool,
    /// A clean NORM phase checked the gradient (LOMO: no pre-check launch).
    pub prechecked: bool,
}

impl UpdateOpts {
    pub fn new(
        cfg: &Config,
        param_id: u32,
        lr_mult: f64,
        weight_decay: f64,
        carry: bool,
        prechecked: bool,
    ) -> UpdateOpts {
        UpdateOpts {
            lr_mult,
            weight_decay,
            clip_value: if cfg.clip_grad_value > 0.0 {
                cfg.clip_grad_value as f32
            } else {
                f32::INFINITY
            },
            stochastic: cfg.rounding == Rounding::Stochastic,
            seed: cfg.seed,
            param_id,
            eps1: cfg.eps1 as f32,
            eps2: cfg.eps2,
            clip_threshold: cfg.clip_threshold,
            carry,
            prechecked,
        }
    }
}

/// Enqueues kernel `name` of `module` with its argument struct (copied by the launch, as
/// cuLaunchKernel does).
pub fn launch<A: Copy>(
    launcher: &dyn Launcher,
    module: Module,
    name: &str,
    geo: Geometry,
    args: &A,
    stream: usize,
) -> Result<()> {
    let mut a = *args;
    let mut ptrs = [(&mut a as *mut A).cast::<c_void>()];
    launcher.launch(&Kernel::new(module, name), geo, &mut ptrs, stream)
}

/// One tensor's passes: its layout, buffers and parameter.
#[derive(Clone, Copy, Debug)]
pub struct Tensor {
    pub layout: Layout,
    pub bufs: Bufs,
    /// The parameter (0 for a gradient-only NORM pass).
    pub p: DevPtr,
    pub p_dtype: DType,
    /// A piece of rows of a tensor held by several ranks (None: the whole tensor).
    pub piece: Option<Piece>,
}

/// Where a piece of rows lies in its global tensor, and its statistics record (device memory,
/// `len` f64: LOMO 1 — the non-finite count; AdaLomo `2C + 3` factored, 3 for rank ≤ 1 — the
/// layout of `cpu::ada_piece`), all-reduced by the core between the statistics and the update.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    pub rec: DevPtr,
    pub len: usize,
    /// Rows of the global `[R, C]` view (rank ≤ 1: the global element count).
    pub global_rows: u64,
    /// Global index of the piece's first element (a piece of columns: its first column).
    pub elem_offset: u64,
    /// A piece of columns (`LOMO_LAYOUT_COLS`): C of the global `[R, C]` view; 0 otherwise.
    pub cols_of: u64,
    /// A piece of columns' AdaLomo round within the current pass (0: the first; 1: the
    /// second, whose one-value record is reduced next).
    pub round: u8,
}

impl Piece {
    /// The part of the record the core reduces next: a piece of columns' round 1 is
    /// `[b (R) ‖ Σp² ‖ nf]` (all but the last value), round 2 the last value; else all of it.
    pub fn reduced(&self, ada_cols: bool) -> (DevPtr, usize) {
        match (ada_cols, self.round) {
            (true, 0) => (self.rec, self.len - 1),
            (true, _) => (self.rec + 8 * (self.len as u64 - 1), 1),
            _ => (self.rec, self.len),
        }
    }
}

impl Tensor {
    /// An AdaLomo piece of columns (two rounds).
    pub(super) fn ada_cols(&self) -> bool {
        self.layout.ada && self.layout.shape.factored && self.piece.is_some_and(|p| p.cols_of > 0)
    }

    /// Global index of element 0 (stochastic rounding).
    pub(super) fn elem_offset(&self) -> u64 {
        self.piece.map_or(0, |p| p.elem_offset)
    }

    /// Nothing to do: an empty whole tensor (an empty piece still takes part in the reductions
    /// and, AdaLomo, in the column state).
    pub(super) fn idle(&self) -> bool {
        self.layout.shape.numel == 0 && self.piece.is_none()
    }
}

impl Tensor {
    /// NORM: Σ(g·inv_scale)² and the non-finite flag into the tensor record; `check_only`
    /// forms the flag alone.
    pub fn norm(
        &self,
        l: &dyn Launcher,
        rec: Records,
        g: DevPtr,
        g_dtype: DType,
        check_only: bool,
        stream: usize,
    ) -> Result<()> {
        if self.idle() {
            return Ok(());
        }
        let a = NormArgs {
            g,
            n: self.layout.shape.numel,
            step: rec.step,
            t: rec.t,
            partials: self.bufs.partials,
            check_only: check_only as u32,
            pad: 0,
            piece: match self.piece {
                Some(p) if check_only => p.rec,
                _ => 0,
            },
        };
        let name = format!("norm_sumsq_{}", g_dtype.as_str());
        launch(l, Module::Norm, &name, self.layout.elementwise, &a, stream)
    }

    /// LOMO's UPDATE pass (the update kernel; without a clean NORM phase the caller enqueues
    /// the pre-check, [`Tensor::norm`] with `check_only`, before it).
    pub fn lomo(
        &self,
        l: &dyn Launcher,
        rec: Records,
        g: DevPtr,
        g_dtype: DType,
        o: &UpdateOpts,
        stream: usize,
    ) -> Result<()> {
        if self.idle() {
            return Ok(());
        }
        let a = LomoArgs {
            p: self.p,
            g,
            n: self.layout.shape.numel,
            step: rec.step,
            t: rec.t,
            lr_mult: o.lr_mult,
            weight_decay: o.weight_decay,
            clip_value: o.clip_value,
            param_id: o.param_id,
            seed: o.seed,
            prechecked: o.prechecked as u32,
            rounding: o.stochastic as u32,
            piece: self.piece.map_or(0, |p| p.rec),
            elem_offset: self.elem_offset(),
            cols: match self.piece {
                Some(p) if p.cols_of > 0 => self.layout.shape.cols,
                _ => 0,
            },
            row_stride: self.piece.map_or(0, |p| p.cols_of),
        };
        let name = pair_name("lomo_update", self.p_dtype, g_dtype);
        launch(l, Module::Lomo, &name, self.layout.elementwise, &a, stream)
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

    #[test]
    fn factored_layout_keeps_columns_in_shared_memory_when_they_fit() {
        let small = Layout::new(Shape::new(16 * 64, 16, 64, true), true, 16, 48 * 1024);
        assert_eq!((small.stats.grid, small.stats.smem), (8, 8 * 64));
        assert_eq!(small.stats_apply().grid, 16);
        assert_eq!(small.sizes().col_part, 4 * 2 * 64 * 8);
        let long = Layout::new(Shape::new(2 * 8192, 2, 8192, true), true, 16, 48 * 1024);
        assert_eq!((long.stats.grid, long.stats.smem), (2, 0));
        let lomo = Layout::new(Shape::new(12, 3, 4, true), false, 16, 48 * 1024);
        assert_eq!(
            lomo.sizes(),
            Sizes {
                partials: 8 * 2 * 16,
                ..Sizes::default()
            }
        );
        let vector = Layout::new(Shape::vector(31), true, 16, 48 * 1024);
        assert_eq!(
            (vector.sizes().state_a, vector.sizes().ws_a),
            (4 * 31, 4 * 31)
        );
    }
}
