//! The single conversion of core errors into Python exceptions.

use pyo3::exceptions::{PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;

use crate::error::Error;

pyo3::create_exception!(
    _native,
    CapacityError,
    PyRuntimeError,
    "A memory tier of the host KV store has no room for the request; nothing was changed."
);

pyo3::create_exception!(
    _native,
    CudaUnavailableError,
    PyRuntimeError,
    "CUDA cannot be used here (no driver, no device, or no NVRTC); the message says which."
);

impl From<Error> for PyErr {
    fn from(err: Error) -> PyErr {
        match err {
            Error::InvalidArgument(msg) => PyValueError::new_err(msg),
            Error::Capacity(msg) => CapacityError::new_err(msg),
            err @ Error::Os { .. } => PyOSError::new_err(err.to_string()),
            err @ Error::Unavailable(_) => CudaUnavailableError::new_err(err.to_string()),
            err @ (Error::Cuda { .. } | Error::Nvrtc { .. }) => {
                PyRuntimeError::new_err(err.to_string())
            }
        }
    }
}

/// Runs `f` (the core's work for one call) with the GIL released. A core error becomes its Python
/// exception; a panic — a bug, since every argument a caller can get wrong is checked before the
/// core runs — becomes a `RuntimeError` saying so, with the panic's message, instead of PyO3's
/// `PanicException` (a `BaseException` that `except Exception` does not catch).
pub(crate) fn run_core<T: Send>(
    py: Python<'_>,
    f: impl FnOnce() -> crate::Result<T> + Send,
) -> PyResult<T> {
    match py.detach(|| std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))) {
        Ok(result) => result.map_err(PyErr::from),
        Err(payload) => {
            let message = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "(no message)".to_string());
            Err(PyRuntimeError::new_err(format!(
                "internal error in hybridgen's core (a bug: please report it): {message}"
            )))
        }
    }
}

/// Panics inside the core on purpose: proves that the binding boundary turns a panic into a
/// `RuntimeError` (see `run_core`). Not part of the API.
#[pyfunction]
fn _raise_internal_error(py: Python<'_>) -> PyResult<()> {
    run_core(py, || -> crate::Result<()> {
        panic!("deliberate panic for the boundary test")
    })
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(_raise_internal_error, m)?)?;
    m.add("CapacityError", m.py().get_type::<CapacityError>())?;
    m.add(
        "CudaUnavailableError",
        m.py().get_type::<CudaUnavailableError>(),
    )
}
