//! `kernels/hybrid_attention.cu`, compiled by NVRTC at first use and cached: in memory for the
//! process, and as a file in a cache directory (if given) keyed by the source, the NVRTC version
//! and the target, so later processes skip NVRTC.
//!
//! The target is a **cubin** for the device's own `sm_XY` whenever NVRTC knows that architecture:
//! the driver loads machine code as is, whatever its own CUDA version (within the major version),
//! whereas PTX is refused by a driver older than the compiler (`CUDA_ERROR_UNSUPPORTED_PTX_VERSION`:
//! torch's NVRTC 13.2 on a 13.0 driver). PTX (for the newest architecture NVRTC knows) is only the
//! fallback for a device newer than NVRTC; the loader then names the versions if the driver
//! refuses it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;

use super::nvrtc::{self, Target};
use crate::error::{Error, Result};

/// The kernel source, built into the library (a wheel carries no `kernels/` directory).
pub const SOURCE: &str = include_str!("../../kernels/hybrid_attention.cu");
const NAME: &str = "hybrid_attention.cu";
/// Options besides the target (no include paths: the source includes no headers).
const OPTIONS: [&str; 1] = ["--std=c++17"];

/// The kernels `SOURCE` defines, by name.
pub const SPLIT_F16: &str = "split_attention_f16";
pub const SPLIT_BF16: &str = "split_attention_bf16";
pub const SPLIT_F32: &str = "split_attention_f32";
pub const MERGE: &str = "merge_partials";
pub const NAMES: [&str; 4] = [SPLIT_F16, SPLIT_BF16, SPLIT_F32, MERGE];

/// Compiled kernels, ready for `cuModuleLoadData`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Image {
    pub target: Target,
    /// A cubin (ELF), or NUL-terminated PTX text.
    pub code: Vec<u8>,
}

/// The target for a device of compute capability `cc` (e.g. 90) given the architectures NVRTC
/// supports: its own cubin if possible, else PTX for the newest supported architecture below it.
pub fn choose_target(cc: u32, supported: &[u32]) -> Result<Target> {
    if supported.contains(&cc) {
        return Ok(Target::Cubin(cc));
    }
    match supported.iter().copied().filter(|&a| a < cc).max() {
        Some(a) => Ok(Target::Ptx(a)),
        None => Err(Error::Unavailable(format!(
            "NVRTC cannot generate code for this GPU (sm_{cc}); it supports {supported:?}: use a torch/CUDA \
             release that still supports this GPU, or point HYBRIDGEN_NVRTC at an older libnvrtc"
        ))),
    }
}

/// Parses `compute_XY` (PTX) or `sm_XY` (cubin).
pub fn parse_arch(arch: &str) -> Result<Target> {
    let number = |digits: &str| {
        digits
            .parse::<u32>()
            .ok()
            .filter(|n| (10..1000).contains(n))
    };
    if let Some(n) = arch.strip_prefix("compute_").and_then(number) {
        return Ok(Target::Ptx(n));
    }
    if let Some(n) = arch.strip_prefix("sm_").and_then(number) {
        return Ok(Target::Cubin(n));
    }
    Err(Error::InvalidArgument(format!(
        "arch must look like 'sm_90' (cubin) or 'compute_90' (PTX), got {arch:?}"
    )))
}

/// Compiles `SOURCE` for `target` with extra NVRTC `options` (e.g. `-Xptxas -v`), uncached.
pub fn build(target: Target, options: &[&str]) -> Result<nvrtc::Output> {
    let nv = nvrtc::get()?;
    let opts: Vec<&str> = OPTIONS.iter().chain(options).copied().collect();
    nv.compile(SOURCE, NAME, target, &opts)
}

/// PTX text for `arch` (`compute_XY`), uncached.
pub fn compile(arch: &str) -> Result<String> {
    let target = parse_arch(arch)?;
    if !matches!(target, Target::Ptx(_)) {
        return Err(Error::InvalidArgument(format!(
            "compile() returns PTX: pass compute_XY, got {arch:?}"
        )));
    }
    let out = build(target, &[])?;
    Ok(String::from_utf8_lossy(&out.code)
        .trim_end_matches('\0')
        .to_string())
}

/// The kernels for a device of compute capability `cc`, compiled at most once per process and,
/// with `cache_dir`, once per machine.
pub fn image(cc: u32, cache_dir: Option<&Path>) -> Result<Arc<Image>> {
    static MEMORY: OnceLock<Mutex<HashMap<u32, Arc<Image>>>> = OnceLock::new();
    let memory = MEMORY.get_or_init(Default::default);
    if let Some(i) = memory.lock().get(&cc) {
        return Ok(i.clone());
    }
    let target = choose_target(cc, &nvrtc::get()?.supported_archs()?)?;
    let file = match cache_dir {
        Some(dir) => Some(cache_file(dir, target)?),
        None => None,
    };
    let cached = file
        .as_ref()
        .and_then(|f| std::fs::read(f).ok())
        .filter(|c| looks_complete(target, c));
    let code = match cached {
        Some(code) => code,
        None => {
            let code = build(target, &[])?.code;
            if let Some(f) = &file {
                // A cache that cannot be written only costs a recompile next time.
                let _ = write_atomically(f, &code);
            }
            code
        }
    };
    let image = Arc::new(Image { target, code });
    memory.lock().insert(cc, image.clone());
    Ok(image)
}

/// A cached file is used only if it is plausibly whole (an interrupted writer leaves nothing,
/// since files are renamed into place, but a foreign file may sit there).
fn looks_complete(target: Target, code: &[u8]) -> bool {
    match target {
        Target::Cubin(_) => code.starts_with(b"\x7fELF"),
        Target::Ptx(_) => String::from_utf8_lossy(code).contains(MERGE),
    }
}

/// The cache file for `target`: its name changes with the source and the NVRTC version.
pub fn cache_file(dir: &Path, target: Target) -> Result<PathBuf> {
    let (major, minor) = nvrtc::get()?.version()?;
    let key = fnv1a(format!("{SOURCE}\0{major}.{minor}").as_bytes());
    Ok(dir.join(match target {
        Target::Cubin(cc) => format!("hybrid_attention-{key:016x}-sm_{cc}.cubin"),
        Target::Ptx(cc) => format!("hybrid_attention-{key:016x}-compute_{cc}.ptx"),
    }))
}

fn write_atomically(path: &Path, text: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, text)?;
    std::fs::rename(tmp, path)
}

/// A stable 64-bit hash (std's hasher may change between Rust releases).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_malformed_architectures() {
        for bad in ["compute_", "compute_x0", "90", "sm_", "sm_9"] {
            assert!(
                matches!(parse_arch(bad), Err(Error::InvalidArgument(_))),
                "{bad}"
            );
        }
        assert_eq!(parse_arch("sm_90").unwrap(), Target::Cubin(90));
        assert_eq!(parse_arch("compute_80").unwrap(), Target::Ptx(80));
        assert!(matches!(compile("sm_90"), Err(Error::InvalidArgument(_))));
    }

    #[test]
    fn a_cubin_for_the_device_and_ptx_only_for_a_device_newer_than_nvrtc() {
        let supported = [75, 80, 86, 89, 90, 100, 120];
        assert_eq!(choose_target(90, &supported).unwrap(), Target::Cubin(90));
        assert_eq!(choose_target(121, &supported).unwrap(), Target::Ptx(120));
        assert!(
            matches!(choose_target(70, &supported), Err(Error::Unavailable(m)) if m.contains("sm_70"))
        );
    }

    #[test]
    fn compiles_every_kernel_when_nvrtc_is_loadable() {
        // tests/run.sh puts torch's NVRTC on LD_LIBRARY_PATH; elsewhere this reports and stops.
        if !nvrtc::loadable() {
            assert!(matches!(compile("compute_90"), Err(Error::Unavailable(_))));
            // Straight to the stderr handle: libtest captures `eprintln!`, so the line would
            // show only with --nocapture.
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED compiles_every_kernel_when_nvrtc_is_loadable: NVRTC is not loadable, kernel compilation not \
                 exercised (put torch's nvidia/cu13/lib on LD_LIBRARY_PATH, as tests/run.sh does)"
            );
            return;
        }
        for arch in ["compute_80", "compute_90"] {
            let ptx = compile(arch).unwrap();
            for name in NAMES {
                assert!(
                    ptx.contains(&format!(".entry {name}")),
                    "{name} missing from the {arch} PTX"
                );
            }
        }
        let dir = std::env::temp_dir().join(format!("hybridgen-kernels-{}", std::process::id()));
        let first = image(90, Some(&dir)).unwrap();
        assert_eq!(first.target, Target::Cubin(90));
        assert!(first.code.starts_with(b"\x7fELF"), "sm_90 gives a cubin");
        assert!(cache_file(&dir, Target::Cubin(90)).unwrap().is_file());
        assert_eq!(first, image(90, Some(&dir)).unwrap());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn hash_is_stable() {
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
