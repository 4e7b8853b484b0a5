//! hybridgen: CPU-GPU hybrid attention for long-context decoding.
//!
//! The core is plain Rust: the host KV store (`kv`), its NUMA-placed buffers (`mem`) and the
//! CPU half of attention (`cpu`), and the run-time-gated CUDA side (`gpu`). Python bindings live only in `py`.

pub mod cpu;
pub mod dtype;
pub mod error;
pub mod gpu;
pub mod kv;
pub mod mem;
mod py;
pub mod sched;

pub use dtype::DType;
pub use error::{Error, Result};
