//! Pre-QKT by page summaries (Quest, arXiv 2406.10774): choose the host tokens to score from a
//! summary of the keys instead of reading them all.
//!
//! The store keeps, per page of [`PAGE_TOKENS`] consecutive host tokens and KV head, the
//! element-wise maximum and minimum of the keys (`KvStore::summaries`). For a query `q`, no key
//! `k` of a page can have a logit above the page's upper bound
//! `Σ_i max(q_i·max_i, q_i·min_i) = ⟨q⁺, max⟩ + ⟨q⁻, min⟩` (`q⁺ = max(q, 0)`, `q⁻ = min(q, 0)`),
//! so the bound is two ordinary logits passes over the summary rows: the same SIMD kernels, and
//! `2/P` of the key bytes. The pages with the highest bounds are selected, and only their tokens'
//! exact logits are computed.
//!
//! Two granularities:
//! - per KV head (`Granularity::KvHead`, the hybrid policies' Pre-QKT): a page's score is the
//!   largest bound over the query heads of the GQA group, and the group shares one token list,
//!   so each selected key row is read once for the whole group;
//! - per query head (`Granularity::QueryHead`, Quest as published): each query head selects its
//!   own pages, so a group may read up to `group` times as many key rows.
//!
//! Extra tokens (per KV head only): a list may carry tokens chosen elsewhere, e.g. the previous
//! step's selection (tokens that mattered a step ago usually still do), scored exactly beside the
//! chosen pages' tokens.
//!
//! Entries that are no tokens of their own are dead: the padding of a selected last page that
//! holds fewer than `P` tokens (repeats of its last token) and extra tokens already in a chosen
//! page; the stage sets their logits to `-inf` (they weigh nothing).

use rayon::prelude::*;

use super::ops::{logits, Strips};
use super::simd::Isa;
use super::split::min_len;
use super::topk::topk;
use crate::ensure;
use crate::error::Result;

/// Host tokens per page of the key summaries.
pub const PAGE_TOKENS: usize = 16;

/// The page summaries of one layer's host keys for a batch of sequences: per (sequence, KV
/// head) one strip of page maxima and one of page minima, `ceil(host / PAGE_TOKENS)` rows each.
#[derive(Clone, Copy, Debug)]
pub struct PageSummaries<'a> {
    pub maxima: Strips<'a>,
    pub minima: Strips<'a>,
}

impl PageSummaries<'_> {
    /// Pages summarised (the row count of each strip).
    pub fn pages(&self) -> usize {
        self.maxima.len()
    }
}

/// Which query heads share a selection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Granularity {
    /// One list per KV head: a page ranks by its largest bound over the GQA group.
    KvHead,
    /// One list per query head (Quest).
    QueryHead,
}

/// A page selection: the summaries, how many pages to keep per list, and extra tokens.
#[derive(Clone, Copy, Debug)]
pub struct PageSelect<'a> {
    pub summaries: PageSummaries<'a>,
    pub pages: usize,
    pub granularity: Granularity,
    /// `[batch, kv_heads, e]` host token indices scored besides the pages' (per KV head only).
    pub extra: Option<&'a [i64]>,
}

impl PageSelect<'_> {
    /// Entries per list when fewer pages are kept than exist, else `None` (every host token).
    pub fn tokens(&self, host_len: usize) -> Option<usize> {
        (self.pages < host_len.div_ceil(PAGE_TOKENS))
            .then_some(self.pages * PAGE_TOKENS + self.extra_per_list())
    }

    fn extra_per_list(&self) -> usize {
        let lists = self.summaries.maxima.batch() * self.summaries.maxima.kv_heads();
        self.extra.map_or(0, |e| e.len() / lists.max(1))
    }
}

/// Working memory of a page selection.
#[derive(Debug, Default)]
pub struct PageScratch {
    q_split: Vec<f32>,
    bounds: Vec<f32>,
    lower: Vec<f32>,
    page_idx: Vec<i64>,
    page_val: Vec<f32>,
    /// Per query head lists: one member of each GQA group at a time.
    q_one: Vec<f32>,
    x_one: Vec<f32>,
    idx_one: Vec<i64>,
    /// The extra tokens of each list with their positions, sorted to find repeats.
    extra_order: Vec<(i64, usize)>,
}

fn take<T: Copy + Default>(v: &mut Vec<T>, n: usize) -> &mut [T] {
    if v.len() < n {
        v.resize(n, T::default());
    }
    &mut v[..n]
}

/// The lists of host tokens a page selection scores: `lists` (one per KV head or per query head,
/// in `[batch, heads]` order) of `m = pages · PAGE_TOKENS + e` entries each (the chosen pages'
/// tokens ascending, then the extra tokens), and which entries are dead (see the module doc).
pub struct TokenLists<'s> {
    pub tokens: &'s [i64],
    pub dead: &'s [u8],
    pub m: usize,
}

/// Selects the pages of `sel` for query `q [batch, q_heads, d]` over the host tokens of `s`
/// (whose strips `sel.summaries` summarise), writing the token lists into `tokens` / `dead`.
/// A page whose every token is masked (`mask [batch, len]`, nonzero = ignore) ranks last.
#[allow(clippy::too_many_arguments)]
pub fn select_pages<'s>(
    isa: Isa,
    s: &Strips<'_>,
    sel: &PageSelect<'_>,
    q: &[f32],
    q_heads: usize,
    mask: Option<&[u8]>,
    scratch: &mut PageScratch,
    tokens: &'s mut Vec<i64>,
    dead: &'s mut Vec<u8>,
) -> Result<TokenLists<'s>> {
    let (b, d, n) = (s.batch(), s.head_dim(), s.len());
    let g = s.group(q_heads)?;
    let sums = &sel.summaries;
    let np = n.div_ceil(PAGE_TOKENS);
    ensure!(
        sums.pages() == np && sums.minima.len() == np,
        "page summaries cover {} pages, the {n} host tokens fill {np}",
        sums.pages()
    );
    ensure!(
        sums.maxima.batch() == b && sums.maxima.kv_heads() == s.kv_heads(),
        "page summaries are for {} sequences × {} KV heads, the strips have {b} × {}",
        sums.maxima.batch(),
        sums.maxima.kv_heads(),
        s.kv_heads()
    );
    ensure!(
        sel.pages > 0 && sel.pages < np,
        "a page selection keeps 1..{np} of {np} pages, got {}",
        sel.pages
    );
    let e = sel.extra_per_list();
    if let Some(extra) = sel.extra {
        ensure!(
            sel.granularity == Granularity::KvHead,
            "extra tokens are scored per KV head: not with per-query-head pages"
        );
        ensure!(
            extra.len() == b * s.kv_heads() * e,
            "extra tokens must be [batch, kv_heads, e] = [{b}, {}, e]; got {} entries",
            s.kv_heads(),
            extra.len()
        );
        s.check_indices(extra)?;
    }
    let rows = b * q_heads;
    // q⁺ then q⁻, so the bound is two logits passes (scale 1: only the ranking matters).
    let split = take(&mut scratch.q_split, 2 * rows * d);
    let (qp, qn) = split.split_at_mut(rows * d);
    for ((p, n_), &v) in qp.iter_mut().zip(qn.iter_mut()).zip(q) {
        *p = v.max(0.0);
        *n_ = v.min(0.0);
    }
    let bounds = take(&mut scratch.bounds, rows * np);
    let lower = take(&mut scratch.lower, rows * np);
    logits(isa, &sums.maxima, qp, q_heads, 1.0, None, bounds)?;
    logits(isa, &sums.minima, qn, q_heads, 1.0, None, lower)?;
    bounds
        .iter_mut()
        .zip(lower.iter())
        .for_each(|(u, l)| *u += l);
    // One row of page scores per list.
    let (lists, ranked) = match sel.granularity {
        Granularity::QueryHead => (rows, &mut *bounds),
        Granularity::KvHead => {
            let lists = b * s.kv_heads();
            let grouped = &mut lower[..lists * np];
            for (list, out) in grouped.chunks_mut(np).enumerate() {
                let first = list * g * np;
                out.copy_from_slice(&bounds[first..first + np]);
                for h in 1..g {
                    let row = &bounds[first + h * np..first + (h + 1) * np];
                    out.iter_mut().zip(row).for_each(|(o, &v)| *o = o.max(v));
                }
            }
            (lists, grouped)
        }
    };
    if let Some(mask) = mask {
        let per_seq = lists / b;
        for (list, row) in ranked.chunks_mut(np).enumerate() {
            let masked = &mask[(list / per_seq) * n..(list / per_seq + 1) * n];
            for (p, v) in row.iter_mut().enumerate() {
                let page = &masked[p * PAGE_TOKENS..((p + 1) * PAGE_TOKENS).min(n)];
                if page.iter().all(|&mk| mk != 0) {
                    *v = f32::NEG_INFINITY;
                }
            }
        }
    }
    let k = sel.pages;
    let page_idx = take(&mut scratch.page_idx, lists * k);
    let page_val = take(&mut scratch.page_val, lists * k);
    topk(ranked, np, k, page_idx, page_val)?;
    // Pages (ascending) → their tokens; a partial last page is padded with its last token; then
    // the extra tokens, dead where a chosen page holds them already or they repeat.
    let m = k * PAGE_TOKENS + e;
    let tokens = take(tokens, lists * m);
    let dead = take(dead, lists * m);
    let serial = min_len(lists, tokens.len() * 8);
    // One sort buffer per list (at least one entry, so the chunks exist without extra tokens).
    let order_len = e.max(1);
    let extra_order = take(&mut scratch.extra_order, lists * order_len);
    tokens
        .par_chunks_mut(m)
        .zip(dead.par_chunks_mut(m))
        .zip(page_idx.par_chunks(k))
        .zip(extra_order.par_chunks_mut(order_len))
        .enumerate()
        .with_min_len(serial)
        .for_each(|(list, (((row, dead), pages), order))| {
            let (paged, extras) = row.split_at_mut(k * PAGE_TOKENS);
            for (slot, &p) in paged.chunks_mut(PAGE_TOKENS).zip(pages) {
                let first = p as usize * PAGE_TOKENS;
                for (j, t) in slot.iter_mut().enumerate() {
                    *t = (first + j).min(n - 1) as i64;
                }
            }
            dead.fill(0);
            // Only the last page (index np - 1) can be partial, and it sorts last.
            if n % PAGE_TOKENS != 0 && pages.last() == Some(&(np as i64 - 1)) {
                dead[k * PAGE_TOKENS - (PAGE_TOKENS - n % PAGE_TOKENS)..k * PAGE_TOKENS].fill(1);
            }
            if let Some(extra) = sel.extra {
                extras.copy_from_slice(&extra[list * e..(list + 1) * e]);
                let order = &mut order[..e];
                for (o, (&t, j)) in order.iter_mut().zip(extras.iter().zip(0..)) {
                    *o = (t, j);
                }
                order.sort_unstable();
                for (i, &(t, j)) in order.iter().enumerate() {
                    let repeat = i > 0 && order[i - 1].0 == t;
                    if repeat || pages.binary_search(&(t / PAGE_TOKENS as i64)).is_ok() {
                        dead[k * PAGE_TOKENS + j] = 1;
                    }
                }
            }
        });
    Ok(TokenLists { tokens, dead, m })
}

/// Logits `x [batch, q_heads, m]` of each query head over its list's tokens (scaled), with the
/// padding and the masked tokens (`mask [batch, len]`) set to `-inf`.
#[allow(clippy::too_many_arguments)]
pub fn list_logits(
    isa: Isa,
    s: &Strips<'_>,
    q: &[f32],
    q_heads: usize,
    scale: f32,
    granularity: Granularity,
    lists: &TokenLists<'_>,
    mask: Option<&[u8]>,
    scratch: &mut PageScratch,
    x: &mut [f32],
) -> Result<()> {
    let (b, hkv, d, n, m) = (s.batch(), s.kv_heads(), s.head_dim(), s.len(), lists.m);
    let g = s.group(q_heads)?;
    match granularity {
        Granularity::KvHead => logits(isa, s, q, q_heads, scale, Some(lists.tokens), x)?,
        Granularity::QueryHead => {
            // The kernel scores [batch, kv_heads] lists for a GQA group; a group member of its
            // own, one call per position j in the group, gives every query head its own list.
            let qj = take(&mut scratch.q_one, b * hkv * d);
            let xj = take(&mut scratch.x_one, b * hkv * m);
            let idx = take(&mut scratch.idx_one, b * hkv * m);
            for j in 0..g {
                for pair in 0..b * hkv {
                    let (seq, kh) = (pair / hkv, pair % hkv);
                    let row = seq * q_heads + kh * g + j;
                    qj[pair * d..(pair + 1) * d].copy_from_slice(&q[row * d..(row + 1) * d]);
                    idx[pair * m..(pair + 1) * m]
                        .copy_from_slice(&lists.tokens[row * m..(row + 1) * m]);
                }
                logits(isa, s, qj, hkv, scale, Some(idx), xj)?;
                for pair in 0..b * hkv {
                    let row = (pair / hkv) * q_heads + (pair % hkv) * g + j;
                    x[row * m..(row + 1) * m].copy_from_slice(&xj[pair * m..(pair + 1) * m]);
                }
            }
        }
    }
    let per_seq = lists.tokens.len() / m / b;
    for (r, row) in x.chunks_mut(m).enumerate() {
        let list = list_of(r, q_heads, g, per_seq);
        let tokens = &lists.tokens[list * m..(list + 1) * m];
        row.iter_mut()
            .zip(&lists.dead[list * m..(list + 1) * m])
            .filter(|(_, &dead)| dead != 0)
            .for_each(|(v, _)| *v = f32::NEG_INFINITY);
        if let Some(mask) = mask {
            let masked = &mask[(r / q_heads) * n..(r / q_heads + 1) * n];
            row.iter_mut()
                .zip(tokens)
                .filter(|(_, &t)| masked[t as usize] != 0)
                .for_each(|(v, _)| *v = f32::NEG_INFINITY);
        }
    }
    Ok(())
}

/// The list query row `r` (`[batch, q_heads]` order) scores from: its own (per query head) or
/// its KV head's.
fn list_of(r: usize, q_heads: usize, g: usize, lists_per_seq: usize) -> usize {
    if lists_per_seq == q_heads {
        r
    } else {
        (r / q_heads) * lists_per_seq + (r % q_heads) / g
    }
}

/// Each query row's token indices `[batch, q_heads, m]` (what the merge's last step takes).
pub fn row_indices(
    lists: &TokenLists<'_>,
    batch: usize,
    q_heads: usize,
    g: usize,
    out: &mut [i64],
) {
    let m = lists.m;
    let per_seq = lists.tokens.len() / m / batch;
    for (r, row) in out.chunks_mut(m).enumerate() {
        let list = list_of(r, q_heads, g, per_seq);
        row.copy_from_slice(&lists.tokens[list * m..(list + 1) * m]);
    }
}

/// The element-wise maximum and minimum of `rows` consecutive key rows of `d` elements of `E`
/// (`src`), written as rows of `E` (exact: the extremes of stored values are stored values).
///
/// # Safety
/// `src` must be valid for `rows · d` reads and `max`/`min` for `d` writes each, all aligned
/// for `E`, with `max`/`min` not overlapping `src` or each other.
pub(crate) unsafe fn summarize_rows<E: super::simd::Element>(
    src: *const E,
    rows: usize,
    d: usize,
    max: *mut E,
    min: *mut E,
) {
    debug_assert!(rows > 0);
    // SAFETY: the caller vouches for every range.
    let (src, max, min) = unsafe {
        (
            std::slice::from_raw_parts(src, rows * d),
            std::slice::from_raw_parts_mut(max, d),
            std::slice::from_raw_parts_mut(min, d),
        )
    };
    max.copy_from_slice(&src[..d]);
    min.copy_from_slice(&src[..d]);
    for row in src.chunks_exact(d).skip(1) {
        for ((hi, lo), &v) in max.iter_mut().zip(min.iter_mut()).zip(row) {
            let f = v.to_f32();
            if f > hi.to_f32() {
                *hi = v;
            }
            if f < lo.to_f32() {
                *lo = v;
            }
        }
    }
}
