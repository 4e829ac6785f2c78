//! The CPU backend against an independent f64 reference of LOMO and AdaLomo
//! (`reference/semantics.md` §2.4, §3.3 with design.md §4), through the C API, on random shapes
//! (0-D, 1-D, 1×1, 3×4097, 3-D, 5×7×11) for every option combination, over two steps so
//! AdaLomo's moving averages are exercised.

mod common;

use common::reference::*;
use common::*;

#[test]
fn matches_f64_reference_for_every_option() {
    let mut seed = 1;
    for algorithm in [0u32, 1] {
        for pdtype in [F32, F16, BF16] {
            for gdtype in [pdtype, F32] {
                for clip_norm in [0.0, 0.5] {
                    for clip_value in [0.0, 0.2] {
                        for wd in [0.0, 0.1] {
                            for scale in [0.0, 1024.0] {
                                for carry in [false, true] {
                                    if carry && algorithm == 0 {
                                        continue;
                                    }
                                    let c = Case {
                                        algorithm,
                                        pdtype,
                                        gdtype,
                                        clip_norm,
                                        clip_value,
                                        wd,
                                        scale,
                                        carry,
                                        pscale: 1.0,
                                    };
                                    run_case(c, &shapes(), seed);
                                    seed += 1;
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn large_tensor_uses_many_chunks_and_still_matches() {
    // 300×1000 is split into several chunks and run on the thread pool.
    for algorithm in [0u32, 1] {
        let c = Case {
            algorithm,
            pdtype: F32,
            gdtype: BF16,
            clip_norm: 1.0,
            clip_value: 0.0,
            wd: 0.01,
            scale: 0.0,
            carry: algorithm == 1,
            pscale: 1.0,
        };
        run_case(c, &[vec![300, 1000], vec![70000]], 99);
    }
}
