//! Rust-level throughput of the logit kernel on every instruction set this CPU has, next to a
//! plain streaming read of a buffer of the same size. No Python involved:
//!
//!     cargo bench --bench kernel_speed -- [tokens per head, default 524288] [f16|bf16|f32]

use hybridgen::cpu::{self, Isa, Strips};
use hybridgen::DType;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let n: usize = args.first().map_or(524_288, |a| a.parse().expect("tokens must be a number"));
    let dtype = DType::parse(args.get(1).map_or("f16", String::as_str)).expect("dtype");
    let (kvh, g, d) = (8usize, 4usize, 128usize);
    let bytes = kvh * n * d * dtype.size();
    let words = vec![0x3c00_3c00u32; bytes / 4]; // 1.0 in f16/bf16 pairs: any finite value will do
    // SAFETY: u32s are plain initialised bytes; the view borrows `words`, which is only read.
    let keys: &[u8] = unsafe { std::slice::from_raw_parts(words.as_ptr().cast(), bytes) };
    let strips = Strips::from_slices(keys, keys, n * d * dtype.size(), 1, kvh, d, dtype, n).expect("strips");
    let q = vec![0.5f32; kvh * g * d];
    let mut out = vec![0f32; kvh * g * n];
    let buf = vec![1u8; bytes];
    let time = |f: &mut dyn FnMut()| {
        let t = std::time::Instant::now();
        f();
        t.elapsed().as_secs_f64()
    };
    println!("{dtype}, {n} tokens × {kvh} kv heads × d {d}, group {g}, {} threads", rayon::current_num_threads());
    // Rounds alternate between the streaming read and each kernel so that drifting machine load
    // affects them alike; medians are reported.
    let isas = Isa::available();
    let mut stream = Vec::new();
    let mut tuned = Vec::new();
    let mut kernel = vec![Vec::new(); isas.len()];
    for round in 0..7 {
        stream.push(bytes as f64 / time(&mut || {
            std::hint::black_box(cpu::bandwidth::stream_read(&buf, false));
        }) / 1e9);
        tuned.push(bytes as f64 / time(&mut || {
            std::hint::black_box(cpu::bandwidth::stream_read(&buf, true));
        }) / 1e9);
        for (i, &isa) in isas.iter().enumerate() {
            if isa == Isa::Scalar && round > 0 {
                continue; // slow; one round is enough
            }
            kernel[i].push(bytes as f64 / time(&mut || cpu::logits(isa, &strips, &q, kvh * g, 1.0, None, &mut out).unwrap()) / 1e9);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (stream, tuned) = (median(&mut stream), median(&mut tuned));
    println!("  streaming read: {stream:.1} GB/s plain, {tuned:.1} GB/s with prefetching");
    for (i, isa) in isas.iter().enumerate() {
        let k = median(&mut kernel[i]);
        println!(
            "  logits {:>7}: {k:.1} GB/s of K ({:.0}% of the plain read, {:.0}% of the prefetching read)",
            isa.name(),
            100.0 * k / stream,
            100.0 * k / tuned
        );
    }
}
