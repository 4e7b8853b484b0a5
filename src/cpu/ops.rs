//! Multi-threaded CPU attention operations over the host strips of one layer.
//!
//! Shapes (row-major, contiguous): `q [batch, q_heads, d]` f32; logits `[batch, q_heads, n]` f32
//! (`n` = host tokens, or the index-list length); key index lists `[batch, kv_heads, m]`, value
//! index lists `[batch, q_heads, m]` (each query head selects its own tokens); values staged as
//! `[batch, q_heads, k, d]` in the store's dtype; partial outputs `[batch, q_heads, d]` f32 and
//! `lse [batch, q_heads]` f32.

use std::marker::PhantomData;

use rayon::prelude::*;

use super::kernels::{
    attend_rows_isa, logits_rows_isa, softmax_lse_isa, weighted_rows_isa, Online, SUB,
};
use super::simd::{tuning, with_element, Isa};
use super::split::{min_len, run};
use crate::dtype::DType;
use crate::ensure;
use crate::error::Result;

/// Where one layer's host keys and values are: `batch × kv_heads` strips of `len` rows of
/// `head_dim` elements, strip `(seq, head)` at `base + (seq·kv_heads + head)·strip_bytes`.
///
/// A `Strips` borrows that memory for `'a` as shared slices would: it can only be made by
/// [`Strips::from_slices`] (checked), by the store (`KvStore::strips`, borrowing the store) or
/// by the unsafe [`Strips::from_raw`], whose caller vouches for the memory. That is what lets
/// the operations below be safe functions.
#[derive(Clone, Copy, Debug)]
pub struct Strips<'a> {
    keys: *const u8,
    values: *const u8,
    strip_bytes: usize,
    batch: usize,
    kv_heads: usize,
    head_dim: usize,
    dtype: DType,
    len: usize,
    _memory: PhantomData<&'a [u8]>,
}

// SAFETY: a Strips is a shared borrow of immutable memory (see `from_raw`), like `&'a [u8]`,
// which is Send and Sync.
unsafe impl Send for Strips<'_> {}
// SAFETY: as for Send: nothing is written through a Strips.
unsafe impl Sync for Strips<'_> {}

impl<'a> Strips<'a> {
    /// Strips over raw memory.
    ///
    /// # Safety
    /// For all of `'a`, for every `seq < batch` and `head < kv_heads`, the `len · head_dim`
    /// elements of `dtype` at `keys + (seq·kv_heads + head)·strip_bytes` (and likewise at
    /// `values`) must be readable, aligned for `dtype`, initialised, and not written by anyone
    /// (no `&mut` to them, no other thread, no device). The address arithmetic must not overflow.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn from_raw(
        keys: *const u8,
        values: *const u8,
        strip_bytes: usize,
        batch: usize,
        kv_heads: usize,
        head_dim: usize,
        dtype: DType,
        len: usize,
    ) -> Strips<'a> {
        Strips {
            keys,
            values,
            strip_bytes,
            batch,
            kv_heads,
            head_dim,
            dtype,
            len,
            _memory: PhantomData,
        }
    }

    /// Strips over two borrowed byte buffers, checked: both must hold every strip's `len` rows
    /// (the last strip may end right after its rows) and be aligned for `dtype`.
    #[allow(clippy::too_many_arguments)]
    pub fn from_slices(
        keys: &'a [u8],
        values: &'a [u8],
        strip_bytes: usize,
        batch: usize,
        kv_heads: usize,
        head_dim: usize,
        dtype: DType,
        len: usize,
    ) -> Result<Strips<'a>> {
        ensure!(
            batch > 0 && kv_heads > 0 && head_dim > 0,
            "batch, kv_heads and head_dim must be positive"
        );
        // Bytes from the first strip's start to the end of the last strip's rows.
        let need = (|| {
            let rows = len.checked_mul(head_dim)?.checked_mul(dtype.size())?;
            let last = batch.checked_mul(kv_heads)? - 1;
            (rows <= strip_bytes).then_some(())?;
            last.checked_mul(strip_bytes)?.checked_add(rows)
        })();
        let Some(need) = need else {
            return crate::invalid!("{len} rows of {head_dim} {dtype} elements do not fit strips of {strip_bytes} bytes");
        };
        for (name, buf) in [("keys", keys), ("values", values)] {
            ensure!(
                buf.len() >= need,
                "{name} hold {} bytes, the strips need {need}",
                buf.len()
            );
            ensure!(
                (buf.as_ptr() as usize).is_multiple_of(dtype.size())
                    && strip_bytes.is_multiple_of(dtype.size()),
                "{name} are not aligned for {dtype}"
            );
        }
        // SAFETY: both buffers are borrowed for 'a (shared: nobody writes them meanwhile), hold
        // every addressed row (checked above) and are aligned for dtype.
        Ok(unsafe {
            Strips::from_raw(
                keys.as_ptr(),
                values.as_ptr(),
                strip_bytes,
                batch,
                kv_heads,
                head_dim,
                dtype,
                len,
            )
        })
    }

    /// The strips of sequences `first..first+count` only, with `len` rows each (at most this
    /// view's rows): e.g. one request's slot of a store, with that slot's host length.
    pub fn sequences(&self, first: usize, count: usize, len: usize) -> Result<Strips<'a>> {
        ensure!(
            first
                .checked_add(count)
                .is_some_and(|end| end <= self.batch)
                && count > 0,
            "sequences {first}..{} are not inside a batch of {}",
            first.saturating_add(count),
            self.batch
        );
        ensure!(
            len <= self.len,
            "{len} rows asked of strips holding {}",
            self.len
        );
        let offset = first * self.kv_heads * self.strip_bytes;
        // SAFETY: the narrowed strips are a subset (sequences inside the batch, rows inside
        // `len`) of the memory this view's maker vouched for, for the same lifetime.
        unsafe {
            Ok(Strips::from_raw(
                self.keys.add(offset),
                self.values.add(offset),
                self.strip_bytes,
                count,
                self.kv_heads,
                self.head_dim,
                self.dtype,
                len,
            ))
        }
    }

    /// Valid rows per strip (host tokens).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn batch(&self) -> usize {
        self.batch
    }

    pub fn kv_heads(&self) -> usize {
        self.kv_heads
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    fn strip(&self, base: *const u8, seq: usize, head: usize) -> *const u8 {
        debug_assert!(seq < self.batch && head < self.kv_heads);
        // SAFETY: seq < batch, head < kv_heads (every caller iterates within them) address a
        // strip inside the memory `from_raw`'s caller vouched for.
        unsafe { base.add((seq * self.kv_heads + head) * self.strip_bytes) }
    }

    /// Number of query heads per KV head.
    pub(crate) fn group(&self, q_heads: usize) -> Result<usize> {
        ensure!(
            q_heads > 0 && q_heads.is_multiple_of(self.kv_heads),
            "q_heads ({q_heads}) must be a positive multiple of kv_heads ({})",
            self.kv_heads
        );
        Ok(q_heads / self.kv_heads)
    }

    pub(crate) fn check_indices(&self, idx: &[i64]) -> Result<()> {
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

/// The operations take the instruction set as an argument (so tests and benchmarks can force
/// each one); running code built for one this CPU lacks would be undefined behaviour.
pub(crate) fn check_isa(isa: Isa) -> Result<()> {
    ensure!(
        isa.supported(),
        "instruction set {} is not supported by this CPU",
        isa.name()
    );
    Ok(())
}

/// Rows of one (sequence, kv head) scanned by one task: large enough to amortise scheduling,
/// small enough to balance two to a few dozen cores.
const BLOCK_ROWS: usize = 4096;

/// `out[b, h, t] = scale · ⟨q[b, h], K[b, h / group, row t]⟩` over all host tokens
/// (`indices = None`, `n = len`) or over `indices [batch, kv_heads, m]` (`n = m`).
#[allow(clippy::too_many_arguments)]
pub fn logits(
    isa: Isa,
    s: &Strips<'_>,
    q: &[f32],
    q_heads: usize,
    scale: f32,
    indices: Option<&[i64]>,
    out: &mut [f32],
) -> Result<()> {
    check_isa(isa)?;
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
    let items = s.batch * s.kv_heads * blocks;
    let bytes = s.batch * s.kv_heads * n * d * s.dtype.size();
    let ahead = tuning().prefetch_ahead;
    run(bytes, || {
        (0..items)
            .into_par_iter()
            .with_min_len(min_len(items, bytes))
            .for_each(|item| {
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
                            ahead,
                            0,
                        )
                    }
                })
            })
    });
    Ok(())
}

/// Rows ahead of the copy that [`gather_values`] prefetches.
const GATHER_AHEAD: usize = 8;

/// Copies value rows `indices [batch, q_heads, k]` into `out [batch, q_heads, k, d]` (raw bytes
/// of the store's dtype): the staging buffer shipped to the device.
pub fn gather_values(
    s: &Strips<'_>,
    indices: &[i64],
    q_heads: usize,
    out: &mut [u8],
) -> Result<()> {
    let g = s.group(q_heads)?;
    let rows = s.batch * q_heads;
    ensure!(
        indices.len().is_multiple_of(rows),
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
    let serial = min_len(rows, out.len());
    run(out.len(), || {
        out.par_chunks_mut(k * row_bytes)
            .zip(indices.par_chunks(k))
            .enumerate()
            .with_min_len(serial)
            .for_each(|(r, (dst, idx))| {
                let (seq, h) = (r / q_heads, r % q_heads);
                let strip = s.strip(s.values, seq, h / g);
                for (j, (dst_row, &t)) in dst.chunks_exact_mut(row_bytes).zip(idx).enumerate() {
                    // The rows are scattered: ask for one a few rows ahead so that several
                    // misses are in flight at once (the addresses come from the index list).
                    if let Some(&ahead) = idx.get(j + GATHER_AHEAD) {
                        let p = strip.wrapping_add(ahead as usize * row_bytes);
                        for line in (0..row_bytes).step_by(64) {
                            super::simd::prefetch(p.wrapping_add(line));
                        }
                    }
                    // SAFETY: t < len was checked; a strip row has row_bytes bytes.
                    let src = unsafe {
                        std::slice::from_raw_parts(strip.add(t as usize * row_bytes), row_bytes)
                    };
                    dst_row.copy_from_slice(src);
                }
            })
    });
    Ok(())
}

/// A partial attention's outputs must be `out [batch, q_heads, d]` and `lse [batch, q_heads]`
/// (`rows = batch · q_heads`).
fn check_partial_outputs(rows: usize, d: usize, out: &[f32], lse: &[f32]) -> Result<()> {
    ensure!(
        out.len() == rows * d && lse.len() == rows,
        "outputs must be [batch, q_heads, d] and [batch, q_heads]: got {} and {} elements",
        out.len(),
        lse.len()
    );
    Ok(())
}

/// Attention over no tokens: zeros and `lse = -inf`, the neutral partial of `merge_partials`.
fn neutral_partial(out: &mut [f32], lse: &mut [f32]) {
    out.fill(0.0);
    lse.fill(f32::NEG_INFINITY);
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
    s: &Strips<'_>,
    logits: &[f32],
    q_heads: usize,
    indices: Option<&[i64]>,
    out: &mut [f32],
    lse: &mut [f32],
) -> Result<()> {
    check_isa(isa)?;
    let g = s.group(q_heads)?;
    let d = s.head_dim;
    let rows = s.batch * q_heads;
    ensure!(
        logits.len().is_multiple_of(rows),
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
    check_partial_outputs(rows, d, out, lse)?;
    if m == 0 {
        neutral_partial(out, lse);
        return Ok(());
    }
    // One task per (sequence, kv head) when heads share rows; per query head otherwise.
    let heads_per_task = if indices.is_none() { g } else { 1 };
    let tasks = rows / heads_per_task;
    let read = rows / heads_per_task * m * d * s.dtype.size() + logits.len() * 4;
    run(read, || {
        out.par_chunks_mut(heads_per_task * d)
            .zip(lse.par_chunks_mut(heads_per_task))
            .zip(logits.par_chunks(heads_per_task * m))
            .enumerate()
            .with_min_len(min_len(tasks, read))
            .for_each_init(Vec::new, |w: &mut Vec<f32>, (task, ((o, l), x))| {
                let head0 = task * heads_per_task;
                let (seq, kh) = (head0 / q_heads, (head0 % q_heads) / g);
                w.clear();
                w.extend_from_slice(x);
                for (h, lse_h) in l.iter_mut().enumerate() {
                    // SAFETY: row h of w holds m floats.
                    *lse_h = unsafe { softmax_lse_isa::<f32>(isa, w[h * m..].as_mut_ptr(), m) };
                }
                o.fill(0.0);
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
            })
    });
    Ok(())
}

/// Rows of one (sequence, kv head) that one task of [`attend`] covers, keys and values.
const ATTEND_BLOCK_ROWS: usize = 4096;

/// Partial attention of `q [batch, q_heads, d]` over all `s.len` rows of `s` in one call:
/// logits, masking (`mask [batch, len]`, nonzero = ignore the token), softmax, values and lse,
/// as [`logits`] then [`partial_attention`] would compute them, fused: each task takes a block
/// of rows of one (sequence, kv head), keeps its logits in L1 (online softmax) and reads every
/// key row and every value row once for the whole GQA group; the blocks' partial results are
/// merged exactly at the end. This is the CPU stage's LSE merge over every host token, and the
/// whole attention over one tier's tokens (e.g. a device tier in host memory without a GPU).
#[allow(clippy::too_many_arguments)]
pub fn attend(
    isa: Isa,
    s: &Strips<'_>,
    q: &[f32],
    q_heads: usize,
    scale: f32,
    mask: Option<&[u8]>,
    out: &mut [f32],
    lse: &mut [f32],
) -> Result<()> {
    check_isa(isa)?;
    let g = s.group(q_heads)?;
    let (d, n) = (s.head_dim, s.len);
    let rows = s.batch * q_heads;
    ensure!(
        q.len() == rows * d,
        "q has {} elements, expected batch × q_heads × head_dim = {}",
        q.len(),
        rows * d
    );
    if let Some(mask) = mask {
        ensure!(
            mask.len() == s.batch * n,
            "mask must be [batch, {n}], got {} entries",
            mask.len()
        );
    }
    check_partial_outputs(rows, d, out, lse)?;
    if n == 0 {
        neutral_partial(out, lse);
        return Ok(());
    }
    let blocks = n.div_ceil(ATTEND_BLOCK_ROWS);
    let pairs = s.batch * s.kv_heads;
    let items = pairs * blocks;
    let bytes = 2 * pairs * n * d * s.dtype.size();
    let ahead = tuning().prefetch_ahead;
    // Per task: the unnormalised output and running maximum of its g heads (f32), and their
    // sums of exponentials (f64).
    let stride = g * d + g;
    run(bytes, || {
        let mut part = vec![0.0f32; items * stride];
        let mut sums = vec![0.0f64; items * g];
        part.par_chunks_mut(stride)
            .zip(sums.par_chunks_mut(g))
            .enumerate()
            .with_min_len(min_len(items, bytes))
            .for_each_init(
                || vec![0.0f32; g * SUB],
                |buf, (item, (p, l))| {
                    let (pair, block) = (item / blocks, item % blocks);
                    let (seq, kh) = (pair / s.kv_heads, pair % s.kv_heads);
                    let t0 = block * ATTEND_BLOCK_ROWS;
                    let len = ATTEND_BLOCK_ROWS.min(n - t0);
                    let (acc, m) = p.split_at_mut(g * d);
                    m.fill(f32::NEG_INFINITY);
                    let mut st = Online { acc, m, l };
                    let head0 = seq * q_heads + kh * g;
                    let mask_rows = mask.map_or(std::ptr::null(), |mk| mk[seq * n + t0..].as_ptr());
                    with_element!(s.dtype, E => {
                        // SAFETY: keys and values point at rows t0..t0+len < len of this pair's
                        // strips; q holds the g heads of the group from head0; the mask (checked
                        // [batch, n]) has len bytes from seq·n + t0; buf holds g × SUB floats
                        // and the state slices g × d, g and g entries.
                        unsafe {
                            attend_rows_isa::<E>(
                                isa,
                                q[head0 * d..].as_ptr(),
                                g,
                                d,
                                (s.strip(s.keys, seq, kh) as *const E).add(t0 * d),
                                (s.strip(s.values, seq, kh) as *const E).add(t0 * d),
                                len,
                                scale,
                                mask_rows,
                                buf.as_mut_ptr(),
                                &mut st,
                                ahead,
                            )
                        }
                    })
                },
            );
        // Merge each (sequence, kv head)'s blocks: o = Σ_b e^(m_b - M) acc_b / Σ_b e^(m_b - M) l_b.
        let merge_bytes = items * stride * 4;
        out.par_chunks_mut(g * d)
            .zip(lse.par_chunks_mut(g))
            .enumerate()
            .with_min_len(min_len(pairs, merge_bytes))
            .for_each_init(
                || vec![0.0f64; d],
                |total, (pair, (o, ls))| {
                    let parts = &part[pair * blocks * stride..(pair + 1) * blocks * stride];
                    let l = &sums[pair * blocks * g..(pair + 1) * blocks * g];
                    for h in 0..g {
                        let mb = |b: usize| parts[b * stride + g * d + h];
                        let big = (0..blocks).map(mb).fold(f32::NEG_INFINITY, f32::max);
                        let oh = &mut o[h * d..(h + 1) * d];
                        if big == f32::NEG_INFINITY {
                            oh.fill(0.0);
                            ls[h] = f32::NEG_INFINITY;
                            continue;
                        }
                        total.fill(0.0);
                        let mut sum = 0.0f64;
                        for b in (0..blocks).filter(|&b| mb(b) > f32::NEG_INFINITY) {
                            let f = ((mb(b) - big) as f64).exp();
                            sum += l[b * g + h] * f;
                            let acc = &parts[b * stride + h * d..b * stride + (h + 1) * d];
                            for (t, &a) in total.iter_mut().zip(acc) {
                                *t += a as f64 * f;
                            }
                        }
                        for (x, t) in oh.iter_mut().zip(total.iter()) {
                            *x = (t / sum) as f32;
                        }
                        ls[h] = big + sum.ln() as f32;
                    }
                },
            );
    });
    Ok(())
}
