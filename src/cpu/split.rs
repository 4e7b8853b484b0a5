//! The CPU kernels' thread pool, and when parallel work is worth it.
//!
//! # Threads: `HYBRIDGEN_THREADS`
//! The kernels run on a pool of their own (not rayon's global one), sized once, at its first
//! use, by the environment variable `HYBRIDGEN_THREADS` (a positive integer), or by the number
//! of CPUs this process may run on when it is unset. On a server the CPU stage shares cores
//! with the framework's own threads (torch's intra-op pool, a data loader): giving it fewer
//! threads than cores keeps them from competing. A streaming kernel saturates memory bandwidth
//! with a few cores per memory channel group, so more threads than that buy nothing.
//! An invalid value is reported on stderr and the default used.
//!
//! # Small work stays on the calling thread
//! Handing work to a pool from a thread outside it wakes a worker and waits for it: tens of
//! microseconds each way, more than a decode step's CPU stage takes over a few hundred tokens.
//! [`run`] enters the pool only for work that reads at least [`SERIAL_BELOW_BYTES`]; below, a
//! parallel iterator given [`min_len`] cannot split and runs on the calling thread.

use std::sync::OnceLock;

/// Work that reads fewer bytes than this runs on the calling thread.
pub const SERIAL_BELOW_BYTES: usize = 256 << 10;

/// The environment variable that sizes the pool.
pub const THREADS_ENV: &str = "HYBRIDGEN_THREADS";

/// The thread count `HYBRIDGEN_THREADS` asks for (`Err` with a message when it is not a positive
/// integer; `Ok(None)` when unset).
pub fn threads_from_env() -> Result<Option<usize>, String> {
    match std::env::var(THREADS_ENV) {
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(e) => Err(format!("{THREADS_ENV}: {e}")),
        Ok(v) => match v.trim().parse::<usize>() {
            Ok(n) if n > 0 => Ok(Some(n)),
            _ => Err(format!("{THREADS_ENV}={v:?} is not a positive integer")),
        },
    }
}

fn pool() -> &'static rayon::ThreadPool {
    static POOL: OnceLock<rayon::ThreadPool> = OnceLock::new();
    POOL.get_or_init(|| {
        let default = std::thread::available_parallelism().map_or(1, |n| n.get());
        let n = threads_from_env().unwrap_or_else(|msg| {
            eprintln!("hybridgen: {msg}; using {default} threads");
            None
        });
        rayon::ThreadPoolBuilder::new()
            .num_threads(n.unwrap_or(default))
            .thread_name(|i| format!("hybridgen-cpu-{i}"))
            .build()
            .expect("the CPU kernels' thread pool could not start")
    })
}

/// Threads the CPU kernels use (starts the pool if it is not yet running).
pub fn threads() -> usize {
    pool().current_num_threads()
}

/// Runs `f` in the kernels' pool when it reads at least [`SERIAL_BELOW_BYTES`] (parallel
/// iterators inside then use the pool), else on the calling thread.
pub fn run<R: Send>(bytes: usize, f: impl FnOnce() -> R + Send) -> R {
    let p = pool();
    if bytes < SERIAL_BELOW_BYTES || p.current_thread_index().is_some() {
        f()
    } else {
        p.install(f)
    }
}

/// The `with_min_len` for a parallel iterator of `items` items that read `bytes` bytes in all:
/// every item in one piece (the calling thread) below [`SERIAL_BELOW_BYTES`], else 1.
pub fn min_len(items: usize, bytes: usize) -> usize {
    if bytes < SERIAL_BELOW_BYTES {
        items.max(1)
    } else {
        1
    }
}
