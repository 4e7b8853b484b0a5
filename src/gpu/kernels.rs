//! `kernels/hybrid_attention.cu`, compiled by NVRTC at first use for the device's architecture
//! and cached: in memory for the process, and as a `.ptx` file in a cache directory (if given)
//! keyed by the source, the NVRTC version and the architecture, so later processes skip NVRTC.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;

use super::probe::{nvrtc_loadable, NVRTC_MISSING};
use crate::error::{Error, Result};

/// The kernel source, built into the library (a wheel carries no `kernels/` directory).
pub const SOURCE: &str = include_str!("../../kernels/hybrid_attention.cu");

/// The kernels `SOURCE` defines, by name.
pub const SPLIT_F16: &str = "split_attention_f16";
pub const SPLIT_BF16: &str = "split_attention_bf16";
pub const SPLIT_F32: &str = "split_attention_f32";
pub const MERGE: &str = "merge_partials";
pub const NAMES: [&str; 4] = [SPLIT_F16, SPLIT_BF16, SPLIT_F32, MERGE];

/// `compute_XY` from a compute capability; the driver JIT-compiles the PTX for the exact device.
pub fn arch_for(major: i32, minor: i32) -> String {
    format!("compute_{major}{minor}")
}

/// NVRTC's `(major, minor)` version.
pub fn nvrtc_version() -> Result<(i32, i32)> {
    if !nvrtc_loadable() {
        return Err(Error::Unavailable(NVRTC_MISSING.to_string()));
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: NVRTC is loadable (checked above); the function writes two ints.
    unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|source| Error::Nvrtc { context: "nvrtcVersion".into(), source, log: None })?;
    Ok((major, minor))
}

/// Compiles `SOURCE` to PTX for `arch` (e.g. `compute_90`) with NVRTC, uncached.
pub fn compile(arch: &str) -> Result<String> {
    check_arch(arch)?;
    if !nvrtc_loadable() {
        return Err(Error::Unavailable(NVRTC_MISSING.to_string()));
    }
    let opts = cudarc::nvrtc::CompileOptions {
        options: vec![format!("--gpu-architecture={arch}"), "--std=c++17".into()],
        name: Some("hybrid_attention.cu".into()),
        ..Default::default()
    };
    use cudarc::nvrtc::CompileError as E;
    let step = |what: &str| format!("NVRTC {what} for {arch}");
    cudarc::nvrtc::compile_ptx_with_opts(SOURCE, opts).map(|ptx| ptx.to_src()).map_err(|e| match e {
        E::CompileError { nvrtc, log, .. } => Error::Nvrtc {
            context: format!("NVRTC could not compile kernels/hybrid_attention.cu for {arch}"),
            source: nvrtc,
            log: Some(log.to_string_lossy().into_owned()),
        },
        E::CreationError(source) => Error::Nvrtc { context: step("creating the program"), source, log: None },
        E::GetLogError(source) => Error::Nvrtc { context: step("reading the log"), source, log: None },
        E::GetPtxError(source) => Error::Nvrtc { context: step("reading the PTX"), source, log: None },
        E::DestroyError(source) => Error::Nvrtc { context: step("destroying the program"), source, log: None },
    })
}

/// PTX for `arch`, compiled at most once per process and, with `cache_dir`, once per machine.
pub fn ptx(arch: &str, cache_dir: Option<&Path>) -> Result<Arc<String>> {
    static MEMORY: OnceLock<Mutex<HashMap<String, Arc<String>>>> = OnceLock::new();
    let memory = MEMORY.get_or_init(Default::default);
    if let Some(p) = memory.lock().get(arch) {
        return Ok(p.clone());
    }
    let file = match cache_dir {
        Some(dir) => Some(cache_file(dir, arch)?),
        None => None,
    };
    let text = match file.as_ref().and_then(|f| std::fs::read_to_string(f).ok()) {
        Some(text) if text.contains(MERGE) => text,
        _ => {
            let text = compile(arch)?;
            if let Some(f) = &file {
                // A cache that cannot be written only costs a recompile next time.
                let _ = write_atomically(f, &text);
            }
            text
        }
    };
    let text = Arc::new(text);
    memory.lock().insert(arch.to_string(), text.clone());
    Ok(text)
}

/// The cache file for `arch`: its name changes with the source and the NVRTC version.
pub fn cache_file(dir: &Path, arch: &str) -> Result<PathBuf> {
    check_arch(arch)?;
    let (major, minor) = nvrtc_version()?;
    let key = fnv1a(format!("{SOURCE}\0{major}.{minor}").as_bytes());
    Ok(dir.join(format!("hybrid_attention-{key:016x}-{arch}.ptx")))
}

fn check_arch(arch: &str) -> Result<()> {
    let digits = arch.strip_prefix("compute_").unwrap_or("");
    if digits.len() < 2 || !digits.chars().take(2).all(|c| c.is_ascii_digit()) {
        return Err(Error::InvalidArgument(format!("arch must look like 'compute_90', got {arch:?}")));
    }
    Ok(())
}

fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, text)?;
    std::fs::rename(tmp, path)
}

/// A stable 64-bit hash (std's hasher may change between Rust releases).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_malformed_architectures() {
        for bad in ["sm_90", "compute_", "compute_x0", "90"] {
            assert!(matches!(compile(bad), Err(Error::InvalidArgument(_))), "{bad}");
        }
    }

    #[test]
    fn compiles_every_kernel_when_nvrtc_is_loadable() {
        // tests/run.sh puts torch's NVRTC on LD_LIBRARY_PATH; elsewhere this reports and stops.
        if !nvrtc_loadable() {
            assert!(matches!(compile("compute_90"), Err(Error::Unavailable(_))));
            eprintln!("NVRTC not loadable: kernel compilation not exercised");
            return;
        }
        for arch in ["compute_80", "compute_90"] {
            let ptx = compile(arch).unwrap();
            for name in NAMES {
                assert!(ptx.contains(&format!(".entry {name}")), "{name} missing from the {arch} PTX");
            }
        }
        let dir = std::env::temp_dir().join(format!("hybridgen-ptx-{}", std::process::id()));
        let first = ptx("compute_80", Some(&dir)).unwrap();
        assert!(cache_file(&dir, "compute_80").unwrap().is_file());
        assert_eq!(first, ptx("compute_80", Some(&dir)).unwrap());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn hash_is_stable() {
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
