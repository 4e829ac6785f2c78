//! Core layer: the optimizer's distributed setup — communicators (`lomo_comm_add`), the group
//! that agrees on the step's scalars (`lomo_dist_set`) and pieces of tensors
//! (`lomo_param_set_shard`). All of it between steps; the step itself is `step.rs` over
//! `crate::orchestrate`.

use super::{Optimizer, StepState};
use crate::backend::cpu::adalomo::{AdaState, AdaWorkspace};
use crate::backend::cpu::{ada_cols, ada_flat, ada_piece};
use crate::backend::cuda::piece::PieceSpec;
use crate::config::Algorithm;
use crate::dist::{Comm, GradMode, Layout, Shard, DIST_CHECK, SHARD_NORM_DUPLICATE};
use crate::error::{bail, Result};
use crate::param::Device;

/// A piece description as the C API hands it over (`lomo_shard_desc`), not yet checked.
#[derive(Clone, Copy, Debug)]
pub struct ShardDesc<'a> {
    pub layout: u32,
    pub global_shape: &'a [i64],
    /// ROWS: first row of the `[R, C]` view (rank ≤ 1: first element); COLS: first column;
    /// FLAT: first element; FULL: 0.
    pub offset: i64,
    pub piece_comm: Option<u32>,
    pub grad_mode: u32,
    pub grad_comm: Option<u32>,
    pub flags: u32,
}

impl Optimizer {
    fn between_steps(&self, what: &str) -> Result<()> {
        if self.state != StepState::Idle || self.accum_micro > 0 {
            bail!(
                PhaseError,
                "{what} is only possible between steps (and not while accumulated gradients are \
                 pending)"
            );
        }
        Ok(())
    }

    /// Whether a communicator may be added now (between steps, below the id limit).
    pub fn comm_add_check(&self) -> Result<()> {
        self.between_steps("adding a communicator")?;
        if self.dist.comms.len() >= u32::MAX as usize - 1 {
            bail!(InvalidArgument, "too many communicators");
        }
        Ok(())
    }

    /// Adds a communicator (after [`Optimizer::comm_add_check`]); returns its id (dense, from 0).
    pub fn comm_add(&mut self, comm: Comm) -> u32 {
        self.dist.comms.push(comm);
        self.dist.comms.len() as u32 - 1
    }

    /// Sets the group over which the step's scalars are agreed (None: this rank alone) and the
    /// `DIST_CHECK` flag.
    pub fn dist_set(&mut self, norm_comm: Option<u32>, flags: u32) -> Result<()> {
        self.between_steps("lomo_dist_set")?;
        if flags & !DIST_CHECK != 0 {
            bail!(InvalidArgument, "lomo_dist_set: unknown flags {flags:#x}");
        }
        if let Some(c) = norm_comm {
            self.dist.comm(c, "lomo_dist_set")?;
        }
        self.dist.norm_comm = norm_comm;
        self.dist.check = flags & DIST_CHECK != 0;
        self.dist.fingerprint = fingerprint(&format!("{:?}", self.config));
        Ok(())
    }

    /// Declares parameter `id` a piece of a global tensor (between steps). Checks the piece
    /// against the registration, the gradient mode against the layout and the communicators,
    /// and sizes its statistics record and the gradient scratch; nothing changes on failure.
    pub fn param_set_shard(&mut self, id: u32, d: &ShardDesc<'_>) -> Result<()> {
        self.between_steps("lomo_param_set_shard")?;
        let comms = self.dist.comms.len();
        let Some(param) = self.params.get(id as usize) else {
            bail!(UnknownParam, "no parameter with id {id}");
        };
        let name = param.name.clone();
        if param.inner.lock().strided.is_some() {
            bail!(
                Unsupported,
                "'{name}': AdaLomo pieces must be contiguous (lomo_param_set_strides set a layout)"
            );
        }
        let cuda = param.device != Device::Cpu;
        let layout = match d.layout {
            0 => Layout::Full,
            1 => Layout::Rows,
            2 => Layout::Cols,
            3 if cuda
                && self.config.algorithm == Algorithm::Adalomo
                && d.global_shape.len() >= 2 =>
            {
                bail!(
                    Unsupported,
                    "'{name}': AdaLomo on LOMO_LAYOUT_FLAT pieces of rank ≥ 2 tensors is \
                     supported on the CPU backend only so far (CUDA parameters: \
                     LOMO_LAYOUT_FULL, LOMO_LAYOUT_ROWS or LOMO_LAYOUT_COLS; flat pieces of \
                     rank ≤ 1 tensors, and LOMO on any)"
                )
            }
            3 => Layout::Flat,
            v => bail!(InvalidArgument, "'{name}': unknown layout {v}"),
        };
        let grad_mode = match d.grad_mode {
            0 => GradMode::Reduced,
            1 => GradMode::AllReduce,
            2 => GradMode::ReduceScatter,
            v => bail!(InvalidArgument, "'{name}': unknown gradient mode {v}"),
        };
        if d.flags & !SHARD_NORM_DUPLICATE != 0 {
            bail!(
                InvalidArgument,
                "'{name}': unknown shard flags {:#x}",
                d.flags
            );
        }
        for c in [d.piece_comm, d.grad_comm].into_iter().flatten() {
            if c as usize >= comms {
                bail!(
                    InvalidArgument,
                    "'{name}': no communicator {c} ({comms} added)"
                );
            }
        }
        if param.shard.is_some_and(|s| s.layout == Layout::Flat) && layout != Layout::Flat {
            bail!(
                InvalidArgument,
                "'{name}': a flat piece cannot become another layout (its state is the whole \
                 tensor's); register the parameter under another name instead"
            );
        }
        let mut global = Vec::with_capacity(d.global_shape.len());
        let mut g_numel: usize = 1;
        for &v in d.global_shape {
            if v < 0 {
                bail!(
                    InvalidArgument,
                    "'{name}': global shape {:?} has a negative dimension",
                    d.global_shape
                );
            }
            g_numel = match g_numel.checked_mul(v as usize) {
                Some(n) => n,
                None => bail!(
                    InvalidArgument,
                    "'{name}': the global element count overflows"
                ),
            };
            global.push(v as usize);
        }
        let factored = global.len() >= 2;
        let (g_rows, g_cols) = if factored {
            let c = global[global.len() - 1];
            (g_numel.checked_div(c).unwrap_or(0), c)
        } else {
            (g_numel, 1)
        };
        // Rows of the local [prod(shape[:-1]), shape[-1]] view, also when it has no columns.
        let local_rows: usize = param.shape[..param.shape.len().saturating_sub(1)]
            .iter()
            .product();
        let fits = match layout {
            Layout::Cols => factored && param.factored && local_rows == g_rows,
            Layout::Flat => param.shape.len() <= 1,
            _ => factored == param.factored && (!factored || g_cols == param.cols),
        };
        if !fits {
            bail!(
                InvalidArgument,
                "'{name}': the piece {:?} does not fit the global shape {:?} (ROWS: the same rank \
                 ≥ 2 and last dimension, or rank ≤ 1 for a range of elements; COLS: rank ≥ 2 and \
                 the same rows of the [prod(shape[:-1]), shape[-1]] view; FLAT: a piece \
                 registered with rank ≤ 1)",
                param.shape,
                global
            );
        }
        let offset = d.offset;
        let (span, len, what) = match layout {
            Layout::Cols => (
                g_cols,
                param.numel().checked_div(local_rows).unwrap_or(0),
                "columns",
            ),
            Layout::Flat => (g_numel, param.numel(), "elements"),
            _ => (g_rows, param.rows, "rows"),
        };
        let elem_offset = match layout {
            Layout::Full => {
                if global != param.shape || offset != 0 {
                    bail!(
                        InvalidArgument,
                        "'{name}': LOMO_LAYOUT_FULL needs the registered shape {:?} to be the \
                         global shape (got {global:?}) and offset 0 (got {offset})",
                        param.shape
                    );
                }
                0
            }
            _ => {
                if offset < 0 || (offset as usize).saturating_add(len) > span {
                    bail!(
                        InvalidArgument,
                        "'{name}': {what} [{offset}, {offset} + {len}) are not inside the {span} \
                         {what} of the global [{g_rows}, {g_cols}] view"
                    );
                }
                match layout {
                    Layout::Cols | Layout::Flat => offset as u64,
                    _ => offset as u64 * g_cols as u64,
                }
            }
        };
        let whole = param.numel() == g_numel;
        if layout != Layout::Full && d.piece_comm.is_none() && !whole {
            bail!(
                InvalidArgument,
                "'{name}': a piece needs piece_comm, the ranks holding the other pieces"
            );
        }
        let part = self.check_grad_mode(&name, grad_mode, layout, d, g_numel, elem_offset, len)?;
        // A flat piece of a factored tensor keeps the whole tensor's row and column state.
        let flat_factored = layout == Layout::Flat && factored;
        let rec_len = match (layout, self.config.algorithm) {
            (Layout::Full, _) => 0,
            (Layout::Cols, Algorithm::Adalomo) => ada_cols::record_len(local_rows),
            (Layout::Flat, Algorithm::Adalomo) if factored => ada_flat::record_len(g_rows, g_cols),
            (_, Algorithm::Adalomo) => {
                ada_piece::record_len(if factored { g_cols } else { 1 }, factored)
            }
            (_, Algorithm::Lomo) => 1,
        };
        let norm_duplicate = d.flags & SHARD_NORM_DUPLICATE != 0;
        let scratch = match grad_mode {
            GradMode::Reduced => (0, 0),
            GradMode::AllReduce => (0, param.numel()),
            GradMode::ReduceScatter => {
                let n = self.dist.comms[d.grad_comm.unwrap_or(0) as usize].size as usize;
                // The send side needs a padded copy only when the tensor does not divide evenly.
                let send = if part * n == g_numel { 0 } else { part * n };
                (send, part)
            }
        };
        let param = &mut self.params[id as usize];
        let new_shard = Shard {
            layout,
            global_numel: g_numel,
            global_rows: g_rows,
            global_cols: g_cols,
            elem_offset,
            piece_comm: d.piece_comm,
            norm_duplicate,
            grad_mode,
            grad_comm: d.grad_comm,
            part,
        };
        if cuda {
            let Some(side) = self.cuda.as_mut() else {
                bail!(Unsupported, "'{name}': CUDA parameter without a CUDA side");
            };
            let piece = match layout {
                Layout::Rows => Some(PieceSpec {
                    global_rows: g_rows as u64,
                    elem_offset,
                    cols_of: 0,
                }),
                Layout::Cols => Some(PieceSpec {
                    global_rows: local_rows as u64,
                    elem_offset,
                    cols_of: g_cols as u64,
                }),
                // LOMO (any tensor) or AdaLomo of a rank ≤ 1 tensor: elementwise on a range of
                // elements, as a rank ≤ 1 piece of rows.
                Layout::Flat => Some(PieceSpec {
                    global_rows: g_numel as u64,
                    elem_offset,
                    cols_of: 0,
                }),
                Layout::Full => None,
            };
            // With gradient accumulation on, the buffer holds what the rank submits: the whole
            // tensor's gradient for LOMO_GRAD_REDUCE_SCATTER, the piece's otherwise.
            let grad_numel = match grad_mode {
                GradMode::ReduceScatter => g_numel,
                _ => param.numel(),
            };
            let accum = match param.inner.lock().accum.as_ref() {
                Some(a) if a.numel() != grad_numel => {
                    super::accum::buffer_for(self.accum, Some(&*side), grad_numel, param.buf.dtype)?
                }
                _ => None,
            };
            // f32 words, as the host scratch: any gradient dtype fits.
            side.reserve_grad_scratch(4 * scratch.0, 4 * scratch.1)?;
            side.set_shard(id, piece, norm_duplicate)?;
            if layout == Layout::Cols {
                param.rows = local_rows;
            }
            if accum.is_some() {
                param.inner.lock().accum = accum;
            }
            param.shard = Some(new_shard);
            return Ok(());
        }
        // Everything the piece needs is allocated before anything changes: an allocation
        // failure (OUT_OF_MEMORY) leaves the parameter as it was.
        let mut inner = param.inner.lock();
        let cols_reset = layout == Layout::Cols && param.rows != local_rows;
        let flat_reset = flat_factored && param.shard != Some(new_shard);
        let fresh_ada = match inner.ada.as_ref() {
            // A piece without columns still keeps the (replicated) row state of every row.
            Some(_) if cols_reset => Some((
                AdaState::zeros(local_rows, 0, true)?,
                AdaWorkspace::new(local_rows, 0, true)?,
            )),
            Some(_) if flat_reset => Some((
                AdaState::zeros(g_rows, g_cols, true)?,
                AdaWorkspace::flat(g_rows, g_cols)?,
            )),
            _ => None,
        };
        let dist_rec = crate::alloc::zeros(rec_len, "a piece's statistics record")?;
        // With gradient accumulation on, the buffer holds what the rank submits: the whole
        // tensor's gradient for LOMO_GRAD_REDUCE_SCATTER, the piece's otherwise.
        let grad_numel = match grad_mode {
            GradMode::ReduceScatter => g_numel,
            _ => param.numel(),
        };
        let accum = match inner.accum.as_ref() {
            Some(a) if a.numel() != grad_numel => {
                super::accum::buffer_for(self.accum, None, grad_numel, param.buf.dtype)?
            }
            _ => None,
        };
        self.dist.scratch.reserve(scratch.0, scratch.1)?;
        let mut fresh_ada = fresh_ada;
        if layout == Layout::Cols {
            match (fresh_ada.as_mut(), inner.ada.as_mut()) {
                (Some((_, ws)), _) => ws.prepare_cols()?,
                (None, Some(ada)) => ada.ws.prepare_cols()?,
                (None, None) => {}
            }
        }
        if cols_reset {
            param.rows = local_rows;
        }
        if flat_factored {
            (param.rows, param.cols, param.factored) = (g_rows, g_cols, true);
        }
        if let (Some((state, ws)), Some(ada)) = (fresh_ada, inner.ada.as_mut()) {
            ada.state = state;
            ada.ws = ws;
            ada.carried_psq = None;
        }
        inner.dist_rec = dist_rec;
        if accum.is_some() {
            inner.accum = accum;
        }
        drop(inner);
        param.shard = Some(new_shard);
        Ok(())
    }

    /// Checks a gradient mode against the layout and the communicators; returns the elements
    /// per rank of a `REDUCE_SCATTER` partition (0 otherwise).
    #[allow(clippy::too_many_arguments)]
    fn check_grad_mode(
        &self,
        name: &str,
        mode: GradMode,
        layout: Layout,
        d: &ShardDesc<'_>,
        g_numel: usize,
        offset: u64,
        len: usize,
    ) -> Result<usize> {
        if mode == GradMode::Reduced {
            return Ok(0);
        }
        let Some(gc) = d.grad_comm else {
            bail!(
                InvalidArgument,
                "'{name}': LOMO_GRAD_ALL_REDUCE and LOMO_GRAD_REDUCE_SCATTER need grad_comm, the \
                 group the gradient is reduced over"
            );
        };
        let comm = &self.dist.comms[gc as usize];
        if mode == GradMode::AllReduce {
            if layout != Layout::Full && d.piece_comm == Some(gc) {
                bail!(
                    InvalidArgument,
                    "'{name}': LOMO_GRAD_ALL_REDUCE over piece_comm would sum different pieces: \
                     grad_comm must be the group of the replicas of this piece (HSDP), or use \
                     LOMO_GRAD_REDUCE_SCATTER for a flat piece"
                );
            }
            return Ok(0);
        }
        if layout != Layout::Flat {
            bail!(
                InvalidArgument,
                "'{name}': LOMO_GRAD_REDUCE_SCATTER needs LOMO_LAYOUT_FLAT (the library \
                 reduce-scatters the full local gradient into equal flat partitions)"
            );
        }
        if comm.reduce_scatter.is_none() {
            bail!(
                InvalidArgument,
                "'{name}': LOMO_GRAD_REDUCE_SCATTER needs a communicator with a reduce_scatter \
                 callback; communicator {gc} has none"
            );
        }
        if d.piece_comm != Some(gc) && len != g_numel {
            bail!(
                InvalidArgument,
                "'{name}': with LOMO_GRAD_REDUCE_SCATTER the pieces are the partitions of \
                 grad_comm, so piece_comm must be grad_comm"
            );
        }
        let n = comm.size as usize;
        let part = g_numel.div_ceil(n);
        let start = (comm.rank as usize * part).min(g_numel);
        let end = ((comm.rank as usize + 1) * part).min(g_numel);
        if offset as usize != start || len != end - start {
            bail!(
                InvalidArgument,
                "'{name}': with LOMO_GRAD_REDUCE_SCATTER rank {} of {n} holds elements [{start}, \
                 {end}) (partitions of ceil({g_numel} / {n}) = {part} elements, the last ones \
                 padded as DeepSpeed ZeRO-3 does), not [{offset}, {})",
                comm.rank,
                offset as usize + len
            );
        }
        Ok(part)
    }

    /// The agreement of the current phase's end, when a norm group is set.
    pub(super) fn agreement(&self, submitted: u32) -> Option<crate::orchestrate::Agreement<'_>> {
        let comm = self.dist.comms.get(self.dist.norm_comm? as usize)?;
        let lr = match self.state {
            StepState::Update { lr, .. } => lr,
            _ => 0.0,
        };
        // The groups' lr multipliers and weight decay are part of the configuration: bindings
        // that carry each group's lr in its multiplier (PyTorch's param_groups) begin with 1.
        let mut config = self.dist.fingerprint;
        for (id, g) in &self.groups {
            for v in [
                *id as u64,
                g.lr_multiplier.to_bits(),
                g.weight_decay.to_bits(),
            ] {
                config = fnv_extend(config, &v.to_le_bytes());
            }
        }
        // So are the step's accumulated micro-batches (lomo_accum_enable): ranks that
        // accumulated different counts would average different batches.
        config = fnv_extend(config, &self.accum_micro.to_le_bytes());
        let check = self.dist.check.then_some([
            submitted as f64,
            lr,
            self.steps as f64,
            (config >> 11) as f64,
            self.params.len() as f64,
        ]);
        Some(crate::orchestrate::Agreement { comm, check })
    }
}

/// FNV-1a of the configuration's description: equal configurations, equal fingerprints.
fn fingerprint(s: &str) -> u64 {
    fnv_extend(0xcbf2_9ce4_8422_2325u64, s.as_bytes())
}

/// FNV-1a continued over `bytes` from the hash `h`.
fn fnv_extend(h: u64, bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(h, |h, &b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}
