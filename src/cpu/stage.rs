//! The CPU stage of one decode step over one layer's host tokens, as one operation: logits →
//! masking → selection → partial attention with its log-sum-exp (LSE merge, HGCA) or the
//! selected logits and value rows (concat merge, HybridGen).
//!
//! Semantics, for `q [batch, q_heads, d]` over the `len` host tokens of `Strips`:
//! - scored tokens: all host tokens in order, or `positions [m]` in the given order (Pre-QKT;
//!   repeats allowed, each scored once per occurrence), or the tokens of the pages a page
//!   selection chooses from the key summaries (Pre-QKT by page summaries, `cpu::pages`; every
//!   host token when it keeps every page), per query head;
//! - masking: a scored token whose `mask[seq, token]` is nonzero gets the logit `-inf`;
//! - selection: with `top_k = k < m`, the `k` largest logits per query head by `cpu::topk`
//!   (NaN lowest, ties to the earlier scored token), listed in scored order; otherwise every
//!   scored token. `k = 0` selects nothing;
//! - LSE merge: attention over the selected tokens, normalised over them (`out`), and
//!   `lse = log Σ exp(logit)`; no tokens (or all masked) give zeros and `-inf`;
//! - concat merge: the selected logits, and for an index selection their indices and value
//!   rows per query head; when every host token is selected in order the value rows are the
//!   store's own, shared by each GQA group, and nothing is copied.

use rayon::prelude::*;

use super::ops::{attend, check_isa, gather_values, logits, partial_attention, Strips};
use super::pages::{list_logits, row_indices, select_pages, PageScratch, PageSelect};
use super::simd::Isa;
use super::split::{min_len, run};
use super::topk::topk;
use crate::ensure;
use crate::error::Result;

/// How the host result is combined with the device's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Merge {
    /// Selected logits and value rows go to the device: one softmax over the union.
    Concat,
    /// The CPU finishes attention over its tokens: partial output and log-sum-exp.
    Lse,
}

impl Merge {
    /// Every merge by name, in the order the Python package lists them.
    pub const NAMES: [&'static str; 2] = ["concat", "lse"];

    pub fn name(self) -> &'static str {
        match self {
            Merge::Concat => "concat",
            Merge::Lse => "lse",
        }
    }

    pub fn parse(name: &str) -> Result<Merge> {
        match name {
            "concat" => Ok(Merge::Concat),
            "lse" => Ok(Merge::Lse),
            other => crate::invalid!("merge must be one of {:?}, got {other:?}", Merge::NAMES),
        }
    }
}

/// What one stage computes.
#[derive(Clone, Copy, Debug)]
pub struct StageArgs<'a> {
    /// `[batch, q_heads, head_dim]` float32.
    pub q: &'a [f32],
    pub q_heads: usize,
    pub scale: f32,
    pub merge: Merge,
    /// Keep this many tokens per query head (Post-QKT); `None` keeps every scored token.
    pub top_k: Option<usize>,
    /// Host token indices to score (Pre-QKT); `None` scores every host token.
    pub positions: Option<&'a [i64]>,
    /// `[batch, len]`, nonzero = ignore the token (padding).
    pub mask: Option<&'a [u8]>,
    /// Pre-QKT by page summaries: score only the tokens of the best pages (then `top_k`, if
    /// given, keeps the best of those; `positions` may not be given with it).
    pub pages: Option<PageSelect<'a>>,
}

/// The shape of a stage's result over a given number of host tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Selection {
    /// Tokens per query head: the last axis of the logits and indices, and of the value rows.
    pub tokens: usize,
    /// The tokens are named per query head by `[batch, q_heads, tokens]` indices. Otherwise
    /// they are all host tokens in order (the value rows are then the store's own).
    pub indexed: bool,
}

impl StageArgs<'_> {
    /// The selection these arguments make over `host_len` tokens.
    pub fn selection(&self, host_len: usize) -> Selection {
        // The scored tokens: a page selection's lists, the given positions, or every host token.
        let (scored, listed) = match (self.pages.and_then(|p| p.tokens(host_len)), self.positions) {
            (Some(m), _) => (m, true),
            (None, Some(p)) => (p.len(), true),
            (None, None) => (host_len, false),
        };
        match self.top_k {
            Some(k) if k < scored => Selection {
                tokens: k,
                indexed: true,
            },
            _ => Selection {
                tokens: scored,
                indexed: listed,
            },
        }
    }
}

impl StageArgs<'_> {
    /// Whether the stage can write `kv_indices` over `host_len` tokens: a top-k selection
    /// among the scored tokens, not per-query-head pages.
    pub fn ranks_kv_heads(&self, host_len: usize) -> bool {
        let paged = self
            .pages
            .and_then(|p| p.tokens(host_len).map(|m| (m, p.granularity)));
        let scored = match (paged, self.positions) {
            (Some((_, super::pages::Granularity::QueryHead)), _) => return false,
            (Some((m, _)), _) => m,
            (None, Some(p)) => p.len(),
            (None, None) => host_len,
        };
        self.top_k.is_some_and(|k| k < scored)
    }
}

/// Where the results go. Each slice has exactly the length the merge and the selection need,
/// or is empty where nothing is wanted (`Default`: all empty). With `rows = batch · q_heads`
/// and `k = Selection::tokens`:
/// - LSE: `out` rows·d and `lse` rows; `indices` rows·k if wanted (index selections only);
/// - concat: `logits` rows·k; for index selections also `indices` rows·k and `values`
///   rows·k·d elements of the store's dtype, as bytes;
/// - either, for a top-k selection (`top_k < scored`, not per-query-head pages): `kv_indices`
///   `batch · kv_heads · k` if wanted: per KV head the `k` scored tokens whose largest logit over
///   the GQA group is highest, ascending (what the next step may reuse as a page selection's
///   extra tokens).
#[derive(Debug, Default)]
pub struct StageOutputs<'o> {
    pub out: &'o mut [f32],
    pub lse: &'o mut [f32],
    pub logits: &'o mut [f32],
    pub indices: &'o mut [i64],
    pub values: &'o mut [u8],
    pub kv_indices: &'o mut [i64],
}

/// Working memory of a stage (the logits of every scored token, index lists), kept between
/// calls so that a decode step does not allocate and fault in megabytes per layer.
#[derive(Debug, Default)]
pub struct Scratch {
    logits: Vec<f32>,
    selected: Vec<f32>,
    indices: Vec<i64>,
    key_indices: Vec<i64>,
    list_dead: Vec<u8>,
    group_max: Vec<f32>,
    kv_selected: Vec<f32>,
    row_lists: Vec<i64>,
    pages: PageScratch,
}

/// The first `n` elements of `v`, growing it if needed (contents unspecified).
fn take<T: Copy + Default>(v: &mut Vec<T>, n: usize) -> &mut [T] {
    if v.len() < n {
        v.resize(n, T::default());
    }
    &mut v[..n]
}

/// Runs the stage (see the module documentation) and returns its selection.
pub fn cpu_stage(
    isa: Isa,
    s: &Strips<'_>,
    a: &StageArgs<'_>,
    out: StageOutputs<'_>,
    scratch: &mut Scratch,
) -> Result<Selection> {
    check_isa(isa)?;
    let g = s.group(a.q_heads)?;
    // What the stage reads: every scored key row, its logits, and at most as many value rows.
    let scored = a.positions.map_or(s.len(), <[i64]>::len);
    let bytes = s.batch() * s.kv_heads() * scored * (2 * s.head_dim() * s.dtype().size() + 4 * g);
    run(bytes, || stage(isa, s, a, out, scratch))
}

fn stage(
    isa: Isa,
    s: &Strips<'_>,
    a: &StageArgs<'_>,
    out: StageOutputs<'_>,
    scratch: &mut Scratch,
) -> Result<Selection> {
    let (b, hq, d, n) = (s.batch(), a.q_heads, s.head_dim(), s.len());
    let rows = b * hq;
    ensure!(
        a.q.len() == rows * d,
        "q has {} elements, expected batch × q_heads × head_dim = {b} × {hq} × {d}",
        a.q.len()
    );
    if let Some(mask) = a.mask {
        ensure!(
            mask.len() == b * n,
            "host_mask must be [batch, host tokens] = [{b}, {n}], got {} entries",
            mask.len()
        );
    }
    if let Some(p) = a.positions {
        s.check_indices(p)?;
    }
    ensure!(
        a.pages.is_none() || a.positions.is_none(),
        "a page selection chooses the tokens to score itself: pass no positions with it"
    );
    let sel = a.selection(n);
    check_outputs(s, a, sel, &out)?;
    let m = a.positions.map_or(n, <[i64]>::len);
    let k = sel.tokens;
    let StageOutputs {
        out,
        lse,
        logits: logits_out,
        indices: indices_out,
        values,
        kv_indices,
    } = out;

    if let Some(p) = a.pages.filter(|p| p.tokens(n).is_some()) {
        // Pre-QKT by page summaries: choose pages from the bounds, score their tokens, and keep
        // the top_k best of those if asked (or all of them).
        let g = s.group(hq)?;
        let lists = select_pages(
            isa,
            s,
            &p,
            a.q,
            hq,
            a.mask,
            &mut scratch.pages,
            &mut scratch.key_indices,
            &mut scratch.list_dead,
        )?;
        let m = lists.m;
        let score_lists = |x: &mut [f32], pages: &mut PageScratch| {
            list_logits(
                isa,
                s,
                a.q,
                hq,
                a.scale,
                p.granularity,
                &lists,
                a.mask,
                pages,
                x,
            )
        };
        let idx = if indices_out.is_empty() {
            take(&mut scratch.indices, rows * k)
        } else {
            indices_out
        };
        if k == m {
            let x = match a.merge {
                Merge::Concat => logits_out,
                Merge::Lse => take(&mut scratch.logits, rows * m),
            };
            score_lists(x, &mut scratch.pages)?;
            row_indices(&lists, b, hq, g, idx);
            finish(isa, s, a, x, Some(idx), out, lse, values)?;
            return Ok(sel);
        }
        let x = take(&mut scratch.logits, rows * m);
        score_lists(x, &mut scratch.pages)?;
        let sel_x = match a.merge {
            Merge::Concat => logits_out,
            Merge::Lse => take(&mut scratch.selected, rows * k),
        };
        if k > 0 {
            topk(x, m, k, idx, sel_x)?;
            // Positions in a row's list become host token indices.
            let all = take(&mut scratch.row_lists, rows * m);
            row_indices(&lists, b, hq, g, all);
            for (r, row) in idx.chunks_mut(k).enumerate() {
                let list = &all[r * m..(r + 1) * m];
                row.iter_mut().for_each(|i| *i = list[*i as usize]);
            }
            if !kv_indices.is_empty() {
                let tokens = lists.tokens;
                let (gm, gv) = (&mut scratch.group_max, &mut scratch.kv_selected);
                kv_top(x, m, k, g, gm, gv, kv_indices, |list, j| {
                    tokens[list * m + j]
                })?;
            }
        }
        finish(isa, s, a, sel_x, Some(idx), out, lse, values)?;
        return Ok(sel);
    }
    if a.top_k.is_none_or(|top| top >= m) && a.positions.is_none() && a.merge == Merge::Lse {
        // Attention over every host token: fused, the logits never leave the cache.
        attend(isa, s, a.q, hq, a.scale, a.mask, out, lse)?;
        return Ok(sel);
    }
    if a.top_k.is_none_or(|top| top >= m) {
        // The scored tokens are the selection: score straight into the result.
        let x = match a.merge {
            Merge::Concat => logits_out,
            Merge::Lse => take(&mut scratch.logits, rows * m),
        };
        score(isa, s, a, x, &mut scratch.key_indices)?;
        let idx = match a.positions {
            Some(p) => {
                let idx = if indices_out.is_empty() {
                    take(&mut scratch.indices, rows * m)
                } else {
                    indices_out
                };
                if let Some(lists) = idx.len().checked_div(m) {
                    let serial = min_len(lists, idx.len() * 8);
                    idx.par_chunks_mut(m)
                        .with_min_len(serial)
                        .for_each(|row| row.copy_from_slice(p));
                }
                Some(&*idx)
            }
            None => None,
        };
        finish(isa, s, a, x, idx, out, lse, values)?;
        return Ok(sel);
    }

    // Top-k: score every candidate into scratch, keep the k best per query head.
    let x = take(&mut scratch.logits, rows * m);
    score(isa, s, a, x, &mut scratch.key_indices)?;
    let sel_x = match a.merge {
        Merge::Concat => logits_out,
        Merge::Lse => take(&mut scratch.selected, rows * k),
    };
    let sel_i = if indices_out.is_empty() {
        take(&mut scratch.indices, rows * k)
    } else {
        indices_out
    };
    if k > 0 {
        topk(x, m, k, sel_i, sel_x)?;
        if !kv_indices.is_empty() {
            let g = s.group(hq)?;
            let (gm, gv) = (&mut scratch.group_max, &mut scratch.kv_selected);
            match a.positions {
                Some(p) => kv_top(x, m, k, g, gm, gv, kv_indices, |_, j| p[j])?,
                None => kv_top(x, m, k, g, gm, gv, kv_indices, |_, j| j as i64)?,
            }
        }
        if let Some(p) = a.positions {
            // Indices into the scored list become host token indices.
            let serial = min_len(sel_i.len(), sel_i.len() * 8);
            sel_i
                .par_iter_mut()
                .with_min_len(serial)
                .for_each(|i| *i = p[*i as usize]);
        }
    }
    finish(isa, s, a, sel_x, Some(sel_i), out, lse, values)?;
    Ok(sel)
}

/// Per KV head, the `k` of the `m` scored entries with the highest logit over the GQA group
/// (`x [lists · g, m]`), as the host tokens `token(list, entry)` names, ascending.
#[allow(clippy::too_many_arguments)]
fn kv_top(
    x: &[f32],
    m: usize,
    k: usize,
    g: usize,
    group_max: &mut Vec<f32>,
    selected: &mut Vec<f32>,
    out: &mut [i64],
    token: impl Fn(usize, usize) -> i64,
) -> Result<()> {
    let lists = x.len() / (m * g);
    let best = take(group_max, lists * m);
    for (list, row) in best.chunks_mut(m).enumerate() {
        row.copy_from_slice(&x[list * g * m..(list * g + 1) * m]);
        for h in 1..g {
            let other = &x[(list * g + h) * m..(list * g + h + 1) * m];
            row.iter_mut().zip(other).for_each(|(b, &v)| *b = b.max(v));
        }
    }
    topk(best, m, k, out, take(selected, lists * k))?;
    for (list, row) in out.chunks_mut(k).enumerate() {
        row.iter_mut().for_each(|i| *i = token(list, *i as usize));
        row.sort_unstable();
    }
    Ok(())
}

fn check_outputs(
    s: &Strips<'_>,
    a: &StageArgs<'_>,
    sel: Selection,
    o: &StageOutputs<'_>,
) -> Result<()> {
    let rows = s.batch() * a.q_heads;
    let (k, d) = (sel.tokens, s.head_dim());
    let want = |name: &str, got: usize, need: usize| -> Result<()> {
        ensure!(
            got == need,
            "{name} output has {got} elements, the {} stage needs {need}",
            a.merge.name()
        );
        Ok(())
    };
    let indexed = |need: usize| if sel.indexed { need } else { 0 };
    if !o.kv_indices.is_empty() {
        ensure!(
            a.ranks_kv_heads(s.len()),
            "kv_indices are written for a top-k selection among the scored tokens (not per-query-head pages) only"
        );
        want(
            "kv_indices",
            o.kv_indices.len(),
            s.batch() * s.kv_heads() * k,
        )?;
    }
    match a.merge {
        Merge::Lse => {
            want("out", o.out.len(), rows * d)?;
            want("lse", o.lse.len(), rows)?;
            want("logits", o.logits.len(), 0)?;
            want("values", o.values.len(), 0)?;
            if !o.indices.is_empty() {
                want("indices", o.indices.len(), indexed(rows * k))?;
            }
        }
        Merge::Concat => {
            want("out", o.out.len(), 0)?;
            want("lse", o.lse.len(), 0)?;
            want("logits", o.logits.len(), rows * k)?;
            want("indices", o.indices.len(), indexed(rows * k))?;
            want(
                "values (bytes)",
                o.values.len(),
                indexed(rows * k * d * s.dtype().size()),
            )?;
        }
    }
    Ok(())
}

/// Logits of the scored tokens into `x [batch, q_heads, m]`, masked tokens set to `-inf`.
fn score(
    isa: Isa,
    s: &Strips<'_>,
    a: &StageArgs<'_>,
    x: &mut [f32],
    key_indices: &mut Vec<i64>,
) -> Result<()> {
    let (hq, n) = (a.q_heads, s.len());
    let key_idx = match a.positions {
        Some(p) => {
            // The kernel takes key indices per (sequence, kv head): the same list for each.
            let idx = take(key_indices, s.batch() * s.kv_heads() * p.len());
            if !p.is_empty() {
                idx.chunks_mut(p.len())
                    .for_each(|row| row.copy_from_slice(p));
            }
            Some(&*idx)
        }
        None => None,
    };
    logits(isa, s, a.q, hq, a.scale, key_idx, x)?;
    let (Some(mask), m) = (a.mask, x.len() / (s.batch() * hq)) else {
        return Ok(());
    };
    if m == 0 {
        return Ok(());
    }
    let serial = min_len(x.len() / m, x.len() * 4);
    x.par_chunks_mut(m)
        .enumerate()
        .with_min_len(serial)
        .for_each(|(r, row)| {
            let masked = &mask[(r / hq) * n..(r / hq + 1) * n];
            match a.positions {
                Some(p) => row
                    .iter_mut()
                    .zip(p)
                    .filter(|(_, &t)| masked[t as usize] != 0)
                    .for_each(|(v, _)| *v = f32::NEG_INFINITY),
                None => row
                    .iter_mut()
                    .zip(masked)
                    .filter(|(_, &mk)| mk != 0)
                    .for_each(|(v, _)| *v = f32::NEG_INFINITY),
            }
        });
    Ok(())
}

/// The merge's last step over the selected logits `x` and their indices (`None`: all host tokens).
#[allow(clippy::too_many_arguments)]
fn finish(
    isa: Isa,
    s: &Strips<'_>,
    a: &StageArgs<'_>,
    x: &[f32],
    idx: Option<&[i64]>,
    out: &mut [f32],
    lse: &mut [f32],
    values: &mut [u8],
) -> Result<()> {
    match (a.merge, idx) {
        (Merge::Lse, _) => partial_attention(isa, s, x, a.q_heads, idx, out, lse),
        (Merge::Concat, Some(idx)) => gather_values(s, idx, a.q_heads, values),
        (Merge::Concat, None) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(top_k: Option<usize>, positions: Option<&[i64]>) -> StageArgs<'_> {
        StageArgs {
            q: &[],
            q_heads: 1,
            scale: 1.0,
            merge: Merge::Lse,
            top_k,
            positions,
            mask: None,
            pages: None,
        }
    }

    #[test]
    fn selection_follows_top_k_and_positions() {
        let all = Selection {
            tokens: 10,
            indexed: false,
        };
        assert_eq!(args(None, None).selection(10), all);
        assert_eq!(args(Some(10), None).selection(10), all);
        assert_eq!(args(Some(99), None).selection(10), all);
        assert_eq!(
            args(Some(3), None).selection(10),
            Selection {
                tokens: 3,
                indexed: true
            }
        );
        assert_eq!(
            args(Some(0), None).selection(10),
            Selection {
                tokens: 0,
                indexed: true
            }
        );
        assert_eq!(
            args(Some(0), None).selection(0),
            Selection {
                tokens: 0,
                indexed: false
            }
        );
        let p = [4i64, 1, 7];
        assert_eq!(
            args(None, Some(&p)).selection(10),
            Selection {
                tokens: 3,
                indexed: true
            }
        );
        assert_eq!(
            args(Some(2), Some(&p)).selection(10),
            Selection {
                tokens: 2,
                indexed: true
            }
        );
        assert_eq!(
            args(Some(5), Some(&p)).selection(10),
            Selection {
                tokens: 3,
                indexed: true
            }
        );
    }

    #[test]
    fn merges_parse_by_name() {
        for name in Merge::NAMES {
            assert_eq!(Merge::parse(name).unwrap().name(), name);
        }
        assert!(Merge::parse("sum").is_err());
    }
}
