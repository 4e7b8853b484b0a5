//! Page-locked host memory for asynchronous copies: `cuMemHostRegister` on our own mbind-placed
//! buffers (not `cuMemHostAlloc`, whose pages we could not place, and not write-combined, which
//! would make the CPU's own reads slow — the CPU reads these buffers every step).

use std::sync::Arc;

use cudarc::driver::sys;

use super::{cuda_err, device::Gpu};
use crate::error::{Error, Result};
use crate::mem::HostBuffer;

/// A host buffer registered with the driver for as long as this value lives (it keeps the
/// buffer alive, so the mapping always outlives its registration).
pub struct PinnedBuffer {
    buf: Arc<HostBuffer>,
    gpu: Arc<Gpu>,
}

impl PinnedBuffer {
    /// Registers all of `buf` (portable: usable from every context). Registration locks and
    /// commits every page of the mapping.
    pub fn register(buf: Arc<HostBuffer>, gpu: Arc<Gpu>) -> Result<Self> {
        gpu.context().bind_to_thread().map_err(cuda_err("binding the CUDA context"))?;
        // SAFETY: ptr/len describe a live mapping owned by `buf`, which we keep alive.
        unsafe { sys::cuMemHostRegister_v2(buf.as_ptr().cast(), buf.len(), sys::CU_MEMHOSTREGISTER_PORTABLE) }
            .result()
            .map_err(|source| Error::Cuda {
                context: format!(
                    "cuMemHostRegister of {} bytes (page-locked memory is limited by RAM and \
                     `ulimit -l`; lower max_context or the batch)",
                    buf.len()
                ),
                source,
            })?;
        Ok(PinnedBuffer { buf, gpu })
    }

    /// A fresh buffer of `len` bytes on NUMA node `node` (best effort), registered.
    pub fn allocate(len: usize, node: Option<u32>, gpu: Arc<Gpu>) -> Result<Self> {
        let buf = HostBuffer::new(len)?;
        if let Some(node) = node {
            let _ = buf.bind(0, buf.len(), node); // before first touch; refusal keeps the default policy
        }
        Self::register(Arc::new(buf), gpu)
    }

    pub fn buffer(&self) -> &Arc<HostBuffer> {
        &self.buf
    }

    /// Whether the driver sees the buffer's first byte as page-locked host memory.
    pub fn is_registered(&self) -> bool {
        let _ = self.gpu.context().bind_to_thread();
        let mut flags: std::ffi::c_uint = 0;
        // SAFETY: queries flags of a host pointer; fails (not UB) for unregistered memory.
        unsafe { sys::cuMemHostGetFlags(&mut flags, self.buf.as_ptr().cast()) }.result().is_ok()
    }
}

impl Drop for PinnedBuffer {
    fn drop(&mut self) {
        let _ = self.gpu.context().bind_to_thread();
        // SAFETY: the pointer was registered by `register` and is unregistered exactly once.
        // A failure here (context already torn down at exit) leaves nothing to clean up.
        let _ = unsafe { sys::cuMemHostUnregister(self.buf.as_ptr().cast()) }.result();
    }
}
