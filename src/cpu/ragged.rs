//! The CPU stage over a ragged batch: a list of query rows, each over its own sequence's host
//! strips (e.g. one request's slot of the store, `KvStore::slot_strips`), in one call. Each row
//! is `stage::cpu_stage` over a batch of one; rows run in parallel on the kernels' pool.
//!
//! Shapes, with `r` rows and `K` = the largest row's selection (`width`):
//! - inputs: `q [r, q_heads, d]` f32; positions `[m]` shared by every row or `[r, m]` one list
//!   per row (host token indices of that row's sequence); or, instead of positions, a page
//!   selection per row (Pre-QKT by page summaries, one list per KV head: `RowPages`, each row
//!   choosing its own count of pages from its own sequence's summaries); mask `[r, mask_width]`,
//!   a row using its first `host_len` entries (nonzero = ignore);
//! - LSE merge: `out [r, q_heads, d]`, `lse [r, q_heads]`;
//! - concat merge: `logits [r, q_heads, K]` f32, `indices [r, q_heads, K]` i64 and `values
//!   [r, q_heads, K, d]` in the store's dtype, row `i` filling its first `tokens_i` entries per
//!   head, in scored order, and padded with `-inf` logits, index `-1` and zero values. Unlike
//!   the batch stage, a selection of every host token is listed by index too and its value
//!   rows copied, once per query head (the rows of different sequences cannot share one
//!   strided view): ~35x the batch stage's time for 8 rows × 4096 tokens × 32 heads, f16 —
//!   the oracle's path, not the hot one (top-K or the LSE merge).

use rayon::prelude::*;

use super::ops::{gather_values, Strips};
use super::pages::{Granularity, PageSelect, PageSummaries, PAGE_TOKENS};
use super::simd::Isa;
use super::split::{min_len, run};
use super::stage::{cpu_stage, Merge, Scratch, Selection, StageArgs, StageOutputs};
use crate::ensure;
use crate::error::Result;

/// Host token indices to score (Pre-QKT).
#[derive(Clone, Copy, Debug)]
pub enum RowPositions<'a> {
    /// One list for every row.
    Shared(&'a [i64]),
    /// `[rows, m]`: row `i`'s list is `list[i·m..(i+1)·m]`.
    PerRow { list: &'a [i64], m: usize },
}

impl<'a> RowPositions<'a> {
    fn row(&self, i: usize) -> &'a [i64] {
        match *self {
            RowPositions::Shared(p) => p,
            RowPositions::PerRow { list, m } => &list[i * m..(i + 1) * m],
        }
    }
}

/// Pre-QKT by page summaries over a ragged batch: row `i` keeps `pages[i]` pages per KV head
/// (the largest bound over the GQA group) of `summaries[i]`, its own sequence's, and scores
/// their tokens (then `top_k`, if given, keeps the best of those).
#[derive(Clone, Copy, Debug)]
pub struct RowPages<'a> {
    pub pages: &'a [usize],
    pub summaries: &'a [PageSummaries<'a>],
}

/// What a ragged stage computes (see the module documentation for the shapes).
#[derive(Clone, Copy, Debug)]
pub struct RaggedArgs<'a> {
    pub q: &'a [f32],
    pub q_heads: usize,
    pub scale: f32,
    pub merge: Merge,
    pub top_k: Option<usize>,
    pub positions: Option<RowPositions<'a>>,
    /// `[rows, width]`, nonzero = ignore the token.
    pub mask: Option<(&'a [u8], usize)>,
    /// A page selection per row (not with `positions`).
    pub pages: Option<RowPages<'a>>,
}

impl<'a> RaggedArgs<'a> {
    /// The batch-of-one stage arguments of row `i` over `host_len` tokens.
    fn row(&self, i: usize, host_len: usize, d: usize) -> StageArgs<'a> {
        let hd = self.q_heads * d;
        StageArgs {
            q: &self.q[i * hd..(i + 1) * hd],
            q_heads: self.q_heads,
            scale: self.scale,
            merge: self.merge,
            top_k: self.top_k,
            positions: self.positions.map(|p| p.row(i)),
            mask: self.mask.map(|(m, w)| &m[i * w..i * w + host_len]),
            pages: self.pages.map(|p| PageSelect {
                summaries: p.summaries[i],
                pages: p.pages[i],
                granularity: Granularity::KvHead,
                extra: None,
            }),
        }
    }

    /// Host key rows row `i` scores over `host_len` tokens (for splitting the work).
    fn scored(&self, i: usize, host_len: usize) -> usize {
        match (self.pages, self.positions) {
            (Some(p), _) => host_len.min(p.pages[i] * PAGE_TOKENS),
            (None, Some(p)) => p.row(i).len(),
            (None, None) => host_len,
        }
    }
}

/// Where a ragged stage's results go, each exactly its shape (see the module documentation) or
/// empty where the merge writes nothing.
#[derive(Debug, Default)]
pub struct RaggedOutputs<'o> {
    pub out: &'o mut [f32],
    pub lse: &'o mut [f32],
    pub logits: &'o mut [f32],
    pub indices: &'o mut [i64],
    pub values: &'o mut [u8],
}

/// Checks the arguments against the rows' strips; returns every row's selection.
pub fn ragged_selections(rows: &[Strips<'_>], a: &RaggedArgs<'_>) -> Result<Vec<Selection>> {
    let r = rows.len();
    let Some(first) = rows.first() else {
        return Ok(Vec::new());
    };
    let d = first.head_dim();
    for (i, s) in rows.iter().enumerate() {
        ensure!(
            s.batch() == 1
                && s.kv_heads() == first.kv_heads()
                && s.head_dim() == d
                && s.dtype() == first.dtype(),
            "row {i}: every row must be over one sequence of the same store"
        );
    }
    first.group(a.q_heads)?;
    ensure!(
        a.q.len() == r * a.q_heads * d,
        "q has {} elements, expected rows × q_heads × head_dim = {r} × {} × {d}",
        a.q.len(),
        a.q_heads
    );
    if let Some(RowPositions::PerRow { list, m }) = a.positions {
        ensure!(
            list.len() == r * m,
            "positions must be [rows, m] = [{r}, {m}], got {} entries",
            list.len()
        );
    }
    if let Some(p) = a.pages {
        ensure!(
            a.positions.is_none(),
            "positions and pages exclude each other"
        );
        ensure!(
            p.pages.len() == r && p.summaries.len() == r,
            "a page selection needs a page count and summaries per row ({r} rows), got {} and {}",
            p.pages.len(),
            p.summaries.len()
        );
        for (i, (&n, (sums, s))) in p.pages.iter().zip(p.summaries.iter().zip(rows)).enumerate() {
            ensure!(n > 0, "row {i}: pages must be > 0");
            ensure!(
                sums.maxima.batch() == 1
                    && sums.maxima.kv_heads() == s.kv_heads()
                    && sums.pages() == s.len().div_ceil(PAGE_TOKENS),
                "row {i}: the page summaries are not those of the row's sequence"
            );
        }
    }
    for (i, s) in rows.iter().enumerate() {
        if let Some(p) = a.positions {
            s.check_indices(p.row(i)).map_err(|e| row_error(i, e))?;
        }
        if let Some((mask, w)) = a.mask {
            ensure!(
                mask.len() == r * w,
                "host_mask must be [rows, width] = [{r}, {w}], got {} entries",
                mask.len()
            );
            ensure!(
                w >= s.len(),
                "host_mask has {w} columns, row {i} has {} host tokens",
                s.len()
            );
        }
    }
    Ok(rows
        .iter()
        .enumerate()
        .map(|(i, s)| a.row(i, s.len(), d).selection(s.len()))
        .collect())
}

fn row_error(i: usize, e: crate::Error) -> crate::Error {
    match e {
        crate::Error::InvalidArgument(msg) => {
            crate::Error::InvalidArgument(format!("row {i}: {msg}"))
        }
        other => other,
    }
}

/// `s` cut into `n` equal pieces (`n` empty pieces when `s` is empty).
fn pieces<T>(s: &mut [T], n: usize) -> Vec<&mut [T]> {
    if s.is_empty() || n == 0 {
        return (0..n).map(|_| <&mut [T]>::default()).collect();
    }
    s.chunks_mut(s.len() / n).collect()
}

/// Runs the stage for every row (see the module documentation); `width` is the padded token
/// axis `K` of the concat outputs (at least every row's selection, from `ragged_selections`;
/// unused by the LSE merge).
pub fn ragged_stage(
    isa: Isa,
    rows: &[Strips<'_>],
    a: &RaggedArgs<'_>,
    width: usize,
    o: RaggedOutputs<'_>,
) -> Result<()> {
    let sels = ragged_selections(rows, a)?;
    let r = rows.len();
    if r == 0 {
        return Ok(());
    }
    let (hq, d, size) = (a.q_heads, rows[0].head_dim(), rows[0].dtype().size());
    ensure!(
        a.merge != Merge::Concat || sels.iter().all(|s| s.tokens <= width),
        "width {width} is less than a row's selection"
    );
    let want = |name: &str, got: usize, need: usize| -> Result<()> {
        ensure!(
            got == need,
            "{name} output has {got} elements, the ragged {} stage needs {need}",
            a.merge.name()
        );
        Ok(())
    };
    let (lse_merge, concat) = (a.merge == Merge::Lse, a.merge == Merge::Concat);
    want("out", o.out.len(), if lse_merge { r * hq * d } else { 0 })?;
    want("lse", o.lse.len(), if lse_merge { r * hq } else { 0 })?;
    want(
        "logits",
        o.logits.len(),
        if concat { r * hq * width } else { 0 },
    )?;
    want(
        "indices",
        o.indices.len(),
        if concat { r * hq * width } else { 0 },
    )?;
    want(
        "values (bytes)",
        o.values.len(),
        if concat { r * hq * width * d * size } else { 0 },
    )?;

    let jobs: Vec<_> = pieces(o.out, r)
        .into_iter()
        .zip(pieces(o.lse, r))
        .zip(pieces(o.logits, r))
        .zip(pieces(o.indices, r))
        .zip(pieces(o.values, r))
        .enumerate()
        .map(|(i, ((((out, lse), logits), indices), values))| {
            (i, out, lse, logits, indices, values)
        })
        .collect();
    let scored: usize = rows
        .iter()
        .enumerate()
        .map(|(i, s)| a.scored(i, s.len()))
        .sum();
    let bytes = scored * rows[0].kv_heads() * (2 * d * size + 4 * (hq / rows[0].kv_heads()));
    run(bytes, || {
        jobs.into_par_iter()
            .with_min_len(min_len(r, bytes))
            .try_for_each_init(Scratch::default, |scratch, job| {
                let (i, out, lse, logits, indices, values) = job;
                let s = &rows[i];
                let sel = sels[i];
                let args = a.row(i, s.len(), d);
                let k = sel.tokens;
                let dst = match a.merge {
                    Merge::Lse => StageOutputs {
                        out,
                        lse,
                        ..Default::default()
                    },
                    Merge::Concat if sel.indexed => StageOutputs {
                        logits: &mut logits[..hq * k],
                        indices: &mut indices[..hq * k],
                        values: &mut values[..hq * k * d * size],
                        ..Default::default()
                    },
                    Merge::Concat => StageOutputs {
                        logits: &mut logits[..hq * k],
                        ..Default::default()
                    },
                };
                cpu_stage(isa, s, &args, dst, scratch).map_err(|e| row_error(i, e))?;
                if concat {
                    if !sel.indexed {
                        // Every host token in order: list them and copy their rows.
                        for head in indices[..hq * k].chunks_mut(k.max(1)) {
                            head.iter_mut().enumerate().for_each(|(t, x)| *x = t as i64);
                        }
                        gather_values(s, &indices[..hq * k], hq, &mut values[..hq * k * d * size])?;
                    }
                    pad(logits, hq, k, width, 1, f32::NEG_INFINITY);
                    pad(indices, hq, k, width, 1, -1);
                    pad(values, hq, k, width, d * size, 0);
                }
                Ok(())
            })
    })
}

/// Spreads `heads` runs of `k` items of `unit` elements, packed at the start of `buf`, to a
/// stride of `width` items, and fills the rest of each run with `fill`.
fn pad<T: Copy>(buf: &mut [T], heads: usize, k: usize, width: usize, unit: usize, fill: T) {
    let (run, stride) = (k * unit, width * unit);
    // Last head first: a run only moves to a later place, never over one not yet moved.
    for h in (0..heads).rev() {
        buf.copy_within(h * run..(h + 1) * run, h * stride);
        buf[h * stride + run..(h + 1) * stride].fill(fill);
    }
}

#[cfg(test)]
mod tests {
    use super::pad;

    #[test]
    fn pad_spreads_runs_to_the_width() {
        let mut buf = [1, 2, 3, 4, 5, 6, 0, 0, 0];
        pad(&mut buf, 3, 2, 3, 1, -1);
        assert_eq!(buf, [1, 2, -1, 3, 4, -1, 5, 6, -1]);
        let mut empty = [9; 4];
        pad(&mut empty, 2, 0, 2, 1, 0);
        assert_eq!(empty, [0; 4]);
    }
}
