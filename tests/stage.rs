//! The CPU stage (`cpu::cpu_stage`) against a naive f64 reference of its definition: logits of
//! the scored tokens, masking, top-k (NaN lowest, ties to the earlier scored token, kept in
//! scored order), then partial attention with its log-sum-exp or the selected logits and values.

use hybridgen::cpu::{self, Merge, Scratch, Selection, StageArgs, StageOutputs};
use hybridgen::DType;
use rand::{Rng, SeedableRng};

mod common;

use common::{case, Case};

impl Case {
    fn row<'a>(&self, data: &'a [f32], s: usize, kh: usize, t: usize) -> &'a [f32] {
        let o = ((s * self.kvh + kh) * self.n + t) * self.d;
        &data[o..o + self.d]
    }
    fn value_row_bytes(&self, s: usize, kh: usize, t: usize) -> &[u8] {
        let rb = self.d * self.dtype.size();
        let o = ((s * self.kvh + kh) * self.n + t) * rb;
        &self.value_bytes[o..o + rb]
    }
}

/// The reference result of one query head: selected host tokens, their logits, and (LSE) the
/// partial output and log-sum-exp.
struct HeadRef {
    tokens: Vec<usize>,
    logits: Vec<f64>,
    out: Vec<f64>,
    lse: f64,
}

struct Query<'a> {
    q: &'a [f32],
    hq: usize,
    scale: f32,
    top_k: Option<usize>,
    positions: Option<&'a [i64]>,
    mask: Option<&'a [u8]>,
}

fn reference(c: &Case, a: &Query<'_>, s: usize, h: usize) -> HeadRef {
    let (d, g) = (c.d, a.hq / c.kvh);
    let kh = h / g;
    let qh = &a.q[(s * a.hq + h) * d..(s * a.hq + h + 1) * d];
    let cand: Vec<usize> = match a.positions {
        Some(p) => p.iter().map(|&t| t as usize).collect(),
        None => (0..c.n).collect(),
    };
    let x: Vec<f64> = cand
        .iter()
        .map(|&t| {
            if a.mask.is_some_and(|m| m[s * c.n + t] != 0) {
                return f64::NEG_INFINITY;
            }
            let k = c.row(&c.keys, s, kh, t);
            qh.iter()
                .zip(k)
                .map(|(&x, &y)| x as f64 * y as f64)
                .sum::<f64>()
                * a.scale as f64
        })
        .collect();
    let mut keep: Vec<usize> = (0..cand.len()).collect();
    if let Some(k) = a.top_k.filter(|&k| k < cand.len()) {
        let key = |i: usize| {
            if x[i].is_nan() {
                f64::NEG_INFINITY
            } else {
                x[i]
            }
        };
        keep.sort_by(|&i, &j| key(j).total_cmp(&key(i)).then(i.cmp(&j)));
        keep.truncate(k);
        keep.sort();
    }
    let logits: Vec<f64> = keep.iter().map(|&i| x[i]).collect();
    let tokens: Vec<usize> = keep.iter().map(|&i| cand[i]).collect();
    let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let mut out = vec![0.0; d];
    let mut lse = f64::NEG_INFINITY;
    if max > f64::NEG_INFINITY {
        let w: Vec<f64> = logits.iter().map(|&l| (l - max).exp()).collect();
        let sum: f64 = w.iter().sum();
        for (wi, &t) in w.iter().zip(&tokens) {
            for (o, &v) in out.iter_mut().zip(c.row(&c.values, s, kh, t)) {
                *o += wi / sum * v as f64;
            }
        }
        lse = max + sum.ln();
    }
    HeadRef {
        tokens,
        logits,
        out,
        lse,
    }
}

fn close(got: f32, want: f64, scale: f64) -> bool {
    if want.is_infinite() {
        return got as f64 == want;
    }
    (got as f64 - want).abs() <= 2e-5 * scale.max(1.0)
}

/// Runs the stage with both merges and checks it against the reference, head by head.
fn check(c: &Case, b: usize, a: &Query<'_>, what: &str) {
    let strips = c.store.strips(0).unwrap();
    let (hq, d) = (a.hq, c.d);
    let rows = b * hq;
    let mut scratch = Scratch::default();
    for merge in [Merge::Lse, Merge::Concat] {
        let args = StageArgs {
            q: a.q,
            q_heads: hq,
            scale: a.scale,
            merge,
            top_k: a.top_k,
            positions: a.positions,
            mask: a.mask,
            pages: None,
        };
        let sel = args.selection(c.n);
        let k = sel.tokens;
        let indexed = |len: usize| if sel.indexed { len } else { 0 };
        let (mut out, mut lse) = (vec![0.0; rows * d], vec![0.0; rows]);
        let mut logits = vec![0.0; rows * k];
        let mut indices = vec![-1i64; indexed(rows * k)];
        let mut values = vec![0u8; indexed(rows * k * d * c.dtype.size())];
        for isa in cpu::Isa::available() {
            let dst = match merge {
                Merge::Lse => StageOutputs {
                    out: &mut out,
                    lse: &mut lse,
                    indices: &mut indices,
                    ..Default::default()
                },
                Merge::Concat => StageOutputs {
                    logits: &mut logits,
                    indices: &mut indices,
                    values: &mut values,
                    ..Default::default()
                },
            };
            let got = cpu::cpu_stage(isa, &strips, &args, dst, &mut scratch);
            assert_eq!(got.unwrap(), sel, "{what} {merge:?} {isa:?}");
            for s in 0..b {
                for h in 0..hq {
                    let r = s * hq + h;
                    let want = reference(c, a, s, h);
                    assert_eq!(want.tokens.len(), k, "{what}: selection size");
                    if sel.indexed {
                        let got: Vec<usize> = indices[r * k..(r + 1) * k]
                            .iter()
                            .map(|&t| t as usize)
                            .collect();
                        assert_eq!(got, want.tokens, "{what} {merge:?}: indices of row {r}");
                    }
                    match merge {
                        Merge::Lse => {
                            let scale = want.out.iter().fold(0.0f64, |m, v| m.max(v.abs()));
                            for (i, (&g, &w)) in
                                out[r * d..(r + 1) * d].iter().zip(&want.out).enumerate()
                            {
                                assert!(
                                    close(g, w, scale),
                                    "{what}: out[{r}][{i}] = {g}, want {w}"
                                );
                            }
                            assert!(
                                close(lse[r], want.lse, want.lse.abs()),
                                "{what}: lse[{r}] = {}, want {}",
                                lse[r],
                                want.lse
                            );
                        }
                        Merge::Concat => {
                            let scale = want
                                .logits
                                .iter()
                                .filter(|v| v.is_finite())
                                .fold(0.0f64, |m, v| m.max(v.abs()));
                            for (j, (&g, &w)) in logits[r * k..(r + 1) * k]
                                .iter()
                                .zip(&want.logits)
                                .enumerate()
                            {
                                assert!(
                                    close(g, w, scale),
                                    "{what}: logits[{r}][{j}] = {g}, want {w}"
                                );
                            }
                            if sel.indexed {
                                let rb = d * c.dtype.size();
                                for (j, &t) in want.tokens.iter().enumerate() {
                                    let got = &values[(r * k + j) * rb..(r * k + j + 1) * rb];
                                    assert_eq!(
                                        got,
                                        c.value_row_bytes(s, h / (hq / c.kvh), t),
                                        "{what}: value row"
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

const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

#[test]
fn stage_matches_reference_for_every_selection() {
    for dtype in DTYPES {
        for g in [1usize, 3, 4] {
            for b in [1usize, 2] {
                let (kvh, d, n) = (2, 64, 91);
                let hq = kvh * g;
                let c = case(b, kvh, d, n, dtype, (g * 10 + b) as u64);
                let mut rng = rand::rngs::StdRng::seed_from_u64(3);
                let q: Vec<f32> = (0..b * hq * d)
                    .map(|_| rng.random_range(-1.0..1.0))
                    .collect();
                let mut mask: Vec<u8> = (0..b * n).map(|_| rng.random_bool(0.3) as u8).collect();
                mask[..n].fill(1); // sequence 0 fully masked
                let positions: Vec<i64> = vec![n as i64 - 1, 0, 5, 5, 40, 3, 77];
                let reverse: Vec<i64> = (0..n as i64).rev().step_by(2).collect();
                let selections: [(Option<usize>, Option<&[i64]>); 7] = [
                    (None, None),
                    (Some(10), None),
                    (Some(0), None),
                    (Some(n), None),
                    (Some(n + 5), None),
                    (None, Some(&positions)),
                    (Some(9), Some(&reverse)),
                ];
                for (top_k, pos) in selections {
                    for m in [None, Some(&mask[..])] {
                        let a = Query {
                            q: &q,
                            hq,
                            scale: 0.125,
                            top_k,
                            positions: pos,
                            mask: m,
                        };
                        let what = format!(
                            "{dtype} g{g} b{b} top_k {top_k:?} positions {} mask {}",
                            pos.is_some(),
                            m.is_some()
                        );
                        check(&c, b, &a, &what);
                    }
                }
            }
        }
    }
}

#[test]
fn no_host_tokens_give_empty_selections() {
    let c = case(2, 2, 32, 0, DType::F16, 1);
    let q = vec![0.5f32; 2 * 4 * 32];
    let empty: [i64; 0] = [];
    for (top_k, pos) in [
        (None, None),
        (Some(4), None),
        (Some(0), None),
        (None, Some(&empty[..])),
    ] {
        let a = Query {
            q: &q,
            hq: 4,
            scale: 1.0,
            top_k,
            positions: pos,
            mask: Some(&[]),
        };
        check(&c, 2, &a, "n = 0");
    }
}

#[test]
fn bad_arguments_are_errors_not_panics() {
    let c = case(1, 2, 16, 10, DType::F32, 2);
    let strips = c.store.strips(0).unwrap();
    let isa = cpu::isa();
    let q = vec![0.0f32; 4 * 16];
    let base = StageArgs {
        q: &q,
        q_heads: 4,
        scale: 1.0,
        merge: Merge::Lse,
        top_k: None,
        positions: None,
        mask: None,
        pages: None,
    };
    let run = |a: StageArgs<'_>, out_len: usize, lse_len: usize| {
        let (mut out, mut lse) = (vec![0.0; out_len], vec![0.0; lse_len]);
        let dst = StageOutputs {
            out: &mut out,
            lse: &mut lse,
            ..Default::default()
        };
        cpu::cpu_stage(isa, &strips, &a, dst, &mut Scratch::default())
    };
    assert!(run(base, 64, 4).is_ok());
    assert!(
        run(StageArgs { q_heads: 3, ..base }, 48, 3).is_err(),
        "heads not a multiple of kv heads"
    );
    assert!(
        run(StageArgs { q: &q[1..], ..base }, 64, 4).is_err(),
        "short q"
    );
    assert!(run(base, 63, 4).is_err(), "short output");
    assert!(run(base, 64, 5).is_err(), "long lse");
    assert!(
        run(
            StageArgs {
                positions: Some(&[0, 10]),
                ..base
            },
            64,
            4
        )
        .is_err(),
        "position past the end"
    );
    assert!(
        run(
            StageArgs {
                positions: Some(&[-1]),
                ..base
            },
            64,
            4
        )
        .is_err(),
        "negative position"
    );
    assert!(
        run(
            StageArgs {
                mask: Some(&[0; 9]),
                ..base
            },
            64,
            4
        )
        .is_err(),
        "short mask"
    );
    // Concat needs logits (and, for an index selection, indices and values) of the right size.
    let concat = StageArgs {
        merge: Merge::Concat,
        top_k: Some(3),
        ..base
    };
    let (mut logits, mut idx, mut values) = (vec![0.0; 12], vec![0; 12], vec![0u8; 12 * 16 * 4]);
    let dst = StageOutputs {
        logits: &mut logits,
        indices: &mut idx,
        values: &mut values[1..],
        ..Default::default()
    };
    assert!(
        cpu::cpu_stage(isa, &strips, &concat, dst, &mut Scratch::default()).is_err(),
        "short values"
    );
    let dst = StageOutputs {
        logits: &mut logits,
        indices: &mut idx,
        values: &mut values,
        ..Default::default()
    };
    assert_eq!(
        cpu::cpu_stage(isa, &strips, &concat, dst, &mut Scratch::default()).unwrap(),
        Selection {
            tokens: 3,
            indexed: true
        }
    );
}
