//! CUDA backend: AdaLomo's passes of one tensor ([`Tensor::ada_stats`], [`Tensor::ada_apply`]):
//! the kernels' arguments and launches of `kernels/adalomo.cu`.
//!
//! Whole tensors: factored 3 launches (stats, finalize, apply), rank ≤ 1 2 (vstats, vapply).
//! A piece of rows held by several ranks (`notes/distributed.md` §3) leaves its partial record
//! in the piece's device record at the end of the statistics — factored one launch more
//! (`adalomo_piece_gather`: the column sums of the stats blocks, Σrow, Σp², the non-finite flag;
//! rank ≤ 1 the vstats kernel writes `[Σu², Σp², nf]` itself) — which the core all-reduces on
//! the stream before `ada_apply`; finalize then reads the reduced record (rank ≤ 1: one small
//! `adalomo_vfinalize` launch), so every rank forms the same column state and scalars as one
//! rank holding the whole tensor.
//!
//! A piece of columns (all rows here) takes two rounds (`cpu::ada_cols` is the spec): the stats
//! launch leaves `[b_i = Σ_{j∈J} U_ij ‖ Σp² ‖ nf]` in the record (reduced: R + 2 values); the
//! second round ([`Tensor::ada_cols_second`]) runs stats again with the new rows from the
//! reduced record and finalize, which leaves `Σ_{j∈J} D_j / col_j` (reduced: 1 value) and the
//! new state in workspaces; apply then commits the state and forms the scalars
//! (`adalomo_cols_finish`) and writes the piece. A failed reduction leaves the state as it was.

use super::abi::*;
use super::launcher::Geometry;
use super::launcher::Launcher;
use super::passes::{launch, Records, Tensor, UpdateOpts};
use super::registry::{pair_name, Module};
use crate::dtype::DType;
use crate::error::Result;

impl Tensor {
    /// The kernels' arguments of AdaLomo's passes; the state is in `bufs.state_a`/`state_b`.
    fn ada_args(&self, rec: Records, g: DevPtr, o: &UpdateOpts) -> AdaArgs {
        let (ly, b) = (&self.layout, &self.bufs);
        let mut flags = if o.carry { ADA_CARRY } else { 0 };
        if ly.shape.factored && ly.stats.smem > 0 {
            flags |= ADA_SMEM;
        }
        let cols_of = self.piece.map_or(0, |p| p.cols_of);
        if self.ada_cols() {
            flags |= match self.piece.map_or(0, |p| p.round) {
                0 => ADA_COLS1,
                _ => ADA_COLS2,
            };
        }
        AdaArgs {
            p: self.p,
            g,
            rows: ly.shape.rows,
            cols: ly.shape.cols,
            state_a: b.state_a,
            state_b: b.state_b,
            ws_a: b.ws_a,
            ws_r: b.ws_r,
            ws_c: b.ws_c,
            col_part: b.col_part,
            partials: b.partials,
            step: rec.step,
            t: rec.t,
            lr_mult: o.lr_mult,
            weight_decay: o.weight_decay,
            eps2: o.eps2,
            clip_threshold: o.clip_threshold,
            eps1: o.eps1,
            clip_value: o.clip_value,
            seed: o.seed,
            param_id: o.param_id,
            rounding: o.stochastic as u32,
            flags,
            stats_blocks: ly.stats.grid,
            piece: self.piece.map_or(0, |p| p.rec),
            global_rows: self.piece.map_or(ly.shape.rows, |p| p.global_rows),
            elem_offset: self.elem_offset(),
            row_stride: if cols_of > 0 { cols_of } else { ly.shape.cols },
        }
    }

    /// AdaLomo's statistics pass (one launch): the new state into the workspace, the column
    /// partials of each block, Σp² and the non-finite flag into the tensor record; for a
    /// factored piece, the gather of its partial record (a second launch).
    pub fn ada_stats(
        &self,
        l: &dyn Launcher,
        rec: Records,
        g: DevPtr,
        g_dtype: DType,
        o: &UpdateOpts,
        stream: usize,
    ) -> Result<()> {
        let ly = &self.layout;
        if self.idle() {
            return Ok(());
        }
        let a = self.ada_args(rec, g, o);
        let (name, geo) = if ly.shape.factored {
            ("adalomo_stats", ly.stats)
        } else {
            ("adalomo_vstats", ly.elementwise)
        };
        let name = pair_name(name, self.p_dtype, g_dtype);
        launch(l, Module::Adalomo, &name, geo, &a, stream)?;
        if self.piece.is_some() && ly.shape.factored && !self.ada_cols() {
            let k = "adalomo_piece_gather";
            launch(l, Module::Adalomo, k, ly.finalize, &a, stream)?;
        }
        Ok(())
    }

    /// A piece of columns' second round, after round 1's record `[b ‖ Σp² ‖ nf]` was reduced
    /// (`self.piece.round` is 1): the statistics pass again with the new rows from the reduced
    /// `b_i / C` (`D_j` with the true rows), then finalize (the new row and local column state
    /// into workspaces, r_i, c_j) leaving `Σ_{j∈J} D_j / col_j` in the record's last value for the core to reduce.
    pub fn ada_cols_second(
        &self,
        l: &dyn Launcher,
        rec: Records,
        g: DevPtr,
        g_dtype: DType,
        o: &UpdateOpts,
        stream: usize,
    ) -> Result<()> {
        let ly = &self.layout;
        let a = self.ada_args(rec, g, o);
        let name = pair_name("adalomo_stats", self.p_dtype, g_dtype);
        launch(l, Module::Adalomo, &name, ly.stats, &a, stream)?;
        launch(
            l,
            Module::Adalomo,
            "adalomo_finalize",
            ly.finalize,
            &a,
            stream,
        )
    }

    /// AdaLomo after the (reduced) statistics: factored, the finalize kernel (column state,
    /// Σu², RMS(p), the update clip, lr and decay; commits the state unless the gradient was not
    /// finite) and the apply kernel; rank ≤ 1, the vector apply kernel (which does both; a piece
    /// first forms its scalars from the reduced record).
    pub fn ada_apply(
        &self,
        l: &dyn Launcher,
        rec: Records,
        g: DevPtr,
        g_dtype: DType,
        o: &UpdateOpts,
        stream: usize,
    ) -> Result<()> {
        let ly = &self.layout;
        if self.idle() {
            return Ok(());
        }
        let a = self.ada_args(rec, g, o);
        let pair = |k: &str| pair_name(k, self.p_dtype, g_dtype);
        if self.ada_cols() {
            let k = "adalomo_cols_finish";
            launch(l, Module::Adalomo, k, ly.finalize, &a, stream)?;
            launch(
                l,
                Module::Adalomo,
                &pair("adalomo_apply"),
                ly.stats_apply(),
                &a,
                stream,
            )
        } else if ly.shape.factored {
            launch(
                l,
                Module::Adalomo,
                "adalomo_finalize",
                ly.finalize,
                &a,
                stream,
            )?;
            launch(
                l,
                Module::Adalomo,
                &pair("adalomo_apply"),
                ly.stats_apply(),
                &a,
                stream,
            )
        } else {
            if self.piece.is_some() {
                let one = Geometry {
                    grid: 1,
                    block: 32,
                    smem: 0,
                };
                launch(l, Module::Adalomo, "adalomo_vfinalize", one, &a, stream)?;
            }
            launch(
                l,
                Module::Adalomo,
                &pair("adalomo_vapply"),
                ly.elementwise,
                &a,
                stream,
            )
        }
    }
}
