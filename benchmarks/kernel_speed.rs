//! Rust-level throughput of the CPU kernels on every instruction set this CPU has, next to a
//! plain streaming read of the same number of bytes. No Python involved:
//!
//!     cargo bench --bench kernel_speed -- [tokens per head] [f16|bf16|f32] [group] [head_dim]
//!     cargo bench --bench kernel_speed -- --sweep [f16|bf16]   # groups 1-8 × head_dim 64/128
//!
//!     cargo bench --bench kernel_speed -- --in-cache [f16|bf16]  # arithmetic only, one thread
//!     cargo bench --bench kernel_speed -- --topk [tokens] [k]    # selection + gather vs logits
//!
//! Reports logits (GB/s of K, share of the plain read) and the fused partial attention over all
//! tokens (`cpu::attend`: GB/s of K + V, share of reading both). `--in-cache` runs the kernels
//! over keys and values that fit in L2, on the calling thread, and reports the best of many
//! runs: what one core's arithmetic allows, the ceiling a kernel meets before memory does
//! (and a figure other processes' load hardly disturbs). `HYBRIDGEN_THREADS` sets the threads,
//! `HYBRIDGEN_PREFETCH` the prefetch distance (bytes, 0 = none).

use hybridgen::cpu::{self, Isa, Strips};
use hybridgen::DType;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn time(f: &mut dyn FnMut()) -> f64 {
    let t = std::time::Instant::now();
    f();
    t.elapsed().as_secs_f64()
}

/// One shape on every instruction set: (logits shares, attend shares) per isa.
fn run(
    bytes_total: usize,
    dtype: DType,
    g: usize,
    d: usize,
    rounds: usize,
    print: bool,
) -> Vec<(Isa, f64, f64)> {
    let kvh = 8usize;
    let n = bytes_total / (kvh * d * dtype.size()) / 64 * 64;
    let bytes = kvh * n * d * dtype.size();
    // Keys and values: distinct buffers, every element a finite value (1.0 in f16 / bf16 pairs
    // or 1/512-ish in f32: any finite value will do for timing).
    let kw = vec![0x3c00_3c00u32; bytes / 4];
    let vw = vec![0x3c00_3c00u32; bytes / 4];
    // SAFETY: u32s are plain initialised bytes; the views borrow kw/vw, which are only read.
    let (keys, values): (&[u8], &[u8]) = unsafe {
        (
            std::slice::from_raw_parts(kw.as_ptr().cast(), bytes),
            std::slice::from_raw_parts(vw.as_ptr().cast(), bytes),
        )
    };
    let strips = Strips::from_slices(keys, values, n * d * dtype.size(), 1, kvh, d, dtype, n)
        .expect("strips");
    let hq = kvh * g;
    let q = vec![0.01f32; hq * d];
    let mut out = vec![0f32; hq * n];
    let (mut o, mut l) = (vec![0f32; hq * d], vec![0f32; hq]);
    let isas: Vec<Isa> = Isa::available()
        .into_iter()
        .filter(|&i| i != Isa::Scalar)
        .collect();
    let (mut rk, mut rv) = (Vec::new(), Vec::new());
    let mut lg = vec![Vec::new(); isas.len()];
    let mut at = vec![Vec::new(); isas.len()];
    // Rounds alternate between the streaming reads and each kernel so that drifting machine
    // load affects them alike; medians are reported.
    for _ in 0..rounds {
        rk.push(time(&mut || {
            std::hint::black_box(cpu::bandwidth::stream_read(keys, false));
        }));
        rv.push(time(&mut || {
            std::hint::black_box(cpu::bandwidth::stream_read(values, false));
        }));
        for (i, &isa) in isas.iter().enumerate() {
            lg[i].push(time(&mut || {
                cpu::logits(isa, &strips, &q, hq, 1.0, None, &mut out).unwrap()
            }));
            at[i].push(time(&mut || {
                cpu::attend(isa, &strips, &q, hq, 1.0, None, &mut o, &mut l).unwrap()
            }));
        }
    }
    let (tk, tv) = (median(rk), median(rv));
    let read = bytes as f64 / tk / 1e9;
    let read_kv = 2.0 * bytes as f64 / (tk + tv) / 1e9;
    if print {
        println!(
            "{dtype}, {n} tokens × {kvh} kv heads × d {d}, group {g}, {} threads: read {read:.1} GB/s (K+V {read_kv:.1})",
            cpu::threads()
        );
    }
    isas.iter()
        .enumerate()
        .map(|(i, &isa)| {
            let l = bytes as f64 / median(lg[i].clone()) / 1e9;
            let a = 2.0 * bytes as f64 / median(at[i].clone()) / 1e9;
            if print {
                println!(
                    "  {:>7}: logits {l:5.1} GB/s of K ({:3.0} %) | attend {a:5.1} GB/s of K+V ({:3.0} %)",
                    isa.name(),
                    100.0 * l / read,
                    100.0 * a / read_kv
                );
            }
            (isa, l / read, a / read_kv)
        })
        .collect()
}

/// Best-of-many GB/s of each kernel over one strip of 96 KiB of K (and as much V: L2-resident), on the calling
/// thread (work this small never enters the pool).
fn in_cache(dtype: DType) {
    println!(
        "in cache, 1 thread, {dtype}, 96 KiB of K: logits / attend GB/s of K (K+V for attend)"
    );
    for d in [64usize, 128] {
        for g in [1usize, 2, 4, 8] {
            let n = (96 << 10) / (d * dtype.size());
            let bytes = n * d * dtype.size();
            let buf = vec![0x3c00_3c00u32; bytes / 4];
            // SAFETY: u32s are plain initialised bytes; the view borrows `buf`, only read.
            let kv: &[u8] = unsafe { std::slice::from_raw_parts(buf.as_ptr().cast(), bytes) };
            let s = Strips::from_slices(kv, kv, bytes, 1, 1, d, dtype, n).expect("strips");
            let q = vec![0.01f32; g * d];
            let mut out = vec![0f32; g * n];
            let (mut o, mut l) = (vec![0f32; g * d], vec![0f32; g]);
            let mut cells = Vec::new();
            for isa in Isa::available().into_iter().filter(|&i| i != Isa::Scalar) {
                let reps = 20;
                let best = |f: &mut dyn FnMut()| {
                    (0..30)
                        .map(|_| time(&mut || (0..reps).for_each(|_| f())))
                        .fold(f64::MAX, f64::min)
                        / reps as f64
                };
                let tl = best(&mut || cpu::logits(isa, &s, &q, g, 1.0, None, &mut out).unwrap());
                let ta =
                    best(&mut || cpu::attend(isa, &s, &q, g, 1.0, None, &mut o, &mut l).unwrap());
                cells.push(format!(
                    "{} {:5.1} / {:5.1}",
                    isa.name(),
                    bytes as f64 / tl / 1e9,
                    2.0 * bytes as f64 / ta / 1e9
                ));
            }
            println!("  d {d:3} group {g}: {}", cells.join(" | "));
        }
    }
}

/// Top-K selection and the gather it feeds, next to the logits pass over the same tokens
/// (32 query heads over 8 KV heads, d = 128, f16; best of 5).
fn topk_speed(n: usize, k: usize) {
    let (kvh, g, d) = (8usize, 4usize, 128usize);
    let bytes = kvh * n * d * 2;
    let buf = vec![0x3c00_3c00u32; bytes / 4];
    // SAFETY: u32s are plain initialised bytes; the view borrows `buf`, only read.
    let kv: &[u8] = unsafe { std::slice::from_raw_parts(buf.as_ptr().cast(), bytes) };
    let s = Strips::from_slices(kv, kv, n * d * 2, 1, kvh, d, DType::F16, n).expect("strips");
    let hq = kvh * g;
    // Logits that vary (a fixed q over identical keys would make every row flat).
    let mut x: u64 = 1;
    let logits: Vec<f32> = (0..hq * n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 8.0 - 4.0
        })
        .collect();
    let q = vec![0.01f32; hq * d];
    let mut out = vec![0f32; hq * n];
    let (mut idx, mut val) = (vec![0i64; hq * k], vec![0f32; hq * k]);
    let mut staged = vec![0u8; hq * k * d * 2];
    let best = |f: &mut dyn FnMut()| (0..5).map(|_| time(f)).fold(f64::MAX, f64::min);
    let tl = best(&mut || cpu::logits(cpu::isa(), &s, &q, hq, 1.0, None, &mut out).unwrap());
    let tk = best(&mut || cpu::topk(&logits, n, k, &mut idx, &mut val).unwrap());
    let tg = best(&mut || cpu::gather_values(&s, &idx, hq, &mut staged).unwrap());
    println!(
        "{n} tokens, {hq} heads, top-{k}: logits {:.1} ms | top-k {:.1} ms | gather {:.2} ms | (top-k + gather) / logits = {:.2}",
        1e3 * tl,
        1e3 * tk,
        1e3 * tg,
        (tk + tg) / tl
    );
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    if args.first().map(String::as_str) == Some("--topk") {
        let n = args.get(1).map_or(786_432, |a| a.parse().expect("tokens"));
        topk_speed(n, args.get(2).map_or(2048, |a| a.parse().expect("k")));
        return;
    }
    println!(
        "{} | {} threads | prefetch {} bytes",
        cpu::cpu_vendor(),
        cpu::threads(),
        cpu::tuning().prefetch_ahead
    );
    if args.first().map(String::as_str) == Some("--in-cache") {
        in_cache(DType::parse(args.get(1).map_or("f16", String::as_str)).expect("dtype"));
        return;
    }
    if args.first().map(String::as_str) == Some("--sweep") {
        let dtype = DType::parse(args.get(1).map_or("f16", String::as_str)).expect("dtype");
        println!(
            "share of the plain read (logits) / of reading K+V (attend), {dtype}, 1 GiB of K:"
        );
        for d in [64usize, 128] {
            for g in [1usize, 2, 4, 8] {
                let r = run(1 << 30, dtype, g, d, 5, false);
                let cells: Vec<String> = r
                    .iter()
                    .map(|(i, l, a)| {
                        format!("{} {:3.0} % / {:3.0} %", i.name(), 100.0 * l, 100.0 * a)
                    })
                    .collect();
                println!("  d {d:3} group {g}: {}", cells.join(" | "));
            }
        }
        return;
    }
    let n: usize = args
        .first()
        .map_or(786_432, |a| a.parse().expect("tokens must be a number"));
    let dtype = DType::parse(args.get(1).map_or("f16", String::as_str)).expect("dtype");
    let g: usize = args.get(2).map_or(4, |a| a.parse().expect("group"));
    let d: usize = args.get(3).map_or(128, |a| a.parse().expect("head_dim"));
    run(8 * n * d * dtype.size(), dtype, g, d, 7, true);
}
