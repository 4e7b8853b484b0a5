//! The exact merge of two partial attentions (HGCA): the one LSE merge on the CPU (the Python
//! package's `merge_partials` runs it for CPU tensors; the CUDA kernel `merge_partials` is its
//! device counterpart). The softmax itself is a SIMD kernel (`kernels::softmax_lse`, and online
//! inside `kernels::attend_rows`).

use crate::ensure;
use crate::error::Result;

/// Merges partial attention `(o_b, lse_b)` into `(o_a, lse_a)`, `d` floats per row:
/// `o = (e^{lse_a} o_a + e^{lse_b} o_b) / (e^{lse_a} + e^{lse_b})`, computed stably.
///
/// Semantics (those of torch's `logaddexp`-based formula): a part over no tokens (`lse = -inf`)
/// contributes nothing, whatever its output holds (even NaN); both empty give zeros and `-inf`;
/// NaN in an attended part propagates; `lse = +inf` dominates the log-sum-exp (the output is
/// then NaN, as in torch).
pub fn merge_partials(
    o_a: &mut [f32],
    lse_a: &mut [f32],
    o_b: &[f32],
    lse_b: &[f32],
    d: usize,
) -> Result<()> {
    let rows = lse_a.len();
    ensure!(
        lse_b.len() == rows && o_a.len() == rows * d && o_b.len() == rows * d,
        "merge_partials needs outputs [rows, {d}] and lse [rows] of one shape: got {} / {} outputs, {} / {} lse",
        o_a.len(),
        o_b.len(),
        rows,
        lse_b.len()
    );
    for (r, (la, &lb)) in lse_a.iter_mut().zip(lse_b).enumerate() {
        let (oa, ob) = (&mut o_a[r * d..(r + 1) * d], &o_b[r * d..(r + 1) * d]);
        let lse = logaddexp(*la, lb);
        if lse == f32::NEG_INFINITY {
            oa.fill(0.0);
            *la = lse;
            continue;
        }
        let weight = |l: f32| {
            if l == f32::NEG_INFINITY {
                0.0
            } else {
                (l - lse).exp()
            }
        };
        let (wa, wb) = (weight(*la), weight(lb));
        for (a, &b) in oa.iter_mut().zip(ob) {
            let part_a = if wa == 0.0 { 0.0 } else { wa * *a };
            let part_b = if wb == 0.0 { 0.0 } else { wb * b };
            *a = part_a + part_b;
        }
        *la = lse;
    }
    Ok(())
}

/// `ln(e^a + e^b)`, stable, with `-inf` as the empty sum and NaN propagated.
fn logaddexp(a: f32, b: f32) -> f32 {
    if a.is_nan() || b.is_nan() {
        return f32::NAN;
    }
    let m = a.max(b);
    if m.is_infinite() {
        return m;
    }
    m + ((a - m).exp() + (b - m).exp()).ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_partial_is_neutral_in_merge_even_when_it_holds_nan() {
        let (mut o, mut l) = (vec![1.0, 2.0], vec![0.5]);
        merge_partials(&mut o, &mut l, &[f32::NAN, 9.0], &[f32::NEG_INFINITY], 2).unwrap();
        assert_eq!(o, vec![1.0, 2.0]);
        assert_eq!(l, vec![0.5]);
        let (mut o, mut l) = (vec![f32::NAN, 1.0], vec![f32::NEG_INFINITY]);
        merge_partials(&mut o, &mut l, &[3.0, 4.0], &[0.0], 2).unwrap();
        assert_eq!((o, l), (vec![3.0, 4.0], vec![0.0]));
    }

    #[test]
    fn equal_partials_average_and_both_empty_give_zeros() {
        let (mut o, mut l) = (vec![1.0, 3.0], vec![0.0]);
        merge_partials(&mut o, &mut l, &[3.0, 5.0], &[0.0], 2).unwrap();
        assert_eq!(o, vec![2.0, 4.0]);
        assert!((l[0] - 2f32.ln()).abs() < 1e-7);
        let (mut o, mut l) = (vec![f32::NAN], vec![f32::NEG_INFINITY]);
        merge_partials(&mut o, &mut l, &[f32::NAN], &[f32::NEG_INFINITY], 1).unwrap();
        assert_eq!((o, l), (vec![0.0], vec![f32::NEG_INFINITY]));
    }

    #[test]
    fn mismatched_shapes_are_an_error_not_a_panic() {
        let (mut o, mut l) = (vec![0.0; 4], vec![0.0; 2]);
        assert!(merge_partials(&mut o, &mut l, &[0.0; 2], &[0.0; 2], 2).is_err());
    }
}
