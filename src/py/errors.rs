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
            err @ (Error::Cuda { .. } | Error::Nvrtc { .. }) => PyRuntimeError::new_err(err.to_string()),
        }
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("CapacityError", m.py().get_type::<CapacityError>())?;
    m.add("CudaUnavailableError", m.py().get_type::<CudaUnavailableError>())
}
