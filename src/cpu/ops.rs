//! Multi-threaded CPU attention operations over the host strips of one layer.
//!
//! Shapes (row-major, contiguous): `q [batch, q_heads, d]` f32; logits `[batch, q_heads, n]` f32
//! (`n` = host tokens, or the index-list length); key index lists `[batch, kv_heads, m]`, value
//! index lists `[batch, q_heads, m]` (each query head selects its own tokens); values staged as
//! `[batch, q_heads, k, d]` in the store's dtype; partial outputs `[batch, q_heads, d]` f32 and
//! `lse [batch, q_heads]` f32.

use rayon::prelude::*;

use super::kernels::{logits_rows_isa, weighted_rows_isa};
use super::simd::{with_element, Isa};
use super::softmax::softmax_lse;
use crate::dtype::DType;
use crate::ensure;
use crate::error::Result;

/// Where one layer's host keys and values are: `batch × kv_heads` strips of `len` rows of
/// `head_dim` elements, strip `(seq, head)` at `base + (seq·kv_heads + head)·strip_bytes`.
#[derive(Clone, Copy, Debug)]
pub struct Strips {
    pub keys: *const u8,
    pub values: *const u8,
    pub strip_bytes: usize,
    pub batch: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub dtype: DType,
    /// Valid rows per strip (host tokens).
    pub len: usize,
}

// SAFETY: Strips is a read-only description of memory the caller keeps alive and unmodified
// for the duration of an operation (the store holds a read lock around every call).
unsafe impl Send for Strips {}
unsafe impl Sync for Strips {}

impl Strips {
    fn strip(&self, base: *const u8, seq: usize, head: usize) -> *const u8 {
        // SAFETY: seq < batch, head < kv_heads address a strip inside the region.
        unsafe { base.add((seq * self.kv_heads + head) * self.strip_bytes) }
    }

    fn group(&self, q_heads: usize) -> Result<usize> {
        ensure!(
            q_heads > 0 && q_heads % self.kv_heads == 0,
            "q_heads ({q_heads}) must be a positive multiple of kv_heads ({})",
            self.kv_heads
        );
        Ok(q_heads / self.kv_heads)
    }

    fn check_indices(&self, idx: &[i64]) -> Result<()> {
        if let Some(bad) = idx.iter().find(|&&i| i < 0 || i as usize >= self.len) {
            return crate::invalid!("token index {bad} out of range: {} host tokens", self.len);
        }
        Ok(())
    }
}

/// A raw pointer that may cross into rayon tasks writing disjoint parts of one output.
#[derive(Clone, Copy)]
struct SendPtr<T>(*mut T);
// SAFETY: every task writes a disjoint range (documented at each use).
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}
impl<T> SendPtr<T> {
    fn get(self) -> *mut T {
        self.0
    }
}

/// Rows of one (sequence, kv head) scanned by one task: large enough to amortise scheduling,
/// small enough to balance two to a few dozen cores.
const BLOCK_ROWS: usize = 4096;

/// `out[b, h, t] = scale · ⟨q[b, h], K[b, h / group, row t]⟩` over all host tokens
/// (`indices = None`, `n = len`) or over `indices [batch, kv_heads, m]` (`n = m`).
#[allow(clippy::too_many_arguments)]
pub fn logits(
    isa: Isa,
    s: &Strips,
    q: &[f32],
    q_heads: usize,
    scale: f32,
    indices: Option<&[i64]>,
    out: &mut [f32],
) -> Result<()> {
    let g = s.group(q_heads)?;
    let d = s.head_dim;
    ensure!(
        q.len() == s.batch * q_heads * d,
        "q has {} elements, expected batch × q_heads × head_dim = {}",
        q.len(),
        s.batch * q_heads * d
    );
    let n = match indices {
        None => s.len,
        Some(idx) => {
            ensure!(
                idx.len() % (s.batch * s.kv_heads) == 0,
                "key indices must be [batch, kv_heads, m]; {} entries for {} × {}",
                idx.len(),
                s.batch,
                s.kv_heads
            );
            s.check_indices(idx)?;
            idx.len() / (s.batch * s.kv_heads)
        }
    };
    ensure!(
        out.len() == s.batch * q_heads * n,
        "logits output has {} elements, expected {} × {q_heads} × {n}",
        out.len(),
        s.batch
    );
    if n == 0 {
        return Ok(());
    }
    let blocks = n.div_ceil(BLOCK_ROWS);
    let out_ptr = SendPtr(out.as_mut_ptr());
    (0..s.batch * s.kv_heads * blocks).into_par_iter().for_each(|item| {
        let (pair, block) = (item / blocks, item % blocks);
        let (seq, kh) = (pair / s.kv_heads, pair % s.kv_heads);
        let t0 = block * BLOCK_ROWS;
        let rows = BLOCK_ROWS.min(n - t0);
        let head0 = seq * q_heads + kh * g;
        let idx = indices.map_or(std::ptr::null(), |i| i[pair * n + t0..].as_ptr());
        let t_base = if indices.is_some() { 0 } else { t0 };
        with_element!(s.dtype, E => {
            // SAFETY: keys point at this pair's strip; rows t_base.. t_base+rows (or the
            // checked indices) are < len. The task writes out[head0..head0+g][t0..t0+rows]
            // only, disjoint from every other task.
            unsafe {
                let keys = (s.strip(s.keys, seq, kh) as *const E).add(t_base * d);
                logits_rows_isa::<E>(
                    isa,
                    q[head0 * d..].as_ptr(),
                    g,
                    d,
                    keys,
                    idx,
                    rows,
                    scale,
                    out_ptr.get().add(head0 * n + t0),
                    n,
                )
            }
        })
    });
    Ok(())
}

/// Copies value rows `indices [batch, q_heads, k]` into `out [batch, q_heads, k, d]` (raw bytes
/// of the store's dtype): the staging buffer shipped to the device.
pub fn gather_values(s: &Strips, indices: &[i64], q_heads: usize, out: &mut [u8]) -> Result<()> {
    let g = s.group(q_heads)?;
    let rows = s.batch * q_heads;
    ensure!(
        indices.len() % rows == 0,
        "value indices must be [batch, q_heads, k]; {} entries for {} × {q_heads}",
        indices.len(),
        s.batch
    );
    s.check_indices(indices)?;
    let k = indices.len() / rows;
    let row_bytes = s.head_dim * s.dtype.size();
    ensure!(
        out.len() == rows * k * row_bytes,
        "staging output has {} bytes, expected {}",
        out.len(),
        rows * k * row_bytes
    );
    if k == 0 {
        return Ok(());
    }
    out.par_chunks_mut(k * row_bytes).zip(indices.par_chunks(k)).enumerate().for_each(
        |(r, (dst, idx))| {
            let (seq, h) = (r / q_heads, r % q_heads);
            let strip = s.strip(s.values, seq, h / g);
            for (dst_row, &t) in dst.chunks_exact_mut(row_bytes).zip(idx) {
                // SAFETY: t < len was checked; a strip row has row_bytes bytes.
                let src = unsafe { std::slice::from_raw_parts(strip.add(t as usize * row_bytes), row_bytes) };
                dst_row.copy_from_slice(src);
            }
        },
    );
    Ok(())
}

/// Attention of every query head over host tokens, normalised over those tokens only:
/// `out[b, h] = Σ_t softmax(logits[b, h])_t · V[b, h / group, row t]` and
/// `lse[b, h] = log Σ_t exp(logits[b, h, t])`, so the result merges exactly with a partial
/// attention over the other tokens (`merge_partials`).
///
/// `logits [batch, q_heads, m]` are already scaled. With `indices = None` they cover all host
/// tokens in order (`m = len`) and each value row is read once per GQA group; otherwise
/// `indices [batch, q_heads, m]` name each head's tokens.
#[allow(clippy::too_many_arguments)]
pub fn partial_attention(
    isa: Isa,
    s: &Strips,
    logits: &[f32],
    q_heads: usize,
    indices: Option<&[i64]>,
    out: &mut [f32],
    lse: &mut [f32],
) -> Result<()> {
    let g = s.group(q_heads)?;
    let d = s.head_dim;
    let rows = s.batch * q_heads;
    ensure!(
        logits.len() % rows == 0,
        "logits must be [batch, q_heads, m]; {} entries for {} × {q_heads}",
        logits.len(),
        s.batch
    );
    let m = logits.len() / rows;
    match indices {
        None => ensure!(
            m == s.len,
            "without indices the logits must cover all {} host tokens, got {m}",
            s.len
        ),
        Some(idx) => {
            ensure!(
                idx.len() == logits.len(),
                "indices ({}) and logits ({}) must both be [batch, q_heads, m]",
                idx.len(),
                logits.len()
            );
            s.check_indices(idx)?;
        }
    }
    ensure!(
        out.len() == rows * d && lse.len() == rows,
        "outputs must be [batch, q_heads, d] and [batch, q_heads]: got {} and {} elements",
        out.len(),
        lse.len()
    );
    // One task per (sequence, kv head) when heads share rows; per query head otherwise.
    let heads_per_task = if indices.is_none() { g } else { 1 };
    out.par_chunks_mut(heads_per_task * d)
        .zip(lse.par_chunks_mut(heads_per_task))
        .zip(logits.par_chunks(heads_per_task * m))
        .enumerate()
        .for_each_init(Vec::new, |w: &mut Vec<f32>, (task, ((o, l), x))| {
            let head0 = task * heads_per_task;
            let (seq, kh) = (head0 / q_heads, (head0 % q_heads) / g);
            w.clear();
            w.extend_from_slice(x);
            for (h, lse_h) in l.iter_mut().enumerate() {
                *lse_h = softmax_lse(&mut w[h * m..(h + 1) * m]);
            }
            o.fill(0.0);
            if m == 0 {
                return;
            }
            let idx = indices.map_or(std::ptr::null(), |i| i[head0 * m..].as_ptr());
            with_element!(s.dtype, E => {
                // SAFETY: the values strip of (seq, kh) holds len >= every addressed row; `o`
                // is this task's own heads_per_task × d output.
                unsafe {
                    weighted_rows_isa::<E>(
                        isa,
                        w.as_ptr(),
                        m,
                        heads_per_task,
                        d,
                        s.strip(s.values, seq, kh) as *const E,
                        idx,
                        m,
                        o.as_mut_ptr(),
                    )
                }
            })
        });
    Ok(())
}

/// Partial attention of `q [batch, q_heads, d]` over all `s.len` rows of `s` in one call:
/// logits, masking (`mask [batch, len]`, nonzero = ignore the token), softmax, values and lse.
/// This is the whole attention over one tier's tokens, e.g. a device tier that lives in host
/// memory on a machine without a GPU.
#[allow(clippy::too_many_arguments)]
pub fn attend(
    isa: Isa,
    s: &Strips,
    q: &[f32],
    q_heads: usize,
    scale: f32,
    mask: Option<&[u8]>,
    out: &mut [f32],
    lse: &mut [f32],
) -> Result<()> {
    let n = s.len;
    let mut x = vec![0.0f32; s.batch * q_heads * n];
    logits(isa, s, q, q_heads, scale, None, &mut x)?;
    if let Some(mask) = mask {
        ensure!(mask.len() == s.batch * n, "mask must be [batch, {n}], got {} entries", mask.len());
        for (row, xs) in x.chunks_mut(n.max(1)).enumerate() {
            let m = &mask[(row / q_heads) * n..(row / q_heads + 1) * n];
            for (v, &masked) in xs.iter_mut().zip(m) {
                if masked != 0 {
                    *v = f32::NEG_INFINITY;
                }
            }
        }
    }
    partial_attention(isa, s, &x, q_heads, None, out, lse)
}
