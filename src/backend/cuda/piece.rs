//! CUDA backend: a parameter declared a piece of a tensor held by several ranks
//! (`lomo_param_set_shard` on a CUDA parameter; `notes/distributed.md` §3): a piece of rows
//! or elements, or of columns; its device statistics record, the piece layout of its passes, and the NORM_DUPLICATE flag of its tensor
//! record. Between steps only (allocates; a write to the tensor record waits for nothing on a
//! step path).

use super::abi::{DevPtr, LomoTensor, TENSOR_NORM_DUPLICATE};
use super::device::DeviceOpt;
use super::passes::{Layout, Piece, Shape};
use crate::config::Algorithm;
use crate::error::{bail, Result};

/// What a piece of rows is in its global tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PieceSpec {
    /// Rows of the global `[R, C]` view (rank ≤ 1: the global element count).
    pub global_rows: u64,
    /// Global index of the piece's first element (a piece of columns: its first column).
    pub elem_offset: u64,
    /// A piece of columns (`LOMO_LAYOUT_COLS`, every row here): C of the global `[R, C]` view
    /// (then `global_rows` is the local rows); 0 for a piece of rows or elements.
    pub cols_of: u64,
}

impl DeviceOpt {
    /// Length (f64) of a piece's statistics record: LOMO 1 (the non-finite count); AdaLomo
    /// `2C + 3` (factored, C columns) or 3 (rank ≤ 1) — `cpu::ada_piece::record_len` —, a
    /// piece of columns `R + 3` (`cpu::ada_cols::record_len`: R + 2 reduced in round 1, 1 in
    /// round 2).
    pub fn piece_record_len(&self, shape: Shape, cols_piece: bool) -> usize {
        match self.cfg.algorithm {
            Algorithm::Lomo => 1,
            Algorithm::Adalomo if cols_piece => shape.rows as usize + 3,
            Algorithm::Adalomo if shape.factored => 2 * shape.cols as usize + 3,
            Algorithm::Adalomo => 3,
        }
    }

    /// Declares parameter `idx` a piece of rows (`piece`), or the whole tensor (None), and
    /// whether its Σg² is counted on another rank (`norm_duplicate`). Everything is allocated
    /// before anything changes: on failure the parameter is as it was. A piece whose layout
    /// needs buffers it did not have (an AdaLomo piece without rows still keeps the column
    /// state) gets fresh, zeroed state.
    pub fn set_shard(
        &mut self,
        idx: usize,
        piece: Option<PieceSpec>,
        norm_duplicate: bool,
    ) -> Result<()> {
        let Some(old) = self.params.get(idx).map(|p| p.tensor) else {
            bail!(UnknownParam, "no CUDA parameter with index {idx}");
        };
        let ada = self.cfg.algorithm == Algorithm::Adalomo;
        let (mb, smem) = (self.max_blocks, self.launcher.max_smem());
        let mut shape = old.layout.shape;
        let cols_piece = piece.is_some_and(|p| p.cols_of > 0);
        let layout = match piece {
            Some(p) if cols_piece => {
                // Every row is here, also when no column is ([R, 0] has R rows).
                shape.rows = p.global_rows;
                Layout::cols_piece(shape, ada, mb, smem)
            }
            Some(_) => Layout::piece(shape, ada, mb, smem),
            None => Layout::new(shape, ada, mb, smem),
        };
        let rec_len = self.piece_record_len(shape, cols_piece);
        let s = layout.sizes();
        let fresh = s != old.layout.sizes();
        let mut got = Vec::with_capacity(8);
        let result = (|| {
            crate::alloc::reserve(&mut self.allocs, 8, "the CUDA allocation list")?;
            let bufs = if fresh {
                self.alloc_bufs(&s, &mut got)?
            } else {
                old.bufs
            };
            let rec = match piece {
                Some(_) => self.alloc(8 * rec_len, &mut got)?,
                None => 0,
            };
            let flags: u32 = if norm_duplicate {
                TENSOR_NORM_DUPLICATE
            } else {
                0
            };
            let at = self.tensor_ptr(idx) + std::mem::offset_of!(LomoTensor, flags) as u64;
            self.launcher.copy_from_host(at, &flags.to_ne_bytes())?;
            Ok((bufs, rec))
        })();
        let (bufs, rec) = self.settle(result, got)?;
        if fresh {
            let b = old.bufs;
            for p in [
                b.partials, b.state_a, b.state_b, b.ws_a, b.ws_r, b.ws_c, b.col_part,
            ] {
                self.release(p);
            }
        }
        if let Some(p) = old.piece {
            self.release(p.rec);
        }
        let t = &mut self.params[idx].tensor;
        t.layout = layout;
        t.bufs = bufs;
        t.piece = piece.map(|p| Piece {
            rec,
            len: rec_len,
            global_rows: p.global_rows,
            elem_offset: p.elem_offset,
            cols_of: p.cols_of,
            round: 0,
        });
        Ok(())
    }

    /// Frees device memory this optimizer allocated (0: nothing).
    fn release(&mut self, p: DevPtr) {
        if p != 0 {
            self.allocs.retain(|&a| a != p);
            self.launcher.free(p);
        }
    }
}
