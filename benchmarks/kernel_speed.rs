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
    let keys = vec![0x3c00_3c00u32; bytes / 4]; // 1.0 in f16/bf16 pairs: any finite value will do
    let strips = Strips {
        keys: keys.as_ptr() as *const u8,
        values: keys.as_ptr() as *const u8,
        strip_bytes: n * d * dtype.size(),
        batch: 1,
        kv_heads: kvh,
        head_dim: d,
        dtype,
        len: n,
    };
    let q = vec![0.5f32; kvh * g * d];
    let mut out = vec![0f32; kvh * g * n];
    let reps = ((4usize << 30) / bytes).max(3);
    let buf = vec![1u8; bytes];
    let t = std::time::Instant::now();
    for _ in 0..reps {
        std::hint::black_box(cpu::bandwidth::stream_read(&buf));
    }
    let stream = (bytes * reps) as f64 / t.elapsed().as_secs_f64() / 1e9;
    println!("{dtype}, {n} tokens × {kvh} kv heads × d {d}, group {g}, {} threads", rayon::current_num_threads());
    println!("  streaming read: {stream:.1} GB/s");
    for isa in Isa::available() {
        let reps = if isa == Isa::Scalar { 1 } else { reps };
        let t = std::time::Instant::now();
        for _ in 0..reps {
            cpu::logits(isa, &strips, &q, kvh * g, 1.0, None, &mut out).unwrap();
        }
        let dt = t.elapsed().as_secs_f64() / reps as f64;
        println!("  logits {:>7}: {:.1} GB/s of K ({:.0}% of the streaming read)", isa.name(), bytes as f64 / dt / 1e9, 100.0 * bytes as f64 / dt / 1e9 / stream);
    }
}
