//! Distributed steps through the real C ABI, threads as ranks (`notes/distributed.md` §7, T1):
//! an in-process communicator (`lomo_comm` callbacks over a barrier and a slot table, summing in
//! rank order) and one optimizer per thread, each holding a piece of every tensor. After every
//! step the assembled pieces must equal one rank holding the whole tensors and submitting the
//! whole (reduced) gradients — LOMO bit for bit (dyadic inputs make every reduction exact),
//! AdaLomo within f32 rounding (its `D_j` sums divide by the row state) — and every rank must
//! agree on the step's scalars. Plus: replicas with `LOMO_SHARD_NORM_DUPLICATE`, overflow in one
//! rank's piece, a failing callback (`LOMO_STATUS_COMM_ERROR`, nothing changed) and ranks that
//! disagree (`LOMO_STATUS_DIST_MISMATCH` on every rank).

mod common;

use common::dist::*;
use common::*;

fn compare(c: &Case, n: usize) {
    let (whole, whole_info) = run(c, 0);
    let (pieces, infos) = run(c, n);
    let what = format!(
        "n={n} {:?}",
        (
            c.algorithm,
            c.dtype,
            c.clip_norm,
            c.clip_value,
            c.wd,
            c.stochastic,
            c.dynamic,
            c.carry,
            c.inf
        )
    );
    for step in 0..STEPS {
        for (i, (w, p)) in whole[step].iter().zip(&pieces[step]).enumerate() {
            assert_eq!(w.len(), p.len());
            for (k, (a, b)) in w.iter().zip(p).enumerate() {
                let ok = if c.algorithm == 0 {
                    a.to_bits() == b.to_bits()
                } else {
                    ulps(c.dtype, *a, *b) <= 1.0 || (a - b).abs() <= 1e-7 + 1e-6 * a.abs()
                };
                assert!(
                    ok,
                    "{what}: step {step} tensor {i} element {k}: whole {a}, pieces {b}"
                );
            }
        }
        let w = whole_info[0][step];
        for (r, info) in infos.iter().enumerate() {
            let i = info[step];
            assert_eq!(
                (
                    i.step,
                    i.skipped,
                    i.overflow,
                    i.loss_scale.to_bits(),
                    i.next_loss_scale.to_bits(),
                    i.grad_norm.to_bits(),
                    i.clip_coef.to_bits()
                ),
                (
                    w.step,
                    w.skipped,
                    w.overflow,
                    w.loss_scale.to_bits(),
                    w.next_loss_scale.to_bits(),
                    w.grad_norm.to_bits(),
                    w.clip_coef.to_bits()
                ),
                "{what}: step {step} rank {r}: diagnostics differ from one rank's"
            );
        }
    }
}

#[test]
fn row_pieces_equal_one_rank_lomo() {
    for n in 1..=4 {
        compare(&case(0), n);
        compare(
            &Case {
                clip_norm: 0.5,
                wd: 0.1,
                clip_value: 0.3,
                ..case(0)
            },
            n,
        );
        compare(
            &Case {
                dtype: BF16,
                stochastic: true,
                ..case(0)
            },
            n,
        );
        compare(
            &Case {
                dynamic: true,
                clip_norm: 1.0,
                inf: Some((1, 0)),
                ..case(0)
            },
            n,
        );
        compare(
            &Case {
                dynamic: true,
                inf: Some((2, 1)),
                ..case(0)
            },
            n,
        );
    }
}

#[test]
fn column_pieces_equal_one_rank() {
    for n in 1..=4 {
        for algorithm in [0, 1] {
            let c = Case {
                cols: true,
                ..case(algorithm)
            };
            compare(&c, n);
            compare(
                &Case {
                    clip_norm: 0.5,
                    wd: 0.1,
                    clip_value: 0.3,
                    carry: true,
                    ..c.clone()
                },
                n,
            );
            compare(
                &Case {
                    dtype: BF16,
                    stochastic: true,
                    ..c.clone()
                },
                n,
            );
            compare(
                &Case {
                    dynamic: true,
                    clip_norm: 1.0,
                    inf: Some((1, 2)),
                    ..c.clone()
                },
                n,
            );
            compare(
                &Case {
                    dynamic: true,
                    inf: Some((2, 0)),
                    ..c.clone()
                },
                n,
            );
        }
    }
}

#[test]
fn row_pieces_equal_one_rank_adalomo() {
    for n in 1..=4 {
        compare(&case(1), n);
        compare(
            &Case {
                clip_norm: 0.5,
                wd: 0.1,
                clip_value: 0.3,
                carry: true,
                ..case(1)
            },
            n,
        );
        compare(
            &Case {
                dtype: BF16,
                stochastic: true,
                ..case(1)
            },
            n,
        );
        compare(
            &Case {
                dynamic: true,
                clip_norm: 1.0,
                inf: Some((1, 2)),
                ..case(1)
            },
            n,
        );
        compare(
            &Case {
                dynamic: true,
                inf: Some((2, 0)),
                ..case(1)
            },
            n,
        );
    }
}
