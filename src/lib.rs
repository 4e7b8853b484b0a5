//! hybridgen: CPU-GPU hybrid attention for long-context decoding.
//!
//! The core is plain Rust: the host KV store (`kv`), its NUMA-placed buffers (`mem`), the CPU
//! half of attention (`cpu`), the feedback scheduler (`sched`) and the run-time-gated CUDA side
//! (`gpu`). It builds and tests without Python; the `python` feature adds the bindings (`py`),
//! the only place that uses pyo3.

pub mod cpu;
pub mod dtype;
pub mod error;
pub mod gpu;
pub mod kv;
pub mod mem;
#[cfg(feature = "python")]
mod py;
pub mod sched;

pub use dtype::DType;
pub use error::{Error, Result};
