//! Top-K selection per row of logits, in about one streaming pass over the row.
//!
//! A strided sample of the row estimates a threshold a little below the k-th largest logit; one
//! pass keeps the tokens at or above it (a compare per logit, a store for the few that pass);
//! the exact selection then runs over those candidates only. The result is exact whatever the
//! estimate: when fewer than `k` tokens pass, the threshold was too high and the row is
//! selected in full; when at least `k` pass, every one of the `k` largest is among them (the
//! k-th largest is then at or above the threshold).

use rayon::prelude::*;

use crate::ensure;
use crate::error::Result;

/// For each of the `rows` rows of `n` logits, the `k` largest, written as indices in ascending
/// (original token) order with their logits. NaN ranks below every number; ties go to the
/// earlier token, so the result is deterministic.
pub fn topk(
    logits: &[f32],
    n: usize,
    k: usize,
    out_idx: &mut [i64],
    out_val: &mut [f32],
) -> Result<()> {
    ensure!(n > 0, "top-k over zero tokens");
    ensure!(
        logits.len().is_multiple_of(n),
        "logits length {} is not a multiple of n = {n}",
        logits.len()
    );
    let rows = logits.len() / n;
    ensure!(k > 0, "k must be positive, got 0");
    ensure!(k <= n, "k = {k} is larger than the number of tokens ({n})");
    ensure!(
        out_idx.len() == rows * k && out_val.len() == rows * k,
        "top-k outputs must hold {rows} × {k} entries, got {} and {}",
        out_idx.len(),
        out_val.len()
    );
    let bytes = logits.len() * 4;
    super::split::run(bytes, || {
        out_idx
            .par_chunks_mut(k)
            .zip(out_val.par_chunks_mut(k))
            .zip(logits.par_chunks(n))
            .with_min_len(super::split::min_len(rows, bytes))
            .for_each_init(Vec::new, |scratch: &mut Vec<u32>, ((idx, val), row)| {
                select_row(row, k, scratch, idx, val)
            })
    });
    Ok(())
}

/// Logits as keys of one total order: NaN lowest.
#[inline(always)]
fn key(v: f32) -> f32 {
    if v.is_nan() {
        f32::NEG_INFINITY
    } else {
        v
    }
}

/// Rows shorter than this (or with `k` above a quarter of them) are selected in full: the
/// sampling pass would not pay for itself.
const SAMPLE_FROM: usize = 16_384;
/// Sample size for the threshold.
const SAMPLE: usize = 4096;

fn select_row(row: &[f32], k: usize, scratch: &mut Vec<u32>, idx: &mut [i64], val: &mut [f32]) {
    let n = row.len();
    scratch.clear();
    if k < n && n >= SAMPLE_FROM && k <= n / 4 {
        if let Some(t) = threshold(row, k) {
            candidates_at_least(row, t, scratch);
        }
        if scratch.len() < k {
            scratch.clear(); // the estimate was too high: select over the whole row
        }
    }
    if scratch.is_empty() {
        scratch.extend(0..n as u32);
    }
    if k < scratch.len() {
        // Larger logit first; among equals, the earlier token first.
        scratch.select_nth_unstable_by(k - 1, |&a, &b| {
            key(row[b as usize])
                .total_cmp(&key(row[a as usize]))
                .then(a.cmp(&b))
        });
    }
    let chosen = &mut scratch[..k];
    chosen.sort_unstable();
    for ((i, v), &t) in idx.iter_mut().zip(val.iter_mut()).zip(chosen.iter()) {
        *i = t as i64;
        *v = row[t as usize];
    }
}

/// A value that about `1.25 k + 3σ` of the row's logits reach, from a strided sample: more
/// than `k` pass it with high probability, not many more. `None` when the sample says nothing
/// useful (the threshold would be `-inf`).
fn threshold(row: &[f32], k: usize) -> Option<f32> {
    let n = row.len();
    let step = n / SAMPLE;
    let mut sample: Vec<f32> = (0..SAMPLE).map(|i| key(row[i * step + step / 2])).collect();
    // Expected sample rank of the k-th largest, with a margin of 25 % and three standard
    // deviations of a binomial count.
    let expect = k as f64 * SAMPLE as f64 / n as f64;
    let rank = (1.25 * expect + 3.0 * expect.sqrt() + 8.0).ceil() as usize;
    if rank >= SAMPLE {
        return None;
    }
    let (_, t, _) = sample.select_nth_unstable_by(rank, |a, b| b.total_cmp(a));
    (*t > f32::NEG_INFINITY).then_some(*t)
}

/// Appends the index of every logit `>= t` (NaN never: it ranks lowest) to `out`.
fn candidates_at_least(row: &[f32], t: f32, out: &mut Vec<u32>) {
    // Blocks of 16: a branch-free compare the compiler vectorises, then a scan of the (rare)
    // hits; the block's mask is zero almost always.
    let mut blocks = row.chunks_exact(16);
    let mut base = 0u32;
    for b in &mut blocks {
        let mut mask = 0u32;
        for (j, &v) in b.iter().enumerate() {
            mask |= ((v >= t) as u32) << j;
        }
        while mask != 0 {
            out.push(base + mask.trailing_zeros());
            mask &= mask - 1;
        }
        base += 16;
    }
    for (j, &v) in blocks.remainder().iter().enumerate() {
        if v >= t {
            out.push(base + j as u32);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_largest_in_token_order() {
        let logits = [0.1, 5.0, -2.0, 3.0, 5.0, f32::NAN, 1.0];
        let (mut i, mut v) = (vec![0; 3], vec![0.0; 3]);
        topk(&logits, 7, 3, &mut i, &mut v).unwrap();
        assert_eq!(i, vec![1, 3, 4]);
        assert_eq!(v, vec![5.0, 3.0, 5.0]);
    }

    #[test]
    fn rejects_k_above_n() {
        let (mut i, mut v) = (vec![0; 4], vec![0.0; 4]);
        assert!(topk(&[1.0; 3], 3, 4, &mut i, &mut v).is_err());
    }
}
