//! A page-aligned anonymous mapping, optionally bound to a NUMA node.

use super::numa::{self, PAGE_SIZE};
use crate::error::{Error, Result};

/// Anonymous `mmap` (`MAP_NORESERVE`: virtual space is reserved, pages are committed on first
/// write), so a store can reserve its worst case up front and keep addresses stable forever:
/// zero-copy views and (later) CUDA host registration rely on that.
pub struct HostBuffer {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the buffer is plain memory owned by this value; synchronisation of its contents is the
// owner's job (the store serialises writers), exactly as for a Vec<u8>.
unsafe impl Send for HostBuffer {}
unsafe impl Sync for HostBuffer {}

impl HostBuffer {
    /// Maps `len` bytes (rounded up to whole pages).
    pub fn new(len: usize) -> Result<Self> {
        let len = round_up_to_page(len.max(1));
        // SAFETY: anonymous private mapping with no address hint; checked for MAP_FAILED below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(Error::Os {
                context: format!("mmap of {len} bytes for the host KV store"),
                source: std::io::Error::last_os_error(),
            });
        }
        // Placement is per 4 KiB page (keys near, values far, spilled keys migrating page by
        // page): a transparent huge page would put 2 MiB of neighbouring strips on one node and
        // migrate them together (kernels that default THP to "always"). Best effort: a kernel
        // without THP refuses the advice, and the pages are small anyway.
        // SAFETY: the range is the mapping just created.
        unsafe { libc::madvise(ptr, len, libc::MADV_NOHUGEPAGE) };
        Ok(HostBuffer {
            ptr: ptr as *mut u8,
            len,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// Binds the page range covering `[offset, offset+len)` to `node`, migrating touched pages.
    pub fn bind(&self, offset: usize, len: usize, node: u32) -> std::io::Result<()> {
        let (start, end) = self.page_range(offset, len);
        // SAFETY: start/end are page aligned and clamped to this mapping.
        unsafe { numa::bind(self.ptr.add(start), end - start, node, true) }
    }

    /// Returns pages in `[offset, offset+len)` (whole pages only) to the kernel; they read as zero.
    pub fn release(&self, offset: usize, len: usize) {
        let start = round_up_to_page(offset);
        let end = ((offset + len) / PAGE_SIZE * PAGE_SIZE).min(self.len);
        if end > start {
            // SAFETY: whole pages inside this mapping; MADV_DONTNEED on private anonymous memory
            // just drops the pages. Failure only means the memory stays committed.
            unsafe {
                libc::madvise(
                    self.ptr.add(start) as *mut libc::c_void,
                    end - start,
                    libc::MADV_DONTNEED,
                )
            };
        }
    }

    /// The node that holds the byte at `offset` (the page is faulted in if untouched).
    pub fn node_at(&self, offset: usize) -> std::io::Result<u32> {
        assert!(
            offset < self.len,
            "offset {offset} outside a {}-byte buffer",
            self.len
        );
        // SAFETY: offset is inside the mapping.
        unsafe { numa::node_of(self.ptr.add(offset)) }
    }

    fn page_range(&self, offset: usize, len: usize) -> (usize, usize) {
        let start = offset / PAGE_SIZE * PAGE_SIZE;
        let end = round_up_to_page(offset + len).min(self.len);
        (start.min(end), end)
    }
}

impl Drop for HostBuffer {
    fn drop(&mut self) {
        // SAFETY: ptr/len came from a successful mmap and are unmapped exactly once.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
    }
}

pub fn round_up_to_page(n: usize) -> usize {
    n.div_ceil(PAGE_SIZE) * PAGE_SIZE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_binds_and_reports_node() {
        let buf = HostBuffer::new(3 * PAGE_SIZE + 5).unwrap();
        assert_eq!(buf.len(), 4 * PAGE_SIZE);
        let node = numa::NodePlacement::resolve(None).node;
        // Binding may be refused inside some containers; placement is best effort.
        let _ = buf.bind(0, buf.len(), node);
        // SAFETY: writing inside the mapping.
        unsafe { buf.as_ptr().add(10).write(7) };
        if let Ok(n) = buf.node_at(10) {
            assert!(numa::online_nodes().contains(&n));
        }
        buf.release(0, buf.len());
        // SAFETY: reading inside the mapping; released pages read back as zero.
        assert_eq!(unsafe { buf.as_ptr().add(10).read() }, 0);
    }
}
