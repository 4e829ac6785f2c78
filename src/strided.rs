//! Core layer: parameters laid out in memory other than contiguous row-major
//! (`lomo_param_set_strides`): dense non-overlapping layouts such as PyTorch's `channels_last`
//! convolution weights or transposed views.
//!
//! LOMO is elementwise, so such a parameter (with a gradient of the same strides) is updated in
//! memory order and nothing is kept here. AdaLomo's statistics are defined on the logical view
//! `[prod(shape[:-1]), shape[-1]]`: for a layout whose strides differ from the contiguous ones,
//! each submit copies the gradient and the parameter into library-owned scratch buffers in
//! logical (row-major) order, runs the contiguous step on them, and copies the written
//! parameter back into the caller's buffer, under the parameter's lock. The result is bit for
//! bit that of the same parameter registered contiguous (same values in the same order, same
//! stochastic-rounding draws, same state), at the cost of `numel · (dtype size + 4)` bytes of
//! scratch per such parameter, allocated by `lomo_param_set_strides` (a step allocates nothing).

use crate::backend::RawBuf;
use crate::dtype::DType;
use crate::error::{bail, Result};

/// The layout and scratch of one AdaLomo parameter whose strides are not contiguous.
#[derive(Debug)]
pub struct Strided {
    /// Element strides of the parameter (and of its gradients), one per logical dimension.
    strides: Vec<usize>,
    shape: Vec<usize>,
    /// The parameter in logical order (elements of the parameter's dtype, packed).
    p: Vec<u32>,
    /// The gradient in logical order (elements of the submitted dtype, packed; 4 bytes each
    /// at most).
    g: Vec<u32>,
}

/// Checks that `strides` (in elements) describe a dense non-overlapping layout of `shape`:
/// every element at its own offset, offsets `0..numel` and nothing else (a permutation of the
/// contiguous strides; size-1 dimensions may have any stride). Returns the strides as `usize`,
/// and whether they are the contiguous row-major ones for every dimension of size > 1.
pub fn check_dense(name: &str, shape: &[usize], strides: &[i64]) -> Result<(Vec<usize>, bool)> {
    if strides.len() != shape.len() {
        bail!(
            InvalidArgument,
            "parameter '{name}': {} strides for a parameter of rank {}",
            strides.len(),
            shape.len()
        );
    }
    let mut out = Vec::with_capacity(strides.len()); // rank <= 32
    for (d, &s) in strides.iter().enumerate() {
        if s < 0 {
            bail!(
                InvalidArgument,
                "parameter '{name}': stride[{d}] = {s} is negative (only dense non-overlapping \
                 layouts are supported)"
            );
        }
        out.push(s as usize);
    }
    if shape.contains(&0) {
        return Ok((out, true));
    }
    let mut dims: Vec<usize> = (0..shape.len()).filter(|&d| shape[d] != 1).collect();
    dims.sort_by_key(|&d| (out[d], std::cmp::Reverse(d)));
    let mut expected = 1usize;
    for &d in &dims {
        if out[d] != expected {
            bail!(
                InvalidArgument,
                "parameter '{name}': strides {strides:?} of shape {shape:?} are not a dense \
                 non-overlapping layout (every element at its own offset, no gaps); copy it \
                 into such a layout first"
            );
        }
        expected *= shape[d];
    }
    let mut contiguous = true;
    let mut inner = 1usize;
    for d in (0..shape.len()).rev() {
        if shape[d] != 1 && out[d] != inner {
            contiguous = false;
        }
        inner *= shape[d];
    }
    Ok((out, contiguous))
}

impl Strided {
    /// The scratch of a parameter of `shape`, `dtype` and (already checked) `strides`.
    pub fn new(shape: &[usize], strides: Vec<usize>, dtype: DType, what: &str) -> Result<Strided> {
        let numel: usize = shape.iter().product();
        let p_words = (numel * dtype.size()).div_ceil(4);
        Ok(Strided {
            p: crate::alloc::zeros(p_words, what)?,
            g: crate::alloc::zeros(numel, what)?,
            strides,
            shape: shape.to_vec(),
        })
    }

    /// Bytes of scratch memory held.
    pub fn bytes(&self) -> usize {
        4 * (self.p.len() + self.g.len())
    }

    /// Copies the gradient `grad` (the parameter's strides) into the gradient scratch in
    /// logical order and returns the scratch as a buffer; with `param`, the parameter too.
    pub fn gather(&mut self, param: Option<&RawBuf>, grad: &RawBuf) -> (Option<RawBuf>, RawBuf) {
        let g = RawBuf {
            addr: self.g.as_mut_ptr() as usize,
            ..*grad
        };
        self.copy(grad, &g, true);
        let p = param.map(|param| {
            let p = RawBuf {
                addr: self.p.as_mut_ptr() as usize,
                ..*param
            };
            self.copy(param, &p, true);
            p
        });
        (p, g)
    }

    /// Copies the parameter scratch back into the caller's buffer `param`.
    pub fn scatter(&mut self, param: &RawBuf) {
        let p = RawBuf {
            addr: self.p.as_mut_ptr() as usize,
            ..*param
        };
        self.copy(&p, param, false);
    }

    /// Copies between the strided buffer (`gather`: `from`; else `to`) and the logical one.
    fn copy(&self, from: &RawBuf, to: &RawBuf, gather: bool) {
        if from.numel == 0 {
            return;
        }
        match from.dtype.size() {
            2 => self.copy_elems::<u16>(from.addr, to.addr, gather),
            _ => self.copy_elems::<u32>(from.addr, to.addr, gather),
        }
    }

    fn copy_elems<T: Copy>(&self, from: usize, to: usize, gather: bool) {
        let rank = self.shape.len();
        let (n, s) = (self.shape[rank - 1], self.strides[rank - 1]);
        let outer = &self.shape[..rank - 1];
        // The outer multi-index on the stack (rank <= 32, `Param::new`): a step allocates nothing.
        let mut idx_buf = [0usize; 32];
        let idx = &mut idx_buf[..outer.len()];
        let mut logical = 0usize;
        let (from, to) = (from as *const T, to as *mut T);
        loop {
            let mem: usize = idx.iter().zip(&self.strides).map(|(i, s)| i * s).sum();
            for j in 0..n {
                let (src, dst) = if gather {
                    (mem + j * s, logical + j)
                } else {
                    (logical + j, mem + j * s)
                };
                // SAFETY: both buffers hold `numel` elements of T (the caller's registered
                // buffer, or scratch sized for it); a dense non-overlapping layout
                // (`check_dense`) maps every logical index to a memory offset below `numel`,
                // and the two buffers never overlap (the scratch is the library's own).
                unsafe { *to.add(dst) = *from.add(src) };
            }
            logical += n;
            let mut d = outer.len();
            loop {
                if d == 0 {
                    return;
                }
                d -= 1;
                idx[d] += 1;
                if idx[d] < outer[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dense_layouts_are_told_from_others() {
        // channels_last (O, I, kH, kW) = (2, 3, 4, 5): strides (60, 1, 15, 3)
        let shape = [2, 3, 4, 5];
        assert_eq!(
            check_dense("w", &shape, &[60, 1, 15, 3]).unwrap(),
            (vec![60, 1, 15, 3], false)
        );
        assert!(check_dense("w", &shape, &[60, 20, 5, 1]).unwrap().1);
        // size-1 dimensions may have any stride
        assert!(check_dense("w", &[3, 1, 4], &[4, 99, 1]).unwrap().1);
        // gaps, overlaps, negative strides, wrong rank
        for bad in [[120, 40, 10, 2], [60, 1, 15, 2], [60, 20, 5, -1]] {
            assert!(check_dense("w", &shape, &bad).is_err(), "{bad:?}");
        }
        assert!(check_dense("w", &shape, &[1, 2, 3]).is_err());
    }

    #[test]
    fn gather_then_scatter_is_the_identity_and_gathers_in_logical_order() {
        // a (3, 4) matrix stored transposed: element (i, j) at j*3 + i
        let shape = [3, 4];
        let mem: Vec<f32> = (0..12).map(|k| k as f32).collect();
        let mut s = Strided::new(&shape, vec![1, 3], DType::F32, "t").unwrap();
        let buf = RawBuf {
            addr: mem.as_ptr() as usize,
            dtype: DType::F32,
            numel: 12,
        };
        let (p, g) = s.gather(Some(&buf), &buf);
        // SAFETY: the scratch holds 12 f32 values.
        let logical = unsafe { std::slice::from_raw_parts(g.addr as *const f32, 12) };
        let want: Vec<f32> = (0..12).map(|k| ((k % 4) * 3 + k / 4) as f32).collect();
        assert_eq!(logical, &want[..]);
        assert_eq!(p.unwrap().numel, 12);
        let mut out = vec![0f32; 12];
        s.scatter(&RawBuf {
            addr: out.as_mut_ptr() as usize,
            ..buf
        });
        assert_eq!(out, mem);
    }
}
