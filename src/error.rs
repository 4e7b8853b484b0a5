//! The core's one error type. `py::errors` maps each kind to a Python exception once.

use cudarc::driver::DriverError;

/// Every failure the core reports. Panics are bugs; anything a caller can cause is one of these.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A caller passed a value the operation cannot accept (shape, range, budget...).
    #[error("{0}")]
    InvalidArgument(String),
    /// A tier has no room left for the request; nothing was changed.
    #[error("{0}")]
    Capacity(String),
    /// CUDA (the driver or NVRTC) is not usable on this machine; says why.
    #[error("CUDA is unavailable: {0}")]
    Unavailable(String),
    /// A CUDA driver call failed; `context` says what was being done.
    #[error("{context}: {source}")]
    Cuda {
        context: String,
        #[source]
        source: DriverError,
    },
    /// NVRTC failed; for a compilation that did not succeed, `log` is the compiler's output.
    #[error("{context}: {message} (NVRTC status {code}){}", .log.as_deref().filter(|l| !l.is_empty()).map(|l| format!("\n{l}")).unwrap_or_default())]
    Nvrtc {
        context: String,
        code: i32,
        message: String,
        log: Option<String>,
    },
    /// The operating system refused a request (mmap, mbind...).
    #[error("{context}: {source}")]
    Os {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

/// Shorthand for `Err(Error::InvalidArgument(format!(...)))`.
#[macro_export]
macro_rules! invalid {
    ($($arg:tt)*) => {
        Err($crate::error::Error::InvalidArgument(format!($($arg)*)))
    };
}

/// Returns `InvalidArgument` with the formatted message unless `cond` holds.
#[macro_export]
macro_rules! ensure {
    ($cond:expr, $($arg:tt)*) => {
        if !$cond {
            return $crate::invalid!($($arg)*);
        }
    };
}
