//! CPU attention operations of every instruction set against a naive f64 reference, over the
//! shapes that matter: GQA groups 1, 2, 4, 7 (and 9 > one register group), head_dim 64/80/128,
//! batch 1 and 3, odd token counts, all three storage dtypes.

use hybridgen::cpu::{self, Isa};
use hybridgen::DType;
use rand::{Rng, SeedableRng};

mod common;

use common::{case, Case};

impl Case {
    fn key(&self, s: usize, kh: usize, t: usize) -> &[f32] {
        let o = ((s * self.kvh + kh) * self.n + t) * self.d;
        &self.keys[o..o + self.d]
    }
    fn value(&self, s: usize, kh: usize, t: usize) -> &[f32] {
        let o = ((s * self.kvh + kh) * self.n + t) * self.d;
        &self.values[o..o + self.d]
    }
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

fn assert_close(got: &[f32], want: &[f64], rel: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(1e-6f64, |m, v| m.max(v.abs()));
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            ((g as f64) - w).abs() <= rel * scale,
            "{what}[{i}]: got {g}, want {w} (tolerance {} of max |x| = {scale})",
            rel
        );
    }
}

const SHAPES: &[(usize, usize, usize, usize)] = &[
    // (batch, kv_heads, group, head_dim)
    (1, 2, 1, 64),
    (3, 1, 2, 80),
    (1, 2, 4, 128),
    (3, 2, 7, 64),
    (1, 1, 9, 128),
];

fn tolerance(dtype: DType) -> f64 {
    // The reference uses the stored (rounded) values, so only accumulation order differs.
    match dtype {
        DType::F32 => 1e-5,
        _ => 2e-5,
    }
}

#[test]
fn logits_match_reference_for_every_isa() {
    for &(b, kvh, g, d) in SHAPES {
        for dtype in [DType::F16, DType::BF16, DType::F32] {
            for n in [1usize, 7, 333] {
                let c = case(b, kvh, d, n, dtype, (b * 1000 + g * 100 + d + n) as u64);
                let hq = kvh * g;
                let mut rng = rand::rngs::StdRng::seed_from_u64(7);
                let q: Vec<f32> = (0..b * hq * d)
                    .map(|_| rng.random_range(-1.0..1.0))
                    .collect();
                let scale = 1.0 / (d as f32).sqrt();
                let mut want = Vec::new();
                for s in 0..b {
                    for h in 0..hq {
                        let qh = &q[(s * hq + h) * d..(s * hq + h + 1) * d];
                        for t in 0..n {
                            want.push(dot(qh, c.key(s, h / g, t)) * scale as f64);
                        }
                    }
                }
                let strips = c.store.strips(0).unwrap();
                for isa in Isa::available() {
                    let mut out = vec![0.0; b * hq * n];
                    cpu::logits(isa, &strips, &q, hq, scale, None, &mut out).unwrap();
                    assert_close(
                        &out,
                        &want,
                        tolerance(dtype),
                        &format!("{isa:?} {dtype} b{b} g{g} d{d} n{n}"),
                    );
                }
                // An index list (Pre-QKT): every other token, backwards, per (seq, kv head).
                let idx: Vec<i64> = (0..b * kvh)
                    .flat_map(|_| (0..n).rev().step_by(2).map(|t| t as i64))
                    .collect();
                let m = idx.len() / (b * kvh);
                let mut want_idx = Vec::new();
                for s in 0..b {
                    for h in 0..hq {
                        let qh = &q[(s * hq + h) * d..(s * hq + h + 1) * d];
                        for &t in &idx[(s * kvh + h / g) * m..(s * kvh + h / g + 1) * m] {
                            want_idx.push(dot(qh, c.key(s, h / g, t as usize)) * scale as f64);
                        }
                    }
                }
                for isa in Isa::available() {
                    let mut out = vec![0.0; b * hq * m];
                    cpu::logits(isa, &strips, &q, hq, scale, Some(&idx), &mut out).unwrap();
                    assert_close(
                        &out,
                        &want_idx,
                        tolerance(dtype),
                        &format!("indexed {isa:?} {dtype}"),
                    );
                }
            }
        }
    }
}

/// Softmax attention in f64 over the given tokens of one head.
fn reference_attention(logits: &[f32], rows: &[&[f32]], d: usize) -> (Vec<f64>, f64) {
    let max = logits
        .iter()
        .fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
    let w: Vec<f64> = logits.iter().map(|&x| (x as f64 - max).exp()).collect();
    let sum: f64 = w.iter().sum();
    let mut out = vec![0.0; d];
    for (wi, r) in w.iter().zip(rows) {
        for (o, &v) in out.iter_mut().zip(r.iter()) {
            *o += wi / sum * v as f64;
        }
    }
    (out, max + sum.ln())
}

#[test]
fn partial_attention_matches_reference_and_merges_exactly() {
    for &(b, kvh, g, d) in SHAPES {
        for dtype in [DType::F16, DType::BF16, DType::F32] {
            let n = 301;
            let c = case(b, kvh, d, n, dtype, (g * 31 + d) as u64);
            let hq = kvh * g;
            let mut rng = rand::rngs::StdRng::seed_from_u64(11);
            let logits: Vec<f32> = (0..b * hq * n)
                .map(|_| rng.random_range(-4.0..4.0))
                .collect();
            let strips = c.store.strips(0).unwrap();
            for isa in Isa::available() {
                // All host tokens.
                let (mut out, mut lse) = (vec![0.0; b * hq * d], vec![0.0; b * hq]);
                cpu::partial_attention(isa, &strips, &logits, hq, None, &mut out, &mut lse)
                    .unwrap();
                for s in 0..b {
                    for h in 0..hq {
                        let r = s * hq + h;
                        let rows: Vec<&[f32]> = (0..n).map(|t| c.value(s, h / g, t)).collect();
                        let (o, l) = reference_attention(&logits[r * n..(r + 1) * n], &rows, d);
                        assert_close(
                            &out[r * d..(r + 1) * d],
                            &o,
                            1e-5,
                            &format!("{isa:?} {dtype} out"),
                        );
                        assert!(
                            (lse[r] as f64 - l).abs() < 1e-5 * l.abs().max(1.0),
                            "lse {} vs {l}",
                            lse[r]
                        );
                    }
                }
                // Split the tokens into two index sets, attend to each, merge: equals the whole.
                let split = 120;
                let first: Vec<i64> = (0..b * hq).flat_map(|_| 0..split as i64).collect();
                let second: Vec<i64> = (0..b * hq).flat_map(|_| split as i64..n as i64).collect();
                let logits_ref = &logits;
                let pick = |idx: &[i64], m: usize| -> Vec<f32> {
                    (0..b * hq)
                        .flat_map(|r| {
                            idx[r * m..(r + 1) * m]
                                .iter()
                                .map(move |&t| logits_ref[r * n + t as usize])
                        })
                        .collect()
                };
                let (m1, m2) = (split, n - split);
                let (mut o1, mut l1) = (vec![0.0; b * hq * d], vec![0.0; b * hq]);
                let (mut o2, mut l2) = (vec![0.0; b * hq * d], vec![0.0; b * hq]);
                cpu::partial_attention(
                    isa,
                    &strips,
                    &pick(&first, m1),
                    hq,
                    Some(&first),
                    &mut o1,
                    &mut l1,
                )
                .unwrap();
                cpu::partial_attention(
                    isa,
                    &strips,
                    &pick(&second, m2),
                    hq,
                    Some(&second),
                    &mut o2,
                    &mut l2,
                )
                .unwrap();
                cpu::merge_partials(&mut o1, &mut l1, &o2, &l2, d).unwrap();
                for (i, (a, w)) in o1.iter().zip(&out).enumerate() {
                    assert!(
                        (a - w).abs() <= 1e-5 * w.abs().max(1.0),
                        "merged[{i}] {a} vs {w}"
                    );
                }
                for (a, w) in l1.iter().zip(&lse) {
                    assert!((a - w).abs() <= 1e-5 * w.abs().max(1.0));
                }
            }
        }
    }
}

#[test]
fn gather_copies_the_selected_rows() {
    let (b, kvh, g, d, n) = (3, 2, 2, 80, 57);
    let c = case(b, kvh, d, n, DType::BF16, 3);
    let hq = kvh * g;
    let k = 9;
    let idx: Vec<i64> = (0..b * hq)
        .flat_map(|r| (0..k).map(move |j| ((r * 7 + j * 5) % n) as i64))
        .collect();
    let mut out = vec![0u8; b * hq * k * d * 2];
    cpu::gather_values(&c.store.strips(0).unwrap(), &idx, hq, &mut out).unwrap();
    for r in 0..b * hq {
        let (s, h) = (r / hq, r % hq);
        for j in 0..k {
            let t = idx[r * k + j] as usize;
            for i in 0..d {
                let o = ((r * k + j) * d + i) * 2;
                let got = half::bf16::from_bits(u16::from_ne_bytes([out[o], out[o + 1]])).to_f32();
                assert_eq!(got, c.value(s, h / g, t)[i]);
            }
        }
    }
}

#[test]
fn topk_matches_a_full_sort() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let (rows, n, k) = (6, 1001, 37);
    let logits: Vec<f32> = (0..rows * n)
        .map(|_| rng.random_range(-10.0..10.0))
        .collect();
    let (mut idx, mut val) = (vec![0; rows * k], vec![0.0; rows * k]);
    cpu::topk(&logits, n, k, &mut idx, &mut val).unwrap();
    for r in 0..rows {
        let row = &logits[r * n..(r + 1) * n];
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
        let mut want: Vec<i64> = order[..k].iter().map(|&i| i as i64).collect();
        want.sort();
        assert_eq!(&idx[r * k..(r + 1) * k], &want[..]);
        for (j, &t) in want.iter().enumerate() {
            assert_eq!(val[r * k + j], row[t as usize]);
        }
    }
}

#[test]
fn bad_shapes_are_errors_not_panics() {
    let c = case(1, 2, 64, 10, DType::F16, 1);
    let s = c.store.strips(0).unwrap();
    let isa = cpu::isa();
    let mut out = vec![0.0; 3 * 10];
    assert!(
        cpu::logits(isa, &s, &[0.0; 3 * 64], 3, 1.0, None, &mut out).is_err(),
        "3 heads over 2 kv heads"
    );
    let mut out = vec![0.0; 4 * 10];
    assert!(
        cpu::logits(isa, &s, &[0.0; 5], 4, 1.0, None, &mut out).is_err(),
        "short q"
    );
    assert!(
        cpu::logits(isa, &s, &[0.0; 4 * 64], 4, 1.0, Some(&[0, 10]), &mut out).is_err(),
        "index past end"
    );
    assert!(
        cpu::logits(isa, &s, &[0.0; 4 * 64], 4, 1.0, Some(&[-1, 0]), &mut out).is_err(),
        "negative index"
    );
    let (mut o, mut l) = (vec![0.0; 4 * 64], vec![0.0; 4]);
    assert!(
        cpu::partial_attention(isa, &s, &[0.0; 4 * 9], 4, None, &mut o, &mut l).is_err(),
        "logits not covering host"
    );
    let (mut i, mut v) = (vec![0; 11], vec![0.0; 11]);
    assert!(
        cpu::topk(&[0.0; 10], 10, 11, &mut i, &mut v).is_err(),
        "k > n"
    );
}

#[test]
fn strips_over_slices_must_cover_every_row() {
    let (b, kvh, d, n) = (2, 3, 8, 5);
    let strip_bytes = 64 * d * 4; // room for 64 rows of f32 per strip
    let words = vec![0u32; (b * kvh * strip_bytes) / 4];
    // SAFETY: u32s are plain initialised bytes; the view borrows `words`, which is only read.
    let bytes: &[u8] =
        unsafe { std::slice::from_raw_parts(words.as_ptr().cast(), words.len() * 4) };
    let last = (b * kvh - 1) * strip_bytes + n * d * 4;
    assert!(cpu::Strips::from_slices(bytes, bytes, strip_bytes, b, kvh, d, DType::F32, n).is_ok());
    assert!(
        cpu::Strips::from_slices(&bytes[..last], bytes, strip_bytes, b, kvh, d, DType::F32, n)
            .is_ok()
    );
    assert!(
        cpu::Strips::from_slices(
            &bytes[..last - 1],
            bytes,
            strip_bytes,
            b,
            kvh,
            d,
            DType::F32,
            n
        )
        .is_err(),
        "short keys"
    );
    assert!(
        cpu::Strips::from_slices(bytes, &bytes[1..], strip_bytes, b, kvh, d, DType::F32, n)
            .is_err(),
        "misaligned values"
    );
    assert!(
        cpu::Strips::from_slices(bytes, bytes, 4 * d * 4, b, kvh, d, DType::F32, n).is_err(),
        "rows longer than a strip"
    );
    assert!(
        cpu::Strips::from_slices(bytes, bytes, strip_bytes, b, kvh, d, DType::F32, usize::MAX)
            .is_err(),
        "overflow"
    );
    let s = cpu::Strips::from_slices(bytes, bytes, strip_bytes, b, kvh, d, DType::F16, n).unwrap();
    assert_eq!(
        (s.batch(), s.kv_heads(), s.head_dim(), s.len(), s.dtype()),
        (b, kvh, d, n, DType::F16)
    );
}

/// f64 attention over all `n` tokens of (s, kv head kh) for query `qh`, masked tokens skipped.
fn reference_attend(
    c: &common::Case,
    qh: &[f32],
    s: usize,
    kh: usize,
    scale: f32,
    mask: Option<&[u8]>,
) -> (Vec<f64>, f64) {
    let x: Vec<f64> = (0..c.n)
        .map(|t| {
            if mask.is_some_and(|m| m[s * c.n + t] != 0) {
                f64::NEG_INFINITY
            } else {
                dot(qh, c.key(s, kh, t)) * scale as f64
            }
        })
        .collect();
    let max = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if max == f64::NEG_INFINITY {
        return (vec![0.0; c.d], f64::NEG_INFINITY);
    }
    let w: Vec<f64> = x.iter().map(|&v| (v - max).exp()).collect();
    let sum: f64 = w.iter().sum();
    let mut out = vec![0.0; c.d];
    for (t, wt) in w.iter().enumerate() {
        for (o, &v) in out.iter_mut().zip(c.value(s, kh, t)) {
            *o += wt / sum * v as f64;
        }
    }
    (out, max + sum.ln())
}

#[test]
fn fused_attention_matches_reference_for_every_isa() {
    // Token counts across the fused kernel's inner block (256 rows) and its task block (4096
    // rows, merged at the end); masks that hide whole blocks at the start (the running maximum
    // starts at -inf), scattered tokens, and one whole sequence.
    for &(b, kvh, g, d) in &[
        (1usize, 2usize, 4usize, 128usize),
        (2, 1, 3, 80),
        (1, 1, 8, 64),
        (2, 2, 1, 64),
    ] {
        for dtype in [DType::F16, DType::BF16, DType::F32] {
            for n in [1usize, 255, 700, 4096 + 300] {
                let c = case(b, kvh, d, n, dtype, (b * 7 + g * 3 + d + n) as u64);
                let hq = kvh * g;
                let mut rng = rand::rngs::StdRng::seed_from_u64(n as u64);
                // Large enough logits that the maximum moves between blocks.
                let q: Vec<f32> = (0..b * hq * d)
                    .map(|_| rng.random_range(-1.5..1.5))
                    .collect();
                let scale = 1.0 / (d as f32).sqrt();
                let mut mask: Vec<u8> = (0..b * n).map(|_| rng.random_bool(0.2) as u8).collect();
                mask[..n.min(600)].fill(1); // the first blocks of sequence 0 masked
                if b > 1 {
                    mask[n..2 * n].fill(1); // sequence 1 masked entirely
                }
                let strips = c.store.strips(0).unwrap();
                for m in [None, Some(&mask[..])] {
                    for isa in Isa::available() {
                        let (mut out, mut lse) = (vec![0.0; b * hq * d], vec![0.0; b * hq]);
                        cpu::attend(isa, &strips, &q, hq, scale, m, &mut out, &mut lse).unwrap();
                        for s in 0..b {
                            for h in 0..hq {
                                let r = s * hq + h;
                                let what = format!(
                                    "{isa:?} {dtype} b{b} g{g} d{d} n{n} mask {}",
                                    m.is_some()
                                );
                                let (o, l) = reference_attend(
                                    &c,
                                    &q[r * d..(r + 1) * d],
                                    s,
                                    h / g,
                                    scale,
                                    m,
                                );
                                assert_close(
                                    &out[r * d..(r + 1) * d],
                                    &o,
                                    2e-5,
                                    &format!("{what} out"),
                                );
                                if l == f64::NEG_INFINITY {
                                    assert_eq!(
                                        lse[r],
                                        f32::NEG_INFINITY,
                                        "{what}: lse of a masked row"
                                    );
                                } else {
                                    assert!(
                                        (lse[r] as f64 - l).abs() <= 2e-5 * l.abs().max(1.0),
                                        "{what}: lse {} vs {l}",
                                        lse[r]
                                    );
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
fn softmax_handles_wide_logits_and_masked_tokens() {
    // exp over a wide range (down to where e^x underflows), -inf entries, a tail shorter
    // than a vector: the partial attention's softmax against f64.
    let (b, kvh, g, d, n) = (1, 1, 2, 64, 1000 + 3);
    let c = case(b, kvh, d, n, DType::F32, 9);
    let mut rng = rand::rngs::StdRng::seed_from_u64(4);
    let mut logits: Vec<f32> = (0..g * n).map(|_| rng.random_range(-120.0..30.0)).collect();
    for t in (0..n).step_by(7) {
        logits[t] = f32::NEG_INFINITY;
    }
    let strips = c.store.strips(0).unwrap();
    for isa in Isa::available() {
        let (mut out, mut lse) = (vec![0.0; g * d], vec![0.0; g]);
        cpu::partial_attention(isa, &strips, &logits, g, None, &mut out, &mut lse).unwrap();
        for h in 0..g {
            let rows: Vec<&[f32]> = (0..n).map(|t| c.value(0, 0, t)).collect();
            let (o, l) = reference_attention(&logits[h * n..(h + 1) * n], &rows, d);
            assert_close(&out[h * d..(h + 1) * d], &o, 1e-5, &format!("{isa:?} out"));
            assert!(
                (lse[h] as f64 - l).abs() < 1e-5 * l.abs().max(1.0),
                "{isa:?} lse {} vs {l}",
                lse[h]
            );
        }
    }
}

/// The k largest of a row by a full sort (NaN lowest, ties to the earlier token), in token order.
fn topk_by_sort(row: &[f32], k: usize) -> Vec<i64> {
    let key = |v: f32| if v.is_nan() { f32::NEG_INFINITY } else { v };
    let mut order: Vec<usize> = (0..row.len()).collect();
    order.sort_by(|&a, &b| key(row[b]).total_cmp(&key(row[a])).then(a.cmp(&b)));
    let mut want: Vec<i64> = order[..k].iter().map(|&i| i as i64).collect();
    want.sort();
    want
}

#[test]
fn topk_over_long_rows_matches_a_full_sort() {
    // Long rows take the sampled-threshold path: random rows, rows with many ties (values on a
    // coarse grid), sorted rows (the sample sees the extremes only at the ends), rows with NaN
    // and -inf, and a row where almost everything is -inf (fewer candidates than k).
    let n = 40_000;
    let mut rng = rand::rngs::StdRng::seed_from_u64(12);
    let mut rows: Vec<Vec<f32>> = Vec::new();
    rows.push((0..n).map(|_| rng.random_range(-10.0..10.0)).collect());
    rows.push((0..n).map(|_| rng.random_range(0..8) as f32).collect());
    rows.push((0..n).map(|i| i as f32).collect());
    rows.push((0..n).map(|i| -(i as f32)).collect());
    rows.push(
        (0..n)
            .map(|i| {
                if i % 5 == 0 {
                    f32::NAN
                } else if i % 3 == 0 {
                    f32::NEG_INFINITY
                } else {
                    rng.random_range(-1.0..1.0)
                }
            })
            .collect(),
    );
    rows.push(
        (0..n)
            .map(|i| {
                if i % 1000 == 0 {
                    i as f32
                } else {
                    f32::NEG_INFINITY
                }
            })
            .collect(),
    );
    let logits: Vec<f32> = rows.concat();
    for k in [1usize, 37, 2048, n / 4, n / 2] {
        let (mut idx, mut val) = (vec![0; rows.len() * k], vec![0.0; rows.len() * k]);
        cpu::topk(&logits, n, k, &mut idx, &mut val).unwrap();
        for (r, row) in rows.iter().enumerate() {
            let want = topk_by_sort(row, k);
            assert_eq!(&idx[r * k..(r + 1) * k], &want[..], "row {r}, k {k}");
            for (j, &t) in want.iter().enumerate() {
                assert_eq!(
                    val[r * k + j].to_bits(),
                    row[t as usize].to_bits(),
                    "row {r}, k {k}: value"
                );
            }
        }
    }
}

#[test]
fn instruction_sets_are_named_and_checked() {
    for isa in Isa::ALL {
        assert_eq!(Isa::parse(isa.name()), Some(isa));
    }
    assert!(Isa::available().contains(&Isa::Scalar));
    assert_eq!(*Isa::available().last().unwrap(), cpu::isa());
    #[cfg(target_arch = "aarch64")]
    assert!(
        Isa::available().contains(&Isa::Neon),
        "every aarch64 CPU has NEON"
    );
    // An instruction set this CPU lacks is an error, not undefined behaviour.
    let c = case(1, 1, 8, 4, DType::F16, 1);
    let s = c.store.strips(0).unwrap();
    for isa in Isa::ALL.into_iter().filter(|i| !i.supported()) {
        let mut out = vec![0.0; 4];
        assert!(
            cpu::logits(isa, &s, &[0.0; 8], 1, 1.0, None, &mut out).is_err(),
            "{isa:?}"
        );
        let (mut o, mut l) = (vec![0.0; 8], vec![0.0; 1]);
        assert!(
            cpu::attend(isa, &s, &[0.0; 8], 1, 1.0, None, &mut o, &mut l).is_err(),
            "{isa:?}"
        );
    }
}
