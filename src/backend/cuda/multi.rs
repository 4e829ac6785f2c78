//! CUDA backend: multi-tensor launches (apex's `multi_tensor_apply`, PyTorch's `_foreach`
//! kernels): the NORM pass, LOMO's non-finite pre-check and LOMO's update of up to
//! [`MULTI`] small whole tensors in one launch, their descriptors by value in the kernel's
//! argument struct (`kernels/norm.cu` `norm_multi_*`, `kernels/lomo.cu` `lomo_multi_*`).
//!
//! Each tensor keeps the grid of its own launch (at most [`MULTI_GRID`] blocks: small tensors)
//! and runs the same kernel body with it, so the results are bit for bit those of one launch
//! per tensor; only the number of launches changes. Tensors that are larger, empty or pieces of
//! a distributed tensor, and groups of one, get their own launch as before. Groups are formed
//! per gradient dtype (NORM) or dtype pair (LOMO), in submission order.

use super::abi::*;
use super::launcher::{Geometry, Launcher};
use super::passes::{launch, Records, Tensor, UpdateOpts, THREADS};
use super::registry::{pair_name, Module};
use crate::dtype::DType;
use crate::error::Result;
use smallvec::{smallvec, SmallVec};

/// One tensor of a batch: its passes, records and gradient.
#[derive(Clone, Copy, Debug)]
pub struct Item {
    pub tensor: Tensor,
    pub rec: Records,
    pub g: DevPtr,
    pub g_dtype: DType,
}

impl Item {
    /// Whether it may share a launch: a whole, non-empty tensor of at most `MULTI_GRID` blocks.
    fn small(&self) -> bool {
        let ly = &self.tensor.layout;
        self.tensor.piece.is_none() && ly.shape.numel > 0 && ly.elementwise.grid <= MULTI_GRID
    }
}

/// A run of a batch's items (at most [`crate::optimizer::BATCH_CHUNK`]: on the stack).
pub type Items = SmallVec<[Item; crate::optimizer::BATCH_CHUNK]>;
/// The UPDATE options of a run's items.
pub type Opts = SmallVec<[UpdateOpts; crate::optimizer::BATCH_CHUNK]>;

/// Visits a batch's items: `one(i)` for each item launched alone (not small, or the only small
/// item of its `key`), `many(group)` for each group of small items of one `key`, in order,
/// at most [`MULTI`] per group (indices into the batch). Allocates nothing for batches of at
/// most `BATCH_CHUNK` items.
fn groups<K: PartialEq + Copy>(
    items: &[Item],
    key: impl Fn(usize) -> K,
    mut one: impl FnMut(usize) -> Result<()>,
    mut many: impl FnMut(&[usize]) -> Result<()>,
) -> Result<()> {
    let mut used: SmallVec<[bool; crate::optimizer::BATCH_CHUNK]> = smallvec![false; items.len()];
    for (i, it) in items.iter().enumerate() {
        if !it.small() {
            used[i] = true;
            one(i)?;
        }
    }
    for i in 0..items.len() {
        if used[i] {
            continue;
        }
        let k = key(i);
        let mut group: SmallVec<[usize; MULTI]> = SmallVec::new();
        for j in i..items.len() {
            if !used[j] && key(j) == k {
                used[j] = true;
                group.push(j);
                if group.len() == MULTI {
                    break;
                }
            }
        }
        match group[..] {
            [only] => one(only)?,
            _ => many(&group)?,
        }
    }
    Ok(())
}

fn geometry(blocks: u32) -> Geometry {
    Geometry {
        grid: blocks,
        block: THREADS,
        smem: 0,
    }
}

/// NORM (or, `check_only`, LOMO's non-finite pre-check) of every item: the results of
/// [`Tensor::norm`] on each, in fewer launches.
pub fn norm_many(l: &dyn Launcher, items: &[Item], check_only: bool, stream: usize) -> Result<()> {
    let one = |i: usize| {
        let it = &items[i];
        it.tensor
            .norm(l, it.rec, it.g, it.g_dtype, check_only, stream)
    };
    let many = |group: &[usize]| {
        let first = &items[group[0]];
        let mut a = NormMultiArgs {
            step: first.rec.step,
            n_tensors: group.len() as u32,
            check_only: check_only as u32,
            d: [NormDesc::default(); MULTI],
        };
        let mut blocks = 0;
        for (d, &i) in a.d.iter_mut().zip(group) {
            let it = &items[i];
            let grid = it.tensor.layout.elementwise.grid;
            *d = NormDesc {
                g: it.g,
                n: it.tensor.layout.shape.numel,
                t: it.rec.t,
                partials: it.tensor.bufs.partials,
                grid,
                block0: blocks,
            };
            blocks += grid;
        }
        let name = format!("norm_multi_{}", first.g_dtype.as_str());
        launch(l, Module::Norm, &name, geometry(blocks), &a, stream)
    };
    groups(items, |i| items[i].g_dtype, one, many)
}

/// LOMO's update of every item with its options: the results of [`Tensor::lomo`] on each, in
/// fewer launches.
pub fn lomo_many(
    l: &dyn Launcher,
    items: &[Item],
    opts: &[UpdateOpts],
    stream: usize,
) -> Result<()> {
    let key = |i: usize| {
        let (it, o) = (&items[i], &opts[i]);
        (
            it.tensor.p_dtype,
            it.g_dtype,
            o.prechecked,
            o.stochastic,
            o.seed,
            o.clip_value.to_bits(),
        )
    };
    let one = |i: usize| {
        let it = &items[i];
        it.tensor
            .lomo(l, it.rec, it.g, it.g_dtype, &opts[i], stream)
    };
    let many = |group: &[usize]| {
        let (first, o) = (&items[group[0]], &opts[group[0]]);
        let mut a = LomoMultiArgs {
            step: first.rec.step,
            seed: o.seed,
            clip_value: o.clip_value,
            prechecked: o.prechecked as u32,
            rounding: o.stochastic as u32,
            n_tensors: group.len() as u32,
            d: [LomoDesc::default(); MULTI],
        };
        let mut blocks = 0;
        for (d, &i) in a.d.iter_mut().zip(group) {
            let (it, o) = (&items[i], &opts[i]);
            let grid = it.tensor.layout.elementwise.grid;
            *d = LomoDesc {
                p: it.tensor.p,
                g: it.g,
                n: it.tensor.layout.shape.numel,
                t: it.rec.t,
                lr_mult: o.lr_mult,
                weight_decay: o.weight_decay,
                param_id: o.param_id,
                grid,
                block0: blocks,
                pad: 0,
            };
            blocks += grid;
        }
        let name = pair_name("lomo_multi", first.tensor.p_dtype, first.g_dtype);
        launch(l, Module::Lomo, &name, geometry(blocks), &a, stream)
    };
    groups(items, key, one, many)
}
