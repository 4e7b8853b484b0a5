//! Whether CUDA can be used here, found without panicking (cudarc panics when it first touches a
//! library that is missing, so presence is checked before any cudarc call).

use std::sync::OnceLock;

use crate::error::{Error, Result};

/// What this process can use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probe {
    /// `libcuda` (the driver) could be loaded.
    pub driver: bool,
    /// `libnvrtc` (the run-time compiler) could be loaded.
    pub nvrtc: bool,
    /// CUDA devices the driver reports (0 when the driver is missing or fails to initialise).
    pub devices: usize,
    /// Why CUDA is unusable, if it is.
    pub reason: Option<String>,
}

impl Probe {
    pub fn available(&self) -> bool {
        self.reason.is_none()
    }
}

pub fn driver_loadable() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    // SAFETY: only tries to dlopen the candidate library names.
    *PRESENT.get_or_init(|| unsafe { cudarc::driver::sys::is_culib_present() })
}

/// Whether an NVRTC can be loaded (see `nvrtc` for the search order). Not cached: importing
/// torch later makes its NVRTC known.
pub fn nvrtc_loadable() -> bool {
    super::nvrtc::loadable()
}

pub fn probe() -> Probe {
    let driver = driver_loadable();
    let nvrtc = nvrtc_loadable();
    let mut devices = 0;
    let mut reason = None;
    if !driver {
        reason = Some(
            "the CUDA driver (libcuda.so) is not installed: no NVIDIA GPU driver on this machine"
                .to_string(),
        );
    } else {
        match cudarc::driver::result::init()
            .and_then(|_| cudarc::driver::result::device::get_count())
        {
            Ok(n) => devices = n.max(0) as usize,
            Err(e) => reason = Some(format!("the CUDA driver failed to initialise: {e:?}")),
        }
        if reason.is_none() && devices == 0 {
            reason = Some("the CUDA driver reports no devices".to_string());
        }
    }
    if reason.is_none() && !nvrtc {
        // The loader's own error names what was tried (and a HYBRIDGEN_NVRTC that did not load).
        reason = Some(match super::nvrtc::get() {
            Err(Error::Unavailable(why)) => why,
            Err(e) => e.to_string(),
            Ok(_) => NVRTC_MISSING.to_string(),
        });
    }
    Probe {
        driver,
        nvrtc,
        devices,
        reason,
    }
}

pub(crate) const NVRTC_MISSING: &str = "NVRTC (libnvrtc.so.13) is not loadable: `import hybridgen.cuda` \
    registers the one in a CUDA build of torch (its nvidia-cuda-nvrtc wheel), or set HYBRIDGEN_NVRTC to \
    a libnvrtc path, or put the CUDA toolkit's lib directory on LD_LIBRARY_PATH";

/// `Ok` when the driver can use device `ordinal` (contexts, page-locking, streams), else
/// `Error::Unavailable` saying why. NVRTC is not needed for that: only the kernels need it, and
/// they check for it when they are first compiled.
pub fn require_device(ordinal: usize) -> Result<()> {
    let p = probe();
    if let Some(reason) = p.reason.filter(|_| !p.driver || p.devices == 0) {
        return Err(Error::Unavailable(reason));
    }
    if ordinal >= p.devices {
        return Err(Error::InvalidArgument(format!(
            "CUDA device {ordinal} does not exist: this machine has {} device(s)",
            p.devices
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_never_panics_and_explains_itself() {
        let p = probe();
        assert_eq!(p.available(), p.reason.is_none());
        if !p.driver {
            assert_eq!(p.devices, 0);
            assert!(p.reason.as_deref().unwrap().contains("libcuda"));
            assert!(matches!(require_device(0), Err(Error::Unavailable(_))));
        }
    }
}
