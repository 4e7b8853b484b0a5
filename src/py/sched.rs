//! `Scheduler`: the feedback scheduler of `crate::sched`.

use parking_lot::Mutex;
use pyo3::prelude::*;

use super::args::{positive, Int};
use crate::sched::{Scheduler, SchedulerConfig, StepTimes};

/// Chooses K and the selection strategy from measured step times (HybridGen, Algorithm 1).
#[pyclass(name = "Scheduler", module = "hybridgen._native", frozen)]
pub(crate) struct PyScheduler {
    inner: Mutex<Scheduler>,
}

#[pymethods]
impl PyScheduler {
    #[new]
    #[pyo3(signature = (k_min, k_max, *, grow=1.25, shrink=0.8, slack=0.5, patience=8, confirm=3))]
    fn new(
        k_min: Int,
        k_max: Int,
        grow: f64,
        shrink: f64,
        slack: f64,
        patience: u32,
        confirm: u32,
    ) -> PyResult<Self> {
        let cfg = SchedulerConfig {
            k_min: positive("k_min", k_min)?,
            k_max: positive("k_max", k_max)?,
            grow,
            shrink,
            slack,
            patience,
            confirm,
        };
        Ok(PyScheduler {
            inner: Mutex::new(Scheduler::new(cfg)?),
        })
    }

    /// Feeds one step's times (seconds); returns `(k, strategy)` for the next step.
    fn observe(&self, t_gpu: f64, t_cpu: f64, t_tx: f64) -> PyResult<(usize, &'static str)> {
        let (k, s) = self.inner.lock().observe(StepTimes {
            gpu: t_gpu,
            cpu: t_cpu,
            tx: t_tx,
        })?;
        Ok((k, s.name()))
    }

    #[getter]
    fn k(&self) -> usize {
        self.inner.lock().k()
    }
    #[getter]
    fn strategy(&self) -> &'static str {
        self.inner.lock().strategy().name()
    }
    #[getter]
    fn steps(&self) -> u64 {
        self.inner.lock().steps()
    }
    #[getter]
    fn k_min(&self) -> usize {
        self.inner.lock().config().k_min
    }
    #[getter]
    fn k_max(&self) -> usize {
        self.inner.lock().config().k_max
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyScheduler>()
}
