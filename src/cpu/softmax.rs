//! Softmax with log-sum-exp, and the exact merge of two partial attentions (HGCA).

/// Replaces `x` by `softmax(x)` and returns `lse = log Σ exp(x)`.
///
/// A row of only `-inf` (every token masked) yields zeros and `lse = -inf`, so merging it with
/// another partial gives that partial unchanged.
pub(crate) fn softmax_lse(x: &mut [f32]) -> f32 {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        x.fill(0.0);
        return f32::NEG_INFINITY;
    }
    // f64 sum: exact enough for any context length, and cheap next to the exps.
    let mut sum = 0.0f64;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v as f64;
    }
    let inv = (1.0 / sum) as f32;
    x.iter_mut().for_each(|v| *v *= inv);
    max + sum.ln() as f32
}

/// Merges partial attention `(o_b, lse_b)` into `(o_a, lse_a)`, `d` floats per row:
/// `o = (e^{lse_a} o_a + e^{lse_b} o_b) / (e^{lse_a} + e^{lse_b})`, computed stably.
pub fn merge_partials(o_a: &mut [f32], lse_a: &mut [f32], o_b: &[f32], lse_b: &[f32], d: usize) {
    assert_eq!(o_a.len(), lse_a.len() * d);
    assert_eq!(o_b.len(), lse_b.len() * d);
    assert_eq!(lse_a.len(), lse_b.len());
    for (r, (la, &lb)) in lse_a.iter_mut().zip(lse_b).enumerate() {
        let m = la.max(lb);
        if m == f32::NEG_INFINITY {
            continue; // both empty
        }
        let (wa, wb) = ((*la - m).exp(), (lb - m).exp());
        let inv = 1.0 / (wa + wb);
        let (oa, ob) = (&mut o_a[r * d..(r + 1) * d], &o_b[r * d..(r + 1) * d]);
        for (a, &b) in oa.iter_mut().zip(ob) {
            *a = (wa * *a + wb * b) * inv;
        }
        *la = m + (wa + wb).ln();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_sums_to_one_and_lse_matches() {
        let mut x = vec![1.0, 2.0, 3.0, -1.0];
        let expect: f32 = [1.0f32, 2.0, 3.0, -1.0].iter().map(|v| v.exp()).sum::<f32>().ln();
        let lse = softmax_lse(&mut x);
        assert!((lse - expect).abs() < 1e-6);
        assert!((x.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }

    #[test]
    fn masked_row_is_neutral_in_merge() {
        let mut x = vec![f32::NEG_INFINITY; 3];
        assert_eq!(softmax_lse(&mut x), f32::NEG_INFINITY);
        let (mut o, mut l) = (vec![1.0, 2.0], vec![0.5]);
        merge_partials(&mut o, &mut l, &[9.0, 9.0], &[f32::NEG_INFINITY], 2);
        assert_eq!(o, vec![1.0, 2.0]);
        assert_eq!(l, vec![0.5]);
    }
}
