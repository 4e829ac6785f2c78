//! Gradient accumulation on distributed optimizers on the emulated CUDA backend
//! (`LOMO_CUDA_EMULATE=1`), threads as ranks through the C ABI: ranks holding pieces of rows,
//! columns, flat pieces (LOMO) or replicas (submitting the reduced gradient, or the library
//! reducing it) accumulating k micro-batches equal one CPU rank
//! without accumulation on the global batch's gradient (`common::dist_accum::compare`; LOMO bit
//! for bit, AdaLomo within the CPU/CUDA parity tolerance).

mod common;

use common::dist::*;
use common::dist_accum::*;
use lomo::ffi::dist::{LOMO_GRAD_ALL_REDUCE, LOMO_GRAD_REDUCE_SCATTER};

/// The CUDA backend (emulated): pieces of rows and replicas submitting the reduced gradient.
#[test]
fn accumulating_cuda_ranks_equal_one_cpu_rank() {
    for algorithm in [0, 1] {
        for full in [false, true] {
            let base = Case {
                full,
                device: 0,
                ..case(algorithm)
            };
            for (k, n) in [(2, 2), (3, 3)] {
                for c in variants(&base, k) {
                    compare(&c, n);
                }
            }
        }
    }
}

/// Columns, LOMO flat pieces, and the library's gradient modes (replicas with ALL_REDUCE, LOMO
/// flat partitions with REDUCE_SCATTER: the buffer holds the whole local gradient).
#[test]
fn accumulating_cuda_ranks_of_other_layouts_equal_one_cpu_rank() {
    let cases = [
        (
            0,
            Case {
                cols: true,
                ..case(0)
            },
        ),
        (
            1,
            Case {
                cols: true,
                ..case(1)
            },
        ),
        (
            0,
            Case {
                flat: true,
                ..case(0)
            },
        ),
        (
            0,
            Case {
                grad_mode: LOMO_GRAD_ALL_REDUCE,
                ..case(0)
            },
        ),
        (
            1,
            Case {
                grad_mode: LOMO_GRAD_ALL_REDUCE,
                ..case(1)
            },
        ),
        (
            0,
            Case {
                grad_mode: LOMO_GRAD_REDUCE_SCATTER,
                ..case(0)
            },
        ),
    ];
    for (_, c) in cases {
        let base = Case { device: 0, ..c };
        for c in variants(&base, 2) {
            compare(&c, 2);
        }
    }
}
