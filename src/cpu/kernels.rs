//! Single-threaded inner kernels, generic over the instruction set and the stored element type.
//! `ops` splits work across threads and calls them through the `isa_dispatch!` wrappers.
//!
//! Every kernel is bandwidth-shaped: a key or value row is loaded and widened once and used by
//! every query head of its GQA group; the arithmetic per byte (G multiply-adds per element for
//! a group of G heads) is what bounds a kernel once the group is large, so the tiles keep as
//! many independent accumulators in registers as the instruction set has room for.

use super::simd::{isa_dispatch, prefetch, prefetch_nta, tuning, Element, Simd};

/// Query heads handled at once; larger GQA groups are done in slices of this many.
const MAX_GROUP: usize = 8;

/// `$body` once for each `$i` in `0..$n` (a constant up to 16), written out: loops over the
/// heads and rows of a tile must be unrolled for their accumulators to live in registers, and
/// LLVM's unrolling heuristics sometimes decline (one AVX-512 bf16 tile ran 10× slower as a
/// loop over an accumulator array in memory).
macro_rules! unroll {
    ($n:expr, $i:ident => $body:block) => {
        unroll!(@ $n, $i, $body, 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15)
    };
    (@ $n:expr, $i:ident, $body:block, $($k:literal)*) => {
        $(
            if $k < $n {
                #[allow(clippy::identity_op)]
                let $i: usize = $k;
                $body
            }
        )*
    };
}

/// Address of row `t` of a strip, directly or through an index list (`idx` null: directly).
///
/// # Safety
/// `idx` is null or valid for `t + 1` entries; the addressed row lies inside the strip at `base`.
#[inline(always)]
unsafe fn row<E>(base: *const E, idx: *const i64, t: usize, d: usize) -> *const E {
    // SAFETY: the caller guarantees both reads/offsets stay inside their allocations.
    unsafe {
        let r = if idx.is_null() {
            t
        } else {
            *idx.add(t) as usize
        };
        base.add(r * d)
    }
}

/// `out[h * out_stride + t] = scale · ⟨q[h], key row t⟩` for `h < g`, `t < n`. Sequential
/// scans prefetch `ahead` bytes ahead (0: none; see `simd::tuning`), and with `also` ≠ 0 the
/// lines `also` bytes past each key row as well (the fused attention's value rows, which it
/// reads right after: their misses then overlap the arithmetic on the keys).
///
/// # Safety
/// `q` holds `g × d` floats; `keys` is valid for every addressed row (`n` rows, or the rows
/// named by the `n` entries of `idx`); `out` is valid for the written positions.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) unsafe fn logits_rows<S: Simd, E: Element>(
    q: *const f32,
    g: usize,
    d: usize,
    keys: *const E,
    idx: *const i64,
    n: usize,
    scale: f32,
    out: *mut f32,
    out_stride: usize,
    ahead: usize,
    also: usize,
) {
    let mut h0 = 0;
    while h0 < g {
        let gs = (g - h0).min(MAX_GROUP);
        // SAFETY: h0 < g: heads h0.. of q (g × d floats) and of out exist.
        let (q, out) = unsafe { (q.add(h0 * d), out.add(h0 * out_stride)) };
        // Each tile of R rows is done for G1 heads, then (from L1) for the next G2: G × R
        // accumulators within the register budget, so each query chunk serves R rows. With 16
        // registers (AVX2) a group of 8 is two passes of 4 heads × 2 rows (rows reloaded from
        // L1 cost less than reloading q for every row). Groups 1 and 2 take 2 rows although
        // the registers would hold 8: a tile's rows are read side by side, chunk by chunk, and
        // 8 rows (8 streams 2 · d bytes apart) streamed from memory at 72-82 % of the plain read
        // where 2 rows reach 90-94 % (Zen 4, d 128, `kernel_speed`, 4 interleaved runs).
        macro_rules! go {
            ($(($G:literal, $G1_16:literal, $G2_16:literal, $R16:literal, $G1_8:literal, $G2_8:literal, $R8:literal))*) => {
                match gs {
                    // SAFETY: gs heads remain from h0; the rows are the caller's.
                    $($G => unsafe {
                        if S::ACC_BUDGET >= 16 {
                            logits_group::<S, E, $G1_16, $G2_16, $R16>(q, d, keys, idx, n, scale, out, out_stride, ahead, also)
                        } else {
                            logits_group::<S, E, $G1_8, $G2_8, $R8>(q, d, keys, idx, n, scale, out, out_stride, ahead, also)
                        }
                    },)*
                    _ => unreachable!(),
                }
            };
        }
        go!((1, 1, 0, 2, 1, 0, 2)(2, 2, 0, 2, 2, 0, 2)(
            3, 3, 0, 4, 3, 0, 2
        )(4, 4, 0, 4, 4, 0, 2)(5, 5, 0, 2, 3, 2, 2)(
            6, 6, 0, 2, 3, 3, 2
        )(7, 7, 0, 2, 4, 3, 2)(8, 8, 0, 2, 4, 4, 2));
        h0 += gs;
    }
}

/// [`logits_rows`] for exactly `G1 + G2` heads, `R` rows per tile (the first `G1` heads, then
/// the other `G2` over the same tile).
///
/// # Safety
/// As for [`logits_rows`] with `g = G1 + G2`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn logits_group<S: Simd, E: Element, const G1: usize, const G2: usize, const R: usize>(
    q: *const f32,
    d: usize,
    keys: *const E,
    idx: *const i64,
    n: usize,
    scale: f32,
    out: *mut f32,
    out_stride: usize,
    ahead: usize,
    also: usize,
) {
    // SAFETY: heads G1.. exist when G2 > 0 (g = G1 + G2).
    let (q2, out2) = (q.wrapping_add(G1 * d), out.wrapping_add(G1 * out_stride));
    let mut t = 0;
    while t + R <= n {
        // SAFETY: rows t..t+R < n exist (caller's contract); heads G1..G1+G2 exist.
        unsafe {
            logits_tile::<S, E, G1, R>(q, d, keys, idx, t, scale, out, out_stride, ahead, also);
            if G2 > 0 {
                logits_tile::<S, E, G2, R>(q2, d, keys, idx, t, scale, out2, out_stride, 0, 0);
            }
        }
        t += R;
    }
    while t < n {
        // SAFETY: row t < n exists (caller's contract).
        unsafe {
            logits_tile::<S, E, G1, 1>(q, d, keys, idx, t, scale, out, out_stride, ahead, also);
            if G2 > 0 {
                logits_tile::<S, E, G2, 1>(q2, d, keys, idx, t, scale, out2, out_stride, 0, 0);
            }
        }
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
    ahead: usize,
    also: usize,
) {
    // SAFETY: every load reads a key row the caller vouched for (d elements, the last chunk
    // by scalar reads) or q (G × d floats); stores go to out[h·out_stride + t + r], r < R;
    // prefetches never fault.
    unsafe {
        let rows: [*const E; R] = std::array::from_fn(|r| row(keys, idx, t + r, d));
        // Where the hardware prefetcher falls behind (see `simd::tuning`), ask for the lines of
        // the tile `ahead` bytes further on (and, for the fused attention, the value lines
        // `also` bytes away) before the arithmetic: a few hints per tile, none inside the chunk
        // loop, whose registers stay for the accumulators. Index lists are not sequential: no
        // hints.
        if idx.is_null() && ahead > 0 {
            let tile = rows[0] as *const u8;
            let lines = (R * d * std::mem::size_of::<E>()).div_ceil(64);
            let nta = tuning().prefetch_nta;
            for line in 0..lines {
                let p = tile.wrapping_add(ahead + 64 * line);
                if nta {
                    prefetch_nta(p)
                } else {
                    prefetch(p)
                }
                if also != 0 {
                    let v = tile.wrapping_add(also.wrapping_add(64 * line));
                    if nta {
                        prefetch_nta(v)
                    } else {
                        prefetch(v)
                    }
                }
            }
        }
        let mut acc = [[S::zero(); R]; G];
        let body = d - d % S::LANES;
        let mut c = 0;
        while c < body {
            let mut k = [S::zero(); R];
            unroll!(R, r => { k[r] = E::load::<S>(rows[r].add(c)); });
            unroll!(G, h => {
                let qv = S::load(q.add(h * d + c));
                unroll!(R, r => { acc[h][r] = S::fma(k[r], qv, acc[h][r]); });
            });
            c += S::LANES;
        }
        let mut sums = [[0.0f32; R]; G];
        let flat = acc.as_flattened();
        for (i, dst) in sums.as_flattened_mut().chunks_mut(4).enumerate() {
            let four: [S::F; 4] =
                std::array::from_fn(|j| flat.get(4 * i + j).copied().unwrap_or(S::zero()));
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
        scale: f32, out: *mut f32, out_stride: usize, ahead: usize, also: usize,
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
pub(crate) unsafe fn weighted_rows<S: Simd, E: Element>(
    w: *const f32,
    w_stride: usize,
    g: usize,
    d: usize,
    values: *const E,
    idx: *const i64,
    n: usize,
    out: *mut f32,
) {
    let chunks = d / S::LANES;
    let mut h0 = 0;
    while h0 < g {
        let gs = (g - h0).min(MAX_GROUP);
        // SAFETY: h0 < g: heads h0.. of w and of out exist.
        let (w, out) = unsafe { (w.add(h0 * w_stride), out.add(h0 * d)) };
        // Lane chunks per pass over a tile: G × C accumulators within the register budget, so
        // that each broadcast weight serves C chunks and each loaded value chunk G heads.
        let c = (S::ACC_BUDGET / gs).min(chunks).max(1);
        macro_rules! go {
            ($(($G:literal, [$($C:literal)*]))*) => {
                match gs {
                    $($G => {
                        $(if c >= $C {
                            // SAFETY: gs heads remain from h0; the rows are the caller's.
                            unsafe { weighted_group::<S, E, $G, $C>(w, w_stride, d, values, idx, n, out) };
                        } else)* {
                            // SAFETY: as above.
                            unsafe { weighted_group::<S, E, $G, 1>(w, w_stride, d, values, idx, n, out) };
                        }
                    },)*
                    _ => unreachable!(),
                }
            };
        }
        go!((1, [8 4 2]) (2, [8 4 2]) (3, [4 2]) (4, [4 2]) (5, [2]) (6, [2]) (7, [2]) (8, [2]));
        h0 += gs;
    }
}

/// [`weighted_rows`] for exactly `G` heads, `C` lane chunks per pass.
///
/// # Safety
/// As for [`weighted_rows`] with `g = G`; the caller runs under `S`'s instruction set.
#[inline(always)]
unsafe fn weighted_group<S: Simd, E: Element, const G: usize, const C: usize>(
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
        let span = C * S::LANES;
        let mut t0 = 0;
        while t0 < n {
            let t1 = (t0 + TILE).min(n);
            let mut c = 0;
            // A fresh accumulator per tile, added to the output afterwards: two-level
            // summation keeps f32 rounding flat over very long contexts.
            while c + span <= body {
                let mut acc = [[S::zero(); C]; G];
                for t in t0..t1 {
                    let r = row(values, idx, t, d).add(c);
                    let mut v = [S::zero(); C];
                    unroll!(C, j => { v[j] = E::load::<S>(r.add(j * S::LANES)); });
                    unroll!(G, h => {
                        let wv = S::splat(*w.add(h * w_stride + t));
                        unroll!(C, j => { acc[h][j] = S::fma(wv, v[j], acc[h][j]); });
                    });
                }
                unroll!(G, h => {
                    unroll!(C, j => {
                        let o = out.add(h * d + c + j * S::LANES);
                        S::store(o, S::add(S::load(o), acc[h][j]));
                    });
                });
                c += span;
            }
            while c < body {
                let mut acc = [S::zero(); G];
                for t in t0..t1 {
                    let v = E::load::<S>(row(values, idx, t, d).add(c));
                    unroll!(G, h => { acc[h] = S::fma(S::splat(*w.add(h * w_stride + t)), v, acc[h]); });
                }
                unroll!(G, h => {
                    let o = out.add(h * d + c);
                    S::store(o, S::add(S::load(o), acc[h]));
                });
                c += S::LANES;
            }
            if body < d {
                for t in t0..t1 {
                    let r = row(values, idx, t, d);
                    for i in body..d {
                        let v = (*r.add(i)).to_f32();
                        for h in 0..G {
                            *out.add(h * d + i) += *w.add(h * w_stride + t) * v;
                        }
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

/// The largest of `x[..n]` (`-inf` for none).
///
/// # Safety
/// `x` is valid for `n` floats; the caller runs under `S`'s instruction set.
#[inline(always)]
unsafe fn max_of<S: Simd>(x: *const f32, n: usize) -> f32 {
    // SAFETY: loads stay below n (lane chunks, then scalars).
    unsafe {
        let mut m = S::splat(f32::NEG_INFINITY);
        let mut i = 0;
        while i + S::LANES <= n {
            m = S::max(m, S::load(x.add(i)));
            i += S::LANES;
        }
        let mut best = S::reduce_max(m);
        while i < n {
            best = best.max(*x.add(i));
            i += 1;
        }
        best
    }
}

/// `x[i] = e^(x[i] - m)` for `i < n`; returns their sum. `-inf` entries become 0.
///
/// # Safety
/// `x` is valid for `n` floats; `m` is finite; the caller runs under `S`'s instruction set.
#[inline(always)]
unsafe fn exp_shifted<S: Simd>(x: *mut f32, n: usize, m: f32) -> f32 {
    // SAFETY: loads and stores stay below n; the tail goes through a local buffer of LANES.
    unsafe {
        let mv = S::splat(-m);
        let mut sum = S::zero();
        let mut i = 0;
        while i + S::LANES <= n {
            let e = S::exp(S::add(S::load(x.add(i)), mv));
            S::store(x.add(i), e);
            sum = S::add(sum, e);
            i += S::LANES;
        }
        let mut total = S::reduce_sum(sum);
        if i < n {
            // The tail through the same vector exp, padded with -inf (weight 0).
            let mut tail = [f32::NEG_INFINITY; 16];
            let rest = n - i;
            std::ptr::copy_nonoverlapping(x.add(i), tail.as_mut_ptr(), rest);
            let e = S::exp(S::add(S::load(tail.as_ptr()), mv));
            S::store(tail.as_mut_ptr(), e);
            std::ptr::copy_nonoverlapping(tail.as_ptr(), x.add(i), rest);
            total += tail[..rest].iter().sum::<f32>();
        }
        total
    }
}

/// Replaces `x[..n]` by `softmax(x)` and returns `lse = log Σ exp(x)`. A row of only `-inf`
/// (every token masked) yields zeros and `lse = -inf`, the neutral partial of a merge.
///
/// # Safety
/// `x` is valid for `n` floats; the caller runs under `S`'s instruction set.
#[inline(always)]
pub(crate) unsafe fn softmax_lse<S: Simd, E: Element>(x: *mut f32, n: usize) -> f32 {
    // SAFETY: every access stays within x[..n] (the helpers' contracts).
    unsafe {
        let m = max_of::<S>(x, n);
        if m == f32::NEG_INFINITY || m.is_nan() {
            for i in 0..n {
                *x.add(i) = 0.0;
            }
            return f32::NEG_INFINITY;
        }
        // Partial sums per block of SUB in f32, the total in f64: exact enough for any length.
        let mut sum = 0.0f64;
        let mut i = 0;
        while i < n {
            let len = SUB.min(n - i);
            sum += exp_shifted::<S>(x.add(i), len, m) as f64;
            i += len;
        }
        let inv = S::splat((1.0 / sum) as f32);
        let mut i = 0;
        while i + S::LANES <= n {
            S::store(x.add(i), S::mul(S::load(x.add(i)), inv));
            i += S::LANES;
        }
        let inv = (1.0 / sum) as f32;
        while i < n {
            *x.add(i) *= inv;
            i += 1;
        }
        m + sum.ln() as f32
    }
}

isa_dispatch! {
    /// Dispatching entry point of [`softmax_lse`] (`E` is unused: any element type).
    fn softmax_lse_isa(x: *mut f32, n: usize) -> f32 = softmax_lse
}

/// Rows per step of the fused attention: their logits (`g × SUB` floats) stay in L1 between
/// the key pass and the value pass.
pub(crate) const SUB: usize = 256;

/// Online-softmax state of one task over its rows: `acc [g × d]` (Σ e^(x - m) · v, not yet
/// normalised), the running maximum `m [g]` and sum `l [g]` (f64: it adds many blocks).
pub(crate) struct Online<'a> {
    pub acc: &'a mut [f32],
    pub m: &'a mut [f32],
    pub l: &'a mut [f64],
}

/// Attention of `g` heads over `n` consecutive rows of keys and values (the same row numbers),
/// folded into `st`: SUB rows at a time, logits into `buf` (L1), masked rows (`mask[t] != 0`,
/// `mask` null: none) set to `-inf`, exponentials relative to the running maximum (rescaling
/// what was accumulated when it grows), then the weighted value rows. K and V are each read
/// once; the logits never reach memory.
///
/// # Safety
/// `q` holds `g × d` floats; `keys` and `values` hold `n` rows of `d`; `mask` is null or holds
/// `n` bytes; `buf` holds `g × SUB` floats; `st`'s slices hold `g × d`, `g` and `g` entries;
/// the caller runs under `S`'s instruction set.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) unsafe fn attend_rows<S: Simd, E: Element>(
    q: *const f32,
    g: usize,
    d: usize,
    keys: *const E,
    values: *const E,
    n: usize,
    scale: f32,
    mask: *const u8,
    buf: *mut f32,
    st: &mut Online<'_>,
    ahead: usize,
) {
    // SAFETY: rows t0..t0+len < n of keys/values, buf[h·SUB + r] for r < len, mask[t0 + r],
    // and the state slices (caller's contract).
    unsafe {
        let mut t0 = 0;
        while t0 < n {
            let len = SUB.min(n - t0);
            // With prefetching on, the value rows of this block are requested with its keys.
            let also = if ahead > 0 {
                (values as usize).wrapping_sub(keys as usize)
            } else {
                0
            };
            logits_rows::<S, E>(
                q,
                g,
                d,
                keys.add(t0 * d),
                std::ptr::null(),
                len,
                scale,
                buf,
                SUB,
                ahead,
                also,
            );
            if !mask.is_null() {
                for r in 0..len {
                    if *mask.add(t0 + r) != 0 {
                        for h in 0..g {
                            *buf.add(h * SUB + r) = f32::NEG_INFINITY;
                        }
                    }
                }
            }
            for h in 0..g {
                let x = buf.add(h * SUB);
                let m_new = st.m[h].max(max_of::<S>(x, len));
                if m_new == f32::NEG_INFINITY || m_new.is_nan() {
                    // Every token so far masked: nothing to weigh.
                    std::ptr::write_bytes(x, 0, len);
                    continue;
                }
                if m_new > st.m[h] {
                    // exp(-inf) = 0: the first block simply starts the sums.
                    let f = (st.m[h] - m_new).exp();
                    st.l[h] *= f as f64;
                    let fv = S::splat(f);
                    let a = st.acc.as_mut_ptr().add(h * d);
                    let mut i = 0;
                    while i + S::LANES <= d {
                        S::store(a.add(i), S::mul(S::load(a.add(i)), fv));
                        i += S::LANES;
                    }
                    while i < d {
                        *a.add(i) *= f;
                        i += 1;
                    }
                    st.m[h] = m_new;
                }
                st.l[h] += exp_shifted::<S>(x, len, m_new) as f64;
            }
            weighted_rows::<S, E>(
                buf,
                SUB,
                g,
                d,
                values.add(t0 * d),
                std::ptr::null(),
                len,
                st.acc.as_mut_ptr(),
            );
            t0 += len;
        }
    }
}

isa_dispatch! {
    /// Dispatching entry point of [`attend_rows`].
    fn attend_rows_isa(
        q: *const f32, g: usize, d: usize, keys: *const E, values: *const E, n: usize, scale: f32,
        mask: *const u8, buf: *mut f32, st: &mut Online<'_>, ahead: usize,
    ) -> () = attend_rows
}
