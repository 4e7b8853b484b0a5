//! When parallel work is worth the thread pool.
//!
//! Handing work to rayon's pool from a thread outside it wakes a worker and waits for it: tens of
//! microseconds each way, more than a decode step's CPU stage takes over a few hundred tokens.
//! A parallel iterator that cannot split runs on the calling thread without entering the pool,
//! so small work is given a minimum split length covering all of it.

/// Work that reads fewer bytes than this runs on the calling thread.
pub const SERIAL_BELOW_BYTES: usize = 256 << 10;

/// The `with_min_len` for a parallel iterator of `items` items that read `bytes` bytes in all:
/// every item in one piece (the calling thread) below [`SERIAL_BELOW_BYTES`], else 1.
pub fn min_len(items: usize, bytes: usize) -> usize {
    if bytes < SERIAL_BELOW_BYTES {
        items.max(1)
    } else {
        1
    }
}
