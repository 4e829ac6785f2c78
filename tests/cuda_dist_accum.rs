//! Gradient accumulation on distributed optimizers on the emulated CUDA backend
//! (`LOMO_CUDA_EMULATE=1`), threads as ranks through the C ABI: ranks holding pieces of rows or
//! replicas (submitting the reduced gradient) accumulating k micro-batches equal one CPU rank
//! without accumulation on the global batch's gradient (`common::dist_accum::compare`; LOMO bit
//! for bit, AdaLomo within the CPU/CUDA parity tolerance).

mod common;

use common::dist::*;
use common::dist_accum::*;

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
