//! How the kernels stream memory on this CPU, chosen at run time from the CPU's vendor.
//!
//! Measured on the development machines (2 cores each, streaming 1.5 GiB of keys):
//! - Intel Xeon (AVX-512): the hardware prefetcher falls behind a scan that also does the
//!   arithmetic; software prefetching 2 KiB ahead raised the logit kernel from ~85 % to ~99 % of
//!   the plain read.
//! - AMD EPYC Zen 4 (family 25, model 17): the same: logits from ~50 % to ~70 % of the plain read
//!   under the same load, alternating runs (the plain read itself is no faster with prefetching,
//!   on Zen 3 neither: the arithmetic between loads is what leaves the prefetcher behind).
//! - Arm (Neoverse): no measurement; the hardware prefetchers of server cores follow
//!   sequential streams, so none are issued.
//!
//! `HYBRIDGEN_PREFETCH=<bytes>` (0 = none) overrides the distance, to tune a new machine.

use std::sync::OnceLock;

/// Memory-streaming parameters of the kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tuning {
    /// How far ahead (bytes) sequential key and value scans prefetch; 0 = no software prefetch.
    pub prefetch_ahead: usize,
    /// Prefetch with the non-temporal hint (the scanned rows are not needed again).
    pub prefetch_nta: bool,
}

/// The CPU vendor string (`cpuid` leaf 0 on x86-64: "GenuineIntel", "AuthenticAMD", ...;
/// "arm" on aarch64; "" elsewhere).
pub fn cpu_vendor() -> &'static str {
    static VENDOR: OnceLock<String> = OnceLock::new();
    VENDOR.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: cpuid leaf 0 exists on every x86-64 CPU and only reads registers (newer
            // compilers call the intrinsic safe, older ones need the block).
            #[allow(unused_unsafe)]
            let r = unsafe { std::arch::x86_64::__cpuid(0) };
            let bytes: Vec<u8> = [r.ebx, r.edx, r.ecx]
                .iter()
                .flat_map(|w| w.to_le_bytes())
                .collect();
            String::from_utf8_lossy(&bytes)
                .trim_end_matches('\0')
                .to_string()
        }
        #[cfg(target_arch = "aarch64")]
        {
            "arm".to_string()
        }
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        {
            String::new()
        }
    })
}

/// The tuning for this CPU, decided once.
pub fn tuning() -> Tuning {
    static TUNING: OnceLock<Tuning> = OnceLock::new();
    *TUNING.get_or_init(|| {
        let x86 = matches!(
            cpu_vendor(),
            "GenuineIntel" | "AuthenticAMD" | "HygonGenuine"
        );
        let mut t = Tuning {
            prefetch_ahead: if x86 { 2048 } else { 0 },
            prefetch_nta: false,
        };
        if let Ok(v) = std::env::var("HYBRIDGEN_PREFETCH_NTA") {
            t.prefetch_nta = v.trim() == "1";
        }
        if let Some(bytes) = std::env::var("HYBRIDGEN_PREFETCH")
            .ok()
            .and_then(|v| v.trim().parse().ok())
        {
            t.prefetch_ahead = bytes;
        }
        t
    })
}
