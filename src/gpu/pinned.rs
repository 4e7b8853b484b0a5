//! Page-locked host memory for asynchronous copies: `cuMemHostRegister` on our own mbind-placed
//! buffers (not `cuMemHostAlloc`, whose pages we could not place, and not write-combined, which
//! would make the CPU's own reads slow — the CPU reads these buffers every step).
//!
//! Two owners of registrations:
//! - [`PinnedBuffer`]: one whole buffer (small staging buffers);
//! - [`PinnedStrips`]: the host store's strips, registered as they fill, a prefix per strip that
//!   doubles, so a store reserved for 128K tokens × batch 4 locks only what it holds (locking
//!   everything up front commits and locks tens of GB, which fails on many machines). Each
//!   strip's prefix is one registration, re-made when it grows: a copy from a range spanning two
//!   registrations is not asynchronous.
//!
//! Unregistering waits for the device first (`cuCtxSynchronize`): a copy still queued on any
//! stream may read the pages, and once unregistered (and then unmapped) the DMA would read freed
//! memory.

use std::sync::Arc;

use cudarc::driver::sys;

use super::device::Gpu;
use crate::error::{Error, Result};
use crate::mem::{round_up_to_page, HostBuffer};

/// Registers `[ptr, ptr+len)` (portable: usable from every context).
///
/// # Safety
/// The range must lie in a live mapping that outlives the registration, and must not overlap
/// another registration.
unsafe fn register(gpu: &Gpu, ptr: *mut u8, len: usize) -> Result<()> {
    let _current = gpu.enter()?;
    sys::cuMemHostRegister_v2(ptr.cast(), len, sys::CU_MEMHOSTREGISTER_PORTABLE).result().map_err(|source| Error::Cuda {
        context: format!(
            "cuMemHostRegister of {len} bytes (page-locked memory is limited by RAM and `ulimit -l`; \
             lower max_context or the batch)"
        ),
        source,
    })
}

/// Waits for all work of the device's context, then unregisters every range starting at `ptrs`.
/// Failures are ignored: at process exit the context may already be gone, and then so are the
/// registrations.
fn unregister_after_sync(gpu: &Gpu, ptrs: &[*mut u8]) {
    if ptrs.is_empty() {
        return;
    }
    let _current = gpu.enter();
    let _ = gpu.context().synchronize();
    for &p in ptrs {
        // SAFETY: each pointer starts a range registered by `register` and is unregistered once.
        let _ = unsafe { sys::cuMemHostUnregister(p.cast()) }.result();
    }
}

/// A host buffer registered with the driver for as long as this value lives (it keeps the
/// buffer alive, so the mapping always outlives its registration).
pub struct PinnedBuffer {
    buf: Arc<HostBuffer>,
    gpu: Arc<Gpu>,
}

impl PinnedBuffer {
    /// Registers all of `buf`. Registration locks and commits every page of the mapping.
    pub fn register(buf: Arc<HostBuffer>, gpu: Arc<Gpu>) -> Result<Self> {
        // SAFETY: the whole live mapping owned by `buf`, which we keep alive; registered once.
        unsafe { register(&gpu, buf.as_ptr(), buf.len())? };
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
        is_registered(&self.gpu, self.buf.as_ptr())
    }
}

impl Drop for PinnedBuffer {
    fn drop(&mut self) {
        unregister_after_sync(&self.gpu, &[self.buf.as_ptr()]);
    }
}

fn is_registered(gpu: &Gpu, ptr: *mut u8) -> bool {
    let _current = gpu.enter();
    let mut flags: std::ffi::c_uint = 0;
    // SAFETY: queries flags of a host pointer; fails (not UB) for unregistered memory.
    unsafe { sys::cuMemHostGetFlags(&mut flags, ptr.cast()) }
        .result()
        .is_ok()
}

/// The smallest registration step per strip: small enough not to lock much more than is used,
/// large enough that a long context needs few registration calls.
pub const MIN_CHUNK_BYTES: usize = 1 << 20;

/// How many leading bytes of every strip to have registered so that `needed` bytes are: the
/// current prefix doubled (at least [`MIN_CHUNK_BYTES`]) or `needed` rounded up to pages,
/// whichever is larger, never beyond the strip. Doubling keeps the number of registrations
/// logarithmic in the context length.
pub fn grown_prefix(current: usize, needed: usize, strip_bytes: usize) -> usize {
    if needed <= current {
        return current;
    }
    let target = round_up_to_page(needed)
        .max(current.saturating_mul(2))
        .max(MIN_CHUNK_BYTES);
    target.min(strip_bytes)
}

/// The strips of one host-store buffer (`strips` page-aligned strips of `strip_bytes`, each
/// filled from its start), page-locked up to a common prefix that grows with the data.
pub struct PinnedStrips {
    buf: Arc<HostBuffer>,
    gpu: Arc<Gpu>,
    strips: usize,
    strip_bytes: usize,
    /// Leading bytes of every strip registered (0 while a growth is incomplete).
    prefix: usize,
    /// Start of every registered range (one per strip), for unregistering.
    ranges: Vec<*mut u8>,
}

// SAFETY: the raw pointers are addresses inside `buf` (owned, Send + Sync), used only to
// unregister; all mutation goes through `&mut self`.
unsafe impl Send for PinnedStrips {}
unsafe impl Sync for PinnedStrips {}

impl PinnedStrips {
    /// Nothing registered yet: call [`PinnedStrips::grow`].
    pub fn new(
        buf: Arc<HostBuffer>,
        gpu: Arc<Gpu>,
        strips: usize,
        strip_bytes: usize,
    ) -> Result<Self> {
        let fits = strips
            .checked_mul(strip_bytes)
            .is_some_and(|n| n <= buf.len());
        if !fits || !strip_bytes.is_multiple_of(crate::mem::PAGE_SIZE) {
            return Err(Error::InvalidArgument(format!(
                "{strips} strips of {strip_bytes} bytes (page-aligned) do not fit a {}-byte buffer",
                buf.len()
            )));
        }
        Ok(PinnedStrips {
            buf,
            gpu,
            strips,
            strip_bytes,
            prefix: 0,
            ranges: Vec::new(),
        })
    }

    /// Makes sure the first `needed` bytes of every strip are page-locked, each strip's prefix
    /// as **one** registration: a copy from a range that spans two registrations is not
    /// asynchronous (the driver stages it as pageable memory), and a copy may start anywhere in
    /// a strip. Growing therefore waits for the device once (queued copies may read the old
    /// registrations), unregisters the old prefixes and registers the longer ones; the prefix
    /// doubles, so that happens a logarithmic number of times.
    pub fn grow(&mut self, needed: usize) -> Result<()> {
        let target = grown_prefix(self.prefix, needed.min(self.strip_bytes), self.strip_bytes);
        if target <= self.prefix {
            return Ok(());
        }
        let old = self.prefix;
        unregister_after_sync(&self.gpu, &self.ranges);
        self.ranges.clear();
        self.prefix = 0;
        if let Err(e) = self.register_prefixes(target) {
            // Out of page-locked memory (the caller warns and copies the rest unlocked): lock the
            // old prefixes again, so what was asynchronous stays so.
            unregister_after_sync(&self.gpu, &self.ranges);
            self.ranges.clear();
            if old > 0 && self.register_prefixes(old).is_ok() {
                self.prefix = old;
            }
            return Err(e);
        }
        self.prefix = target;
        Ok(())
    }

    /// Registers the first `len` bytes of every strip, one range each, recording them in
    /// `ranges` as it goes (so a failure part-way leaves them to be unregistered).
    fn register_prefixes(&mut self, len: usize) -> Result<()> {
        for s in 0..self.strips {
            // SAFETY: strip `s` spans [s*strip_bytes, (s+1)*strip_bytes) of the live mapping (checked
            // in `new`); [0, len) is page-aligned (a page multiple: grown_prefix rounds to pages),
            // inside the strip, and not registered (every earlier range was unregistered).
            unsafe {
                let start = self.buf.as_ptr().add(s * self.strip_bytes);
                register(&self.gpu, start, len)?;
                self.ranges.push(start);
            }
        }
        Ok(())
    }

    /// Page-locked bytes (all strips).
    pub fn pinned_bytes(&self) -> usize {
        self.prefix * self.strips
    }

    /// Whether the driver sees the start of every strip as page-locked (trivially true before the
    /// first growth).
    pub fn is_registered(&self) -> bool {
        self.prefix == 0
            || (0..self.strips).all(|s| {
                is_registered(
                    &self.gpu,
                    self.buf.as_ptr().wrapping_add(s * self.strip_bytes),
                )
            })
    }
}

impl Drop for PinnedStrips {
    fn drop(&mut self) {
        unregister_after_sync(&self.gpu, &self.ranges);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_registered_prefix_doubles_and_stays_within_the_strip() {
        let page = crate::mem::PAGE_SIZE;
        let strip = 64 << 20;
        assert_eq!(grown_prefix(0, 0, strip), 0);
        assert_eq!(grown_prefix(0, 1, strip), MIN_CHUNK_BYTES);
        assert_eq!(
            grown_prefix(MIN_CHUNK_BYTES, MIN_CHUNK_BYTES, strip),
            MIN_CHUNK_BYTES
        );
        assert_eq!(
            grown_prefix(MIN_CHUNK_BYTES, MIN_CHUNK_BYTES + 1, strip),
            2 * MIN_CHUNK_BYTES
        );
        assert_eq!(
            grown_prefix(MIN_CHUNK_BYTES, 5 * MIN_CHUNK_BYTES + 3, strip),
            round_up_to_page(5 * MIN_CHUNK_BYTES + 3)
        );
        assert_eq!(grown_prefix(32 << 20, (32 << 20) + page, strip), strip);
        assert_eq!(grown_prefix(0, 1, 8 * page), 8 * page); // a small strip is locked whole
                                                            // Growing token by token to the full strip registers O(log) times.
        let (mut prefix, mut steps) = (0, 0);
        for needed in (0..=strip).step_by(256 * 1024) {
            let next = grown_prefix(prefix, needed, strip);
            assert!(next >= needed && next.is_multiple_of(page) && next <= strip);
            steps += (next != prefix) as usize;
            prefix = next;
        }
        assert!(steps <= 8, "{steps} registrations");
    }
}
