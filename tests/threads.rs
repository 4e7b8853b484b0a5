//! `HYBRIDGEN_THREADS` sizes the CPU kernels' pool at its first use (this test binary is its
//! own process, so the variable is set before anything starts the pool), and the kernels give
//! the same results on it as anywhere.

use hybridgen::cpu::{self, split};
use hybridgen::DType;

mod common;

#[test]
fn hybridgen_threads_sizes_the_pool() {
    // The only test in this binary: nothing else reads the environment meanwhile, and the
    // pool does not exist yet.
    std::env::set_var(split::THREADS_ENV, "3");
    assert_eq!(split::threads_from_env(), Ok(Some(3)));
    assert_eq!(cpu::threads(), 3);
    // Work large enough to enter the pool, checked against the calling thread's result.
    let c = common::case(1, 2, 64, 6000, DType::F16, 5);
    let s = c.store.strips(0).unwrap();
    let q: Vec<f32> = (0..4 * 64).map(|i| (i as f32 * 0.37).sin()).collect();
    let mut out = vec![0.0; 4 * 6000];
    cpu::logits(cpu::isa(), &s, &q, 4, 0.125, None, &mut out).unwrap();
    let mut single = vec![0.0; 4 * 6000];
    for h in 0..4 {
        let qh = &q[h * 64..(h + 1) * 64];
        for t in 0..6000 {
            let o = ((h / 2) * 6000 + t) * 64;
            let k = &c.keys[o..o + 64];
            single[h * 6000 + t] =
                qh.iter().zip(k).map(|(a, b)| (a * b) as f64).sum::<f64>() as f32 * 0.125;
        }
    }
    for (a, b) in out.iter().zip(&single) {
        assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{a} vs {b}");
    }
    // Invalid values are rejected with a message (the pool then uses its default).
    std::env::set_var(split::THREADS_ENV, "zero");
    assert!(split::threads_from_env().is_err());
    std::env::set_var(split::THREADS_ENV, "0");
    assert!(split::threads_from_env().is_err());
    std::env::remove_var(split::THREADS_ENV);
    assert_eq!(split::threads_from_env(), Ok(None));
}
