//! Core layer: the optimizer's distributed setup — communicators (`lomo_comm_add`), the group
//! that agrees on the step's scalars (`lomo_dist_set`) and pieces of tensors
//! (`lomo_param_set_shard`). All of it between steps; the step itself is `step.rs` over
//! `crate::orchestrate`.

use super::{Optimizer, StepState};
use crate::backend::cpu::adalomo::{AdaState, AdaWorkspace};
use crate::backend::cpu::{ada_cols, ada_piece};
use crate::backend::cuda::piece::PieceSpec;
use crate::config::Algorithm;
use crate::dist::{Comm, Layout, Shard, DIST_CHECK, SHARD_NORM_DUPLICATE};
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
        if self.state != StepState::Idle {
            bail!(PhaseError, "{what} is only possible between steps");
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
    /// against the registration and sizes its statistics record.
    pub fn param_set_shard(&mut self, id: u32, d: &ShardDesc<'_>) -> Result<()> {
        self.between_steps("lomo_param_set_shard")?;
        let comms = self.dist.comms.len();
        let Some(param) = self.params.get_mut(id as usize) else {
            bail!(UnknownParam, "no parameter with id {id}");
        };
        let name = param.name.clone();
        if param.inner.get_mut().strided.is_some() {
            bail!(
                Unsupported,
                "'{name}': AdaLomo pieces must be contiguous (lomo_param_set_strides set a layout)"
            );
        }
        let cuda = param.device != Device::Cpu;
        let layout = match d.layout {
            0 => Layout::Full,
            1 => Layout::Rows,
            2 if cuda => bail!(
                Unsupported,
                "'{name}': LOMO_LAYOUT_COLS is supported on the CPU backend only so far (CUDA \
                 parameters: LOMO_LAYOUT_FULL or LOMO_LAYOUT_ROWS)"
            ),
            2 => Layout::Cols,
            3 => bail!(
                Unsupported,
                "'{name}': LOMO_LAYOUT_FLAT is not supported yet (use LOMO_LAYOUT_ROWS or \
                 LOMO_LAYOUT_COLS, or FULL with gradients reduced by the caller)"
            ),
            v => bail!(InvalidArgument, "'{name}': unknown layout {v}"),
        };
        match d.grad_mode {
            0 => {}
            1 | 2 => bail!(
                Unsupported,
                "'{name}': the library does not reduce gradients yet: submit the reduced \
                 gradient of the piece (LOMO_GRAD_REDUCED)"
            ),
            v => bail!(InvalidArgument, "'{name}': unknown gradient mode {v}"),
        }
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
            _ => factored == param.factored && (!factored || g_cols == param.cols),
        };
        if !fits {
            bail!(
                InvalidArgument,
                "'{name}': the piece {:?} does not fit the global shape {:?} (ROWS: the same rank \
                 ≥ 2 and last dimension, or rank ≤ 1 for a range of elements; COLS: rank ≥ 2 and \
                 the same rows of the [prod(shape[:-1]), shape[-1]] view)",
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
                    Layout::Cols => offset as u64,
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
        let rec_len = match (layout, self.config.algorithm) {
            (Layout::Full, _) => 0,
            (Layout::Cols, Algorithm::Adalomo) => ada_cols::record_len(local_rows),
            (_, Algorithm::Adalomo) => ada_piece::record_len(param.cols, factored),
            (_, Algorithm::Lomo) => 1,
        };
        let norm_duplicate = d.flags & SHARD_NORM_DUPLICATE != 0;
        let shard = Shard {
            layout,
            global_numel: g_numel,
            global_rows: g_rows,
            global_cols: g_cols,
            elem_offset,
            piece_comm: d.piece_comm,
            norm_duplicate,
        };
        if cuda {
            let Some(side) = self.cuda.as_mut() else {
                bail!(Unsupported, "'{name}': CUDA parameter without a CUDA side");
            };
            let piece = (layout == Layout::Rows).then_some(PieceSpec {
                global_rows: g_rows as u64,
                elem_offset,
            });
            side.set_shard(id, piece, norm_duplicate)?;
            param.shard = Some(shard);
            return Ok(());
        }
        // Everything the piece needs is allocated before anything changes: an allocation
        // failure (OUT_OF_MEMORY) leaves the parameter as it was.
        let mut inner = param.inner.lock();
        let cols_reset = layout == Layout::Cols && param.rows != local_rows;
        let fresh_ada = match inner.ada.as_ref() {
            // A piece without columns still keeps the (replicated) row state of every row.
            Some(_) if cols_reset => Some((
                AdaState::zeros(local_rows, 0, true)?,
                AdaWorkspace::new(local_rows, 0, true)?,
            )),
            _ => None,
        };
        let dist_rec = crate::alloc::zeros(rec_len, "a piece's statistics record")?;
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
        if let (Some((state, ws)), Some(ada)) = (fresh_ada, inner.ada.as_mut()) {
            ada.state = state;
            ada.ws = ws;
        }
        inner.dist_rec = dist_rec;
        drop(inner);
        param.shard = Some(shard);
        Ok(())
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
