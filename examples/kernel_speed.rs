use hybridgen::cpu::{self, Isa, Strips};
use hybridgen::DType;
fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args.get(1).map_or(256, |a| a.parse().unwrap());
    let dtype = match args.get(2).map(|s| s.as_str()) { Some("bf16") => DType::BF16, _ => DType::F16 };
    let (kvh, g, d) = (8usize, 4usize, 128usize);
    let keys = vec![0x3c00u16; kvh * n * d];
    let s = Strips { keys: keys.as_ptr() as *const u8, values: keys.as_ptr() as *const u8, strip_bytes: n * d * 2, batch: 1, kv_heads: kvh, head_dim: d, dtype, len: n };
    let q = vec![0.5f32; kvh * g * d];
    let mut out = vec![0f32; kvh * g * n];
    let buf = vec![1u8; kvh * n * d * 2];
    for _ in 0..3 {
        let t = std::time::Instant::now();
        let c = cpu::bandwidth::stream_read(&buf);
        println!("stream_read: {:.1} GB/s ({c})", buf.len() as f64 / t.elapsed().as_secs_f64() / 1e9);
    }
    for isa in Isa::available() {
        let reps = (1usize << 31) / (kvh * n * d * 2);
        let t = std::time::Instant::now();
        for _ in 0..reps { cpu::logits(isa, &s, &q, kvh * g, 1.0, None, &mut out).unwrap(); }
        let dt = t.elapsed().as_secs_f64() / reps as f64;
        println!("{:?} n={n}: {:.1} GB/s, {:.1} ns/row", isa, (kvh * n * d * 2) as f64 / dt / 1e9, dt * 1e9 / (kvh * n) as f64);
    }
}
#[allow(dead_code)]
fn unused() {}
