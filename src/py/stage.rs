//! `HostKVStore.cpu_stage`: the CPU stage of a decode step (`cpu::stage`) in one call, with the
//! GIL released and the store read-locked once for all of it.
//!
//! Outputs: a caller may pass each as a contiguous tensor of exactly the result's shape, or as a
//! 1-D buffer of at least that many elements (a buffer a plan allocates once, e.g. page-locked,
//! while K and the host length vary: the result fills its start, row-major). Outputs not passed
//! are allocated here. Results come back as the caller's own tensor when it had the exact
//! shape, otherwise as DLPack capsules of the exact shape (`torch.from_dlpack`).

use super::errors::run_core;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::export::{export_prefix, export_strips, Owned};
use super::store::PyHostKvStore;
use super::tensor::{outputs_apart, require_finite, Elem, Tensor};
use crate::cpu::{self, Isa, Merge, Scratch, Selection, StageArgs, StageOutputs};
use crate::kv::Kind;

/// The output arguments, as Python passed them (`None`: allocate).
pub(super) struct OutputArgs<'a, 'py> {
    pub logits: Option<&'a Bound<'py, PyAny>>,
    pub values: Option<&'a Bound<'py, PyAny>>,
    pub indices: Option<&'a Bound<'py, PyAny>>,
    pub out: Option<&'a Bound<'py, PyAny>>,
    pub lse: Option<&'a Bound<'py, PyAny>>,
    pub kv_indices: Option<&'a Bound<'py, PyAny>>,
}

/// The non-output arguments, parsed.
pub(super) struct StageCall<'a, 'py> {
    pub layer: usize,
    pub isa: Isa,
    pub q: &'a Bound<'py, PyAny>,
    pub scale: f32,
    pub merge: Merge,
    pub top_k: Option<usize>,
    pub positions: Option<&'a Bound<'py, PyAny>>,
    pub host_mask: Option<&'a Bound<'py, PyAny>>,
    /// Pre-QKT by page summaries: pages kept per list, and extra tokens `[b, kv_heads, e]`.
    pub pages: Option<usize>,
    pub granularity: cpu::Granularity,
    pub page_extra: Option<&'a Bound<'py, PyAny>>,
}

fn shape_of_kv(g: &Option<Given<'_, '_>>) -> Option<Vec<usize>> {
    g.as_ref().map(|g| g.t.shape().to_vec())
}

/// One output argument the caller passed: its object and the imported tensor.
struct Given<'a, 'py> {
    obj: &'a Bound<'py, PyAny>,
    t: Tensor,
}

/// `g`'s tensor under `name`, for the memory-overlap check.
fn named<'t>(name: &'t str, g: &'t Option<Given<'_, '_>>) -> Option<(&'t str, &'t Tensor)> {
    g.as_ref().map(|g| (name, &g.t))
}

fn given<'a, 'py>(
    obj: Option<&'a Bound<'py, PyAny>>,
    name: &str,
    elem: Elem,
) -> PyResult<Option<Given<'a, 'py>>> {
    obj.map(|obj| {
        Ok(Given {
            obj,
            t: Tensor::import_any_shape(obj, name, &[elem])?.writable(name)?,
        })
    })
    .transpose()
}

/// Whether a caller's output of `shape` can take a `want` result: `Some(true)` exactly,
/// `Some(false)` as a 1-D buffer with room for it.
fn fits(name: &str, shape: &[usize], want: &[usize]) -> crate::Result<bool> {
    let need: usize = want.iter().product();
    if shape == want {
        Ok(true)
    } else if shape.len() == 1 && shape[0] >= need {
        Ok(false)
    } else {
        crate::invalid!("{name} has shape {shape:?}: expected {want:?}, or a 1-D buffer of at least {need} elements")
    }
}

/// The first `want` elements of a caller's output (checked), or of a fresh allocation.
fn dest<'s, T>(
    name: &str,
    given: Option<(&'s mut [T], &[usize])>,
    owned: &'s mut Option<Vec<T>>,
    want: &[usize],
) -> crate::Result<&'s mut [T]>
where
    T: Copy + Default,
{
    let need: usize = want.iter().product();
    match given {
        Some((full, shape)) => {
            fits(name, shape, want)?;
            Ok(&mut full[..need])
        }
        None => Ok(owned.insert(vec![T::default(); need])),
    }
}

/// What the GIL-free part hands back: the selection and host length, the arrays it allocated,
/// and (concat over every host token) the store's value rows to export.
struct Done {
    sel: Selection,
    host_len: usize,
    logits: Option<Vec<f32>>,
    indices: Option<Vec<i64>>,
    values: Option<Owned>,
    out: Option<Vec<f32>>,
    lse: Option<Vec<f32>>,
    kv_indices: Option<Vec<i64>>,
    /// Whether the stage ranked the tokens per KV head (`kv_indices_out` written).
    kv_written: bool,
    /// The buffer, the offset of the first slot's strips, the strip stride.
    store_values: Option<(std::sync::Arc<crate::mem::HostBuffer>, usize, usize)>,
}

pub(super) fn cpu_stage<'py>(
    st: &PyHostKvStore,
    py: Python<'py>,
    call: StageCall<'_, 'py>,
    outs: OutputArgs<'_, 'py>,
) -> PyResult<Bound<'py, PyDict>> {
    // The lockstep batch: the slots in use (rechecked against the strips under the lock).
    let (b, d, dtype) = (st.lockstep_batch(), st.head_dim, st.dtype);
    let q = Tensor::import(call.q, "q", Elem::F32, &[Some(b), None, Some(d)])?;
    require_finite("q", &q, false)?;
    let hq = st.q_heads_of(&q, 1)?;
    let positions = call
        .positions
        .map(|p| Tensor::import(p, "positions", Elem::I64, &[None]))
        .transpose()?;
    let mask = call
        .host_mask
        .map(|m| Tensor::import_one_of(m, "host_mask", &[Elem::Bool, Elem::U8], &[Some(b), None]))
        .transpose()?;
    if call.page_extra.is_some() && call.pages.is_none() {
        return Err(PyValueError::new_err("page_extra needs pages"));
    }
    let page_extra = call
        .page_extra
        .map(|e| {
            Tensor::import(
                e,
                "page_extra",
                Elem::I64,
                &[Some(b), Some(st.kv_heads), None],
            )
        })
        .transpose()?;
    let lse_merge = call.merge == Merge::Lse;
    let unused = if lse_merge {
        [("logits_out", outs.logits), ("values_out", outs.values)]
    } else {
        [("out", outs.out), ("lse_out", outs.lse)]
    };
    if let Some((name, _)) = unused.iter().find(|(_, o)| o.is_some()) {
        return Err(PyValueError::new_err(format!(
            "{name} is not written by the {} merge",
            call.merge.name()
        )));
    }
    let logits = given(outs.logits, "logits_out", Elem::F32)?;
    let values = given(outs.values, "values_out", Elem::of(dtype))?;
    let indices = given(outs.indices, "indices_out", Elem::I64)?;
    let out = given(outs.out, "out", Elem::F32)?;
    let lse = given(outs.lse, "lse_out", Elem::F32)?;
    let kv_indices = given(outs.kv_indices, "kv_indices_out", Elem::I64)?;
    {
        let outputs: Vec<(&str, &Tensor)> = [
            named("logits_out", &logits),
            named("values_out", &values),
            named("indices_out", &indices),
            named("out", &out),
            named("lse_out", &lse),
            named("kv_indices_out", &kv_indices),
        ]
        .into_iter()
        .flatten()
        .collect();
        let inputs: Vec<(&str, &Tensor)> = [
            Some(("q", &q)),
            positions.as_ref().map(|p| ("positions", p)),
            mask.as_ref().map(|m| ("host_mask", m)),
            page_extra.as_ref().map(|e| ("page_extra", e)),
        ]
        .into_iter()
        .flatten()
        .collect();
        outputs_apart(&outputs, &inputs)?;
    }

    let qs = q.slice::<f32>();
    let ps = positions.as_ref().map(|p| p.slice::<i64>());
    let ms = mask.as_ref().map(|m| m.slice::<u8>());
    let es = page_extra.as_ref().map(|e| e.slice::<i64>());
    let kv_shape = shape_of_kv(&kv_indices);
    let kv_s = kv_indices.as_ref().map(|g| g.t.slice_mut::<i64>());
    let shape_of = |g: &Option<Given<'_, '_>>| g.as_ref().map(|g| g.t.shape().to_vec());
    let (logits_shape, values_shape, indices_shape) =
        (shape_of(&logits), shape_of(&values), shape_of(&indices));
    let (out_shape, lse_shape) = (shape_of(&out), shape_of(&lse));
    let logits_s = logits.as_ref().map(|g| g.t.slice_mut::<f32>());
    let values_s = values.as_ref().map(|g| g.t.bytes_mut());
    let indices_s = indices.as_ref().map(|g| g.t.slice_mut::<i64>());
    let out_s = out.as_ref().map(|g| g.t.slice_mut::<f32>());
    let lse_s = lse.as_ref().map(|g| g.t.slice_mut::<f32>());
    let (layer, isa, merge, top_k, scale) =
        (call.layer, call.isa, call.merge, call.top_k, call.scale);
    let (page_count, granularity) = (call.pages, call.granularity);
    let indices_given = indices.is_some();

    let done = run_core(py, move || -> crate::Result<Done> {
        let store = st.store.read();
        let strips = store.strips(layer)?;
        if strips.batch() != b {
            return crate::invalid!(
                "the slots in use changed during the call ({b} → {})",
                strips.batch()
            );
        }
        let pages = page_count
            .map(|pages| {
                Ok::<_, crate::Error>(cpu::PageSelect {
                    summaries: store.summaries(layer)?,
                    pages,
                    granularity,
                    extra: es,
                })
            })
            .transpose()?;
        let args = StageArgs {
            q: qs,
            q_heads: hq,
            scale,
            merge,
            top_k,
            positions: ps,
            mask: ms,
            pages,
        };
        let sel = args.selection(strips.len());
        let k = sel.tokens;
        let (rows3, values4) = ([b, hq, k], [b, hq, k, d]);
        let mut done = Done {
            sel,
            host_len: strips.len(),
            logits: None,
            indices: None,
            values: None,
            out: None,
            lse: None,
            kv_indices: None,
            kv_written: false,
            store_values: None,
        };
        let mut dst = StageOutputs::default();
        match merge {
            Merge::Lse => {
                dst.out = dest(
                    "out",
                    out_s.zip(out_shape.as_deref()),
                    &mut done.out,
                    &[b, hq, d],
                )?;
                dst.lse = dest(
                    "lse_out",
                    lse_s.zip(lse_shape.as_deref()),
                    &mut done.lse,
                    &[b, hq],
                )?;
            }
            Merge::Concat => {
                dst.logits = dest(
                    "logits_out",
                    logits_s.zip(logits_shape.as_deref()),
                    &mut done.logits,
                    &rows3,
                )?;
            }
        }
        if sel.indexed && (merge == Merge::Concat || indices_given) {
            let given = indices_s.zip(indices_shape.as_deref());
            dst.indices = dest("indices_out", given, &mut done.indices, &rows3)?;
        }
        if sel.indexed && merge == Merge::Concat {
            let bytes = values4.iter().product::<usize>() * dtype.size();
            dst.values = match values_s.zip(values_shape.as_deref()) {
                Some((full, shape)) => {
                    fits("values_out", shape, &values4)?;
                    &mut full[..bytes]
                }
                None => &mut done
                    .values
                    .insert(Owned::words(bytes, Elem::of(dtype)))
                    .bytes_mut()[..bytes],
            };
        }
        if kv_s.is_some() && args.ranks_kv_heads(strips.len()) {
            done.kv_written = true;
            let kv = [b, st.kv_heads, k];
            dst.kv_indices = dest(
                "kv_indices_out",
                kv_s.zip(kv_shape.as_deref()),
                &mut done.kv_indices,
                &kv,
            )?;
        }
        if merge == Merge::Concat && !sel.indexed {
            let first = store.lockstep_slots()?.start * st.kv_heads * store.strip_bytes();
            done.store_values = Some((
                store.buffer(layer, Kind::Values),
                first,
                store.strip_bytes(),
            ));
        }
        let mut scratch_guard = st.scratch.try_lock();
        let mut own_scratch = Scratch::default();
        // A concurrent stage on the same store uses its own scratch rather than waiting.
        let scratch = scratch_guard.as_deref_mut().unwrap_or(&mut own_scratch);
        cpu::cpu_stage(isa, &strips, &args, dst, scratch)?;
        Ok(done)
    })?;

    let (sel, n) = (done.sel, done.host_len);
    let k = sel.tokens;
    let d3 = PyDict::new(py);
    d3.set_item("merge", merge.name())?;
    d3.set_item("tokens", k)?;
    d3.set_item("host_len", n)?;
    d3.set_item("grouped", merge == Merge::Concat && !sel.indexed)?;
    // A caller's output comes back as itself when it has the exact shape, else as a capsule of
    // its prefix; an allocated one as a capsule owning the allocation.
    macro_rules! result {
        ($given:expr, $owned:expr, $shape:expr, $to_owned:expr) => {
            match ($given.as_ref(), $owned) {
                (Some(g), _) if g.t.shape() == &$shape[..] => Some(g.obj.clone().unbind()),
                (Some(g), _) => Some(export_prefix(py, g.obj, &g.t, $shape)?),
                (None, Some(v)) => Some($to_owned(v).export(py, $shape)?),
                (None, None) => None,
            }
        };
    }
    let (out_v, lse_v, logits_v, indices_v, values_v);
    if merge == Merge::Lse {
        out_v = result!(out, done.out, [b, hq, d], Owned::F32);
        lse_v = result!(lse, done.lse, [b, hq], Owned::F32);
        logits_v = None;
        values_v = None;
    } else {
        out_v = None;
        lse_v = None;
        logits_v = result!(logits, done.logits, [b, hq, k], Owned::F32);
        values_v = match done.store_values {
            Some((buf, first, strip_bytes)) => Some(export_strips(
                py,
                buf,
                first,
                [b, st.kv_heads, n, d],
                strip_bytes,
                dtype,
            )?),
            None => result!(values, done.values, [b, hq, k, d], std::convert::identity),
        };
    }
    let used_indices = sel.indexed && (merge == Merge::Concat || indices_given);
    indices_v = if used_indices {
        result!(indices, done.indices, [b, hq, k], Owned::I64)
    } else {
        None
    };
    d3.set_item("out", out_v)?;
    d3.set_item("lse", lse_v)?;
    d3.set_item("logits", logits_v)?;
    d3.set_item("indices", indices_v)?;
    d3.set_item("values", values_v)?;
    let kv_v = if done.kv_written {
        result!(kv_indices, done.kv_indices, [b, st.kv_heads, k], Owned::I64)
    } else {
        None
    };
    d3.set_item("kv_indices", kv_v)?;
    Ok(d3)
}
