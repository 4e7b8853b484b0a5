//! The PyO3 bindings: thin wrappers that check arguments, release the GIL and call the core.
//! Nothing here computes; every submodule exposes a `register(m)`.

mod args;
mod constants;
mod cuda_tensor;
mod errors;
mod export;
mod gpu;
mod launch;
mod ops;
mod sched;
mod slots;
mod stage;
mod store;
mod tensor;

use pyo3::prelude::*;

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    constants::register(m)?;
    errors::register(m)?;
    ops::register(m)?;
    store::register(m)?;
    sched::register(m)?;
    gpu::register(m)?;
    launch::register(m)?;
    Ok(())
}
