//! Single-threaded inner kernels, generic over the instruction set and the stored element type.
//! `ops` splits work across threads and calls them through the `isa_dispatch!` wrappers.

use super::simd::{isa_dispatch, prefetch, Element, Simd};

/// How far ahead (bytes) sequential key scans prefetch.
pub(crate) const PREFETCH_AHEAD: usize = 2048;

/// Query heads handled at once; larger GQA groups are done in slices of this many.
const MAX_GROUP: usize = 8;

/// Address of row `t` of a strip, directly or through an index list (`idx` null: directly).
///
/// # Safety
/// `idx` is null or valid for `t + 1` entries; the addressed row lies inside the strip at `base`.
#[inline(always)]
unsafe fn row<E>(base: *const E, idx: *const i64, t: usize, d: usize) -> *const E {
    // SAFETY: the caller guarantees both reads/offsets stay inside their allocations.
    unsafe {
        let r = if idx.is_null() { t } else { *idx.add(t) as usize };
        base.add(r * d)
    }
}

/// `out[h * out_stride + t] = scale · ⟨q[h], key row t⟩` for `h < g`, `t < n`.
///
/// # Safety
/// `q` holds `g × d` floats; `keys` is valid for every addressed row (`n` rows, or the rows
/// named by the `n` entries of `idx`); `out` is valid for the written positions.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn logits_rows<S: Simd, E: Element>(
    q: *const f32,
    g: usize,
    d: usize,
    keys: *const E,
    idx: *const i64,
    n: usize,
    scale: f32,
    out: *mut f32,
    out_stride: usize,
) {
    let mut h0 = 0;
    while h0 < g {
        let gs = (g - h0).min(MAX_GROUP);
        // SAFETY: h0 < g: heads h0.. of q (g × d floats) and of out exist.
        let (q, out) = unsafe { (q.add(h0 * d), out.add(h0 * out_stride)) };
        // Rows per tile: as many as keep G × R accumulators within the register budget
        // (R for a 16-accumulator budget, then for an 8-accumulator one).
        macro_rules! go {
            ($(($G:literal, $R16:literal, $R8:literal))*) => {
                match gs {
                    // SAFETY: gs heads remain from h0; the rows are the caller's.
                    $($G => unsafe {
                        if S::ACC_BUDGET >= 16 {
                            logits_group::<S, E, $G, $R16>(q, d, keys, idx, n, scale, out, out_stride)
                        } else {
                            logits_group::<S, E, $G, $R8>(q, d, keys, idx, n, scale, out, out_stride)
                        }
                    },)*
                    _ => unreachable!(),
                }
            };
        }
        go!((1, 8, 8) (2, 8, 4) (3, 4, 2) (4, 4, 2) (5, 2, 1) (6, 2, 1) (7, 2, 1) (8, 2, 1));
        h0 += gs;
    }
}

/// [`logits_rows`] for exactly `G` heads, `R` rows per tile.
///
/// # Safety
/// As for [`logits_rows`] with `g = G`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn logits_group<S: Simd, E: Element, const G: usize, const R: usize>(
    q: *const f32,
    d: usize,
    keys: *const E,
    idx: *const i64,
    n: usize,
    scale: f32,
    out: *mut f32,
    out_stride: usize,
) {
    let mut t = 0;
    while t + R <= n {
        // SAFETY: rows t..t+R < n exist (caller's contract).
        unsafe { logits_tile::<S, E, G, R>(q, d, keys, idx, t, scale, out, out_stride) };
        t += R;
    }
    while t < n {
        // SAFETY: row t < n exists (caller's contract).
        unsafe { logits_tile::<S, E, G, 1>(q, d, keys, idx, t, scale, out, out_stride) };
        t += 1;
    }
}

/// Logits of `R` rows starting at `t` for `G` heads: every key element is loaded and widened
/// once and used by all heads of the group (GQA reads K once); each query chunk is loaded once
/// for all `R` rows; the `R × G` dot products are reduced four at a time.
///
/// # Safety
/// As for [`logits_rows`] with `g = G`, for rows `t..t + R`; the caller runs under `S`'s
/// instruction set.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn logits_tile<S: Simd, E: Element, const G: usize, const R: usize>(
    q: *const f32,
    d: usize,
    keys: *const E,
    idx: *const i64,
    t: usize,
    scale: f32,
    out: *mut f32,
    out_stride: usize,
) {
    // SAFETY: every load reads a key row the caller vouched for (d elements, the last chunk
    // by scalar reads) or q (G × d floats); stores go to out[h·out_stride + t + r], r < R;
    // prefetches never fault.
    unsafe {
        let rows: [*const E; R] = std::array::from_fn(|r| row(keys, idx, t + r, d));
        // Sequential scans outrun the hardware prefetcher: ask for the lines of the tile
        // PREFETCH_AHEAD bytes further on, spread over the chunk loop (a burst of hints would
        // queue behind the line-fill buffers).
        let tile = rows[0] as *const u8;
        let tile_lines = (R * d * std::mem::size_of::<E>()).div_ceil(64);
        let per_chunk = tile_lines.div_ceil((d / S::LANES).max(1));
        let mut next_line = if idx.is_null() { 0 } else { tile_lines };
        let mut acc = [[S::zero(); R]; G];
        let body = d - d % S::LANES;
        let mut c = 0;
        while c < body {
            for _ in 0..per_chunk {
                if next_line < tile_lines {
                    prefetch(tile.wrapping_add(PREFETCH_AHEAD + 64 * next_line));
                    next_line += 1;
                }
            }
            let k: [S::F; R] = std::array::from_fn(|r| E::load::<S>(rows[r].add(c)));
            for h in 0..G {
                let qv = S::load(q.add(h * d + c));
                for r in 0..R {
                    acc[h][r] = S::fma(k[r], qv, acc[h][r]);
                }
            }
            c += S::LANES;
        }
        let mut sums = [[0.0f32; R]; G];
        let flat = acc.as_flattened();
        for (i, dst) in sums.as_flattened_mut().chunks_mut(4).enumerate() {
            let four: [S::F; 4] = std::array::from_fn(|j| flat.get(4 * i + j).copied().unwrap_or(S::zero()));
            dst.copy_from_slice(&S::reduce4(four)[..dst.len()]);
        }
        if body < d {
            for (h, row_sums) in sums.iter_mut().enumerate() {
                for (r, s) in row_sums.iter_mut().enumerate() {
                    for i in body..d {
                        *s += (*rows[r].add(i)).to_f32() * *q.add(h * d + i);
                    }
                }
            }
        }
        for (h, row_sums) in sums.iter().enumerate() {
            let dst = out.add(h * out_stride + t);
            for (r, &s) in row_sums.iter().enumerate() {
                *dst.add(r) = s * scale;
            }
        }
    }
}

isa_dispatch! {
    /// Dispatching entry point of [`logits_rows`].
    fn logits_rows_isa(
        q: *const f32, g: usize, d: usize, keys: *const E, idx: *const i64, n: usize,
        scale: f32, out: *mut f32, out_stride: usize,
    ) -> () = logits_rows
}

/// Tokens per tile of the value aggregation: a tile of rows stays in L1 while every lane chunk
/// of it is accumulated.
const TILE: usize = 32;

/// `out[h·d + i] += Σ_t w[h·w_stride + t] · value_row_t[i]` for `h < g`, `t < n`.
///
/// # Safety
/// As for [`logits_rows`]; `w` holds `g` rows of `n` weights `w_stride` apart, `out` `g × d`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn weighted_rows<S: Simd, E: Element>(
    w: *const f32,
    w_stride: usize,
    g: usize,
    d: usize,
    values: *const E,
    idx: *const i64,
    n: usize,
    out: *mut f32,
) {
    let mut h0 = 0;
    while h0 < g {
        let gs = (g - h0).min(MAX_GROUP);
        // SAFETY: h0 < g: heads h0.. of w and of out exist.
        let (w, out) = unsafe { (w.add(h0 * w_stride), out.add(h0 * d)) };
        macro_rules! go {
            ($($G:literal)*) => {
                match gs {
                    // SAFETY: gs heads remain from h0; the rows are the caller's.
                    $($G => unsafe { weighted_group::<S, E, $G>(w, w_stride, d, values, idx, n, out) },)*
                    _ => unreachable!(),
                }
            };
        }
        go!(1 2 3 4 5 6 7 8);
        h0 += gs;
    }
}

/// [`weighted_rows`] for exactly `G` heads.
///
/// # Safety
/// As for [`weighted_rows`] with `g = G`; the caller runs under `S`'s instruction set.
#[inline(always)]
unsafe fn weighted_group<S: Simd, E: Element, const G: usize>(
    w: *const f32,
    w_stride: usize,
    d: usize,
    values: *const E,
    idx: *const i64,
    n: usize,
    out: *mut f32,
) {
    // SAFETY: value rows are read within their d elements (lane chunks below `body`, then
    // scalars); w[h·w_stride + t] and out[h·d + i] for h < G, t < n, i < d are the caller's.
    unsafe {
        let body = d - d % S::LANES;
        let mut t0 = 0;
        while t0 < n {
            let t1 = (t0 + TILE).min(n);
            let mut c = 0;
            while c < body {
                // A fresh accumulator per tile, added to the output afterwards: two-level
                // summation keeps f32 rounding flat over very long contexts.
                let mut acc = [S::zero(); G];
                for t in t0..t1 {
                    let v = E::load::<S>(row(values, idx, t, d).add(c));
                    for h in 0..G {
                        acc[h] = S::fma(S::splat(*w.add(h * w_stride + t)), v, acc[h]);
                    }
                }
                for h in 0..G {
                    let o = out.add(h * d + c);
                    S::store(o, S::add(S::load(o), acc[h]));
                }
                c += S::LANES;
            }
            for t in t0..t1 {
                let r = row(values, idx, t, d);
                for i in body..d {
                    let v = (*r.add(i)).to_f32();
                    for h in 0..G {
                        *out.add(h * d + i) += *w.add(h * w_stride + t) * v;
                    }
                }
            }
            t0 = t1;
        }
    }
}

isa_dispatch! {
    /// Dispatching entry point of [`weighted_rows`].
    fn weighted_rows_isa(
        w: *const f32, w_stride: usize, g: usize, d: usize, values: *const E, idx: *const i64,
        n: usize, out: *mut f32,
    ) -> () = weighted_rows
}
