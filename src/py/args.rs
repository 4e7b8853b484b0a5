//! Checks of scalar arguments (Python ints arrive as i64 so negatives get a ValueError, not an
//! OverflowError).

use pyo3::exceptions::{PyOverflowError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBool;
use pyo3::PyResult;

use crate::cpu::Isa;

/// An integer argument, strictly: `True`/`False` are refused (a bool where a count or index is
/// expected is a bug in the caller, not a 1 or a 0), anything with `__index__` is accepted (numpy
/// integers too), and one beyond 64 bits is an `OverflowError`. Extraction itself never fails:
/// the error is raised by [`Int::get`] (and `non_negative`/`positive`), which name the argument.
#[derive(Clone, Debug)]
pub(crate) struct Int(Result<i64, BadInt>);

#[derive(Clone, Debug)]
enum BadInt {
    Type(String),
    Overflow(String),
}

impl Int {
    pub(crate) const ZERO: Int = Int(Ok(0));

    /// The value, or the error naming argument `name`.
    pub(crate) fn get(&self, name: &str) -> PyResult<i64> {
        match &self.0 {
            Ok(v) => Ok(*v),
            Err(BadInt::Type(t)) => Err(PyTypeError::new_err(format!(
                "{name} must be an integer, got {t}"
            ))),
            Err(BadInt::Overflow(v)) => Err(PyOverflowError::new_err(format!(
                "{name} = {v} is out of range (|{name}| < 2**63)"
            ))),
        }
    }
}

impl<'a, 'py> FromPyObject<'a, 'py> for Int {
    type Error = PyErr;

    fn extract(obj: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        let type_name = || {
            obj.get_type()
                .name()
                .map(|n| n.to_string())
                .unwrap_or_else(|_| "?".into())
        };
        if obj.is_instance_of::<PyBool>() {
            return Ok(Int(Err(BadInt::Type("a bool".into()))));
        }
        let Ok(index) = obj.call_method0("__index__") else {
            return Ok(Int(Err(BadInt::Type(type_name()))));
        };
        Ok(Int(index
            .extract::<i64>()
            .map_err(|_| BadInt::Overflow(index.to_string()))))
    }
}

/// `value` as a count or index; negative values are a ValueError naming the argument.
pub(crate) fn non_negative(name: &str, value: Int) -> PyResult<usize> {
    let value = value.get(name)?;
    usize::try_from(value)
        .map_err(|_| PyValueError::new_err(format!("{name} must be >= 0, got {value}")))
}

/// `value` as a positive count.
pub(crate) fn positive(name: &str, value: Int) -> PyResult<usize> {
    match non_negative(name, value)? {
        0 => Err(PyValueError::new_err(format!("{name} must be > 0, got 0"))),
        v => Ok(v),
    }
}

/// The instruction set to run (`None`: the best this CPU has).
pub(crate) fn isa(name: Option<&str>) -> PyResult<Isa> {
    let Some(name) = name else {
        return Ok(crate::cpu::isa());
    };
    let isa = Isa::parse(name).ok_or_else(|| {
        PyValueError::new_err(format!(
            "unknown isa {name:?}: expected 'scalar', 'avx2', 'avx512' or 'neon'"
        ))
    })?;
    if !isa.supported() {
        return Err(PyValueError::new_err(format!(
            "isa {name:?} is not supported by this CPU"
        )));
    }
    Ok(isa)
}
