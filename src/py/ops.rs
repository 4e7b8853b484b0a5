//! Free functions: top-K selection, partial-attention merge, CPU capabilities, bandwidth probe.

use super::errors::run_core;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use super::args::{positive, Int};
use super::tensor::{distinct, outputs_apart, require_finite, Elem, Tensor};
use crate::cpu::{self, Isa};

/// The `k` largest logits of every row of `logits [..., n]` into `out_indices [..., k]` (int64,
/// ascending token order) and `out_values [..., k]` (float32).
#[pyfunction]
fn topk(
    py: Python<'_>,
    logits: &Bound<'_, PyAny>,
    k: Int,
    out_indices: &Bound<'_, PyAny>,
    out_values: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let k = positive("k", k)?;
    let x = Tensor::import(logits, "logits", Elem::F32, &[None, None, None])?;
    let n = x.shape()[2];
    if n > crate::kv::MAX_TOKENS {
        return Err(PyValueError::new_err(format!(
            "logits rows hold {n} tokens; at most {} are supported",
            crate::kv::MAX_TOKENS
        )));
    }
    if k > n {
        return Err(PyValueError::new_err(format!(
            "k = {k} is larger than the number of tokens ({n})"
        )));
    }
    let rows = [Some(x.shape()[0]), Some(x.shape()[1]), Some(k)];
    let idx =
        Tensor::import(out_indices, "out_indices", Elem::I64, &rows)?.writable("out_indices")?;
    let val = Tensor::import(out_values, "out_values", Elem::F32, &rows)?.writable("out_values")?;
    distinct(&[("logits", &x), ("out_indices", &idx), ("out_values", &val)])?;
    let (xs, is, vs) = (
        x.slice::<f32>(),
        idx.slice_mut::<i64>(),
        val.slice_mut::<f32>(),
    );
    run_core(py, || cpu::topk(xs, n, k, is, vs))?;
    Ok(())
}

/// Partial attention of `q [b, hq, d]` (float32) over every token of `keys`/`values`
/// `[b, hkv, n, d]` (float16/bfloat16/float32, rows contiguous, any head stride) into
/// `out [b, hq, d]` and `lse [b, hq]` (float32); `mask` bool/uint8 `[b, n]`, nonzero = ignore.
#[pyfunction]
#[pyo3(signature = (q, keys, values, scale, out, lse, mask=None, isa_name=None))]
#[allow(clippy::too_many_arguments)]
fn attend(
    py: Python<'_>,
    q: &Bound<'_, PyAny>,
    keys: &Bound<'_, PyAny>,
    values: &Bound<'_, PyAny>,
    scale: f32,
    out: &Bound<'_, PyAny>,
    lse: &Bound<'_, PyAny>,
    mask: Option<&Bound<'_, PyAny>>,
    isa_name: Option<&str>,
) -> PyResult<()> {
    let isa = super::args::isa(isa_name)?;
    let q = Tensor::import(q, "q", Elem::F32, &[None, None, None])?;
    require_finite("q", &q, false)?;
    let [b, hq, d] = [q.shape()[0], q.shape()[1], q.shape()[2]];
    let dtype = match keys.getattr("dtype").map(|d| d.to_string()) {
        Ok(name) => crate::dtype::DType::parse(&name)?,
        Err(_) => crate::dtype::DType::F32,
    };
    let (k, k_stride) = Tensor::import_strips(
        keys,
        "keys",
        Elem::of(dtype),
        &[Some(b), None, None, Some(d)],
    )?;
    let (hkv, n) = (k.shape()[1], k.shape()[2]);
    if hkv == 0 || hq % hkv != 0 {
        return Err(PyValueError::new_err(format!(
            "q's heads ({hq}) must be a positive multiple of the KV heads ({hkv})"
        )));
    }
    let (v, v_stride) = Tensor::import_strips(
        values,
        "values",
        Elem::of(dtype),
        &[Some(b), Some(hkv), Some(n), Some(d)],
    )?;
    if k_stride != v_stride {
        return Err(PyValueError::new_err(
            "keys and values must have the same layout",
        ));
    }
    let out =
        Tensor::import(out, "out", Elem::F32, &[Some(b), Some(hq), Some(d)])?.writable("out")?;
    let lse = Tensor::import(lse, "lse", Elem::F32, &[Some(b), Some(hq)])?.writable("lse")?;
    let mask = mask
        .map(|m| Tensor::import_one_of(m, "mask", &[Elem::Bool, Elem::U8], &[Some(b), Some(n)]))
        .transpose()?;
    let mut inputs = vec![("q", &q), ("keys", &k), ("values", &v)];
    inputs.extend(mask.as_ref().map(|m| ("mask", m)));
    outputs_apart(&[("out", &out), ("lse", &lse)], &inputs)?;
    // SAFETY: `import_strips` checked that both tensors are [b, hkv, n, d] of `dtype` with
    // contiguous rows and heads `k_stride` elements apart (the same layout for both), so every
    // strip's n rows lie inside their DLPack allocations, aligned for the dtype; the imports
    // keep them alive until this function returns. This call's outputs (out, lse) were just
    // checked not to overlap them; other Python threads writing arguments of a call that is in
    // progress break the contract of every GIL-releasing binding, as in numpy or torch.
    let strips = unsafe {
        cpu::Strips::from_raw(
            k.ptr(),
            v.ptr(),
            k_stride * dtype.size(),
            b,
            hkv,
            d,
            dtype,
            n,
        )
    };
    let (qs, os, ls) = (
        q.slice::<f32>(),
        out.slice_mut::<f32>(),
        lse.slice_mut::<f32>(),
    );
    let ms = mask.as_ref().map(|m| m.slice::<u8>());
    run_core(py, || cpu::attend(isa, &strips, qs, hq, scale, ms, os, ls))?;
    Ok(())
}

/// Reads a uint8 tensor once on all threads; returns a checksum (for bandwidth measurements).
/// With `prefetch`, software prefetches run ahead as in the logit kernels.
#[pyfunction]
#[pyo3(signature = (buffer, prefetch=false))]
fn stream_read(py: Python<'_>, buffer: &Bound<'_, PyAny>, prefetch: bool) -> PyResult<u64> {
    let t = Tensor::import(buffer, "buffer", Elem::U8, &[None])?;
    let bytes = t.bytes();
    run_core(py, || Ok(cpu::bandwidth::stream_read(bytes, prefetch)))
}

/// The instruction set the kernels use on this CPU ("avx512", "avx2" or "scalar").
#[pyfunction]
fn isa() -> &'static str {
    cpu::isa().name()
}

/// Every instruction set this CPU can run, best last.
#[pyfunction]
fn available_isas() -> Vec<&'static str> {
    Isa::available().into_iter().map(Isa::name).collect()
}

/// Threads the CPU kernels use: `HYBRIDGEN_THREADS`, or every CPU this process may run on.
#[pyfunction]
fn num_threads() -> usize {
    cpu::threads()
}

/// Merges the partial attention `(out_b [rows, d], lse_b [rows])` into `(out [rows, d],
/// lse [rows])` in place (float32, contiguous): the CPU's one LSE merge (`cpu::merge_partials`).
#[pyfunction]
fn merge_into(
    py: Python<'_>,
    out: &Bound<'_, PyAny>,
    lse: &Bound<'_, PyAny>,
    out_b: &Bound<'_, PyAny>,
    lse_b: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let o = Tensor::import(out, "out", Elem::F32, &[None, None])?.writable("out")?;
    let (rows, d) = (o.shape()[0], o.shape()[1]);
    let l = Tensor::import(lse, "lse", Elem::F32, &[Some(rows)])?.writable("lse")?;
    let ob = Tensor::import(out_b, "out_b", Elem::F32, &[Some(rows), Some(d)])?;
    let lb = Tensor::import(lse_b, "lse_b", Elem::F32, &[Some(rows)])?;
    distinct(&[("out", &o), ("lse", &l), ("out_b", &ob), ("lse_b", &lb)])?;
    let (os, ls, obs, lbs) = (
        o.slice_mut::<f32>(),
        l.slice_mut::<f32>(),
        ob.slice::<f32>(),
        lb.slice::<f32>(),
    );
    run_core(py, || cpu::merge_partials(os, ls, obs, lbs, d))?;
    Ok(())
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(merge_into, m)?)?;
    m.add_function(wrap_pyfunction!(topk, m)?)?;
    m.add_function(wrap_pyfunction!(stream_read, m)?)?;
    m.add_function(wrap_pyfunction!(attend, m)?)?;
    m.add_function(wrap_pyfunction!(isa, m)?)?;
    m.add_function(wrap_pyfunction!(available_isas, m)?)?;
    m.add_function(wrap_pyfunction!(num_threads, m)?)?;
    Ok(())
}
