//! Checkpoints of a distributed run, threads as ranks through the C ABI: every rank serializes
//! its own state midway (`lomo_state_serialize`), fresh optimizers with the same pieces load it
//! (`lomo_state_deserialize`) and continue — bit for bit the parameters of the straight run, for
//! LOMO and AdaLomo on pieces of rows, of columns and flat pieces (whose AdaLomo state is the
//! whole tensor's row and column vectors), with dynamic loss scaling.

mod common;

use std::sync::Arc;

use common::dist::*;
use common::*;
use lomo::ffi::dist::*;
use lomo::ffi::state::{lomo_state_deserialize, lomo_state_serialize, lomo_state_size};
use lomo::ffi::types::LOMO_DEVICE_CPU;

const RANKS: usize = 2;
const SHAPE: [i64; 2] = [6, 4];
const VEC: usize = 5;

/// One rank's optimizer with its piece of a [6, 4] matrix (rows or columns) and of a [5]
/// vector, plus the global indices of both pieces.
fn rank_opt(
    c: &Case,
    group: &Arc<Group>,
    r: usize,
    data: &[Vec<f32>],
) -> (Opt, Vec<Buf>, Vec<Vec<usize>>) {
    let opt = Opt::new(&cfg_of(c)).unwrap();
    let comm = add_comm(&opt, group, r);
    let (rows, cols) = (SHAPE[0] as usize, SHAPE[1] as usize);
    let units = if c.cols { cols } else { rows };
    let (a, b) = if c.flat {
        flat_split(rows * cols, RANKS, r)
    } else {
        split(units, RANKS, r)
    };
    let m_idx: Vec<usize> = if c.flat {
        (a..b).collect()
    } else if c.cols {
        (0..rows)
            .flat_map(|i| (a..b).map(move |j| i * cols + j))
            .collect()
    } else {
        (a * cols..b * cols).collect()
    };
    let m_local = if c.flat {
        vec![(b - a) as i64]
    } else if c.cols {
        vec![rows as i64, (b - a) as i64]
    } else {
        vec![(b - a) as i64, cols as i64]
    };
    let (va, vb) = split(VEC, RANKS, r);
    let v_idx: Vec<usize> = (va..vb).collect();
    let mut bufs = vec![
        Buf::new(
            c.dtype,
            &m_idx.iter().map(|&k| data[0][k]).collect::<Vec<_>>(),
        ),
        Buf::new(
            c.dtype,
            &v_idx.iter().map(|&k| data[1][k]).collect::<Vec<_>>(),
        ),
    ];
    let m = opt
        .register_on("m", bufs[0].ptr(), c.dtype, &m_local, c.device, 0, 0)
        .unwrap();
    let v = opt
        .register_on(
            "v",
            bufs[1].ptr(),
            c.dtype,
            &[(vb - va) as i64],
            c.device,
            0,
            0,
        )
        .unwrap();
    let layout = if c.flat {
        LOMO_LAYOUT_FLAT
    } else if c.cols {
        LOMO_LAYOUT_COLS
    } else {
        LOMO_LAYOUT_ROWS
    };
    shard(&opt, m, layout, &SHAPE, a as i64, comm, 0).unwrap();
    shard(&opt, v, LOMO_LAYOUT_ROWS, &[VEC as i64], va as i64, comm, 0).unwrap();
    dist_set(&opt, comm, LOMO_DIST_CHECK).unwrap();
    (opt, bufs, vec![m_idx, v_idx])
}

fn steps(opt: &Opt, grads: &[Vec<Vec<f32>>], pieces: &[Vec<usize>], dtype: u32) {
    for (step, g) in grads.iter().enumerate() {
        let scale = opt.loss_scale();
        opt.begin(1, [0.05f32, 0.02][step % 2]).unwrap();
        for (i, idx) in pieces.iter().enumerate() {
            let mut gb = Buf::new(
                dtype,
                &idx.iter().map(|&k| g[i][k] * scale).collect::<Vec<_>>(),
            );
            opt.submit(i as u32, gb.ptr(), dtype).unwrap();
        }
        opt.end().unwrap();
    }
}

fn serialize(opt: &Opt) -> Vec<u8> {
    let mut n = 0;
    // SAFETY: live handle, valid out pointers and a buffer of the reported size.
    unsafe {
        check(lomo_state_size(opt.0, &mut n)).unwrap();
        let mut buf = vec![0u8; n];
        let mut written = 0;
        check(lomo_state_serialize(
            opt.0,
            buf.as_mut_ptr(),
            n,
            &mut written,
        ))
        .unwrap();
        buf.truncate(written);
        buf
    }
}

/// Runs `ranks` threads of `f(rank)` and returns their results in rank order.
fn on_ranks<T: Send>(f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..RANKS)
            .map(|r| {
                let f = &f;
                s.spawn(move || f(r))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn a_resumed_distributed_run_equals_the_straight_run() {
    resumed_equals_straight(
        LOMO_DEVICE_CPU,
        &[(false, false), (true, false), (false, true)],
    );
}

/// The same on the emulated CUDA backend (row pieces: columns and flat pieces are CPU only).
#[cfg(feature = "cuda-emulation")]
#[test]
fn a_resumed_distributed_cuda_run_equals_the_straight_run() {
    std::env::set_var("LOMO_CUDA_EMULATE", "1");
    resumed_equals_straight(0, &[(false, false)]);
}

/// `layouts`: (columns, flat) pieces.
fn resumed_equals_straight(device: i32, layouts: &[(bool, bool)]) {
    for algorithm in [0, 1] {
        for &(cols, flat) in layouts {
            let c = Case {
                cols,
                flat,
                dynamic: true,
                dtype: BF16,
                stochastic: true,
                device,
                ..case(algorithm)
            };
            let mut rng = Rng::new(17);
            let data = vec![dyadic(&mut rng, 24), dyadic(&mut rng, VEC)];
            let grads: Vec<Vec<Vec<f32>>> = (0..4)
                .map(|_| vec![dyadic(&mut rng, 24), dyadic(&mut rng, VEC)])
                .collect();
            let straight_group = Group::new(RANKS);
            let straight = on_ranks(|r| {
                let (opt, bufs, pieces) = rank_opt(&c, &straight_group, r, &data);
                steps(&opt, &grads, &pieces, c.dtype);
                bufs.iter().map(|b| b.values()).collect::<Vec<_>>()
            });
            let (first, second) = (Group::new(RANKS), Group::new(RANKS));
            let resumed = on_ranks(|r| {
                let (opt, bufs, pieces) = rank_opt(&c, &first, r, &data);
                steps(&opt, &grads[..2], &pieces, c.dtype);
                let state = serialize(&opt);
                let values: Vec<Vec<f32>> = bufs.iter().map(|b| b.values()).collect();
                drop(opt);
                // A fresh process: the parameters as they were saved, the state from the file.
                let (opt2, mut fresh, _) = rank_opt(&c, &second, r, &data);
                for (b, v) in fresh.iter_mut().zip(&values) {
                    let src = Buf::new(c.dtype, v);
                    // Same length and dtype: into the registered buffers, in place.
                    if c.dtype == F32 {
                        b.f32s.copy_from_slice(&src.f32s)
                    } else {
                        b.halves.copy_from_slice(&src.halves)
                    }
                }
                // SAFETY: live handle, the serialized bytes of the same configuration.
                check(unsafe { lomo_state_deserialize(opt2.0, state.as_ptr(), state.len()) })
                    .unwrap();
                steps(&opt2, &grads[2..], &pieces, c.dtype);
                fresh.iter().map(|b| b.values()).collect::<Vec<_>>()
            });
            for r in 0..RANKS {
                for (i, (a, b)) in straight[r].iter().zip(&resumed[r]).enumerate() {
                    let same = a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
                    assert!(
                        same,
                        "algorithm {algorithm} cols {cols} flat {flat} rank {r} tensor {i}: {a:?} \
                         vs {b:?}"
                    );
                }
            }
        }
    }
}
