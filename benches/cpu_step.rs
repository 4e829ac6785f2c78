//! `cargo bench --bench cpu_step`: time one optimizer step on the CPU backend for a 4096×4096
//! tensor (f32 and bf16 parameters and gradients), LOMO and AdaLomo, through the core API.
//! Prints the median of several runs and the effective bandwidth on the minimum bytes each
//! variant must move (LOMO without a NORM phase reads the gradient twice: see `Variant`), and
//! the same run's **memory floor**: a streaming copy (same threads) moving the algorithm's
//! minimum bytes per element (LOMO 3 × the element size: read g and p, write p; AdaLomo 5 ×),
//! each variant reported as a fraction of that floor's time (1.0 = at the floor).
//! Then the per-call cost of small tensors: `lomo_grad_submit` of 1- and 4096-element tensors
//! (256 tensors per step, the time of begin + submits + end divided by 256).
//! `LOMO_BENCH_ONLY=tag,...` selects rows (e.g. `lomo-f32,lomo-f32-elem,small`).

use std::time::Instant;

use lomo::{Algorithm, Config, DType, Device, NonFinitePolicy, Optimizer, ParamDesc, Phase};

/// Process CPU time in seconds (all threads): less sensitive than wall time to other load.
fn cpu_time() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out pointer for clock_gettime.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// What is timed: the UPDATE phase of a step without a NORM phase (LOMO then pre-checks the
/// gradient for non-finite values in an extra read), the same with `LOMO_PARAM_CARRY_RMS`
/// (AdaLomo), the UPDATE phase of a step whose NORM phase (untimed) already checked it, or
/// LOMO with `NonFinitePolicy::PerElement` (one pass, no pre-check).
#[derive(Clone, Copy, PartialEq)]
enum Variant {
    Plain,
    Carry,
    AfterNorm,
    PerElement,
}

impl Variant {
    fn tag(self) -> &'static str {
        match self {
            Variant::Plain => "",
            Variant::Carry => "carry",
            Variant::AfterNorm => "norm",
            Variant::PerElement => "elem",
        }
    }
}

fn bench(algorithm: Algorithm, dtype: DType, rows: usize, cols: usize, v: Variant, reps: usize) {
    let carry = v == Variant::Carry;
    let tag = format!(
        "{}-{}{}{}",
        algorithm.as_str(),
        dtype.as_str(),
        if v == Variant::Plain { "" } else { "-" },
        v.tag()
    );
    if let Ok(only) = std::env::var("LOMO_BENCH_ONLY") {
        if !only.split(',').any(|o| o == tag) {
            return;
        }
    }
    let n = rows * cols;
    let mut cfg = Config::defaults(algorithm);
    cfg.weight_decay = 0.01;
    if v == Variant::PerElement {
        cfg.nonfinite = NonFinitePolicy::PerElement;
    }
    let mut opt = Optimizer::new(cfg).unwrap();
    let bytes = dtype.size();
    // Buffers of u32 words so every dtype is aligned; values are small finite numbers.
    let fill = |seed: u32| -> Vec<u32> {
        (0..(n * bytes).div_ceil(4))
            .map(|i| {
                let h = (i as u32 ^ seed).wrapping_mul(2_654_435_761) >> 20;
                let v = (h as f32 / 4096.0 - 0.5) * 0.1;
                match dtype {
                    DType::F32 => v.to_bits(),
                    DType::Bf16 => {
                        let b = half::bf16::from_f32(v).to_bits() as u32;
                        b | (b << 16)
                    }
                    DType::F16 => {
                        let b = half::f16::from_f32(v).to_bits() as u32;
                        b | (b << 16)
                    }
                }
            })
            .collect()
    };
    let mut p = fill(1);
    let g = fill(2);
    let shape = [rows as i64, cols as i64];
    let id = opt
        .register(&ParamDesc {
            name: "w",
            addr: p.as_mut_ptr() as usize,
            dtype,
            shape: &shape,
            device: Device::Cpu,
            group: 0,
            flags: if carry { 1 } else { 0 },
        })
        .unwrap();
    let mut times = Vec::new();
    let mut cpu = Vec::new();
    for _ in 0..reps {
        if v == Variant::AfterNorm {
            opt.begin(Phase::Norm, 0.0).unwrap();
            opt.submit(id, g.as_ptr() as usize, dtype).unwrap();
            opt.end().unwrap();
        }
        let (t, c) = (Instant::now(), cpu_time());
        opt.begin(Phase::Update, 1e-4).unwrap();
        opt.submit(id, g.as_ptr() as usize, dtype).unwrap();
        opt.end().unwrap();
        times.push(t.elapsed().as_secs_f64());
        cpu.push(cpu_time() - c);
    }
    let t = median(times[1..].to_vec());
    let c = median(cpu[1..].to_vec());
    let min_bytes = match algorithm {
        Algorithm::Lomo if v == Variant::Plain => 4 * bytes,
        Algorithm::Lomo => 3 * bytes,
        Algorithm::Adalomo if carry => 4 * bytes,
        Algorithm::Adalomo => 5 * bytes,
    };
    let floor_bytes = match algorithm {
        Algorithm::Lomo => 3 * bytes,
        Algorithm::Adalomo => 5 * bytes,
    };
    drop(opt);
    drop((p, g));
    let floor = floor_copy(n * floor_bytes, reps);
    println!(
        "{:<8} {:<5} {:>5}x{:<5} {:<6} {:>8.2} ms  {:>6.1} GB/s on {} B/elem  (cpu {:.2} ms)  \
         floor {:>2} B/elem {:>6.2} ms: {:.2} of the floor",
        algorithm.as_str(),
        dtype.as_str(),
        rows,
        cols,
        v.tag(),
        t * 1e3,
        (n * min_bytes) as f64 / t / 1e9,
        min_bytes,
        c * 1e3,
        floor_bytes,
        floor * 1e3,
        floor / t
    );
}

/// The memory floor: median time of a streaming copy (split over the library's thread count)
/// that reads `bytes / 2` and writes `bytes / 2`, measured right after the variant, in the same
/// process. Fresh buffers, touched once before timing (no page faults timed).
fn floor_copy(bytes: usize, reps: usize) -> f64 {
    let words = bytes / 2 / 8;
    let src: Vec<u64> = (0..words as u64).collect();
    let mut dst = vec![0u64; words];
    let threads = lomo::backend::cpu::num_threads().max(1);
    let per = words.div_ceil(threads);
    let mut times = Vec::new();
    for _ in 0..reps {
        let t = Instant::now();
        std::thread::scope(|s| {
            for (d, c) in dst.chunks_mut(per).zip(src.chunks(per)) {
                s.spawn(move || d.copy_from_slice(c));
            }
        });
        times.push(t.elapsed().as_secs_f64());
    }
    std::hint::black_box(&dst);
    median(times[1..].to_vec())
}

/// Per-call cost of small tensors: 256 tensors of `n` elements (f32), one UPDATE phase per
/// repetition; prints the median time per `submit` (begin and end amortised over the 256).
fn bench_small(algorithm: Algorithm, n: usize, reps: usize) {
    let tag = format!("small-{}-{n}", algorithm.as_str());
    if let Ok(only) = std::env::var("LOMO_BENCH_ONLY") {
        if !only.split(',').any(|o| o == tag || o == "small") {
            return;
        }
    }
    const TENSORS: usize = 256;
    let mut cfg = Config::defaults(algorithm);
    cfg.weight_decay = 0.01;
    let mut opt = Optimizer::new(cfg).unwrap();
    let mut params: Vec<Vec<f32>> = (0..TENSORS).map(|_| vec![0.01f32; n]).collect();
    let grads: Vec<Vec<f32>> = (0..TENSORS).map(|_| vec![1e-3f32; n]).collect();
    let shape = [n as i64];
    let ids: Vec<u32> = params
        .iter_mut()
        .enumerate()
        .map(|(k, p)| {
            opt.register(&ParamDesc {
                name: &format!("p{k}"),
                addr: p.as_mut_ptr() as usize,
                dtype: DType::F32,
                shape: &shape,
                device: Device::Cpu,
                group: 0,
                flags: 0,
            })
            .unwrap()
        })
        .collect();
    let mut times = Vec::new();
    for _ in 0..reps {
        let t = Instant::now();
        opt.begin(Phase::Update, 1e-4).unwrap();
        for (id, g) in ids.iter().zip(&grads) {
            opt.submit(*id, g.as_ptr() as usize, DType::F32).unwrap();
        }
        opt.end().unwrap();
        times.push(t.elapsed().as_secs_f64());
    }
    let t = median(times[1..].to_vec()) / TENSORS as f64;
    println!(
        "{:<8} f32   {:>11} elements  {:>8.3} us per lomo_grad_submit",
        algorithm.as_str(),
        n,
        t * 1e6
    );
}

fn main() {
    let reps = std::env::var("LOMO_BENCH_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(15);
    println!(
        "threads: {}, simd level: {} (0 baseline, 1 AVX2+FMA, 2 AVX-512)",
        lomo::backend::cpu::num_threads(),
        lomo::backend::cpu::simd::level()
    );
    for dtype in [DType::F32, DType::Bf16, DType::F16] {
        bench(Algorithm::Lomo, dtype, 4096, 4096, Variant::Plain, reps);
        bench(Algorithm::Lomo, dtype, 4096, 4096, Variant::AfterNorm, reps);
        bench(
            Algorithm::Lomo,
            dtype,
            4096,
            4096,
            Variant::PerElement,
            reps,
        );
        bench(Algorithm::Adalomo, dtype, 4096, 4096, Variant::Plain, reps);
        bench(Algorithm::Adalomo, dtype, 4096, 4096, Variant::Carry, reps);
    }
    for algorithm in [Algorithm::Lomo, Algorithm::Adalomo] {
        for n in [1, 4096] {
            bench_small(algorithm, n, 200);
        }
    }
}
