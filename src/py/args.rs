//! Checks of scalar arguments (Python ints arrive as i64 so negatives get a ValueError, not an
//! OverflowError).

use pyo3::exceptions::PyValueError;
use pyo3::PyResult;

use crate::cpu::Isa;

/// `value` as a count or index; negative values are a ValueError naming the argument.
pub(crate) fn non_negative(name: &str, value: i64) -> PyResult<usize> {
    usize::try_from(value).map_err(|_| PyValueError::new_err(format!("{name} must be >= 0, got {value}")))
}

/// `value` as a positive count.
pub(crate) fn positive(name: &str, value: i64) -> PyResult<usize> {
    match non_negative(name, value)? {
        0 => Err(PyValueError::new_err(format!("{name} must be > 0, got 0"))),
        v => Ok(v),
    }
}

/// The instruction set to run (`None`: the best this CPU has).
pub(crate) fn isa(name: Option<&str>) -> PyResult<Isa> {
    let Some(name) = name else { return Ok(crate::cpu::isa()) };
    let isa = Isa::parse(name).ok_or_else(|| {
        PyValueError::new_err(format!("unknown isa {name:?}: expected 'scalar', 'avx2' or 'avx512'"))
    })?;
    if !isa.supported() {
        return Err(PyValueError::new_err(format!("isa {name:?} is not supported by this CPU")));
    }
    Ok(isa)
}
