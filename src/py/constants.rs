//! Constants the Python package needs, defined once in the core and exported from here.

use pyo3::prelude::*;
use pyo3::types::PyTuple;

use crate::cpu::Merge;
use crate::dtype::DType;
use crate::kv::Tier;
use crate::sched::Strategy;

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    // Largest head_dim the CUDA kernels take (they keep a row per warp in registers).
    m.add("MAX_HEAD_DIM", crate::gpu::device::MAX_HEAD_DIM)?;
    m.add("DTYPES", PyTuple::new(py, DType::ALL.map(DType::name))?)?;
    m.add("MERGES", PyTuple::new(py, Merge::NAMES)?)?;
    m.add(
        "STRATEGIES",
        PyTuple::new(py, Strategy::ALL.map(Strategy::name))?,
    )?;
    // Names of the values of `HostKVStore.token_map` (index = value).
    m.add("TIERS", PyTuple::new(py, Tier::ALL.map(Tier::name))?)?;
    m.add("PAGE_TOKENS", crate::cpu::PAGE_TOKENS)?;
    Ok(())
}
