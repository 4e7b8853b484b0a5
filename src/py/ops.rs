//! Free functions: top-K selection, partial-attention merge, CPU capabilities, bandwidth probe.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use super::args::positive;
use super::tensor::{distinct, Elem, Tensor};
use crate::cpu::{self, Isa};

/// The `k` largest logits of every row of `logits [..., n]` into `out_indices [..., k]` (int64,
/// ascending token order) and `out_values [..., k]` (float32).
#[pyfunction]
fn topk(py: Python<'_>, logits: &Bound<'_, PyAny>, k: i64, out_indices: &Bound<'_, PyAny>, out_values: &Bound<'_, PyAny>) -> PyResult<()> {
    let k = positive("k", k)?;
    let x = Tensor::import(logits, "logits", Elem::F32, &[None, None, None])?;
    let n = x.shape()[2];
    if k > n {
        return Err(PyValueError::new_err(format!("k = {k} is larger than the number of tokens ({n})")));
    }
    let rows = [Some(x.shape()[0]), Some(x.shape()[1]), Some(k)];
    let idx = Tensor::import(out_indices, "out_indices", Elem::I64, &rows)?;
    let val = Tensor::import(out_values, "out_values", Elem::F32, &rows)?;
    distinct(&[("logits", &x), ("out_indices", &idx), ("out_values", &val)])?;
    let (xs, is, vs) = (x.slice::<f32>(), idx.slice_mut::<i64>(), val.slice_mut::<f32>());
    py.detach(|| cpu::topk(xs, n, k, is, vs))?;
    Ok(())
}

/// Reads a uint8 tensor once on all threads; returns a checksum (for bandwidth measurements).
/// With `prefetch`, software prefetches run ahead as in the logit kernels.
#[pyfunction]
#[pyo3(signature = (buffer, prefetch=false))]
fn stream_read(py: Python<'_>, buffer: &Bound<'_, PyAny>, prefetch: bool) -> PyResult<u64> {
    let t = Tensor::import(buffer, "buffer", Elem::U8, &[None])?;
    let bytes = t.bytes();
    Ok(py.detach(|| cpu::bandwidth::stream_read(bytes, prefetch)))
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

/// Threads the CPU kernels use.
#[pyfunction]
fn num_threads() -> usize {
    rayon::current_num_threads()
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(topk, m)?)?;
    m.add_function(wrap_pyfunction!(stream_read, m)?)?;
    m.add_function(wrap_pyfunction!(isa, m)?)?;
    m.add_function(wrap_pyfunction!(available_isas, m)?)?;
    m.add_function(wrap_pyfunction!(num_threads, m)?)?;
    Ok(())
}
