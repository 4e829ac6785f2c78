//! [`super::tensor_split`] against [`super::tensor`] on the whole tensor: a tensor cut into
//! pieces (rows or columns), each piece's statistics summed by the test in piece order (as
//! `jax.lax.psum` would), then applied, gives the whole tensor's parameter and state bit for bit
//! on dyadic values (exact sums; update clip inactive), and stops before writing anything while a
//! round is missing.

use super::*;
use crate::backend::cpu::adalomo::{AdaWorkspace, StateViewMut};
use crate::backend::cpu::step::{CpuAda, CpuPiece, CpuStep, CpuTensor, HostStep};
use crate::backend::{GradXform, TensorUpdate};
use crate::config::Config;
use crate::dtype::DType;

const R: usize = 6;
const C: usize = 10;

fn dyadic(seed: u32, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let v = (i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 27; // 0..31
            (v as f32 - 16.0) / 16.0 * scale
        })
        .collect()
}

fn buf(v: &mut [f32]) -> RawBuf {
    RawBuf {
        addr: v.as_mut_ptr() as usize,
        dtype: DType::F32,
        numel: v.len(),
    }
}

fn update() -> TensorPass {
    TensorPass::Update(TensorUpdate {
        param_id: 3,
        lr_multiplier: 1.0,
        weight_decay: 0.01,
        prechecked: false,
        per_element: false,
        carry: false,
    })
}

fn backend(cfg: &Config) -> CpuStep<'_> {
    CpuStep {
        cfg,
        host: HostStep {
            xf: GradXform {
                inv_scale: 1.0,
                clip_value: f32::INFINITY,
                coef: 1.0,
            },
            lr: 0.05,
            step: 1,
            skip: false,
        },
    }
}

/// One piece: its parameter, gradient and state, and where it lies.
struct Piece {
    p: Vec<f32>,
    g: Vec<f32>,
    row: Vec<f32>,
    col: Vec<f32>,
    rows: usize,
    cols: usize,
    offset: u64,
}

/// Runs one split call on a piece; returns `Ok(done)` and the partial record when it stopped.
fn run(
    cfg: &Config,
    pc: &mut Piece,
    cols_of: Option<usize>,
    reduced: &[Vec<f64>],
) -> (bool, Vec<f64>, bool) {
    let b = backend(cfg);
    let rec_len = match cols_of {
        Some(_) => crate::backend::cpu::ada_cols::record_len(R),
        None => crate::backend::cpu::ada_piece::record_len(C, true),
    };
    let mut record = vec![0.0; rec_len];
    let mut ws = AdaWorkspace::new(pc.rows, pc.cols, true).unwrap();
    if cols_of.is_some() {
        ws.prepare_cols().unwrap();
    }
    let view = StateViewMut::Factored {
        row: &mut pc.row,
        col: &mut pc.col,
    };
    let grad = buf(&mut pc.g);
    let mut t = CpuTensor::new(buf(&mut pc.p), Some(CpuAda::new(view, &mut ws, None)));
    t.piece = Some(CpuPiece {
        global_numel: R * C,
        global_rows: R,
        elem_offset: pc.offset,
        cols_of,
        flat: false,
        record: &mut record,
        round: 0,
        row_mean: 0.0,
    });
    let mut split = Split {
        reduced: reduced.iter().map(|r| r.as_slice()).collect(),
        ..Split::default()
    };
    let done = tensor_split(&b, Algorithm::Adalomo, &mut t, &grad, &update(), &mut split).unwrap();
    (done, split.partial, t.finite)
}

fn sum(records: &[Vec<f64>]) -> Vec<f64> {
    let mut out = vec![0.0; records[0].len()];
    for r in records {
        for (o, v) in out.iter_mut().zip(r) {
            *o += v;
        }
    }
    out
}

fn whole(cfg: &Config, p: &mut [f32], g: &mut [f32]) -> (Vec<f32>, Vec<f32>) {
    let (mut row, mut col) = (vec![0f32; R], vec![0f32; C]);
    let mut ws = AdaWorkspace::new(R, C, true).unwrap();
    let view = StateViewMut::Factored {
        row: &mut row,
        col: &mut col,
    };
    let grad = buf(g);
    let mut t = CpuTensor::new(buf(p), Some(CpuAda::new(view, &mut ws, None)));
    tensor(
        &backend(cfg),
        Algorithm::Adalomo,
        &mut t,
        &grad,
        &update(),
        None,
    )
    .unwrap();
    assert!(t.finite);
    (row, col)
}

fn config() -> Config {
    let mut cfg = Config::defaults(Algorithm::Adalomo);
    cfg.clip_threshold = 1e4; // RMS(u) is not a dyadic sum: keep the update clip inactive
    cfg
}

#[test]
fn row_pieces_equal_the_whole_tensor() {
    let cfg = config();
    let (mut p, mut g) = (dyadic(1, R * C, 1.0), dyadic(2, R * C, 4.0));
    let p0 = p.clone();
    let (row, col) = whole(&cfg, &mut p, &mut g);
    let h = R / 2;
    let mut pieces: Vec<Piece> = (0..2)
        .map(|k| Piece {
            p: p0[k * h * C..(k + 1) * h * C].to_vec(),
            g: g[k * h * C..(k + 1) * h * C].to_vec(),
            row: vec![0.0; h],
            col: vec![0.0; C],
            rows: h,
            cols: C,
            offset: (k * h * C) as u64,
        })
        .collect();
    let before: Vec<Vec<f32>> = pieces.iter().map(|pc| pc.p.clone()).collect();
    let partials: Vec<Vec<f64>> = pieces
        .iter_mut()
        .map(|pc| {
            let (done, rec, _) = run(&cfg, pc, None, &[]);
            assert!(
                !done,
                "the statistics call must stop at the unreduced round"
            );
            rec
        })
        .collect();
    for (pc, b) in pieces.iter().zip(&before) {
        assert_eq!(&pc.p, b, "a statistics call wrote the parameter");
    }
    let r1 = sum(&partials);
    for pc in &mut pieces {
        let (done, _, finite) = run(&cfg, pc, None, std::slice::from_ref(&r1));
        assert!(done && finite);
    }
    let got: Vec<f32> = pieces.iter().flat_map(|pc| pc.p.clone()).collect();
    assert_eq!(got, p);
    let got_row: Vec<f32> = pieces.iter().flat_map(|pc| pc.row.clone()).collect();
    assert_eq!(got_row, row);
    for pc in &pieces {
        assert_eq!(pc.col, col);
    }
}

#[test]
fn column_pieces_take_two_rounds_and_equal_the_whole_tensor() {
    let cfg = config();
    let (mut p, mut g) = (dyadic(3, R * C, 1.0), dyadic(4, R * C, 2.0));
    let p0 = p.clone();
    let (row, col) = whole(&cfg, &mut p, &mut g);
    let w = C / 2;
    let cut = |v: &[f32], k: usize| -> Vec<f32> {
        (0..R)
            .flat_map(|i| v[i * C + k * w..i * C + (k + 1) * w].to_vec())
            .collect()
    };
    let mut pieces: Vec<Piece> = (0..2)
        .map(|k| Piece {
            p: cut(&p0, k),
            g: cut(&g, k),
            row: vec![0.0; R],
            col: vec![0.0; w],
            rows: R,
            cols: w,
            offset: (k * w) as u64,
        })
        .collect();
    let r1 = sum(&pieces
        .iter_mut()
        .map(|pc| run(&cfg, pc, Some(C), &[]).1)
        .collect::<Vec<_>>());
    let r2 = sum(&pieces
        .iter_mut()
        .map(|pc| {
            let (done, rec, _) = run(&cfg, pc, Some(C), std::slice::from_ref(&r1));
            assert!(!done);
            rec
        })
        .collect::<Vec<_>>());
    assert_eq!(r2.len(), 1);
    for pc in &mut pieces {
        let (done, _, finite) = run(&cfg, pc, Some(C), &[r1.clone(), r2.clone()]);
        assert!(done && finite);
    }
    for (k, pc) in pieces.iter().enumerate() {
        assert_eq!(pc.p, cut(&p, k));
        assert_eq!(pc.row, row);
        assert_eq!(pc.col, col[k * w..(k + 1) * w]);
    }
}

#[test]
fn a_non_finite_piece_skips_every_piece_and_a_wrong_record_is_refused() {
    let cfg = config();
    let h = R / 2;
    let mut pieces: Vec<Piece> = (0..2)
        .map(|k| Piece {
            p: dyadic(5 + k as u32, h * C, 1.0),
            g: dyadic(7 + k as u32, h * C, 1.0),
            row: vec![0.0; h],
            col: vec![0.0; C],
            rows: h,
            cols: C,
            offset: (k * h * C) as u64,
        })
        .collect();
    pieces[1].g[3] = f32::NAN;
    let before: Vec<Vec<f32>> = pieces.iter().map(|pc| pc.p.clone()).collect();
    let r1 = sum(&pieces
        .iter_mut()
        .map(|pc| run(&cfg, pc, None, &[]).1)
        .collect::<Vec<_>>());
    for (pc, b) in pieces.iter_mut().zip(&before) {
        let (done, _, finite) = run(&cfg, pc, None, std::slice::from_ref(&r1));
        assert!(done && !finite);
        assert_eq!(&pc.p, b);
        assert!(pc.row.iter().chain(&pc.col).all(|&v| v == 0.0));
    }
    // A record of the wrong length is an error before anything is written.
    let b = backend(&cfg);
    let pc = &mut pieces[0];
    let mut record = vec![0.0; crate::backend::cpu::ada_piece::record_len(C, true)];
    let mut ws = AdaWorkspace::new(h, C, true).unwrap();
    let view = StateViewMut::Factored {
        row: &mut pc.row,
        col: &mut pc.col,
    };
    let grad = buf(&mut pc.g);
    let mut t = CpuTensor::new(buf(&mut pc.p), Some(CpuAda::new(view, &mut ws, None)));
    t.piece = Some(CpuPiece {
        global_numel: R * C,
        global_rows: R,
        elem_offset: 0,
        cols_of: None,
        flat: false,
        record: &mut record,
        round: 0,
        row_mean: 0.0,
    });
    let short = [0.0; 3];
    let mut split = Split {
        reduced: vec![&short[..]],
        ..Split::default()
    };
    let err = tensor_split(&b, Algorithm::Adalomo, &mut t, &grad, &update(), &mut split);
    assert!(err.is_err());
    assert_eq!(pc.p, before[0]);
}
