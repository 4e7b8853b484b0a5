//! The CUDA side of the core, all of it gated at run time: the driver (`libcuda`) and NVRTC
//! (`libnvrtc`) are loaded dynamically when first needed, so the crate builds, imports and tests
//! on machines without a GPU or a CUDA toolkit. Every entry point checks availability first and
//! reports `Error::Unavailable` instead of letting cudarc panic on a missing library.
//!
//! - `probe`: what is there (driver, NVRTC, devices) without side effects on failure;
//! - `nvrtc`: the run-time compiler, loaded by path/version in an order the core controls;
//! - `kernels`: `kernels/*.cu` compiled by NVRTC at first use (a cubin for the device), cached in
//!   memory and on disk;
//! - `launch`: the kernels' launch geometry (grid, block, slices), pure arithmetic;
//! - `device`: one context per device (torch's primary context), the compiled module, launches
//!   on a stream the caller owns (torch's current stream);
//! - `pinned`: page-locked registration (`cuMemHostRegister`) of mbind-placed host buffers, grown
//!   with the store.

pub mod device;
pub mod kernels;
pub mod launch;
pub mod nvrtc;
pub mod pinned;
pub mod probe;

pub use device::{Gpu, MergeArgs, SplitArgs};
pub use pinned::{PinnedBuffer, PinnedStrips};
pub use probe::{probe, Probe};

use crate::error::Error;

/// A CUDA driver error as the core's error (kept as its source), with what was being done.
pub(crate) fn cuda_err(context: &str) -> impl FnOnce(cudarc::driver::DriverError) -> Error + '_ {
    move |source| Error::Cuda {
        context: context.to_string(),
        source,
    }
}
