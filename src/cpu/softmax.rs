//! The exact merge of two partial attentions (HGCA). The softmax itself is a SIMD kernel
//! (`kernels::softmax_lse`, and online inside `kernels::attend_rows`).

/// Merges partial attention `(o_b, lse_b)` into `(o_a, lse_a)`, `d` floats per row:
/// `o = (e^{lse_a} o_a + e^{lse_b} o_b) / (e^{lse_a} + e^{lse_b})`, computed stably.
/// A partial over no tokens (`lse = -inf`, output zeros) is neutral.
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
    fn empty_partial_is_neutral_in_merge() {
        let (mut o, mut l) = (vec![1.0, 2.0], vec![0.5]);
        merge_partials(&mut o, &mut l, &[9.0, 9.0], &[f32::NEG_INFINITY], 2);
        assert_eq!(o, vec![1.0, 2.0]);
        assert_eq!(l, vec![0.5]);
    }

    #[test]
    fn equal_partials_average() {
        let (mut o, mut l) = (vec![1.0, 3.0], vec![0.0]);
        merge_partials(&mut o, &mut l, &[3.0, 5.0], &[0.0], 2);
        assert_eq!(o, vec![2.0, 4.0]);
        assert!((l[0] - 2f32.ln()).abs() < 1e-7);
    }
}
