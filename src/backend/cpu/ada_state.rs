//! CPU backend: AdaLomo's optimizer state — owned by the core for CPU parameters
//! ([`AdaState`]), or borrowed from caller buffers such as XLA's ([`StateView`],
//! [`StateViewMut`]). The passes that read and write it are in [`super::adalomo`].

use crate::alloc;
use crate::error::Result;

/// Optimizer state of one parameter (f32, host memory), owned by the core.
#[derive(Clone, Debug, PartialEq)]
pub enum AdaState {
    /// Rank ≥ 2: row and column second-moment estimates.
    Factored { row: Vec<f32>, col: Vec<f32> },
    /// Rank ≤ 1: one estimate per element.
    Vector { v: Vec<f32> },
}

impl AdaState {
    /// Zero state for the `[rows, cols]` view (`rows * cols` must not overflow: the core checks
    /// shapes first); `OutOfMemory` if it cannot be allocated.
    pub fn zeros(rows: usize, cols: usize, factored: bool) -> Result<AdaState> {
        const WHAT: &str = "AdaLomo state";
        Ok(if factored {
            AdaState::Factored {
                row: alloc::zeros(rows, WHAT)?,
                col: alloc::zeros(cols, WHAT)?,
            }
        } else {
            AdaState::Vector {
                v: alloc::zeros(rows * cols, WHAT)?,
            }
        })
    }
    pub fn bytes(&self) -> usize {
        4 * match self {
            AdaState::Factored { row, col } => row.len() + col.len(),
            AdaState::Vector { v } => v.len(),
        }
    }
    pub fn as_view(&self) -> StateView<'_> {
        match self {
            AdaState::Factored { row, col } => StateView::Factored { row, col },
            AdaState::Vector { v } => StateView::Vector { v },
        }
    }
    pub fn as_view_mut(&mut self) -> StateViewMut<'_> {
        match self {
            AdaState::Factored { row, col } => StateViewMut::Factored { row, col },
            AdaState::Vector { v } => StateViewMut::Vector { v },
        }
    }
}

/// Borrowed AdaLomo state (from the core, or from caller buffers such as XLA's).
#[derive(Clone, Copy, Debug)]
pub enum StateView<'a> {
    Factored { row: &'a [f32], col: &'a [f32] },
    Vector { v: &'a [f32] },
}

/// Mutably borrowed AdaLomo state.
#[derive(Debug)]
pub enum StateViewMut<'a> {
    Factored {
        row: &'a mut [f32],
        col: &'a mut [f32],
    },
    Vector {
        v: &'a mut [f32],
    },
}

impl StateViewMut<'_> {
    pub fn as_view(&self) -> StateView<'_> {
        match self {
            StateViewMut::Factored { row, col } => StateView::Factored { row, col },
            StateViewMut::Vector { v } => StateView::Vector { v },
        }
    }

    /// A shorter mutable borrow of the same state.
    pub fn reborrow(&mut self) -> StateViewMut<'_> {
        match self {
            StateViewMut::Factored { row, col } => StateViewMut::Factored { row, col },
            StateViewMut::Vector { v } => StateViewMut::Vector { v },
        }
    }
}
