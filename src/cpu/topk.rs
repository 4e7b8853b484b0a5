//! Top-K selection per row of logits: partial selection (O(n)), not a full sort.

use rayon::prelude::*;

use crate::ensure;
use crate::error::Result;

/// For each of the `rows` rows of `n` logits, the `k` largest, written as indices in ascending
/// (original token) order with their logits. NaN ranks below every number; ties go to the
/// earlier token, so the result is deterministic.
pub fn topk(logits: &[f32], n: usize, k: usize, out_idx: &mut [i64], out_val: &mut [f32]) -> Result<()> {
    ensure!(n > 0, "top-k over zero tokens");
    ensure!(logits.len() % n == 0, "logits length {} is not a multiple of n = {n}", logits.len());
    let rows = logits.len() / n;
    ensure!(k > 0, "k must be positive, got 0");
    ensure!(k <= n, "k = {k} is larger than the number of tokens ({n})");
    ensure!(
        out_idx.len() == rows * k && out_val.len() == rows * k,
        "top-k outputs must hold {rows} × {k} entries, got {} and {}",
        out_idx.len(),
        out_val.len()
    );
    out_idx
        .par_chunks_mut(k)
        .zip(out_val.par_chunks_mut(k))
        .zip(logits.par_chunks(n))
        .with_min_len(super::split::min_len(rows, logits.len() * 4))
        .for_each_init(Vec::new, |scratch: &mut Vec<u32>, ((idx, val), row)| {
            select_row(row, k, scratch, idx, val)
        });
    Ok(())
}

fn select_row(row: &[f32], k: usize, scratch: &mut Vec<u32>, idx: &mut [i64], val: &mut [f32]) {
    let key = |i: u32| {
        let v = row[i as usize];
        if v.is_nan() { f32::NEG_INFINITY } else { v }
    };
    scratch.clear();
    scratch.extend(0..row.len() as u32);
    if k < row.len() {
        // Larger logit first; among equals, the earlier token first.
        scratch.select_nth_unstable_by(k - 1, |&a, &b| key(b).total_cmp(&key(a)).then(a.cmp(&b)));
    }
    let chosen = &mut scratch[..k];
    chosen.sort_unstable();
    for ((i, v), &t) in idx.iter_mut().zip(val.iter_mut()).zip(chosen.iter()) {
        *i = t as i64;
        *v = row[t as usize];
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
