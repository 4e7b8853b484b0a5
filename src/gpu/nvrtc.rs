//! NVRTC, loaded by the core itself (`dlopen`), so the core decides *which* NVRTC compiles the
//! kernels. cudarc looks for the unversioned `libnvrtc.so` first, which lets a system CUDA
//! toolkit on the library path win over the NVRTC that torch ships and was built against; a
//! compiler newer than the driver then produces code the driver refuses.
//!
//! Search order (first that loads wins, fixed for the process once found):
//! 1. `HYBRIDGEN_NVRTC`: an explicit path (then nothing else: a path that does not load is an
//!    error naming it, not a silent fallback);
//! 2. paths registered with [`prefer`] (the Python package registers torch's own
//!    `nvidia/cu13/lib/libnvrtc.so.13` before compiling);
//! 3. versioned names on the library path: `libnvrtc.so.13`, then `.12`;
//! 4. the unversioned `libnvrtc.so` (a toolkit's development link) last.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::sync::OnceLock;

use parking_lot::Mutex;

use crate::error::{Error, Result};

type Program = *mut c_void;
type Status = c_int;

/// The entry points the core uses, resolved from one loaded library.
pub struct Nvrtc {
    /// The file name or path the library was loaded from.
    pub source: String,
    version: VersionFn,
    error_string: ErrorStringFn,
    create: CreateFn,
    compile: CompileFn,
    destroy: DestroyFn,
    log_size: SizeFn,
    log: BytesFn,
    ptx_size: SizeFn,
    ptx: BytesFn,
    cubin_size: SizeFn,
    cubin: BytesFn,
    num_archs: ArchsFn,
    archs: ArchsFn,
}

// The C signatures of the NVRTC functions used (nvrtc.h, stable since CUDA 11).
type VersionFn = unsafe extern "C" fn(*mut c_int, *mut c_int) -> Status;
type ErrorStringFn = unsafe extern "C" fn(Status) -> *const c_char;
type CreateFn = unsafe extern "C" fn(
    *mut Program,
    *const c_char,
    *const c_char,
    c_int,
    *const *const c_char,
    *const *const c_char,
) -> Status;
type CompileFn = unsafe extern "C" fn(Program, c_int, *const *const c_char) -> Status;
type DestroyFn = unsafe extern "C" fn(*mut Program) -> Status;
/// `nvrtcGetProgramLogSize`, `nvrtcGetPTXSize`, `nvrtcGetCUBINSize`.
type SizeFn = unsafe extern "C" fn(Program, *mut usize) -> Status;
/// `nvrtcGetProgramLog`, `nvrtcGetPTX`, `nvrtcGetCUBIN`.
type BytesFn = unsafe extern "C" fn(Program, *mut c_char) -> Status;
type ArchsFn = unsafe extern "C" fn(*mut c_int) -> Status;

// SAFETY: NVRTC's API is thread-safe (each program object is used by one call sequence here) and
// the function pointers point into a library that is never unloaded.
unsafe impl Send for Nvrtc {}
unsafe impl Sync for Nvrtc {}

/// What a compilation produced.
pub struct Output {
    pub code: Vec<u8>,
    /// The compiler's log (warnings; ptxas statistics with `-Xptxas -v`).
    pub log: String,
}

/// Whether to ask NVRTC for machine code for one GPU or for portable PTX.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// `sm_XY`: a cubin the driver loads as is (no JIT, no PTX version check).
    Cubin(u32),
    /// `compute_XY`: PTX the driver JIT-compiles, only if it is at least as new as NVRTC.
    Ptx(u32),
}

impl Target {
    /// `sm_XY` or `compute_XY`.
    pub fn name(self) -> String {
        match self {
            Target::Cubin(cc) => format!("sm_{cc}"),
            Target::Ptx(cc) => format!("compute_{cc}"),
        }
    }

    pub fn option(self) -> String {
        format!("--gpu-architecture={}", self.name())
    }
}

static PREFERRED: Mutex<Vec<String>> = Mutex::new(Vec::new());
static LOADED: OnceLock<Nvrtc> = OnceLock::new();

/// Puts `path` ahead of the library-path search (not ahead of `HYBRIDGEN_NVRTC`). No effect once
/// an NVRTC has been loaded.
pub fn prefer(path: &str) {
    let mut list = PREFERRED.lock();
    if !list.iter().any(|p| p == path) {
        list.push(path.to_string());
    }
}

fn candidates() -> Vec<String> {
    if let Some(explicit) = std::env::var("HYBRIDGEN_NVRTC")
        .ok()
        .filter(|p| !p.is_empty())
    {
        return vec![explicit];
    }
    let mut names: Vec<String> = PREFERRED.lock().clone();
    names.extend(["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"].map(String::from));
    names
}

/// The NVRTC this process compiles with, loading it on first success. Not cached on failure:
/// importing torch (which makes its NVRTC known) can make a later call succeed.
pub fn get() -> Result<&'static Nvrtc> {
    if let Some(n) = LOADED.get() {
        return Ok(n);
    }
    let tried = candidates();
    for name in &tried {
        if let Some(n) = load(name) {
            return Ok(LOADED.get_or_init(|| n));
        }
    }
    if std::env::var("HYBRIDGEN_NVRTC").is_ok_and(|p| !p.is_empty()) {
        return Err(Error::Unavailable(format!(
            "HYBRIDGEN_NVRTC={} is not a loadable NVRTC library: {}",
            tried[0],
            dl_error()
        )));
    }
    Err(Error::Unavailable(format!(
        "{} (tried: {})",
        super::probe::NVRTC_MISSING,
        tried.join(", ")
    )))
}

/// The dynamic linker's last error message.
fn dl_error() -> String {
    // SAFETY: dlerror returns null or a NUL-terminated string valid until the next dl* call.
    let e = unsafe { libc::dlerror() };
    if e.is_null() {
        "it lacks NVRTC's functions".to_string()
    } else {
        // SAFETY: non-null, NUL-terminated (above).
        unsafe { CStr::from_ptr(e) }.to_string_lossy().into_owned()
    }
}

/// Whether some NVRTC can be loaded.
pub fn loadable() -> bool {
    get().is_ok()
}

fn load(name: &str) -> Option<Nvrtc> {
    let cname = CString::new(name).ok()?;
    // SAFETY: dlopen with a NUL-terminated name; a null result only means "not found". The handle
    // is deliberately never closed: the function pointers below live as long as the process.
    let handle = unsafe { libc::dlopen(cname.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if handle.is_null() {
        return None;
    }
    macro_rules! sym {
        ($name:literal, $ty:ty) => {{
            // SAFETY: the symbol name is NUL-terminated; a missing symbol gives null, refused below.
            let p = unsafe { libc::dlsym(handle, concat!($name, "\0").as_ptr().cast()) };
            if p.is_null() {
                return None;
            }
            // SAFETY: the symbol is NVRTC's function of that name; its C signature is the one of
            // the field it is stored in, `$ty` (nvrtc.h, stable since CUDA 11).
            unsafe { std::mem::transmute::<*mut c_void, $ty>(p) }
        }};
    }
    Some(Nvrtc {
        source: name.to_string(),
        version: sym!("nvrtcVersion", VersionFn),
        error_string: sym!("nvrtcGetErrorString", ErrorStringFn),
        create: sym!("nvrtcCreateProgram", CreateFn),
        compile: sym!("nvrtcCompileProgram", CompileFn),
        destroy: sym!("nvrtcDestroyProgram", DestroyFn),
        log_size: sym!("nvrtcGetProgramLogSize", SizeFn),
        log: sym!("nvrtcGetProgramLog", BytesFn),
        ptx_size: sym!("nvrtcGetPTXSize", SizeFn),
        ptx: sym!("nvrtcGetPTX", BytesFn),
        cubin_size: sym!("nvrtcGetCUBINSize", SizeFn),
        cubin: sym!("nvrtcGetCUBIN", BytesFn),
        num_archs: sym!("nvrtcGetNumSupportedArchs", ArchsFn),
        archs: sym!("nvrtcGetSupportedArchs", ArchsFn),
    })
}

impl Nvrtc {
    fn check(
        &self,
        status: Status,
        context: impl FnOnce() -> String,
        log: Option<String>,
    ) -> Result<()> {
        if status == 0 {
            return Ok(());
        }
        // SAFETY: nvrtcGetErrorString returns a static string for any status.
        let message = unsafe { CStr::from_ptr((self.error_string)(status)) }
            .to_string_lossy()
            .into_owned();
        Err(Error::Nvrtc {
            context: context(),
            code: status,
            message,
            log,
        })
    }

    /// `(major, minor)`.
    pub fn version(&self) -> Result<(i32, i32)> {
        let (mut major, mut minor) = (0, 0);
        // SAFETY: writes two ints.
        self.check(
            unsafe { (self.version)(&mut major, &mut minor) },
            || "nvrtcVersion".into(),
            None,
        )?;
        Ok((major, minor))
    }

    /// The `sm_XY` numbers (e.g. 90) this NVRTC can generate code for.
    pub fn supported_archs(&self) -> Result<Vec<u32>> {
        let mut n: c_int = 0;
        // SAFETY: writes one int.
        self.check(
            unsafe { (self.num_archs)(&mut n) },
            || "nvrtcGetNumSupportedArchs".into(),
            None,
        )?;
        let mut archs = vec![0 as c_int; n.max(0) as usize];
        // SAFETY: `archs` has room for the `n` ints NVRTC reported.
        self.check(
            unsafe { (self.archs)(archs.as_mut_ptr()) },
            || "nvrtcGetSupportedArchs".into(),
            None,
        )?;
        Ok(archs.into_iter().map(|a| a as u32).collect())
    }

    /// Compiles `source` (named `name` in messages) for `target` with extra `options`.
    pub fn compile(
        &self,
        source: &str,
        name: &str,
        target: Target,
        options: &[&str],
    ) -> Result<Output> {
        let what = || {
            format!(
                "NVRTC ({}) compiling {name} with {}",
                self.source,
                target.option()
            )
        };
        let src = CString::new(source)
            .map_err(|_| Error::InvalidArgument("kernel source contains NUL".into()))?;
        let cname = CString::new(name)
            .map_err(|_| Error::InvalidArgument("kernel name contains NUL".into()))?;
        let mut opts: Vec<CString> = vec![CString::new(target.option()).unwrap()];
        for o in options {
            opts.push(
                CString::new(*o).map_err(|_| {
                    Error::InvalidArgument(format!("NVRTC option {o:?} contains NUL"))
                })?,
            );
        }
        let opt_ptrs: Vec<*const c_char> = opts.iter().map(|o| o.as_ptr()).collect();
        let mut prog: Program = std::ptr::null_mut();
        // SAFETY: all strings are NUL-terminated and outlive the call; no headers are passed.
        let created = unsafe {
            (self.create)(
                &mut prog,
                src.as_ptr(),
                cname.as_ptr(),
                0,
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        self.check(created, what, None)?;
        let result = (|| {
            // SAFETY: `prog` is the live program created above; the option array outlives the call.
            let compiled =
                unsafe { (self.compile)(prog, opt_ptrs.len() as c_int, opt_ptrs.as_ptr()) };
            let log = self
                .read(prog, self.log_size, self.log)
                .map(|b| text(&b))
                .unwrap_or_default();
            self.check(compiled, what, Some(log.clone()))?;
            let code = match target {
                Target::Cubin(_) => self.read(prog, self.cubin_size, self.cubin)?,
                Target::Ptx(_) => self.read(prog, self.ptx_size, self.ptx)?,
            };
            Ok(Output { code, log })
        })();
        // SAFETY: destroys the program created above, exactly once.
        unsafe { (self.destroy)(&mut prog) };
        result
    }

    fn read(
        &self,
        prog: Program,
        size: unsafe extern "C" fn(Program, *mut usize) -> Status,
        get: unsafe extern "C" fn(Program, *mut c_char) -> Status,
    ) -> Result<Vec<u8>> {
        let mut n = 0usize;
        // SAFETY: `prog` is live; writes one size_t.
        self.check(
            unsafe { size(prog, &mut n) },
            || "NVRTC output size".into(),
            None,
        )?;
        let mut buf = vec![0u8; n];
        // SAFETY: `buf` has the `n` bytes NVRTC asked for.
        self.check(
            unsafe { get(prog, buf.as_mut_ptr().cast()) },
            || "NVRTC output".into(),
            None,
        )?;
        Ok(buf)
    }
}

/// NVRTC's NUL-terminated text output as a string.
fn text(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).trim().to_string()
}
