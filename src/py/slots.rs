//! `HostKVStore.cpu_stage_slots`: the CPU stage over a ragged batch (`cpu::ragged`), one query
//! row per entry of `slots`, in one call: the GIL released and the store read-locked once.
//!
//! Arguments: `slots` int64 `[r]` (slots in use; a slot may appear in several rows, e.g. the
//! query rows of one request), `q` float32 `[r, hq, d]`, `positions` int64 `[m]` (every row) or
//! `[r, m]` (one list per row), `pages` int64 `[r]` (Pre-QKT by page summaries: row `i` keeps
//! `pages[i]` pages per KV head of its slot's summaries; not with `positions`), `host_mask`
//! bool/uint8 `[r, w]` with `w` at least every row's host length (a row uses its first
//! `host_len` columns). Results are allocated here and come
//! back as DLPack capsules: lse: `out [r, hq, d]`, `lse [r, hq]`; concat: `logits [r, hq, K]`,
//! `indices [r, hq, K]`, `values [r, hq, K, d]`, padded past each row's `tokens` with `-inf`,
//! `-1` and zeros (`K` = `width`, the largest row's selection).

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::errors::run_core;
use super::export::Owned;
use super::store::PyHostKvStore;
use super::tensor::{require_finite, Elem, Tensor};
use crate::cpu::{self, Isa, Merge, RaggedArgs, RaggedOutputs, RowPages, RowPositions, Strips};

/// The arguments, as parsed by the method.
pub(super) struct SlotsCall<'a, 'py> {
    pub layer: usize,
    pub isa: Isa,
    pub slots: &'a Bound<'py, PyAny>,
    pub q: &'a Bound<'py, PyAny>,
    pub scale: f32,
    pub merge: Merge,
    pub top_k: Option<usize>,
    pub positions: Option<&'a Bound<'py, PyAny>>,
    pub host_mask: Option<&'a Bound<'py, PyAny>>,
    pub pages: Option<&'a Bound<'py, PyAny>>,
}

/// What the GIL-free part hands back.
struct Done {
    tokens: Vec<usize>,
    host_len: Vec<usize>,
    width: usize,
    out: Option<Vec<f32>>,
    lse: Option<Vec<f32>>,
    logits: Option<Vec<f32>>,
    indices: Option<Vec<i64>>,
    values: Option<Owned>,
}

pub(super) fn cpu_stage_slots<'py>(
    st: &PyHostKvStore,
    py: Python<'py>,
    call: SlotsCall<'_, 'py>,
) -> PyResult<Bound<'py, PyDict>> {
    let (d, dtype) = (st.head_dim, st.dtype);
    let slots = Tensor::import(call.slots, "slots", Elem::I64, &[None])?;
    let r = slots.shape()[0];
    let q = Tensor::import(call.q, "q", Elem::F32, &[Some(r), None, Some(d)])?;
    require_finite("q", &q, false)?;
    let hq = st.q_heads_of(&q, 1)?;
    let ids = slots
        .slice::<i64>()
        .iter()
        .enumerate()
        .map(|(i, &s)| {
            usize::try_from(s)
                .ok()
                .filter(|&s| s < st.batch)
                .ok_or_else(|| {
                    PyValueError::new_err(format!(
                        "slots[{i}] = {s} out of range: the store has {} slots (its batch)",
                        st.batch
                    ))
                })
        })
        .collect::<PyResult<Vec<usize>>>()?;
    let positions = call
        .positions
        .map(|p| Tensor::import_any_shape(p, "positions", &[Elem::I64]))
        .transpose()?;
    let row_positions = match &positions {
        None => None,
        Some(p) => match *p.shape() {
            [_] => Some(RowPositions::Shared(p.slice::<i64>())),
            [rows, m] if rows == r => Some(RowPositions::PerRow {
                list: p.slice::<i64>(),
                m,
            }),
            ref shape => {
                return Err(PyValueError::new_err(format!(
                    "positions must be [m] (every row) or [rows, m] = [{r}, m], got shape {shape:?}"
                )))
            }
        },
    };
    let pages = call
        .pages
        .map(|p| Tensor::import(p, "pages", Elem::I64, &[Some(r)]))
        .transpose()?;
    let page_counts = match &pages {
        None => None,
        Some(p) => {
            if positions.is_some() {
                return Err(PyValueError::new_err(
                    "positions and pages exclude each other",
                ));
            }
            Some(
                p.slice::<i64>()
                    .iter()
                    .enumerate()
                    .map(|(i, &n)| {
                        usize::try_from(n).ok().filter(|&n| n > 0).ok_or_else(|| {
                            PyValueError::new_err(format!("pages[{i}] must be > 0, got {n}"))
                        })
                    })
                    .collect::<PyResult<Vec<usize>>>()?,
            )
        }
    };
    let mask = call
        .host_mask
        .map(|m| Tensor::import_one_of(m, "host_mask", &[Elem::Bool, Elem::U8], &[Some(r), None]))
        .transpose()?;
    let args = RaggedArgs {
        q: q.slice::<f32>(),
        q_heads: hq,
        scale: call.scale,
        merge: call.merge,
        top_k: call.top_k,
        positions: row_positions,
        mask: mask.as_ref().map(|m| (m.slice::<u8>(), m.shape()[1])),
        pages: None,
    };
    let (layer, isa, merge) = (call.layer, call.isa, call.merge);

    let done = run_core(py, move || -> crate::Result<Done> {
        let store = st.store.read();
        let strips = ids
            .iter()
            .enumerate()
            .map(|(i, &slot)| {
                store.slot_strips(layer, slot).map_err(|e| match e {
                    crate::Error::InvalidArgument(msg) => {
                        crate::Error::InvalidArgument(format!("slots[{i}]: {msg}"))
                    }
                    other => other,
                })
            })
            .collect::<crate::Result<Vec<Strips<'_>>>>()?;
        let summaries = match &page_counts {
            None => Vec::new(),
            Some(_) => ids
                .iter()
                .map(|&slot| store.slot_summaries(layer, slot))
                .collect::<crate::Result<Vec<_>>>()?,
        };
        let args = RaggedArgs {
            pages: page_counts.as_deref().map(|pages| RowPages {
                pages,
                summaries: &summaries,
            }),
            ..args
        };
        let sels = cpu::ragged_selections(&strips, &args)?;
        let width = sels.iter().map(|s| s.tokens).max().unwrap_or(0);
        let mut done = Done {
            tokens: sels.iter().map(|s| s.tokens).collect(),
            host_len: strips.iter().map(Strips::len).collect(),
            width,
            out: None,
            lse: None,
            logits: None,
            indices: None,
            values: None,
        };
        let mut dst = RaggedOutputs::default();
        match merge {
            Merge::Lse => {
                dst.out = done.out.insert(vec![0.0; r * hq * d]);
                dst.lse = done.lse.insert(vec![0.0; r * hq]);
            }
            Merge::Concat => {
                let n = r * hq * width;
                dst.logits = done.logits.insert(vec![0.0; n]);
                dst.indices = done.indices.insert(vec![0; n]);
                let bytes = n * d * dtype.size();
                dst.values = &mut done
                    .values
                    .insert(Owned::words(bytes, Elem::of(dtype)))
                    .bytes_mut()[..bytes];
            }
        }
        cpu::ragged_stage(isa, &strips, &args, width, dst)?;
        Ok(done)
    })?;

    let w = done.width;
    let dict = PyDict::new(py);
    dict.set_item("merge", merge.name())?;
    dict.set_item("tokens", &done.tokens)?;
    dict.set_item("host_len", &done.host_len)?;
    dict.set_item("width", w)?;
    let rows3 = |v: Option<Vec<f32>>, last: usize| {
        v.map(|v| Owned::F32(v).export(py, [r, hq, last]))
            .transpose()
    };
    dict.set_item("out", rows3(done.out, d)?)?;
    dict.set_item(
        "lse",
        done.lse
            .map(|v| Owned::F32(v).export(py, [r, hq]))
            .transpose()?,
    )?;
    dict.set_item("logits", rows3(done.logits, w)?)?;
    dict.set_item(
        "indices",
        done.indices
            .map(|v| Owned::I64(v).export(py, [r, hq, w]))
            .transpose()?,
    )?;
    dict.set_item(
        "values",
        done.values
            .map(|v| v.export(py, [r, hq, w, d]))
            .transpose()?,
    )?;
    Ok(dict)
}
