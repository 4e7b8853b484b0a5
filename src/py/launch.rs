//! The kernels' launch geometry (`gpu::launch`): slice counts for callers that size the
//! partial buffers, and whole launches for the tests that run the kernels on the CPU, so that
//! neither restates the core's arithmetic.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::gpu::launch;

/// Slices per row for a ``split_attention`` launch over ``tokens`` (device + shipped) tokens
/// on a device with ``sm_count`` SMs (``part_o [batch * q_heads, splits, d]``).
#[pyfunction]
fn split_count(
    batch: usize,
    q_heads: usize,
    kv_heads: usize,
    tokens: usize,
    sm_count: u32,
) -> usize {
    launch::split_count(batch, q_heads, kv_heads, tokens, sm_count)
}

/// The launch of kernel ``kind`` (``"split_attention"`` or ``"merge_partials"``) as
/// ``src/gpu/device.rs`` issues it: ``grid`` and ``block`` (3-tuples), ``shared_mem_bytes``,
/// ``splits``; for ``split_attention`` also ``tokens_per_split`` (its argument), ``head_chunks``
/// and ``heads_per_block``. ``splits`` defaults to ``split_count(..., sm_count)``.
#[pyfunction]
#[pyo3(signature = (kind, batch, q_heads, kv_heads, head_dim, tokens, splits=None, *, sm_count=None))]
#[allow(clippy::too_many_arguments)]
fn launch_geometry<'py>(
    py: Python<'py>,
    kind: &str,
    batch: usize,
    q_heads: usize,
    kv_heads: usize,
    head_dim: usize,
    tokens: usize,
    splits: Option<usize>,
    sm_count: Option<u32>,
) -> PyResult<Bound<'py, PyDict>> {
    let splits = match (splits, sm_count) {
        (Some(s), _) => s,
        (None, Some(sm)) => launch::split_count(batch, q_heads, kv_heads, tokens, sm),
        (None, None) => return Err(PyValueError::new_err("give splits or sm_count")),
    };
    let d = PyDict::new(py);
    let geo = match kind {
        "split_attention" => {
            let s = launch::split_attention(batch, q_heads, kv_heads, head_dim, tokens, splits)?;
            d.set_item("tokens_per_split", s.tokens_per_split)?;
            d.set_item("head_chunks", s.head_chunks)?;
            d.set_item("heads_per_block", s.heads_per_block)?;
            s.launch
        }
        "merge_partials" => launch::merge_partials(batch * q_heads, head_dim, splits)?,
        other => {
            return Err(PyValueError::new_err(format!(
                "kind must be split_attention or merge_partials, not {other:?}"
            )))
        }
    };
    d.set_item("grid", geo.grid)?;
    d.set_item("block", geo.block)?;
    d.set_item("shared_mem_bytes", geo.shared_mem_bytes)?;
    d.set_item("splits", splits)?;
    Ok(d)
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(split_count, m)?)?;
    m.add_function(wrap_pyfunction!(launch_geometry, m)?)
}
