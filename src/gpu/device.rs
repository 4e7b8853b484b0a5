//! One `Gpu` per device: the primary context (the one torch uses), the compiled kernels, and
//! launches on a stream handed in by the caller (torch's current stream), so kernels are ordered
//! with the model's own work without any synchronisation.
//!
//! The context is all that page-locking and stream ordering need; the kernels are compiled and
//! loaded only at the first launch, so a compiler problem can never take pinning with it (a cache
//! with `kernels="torch"` works without NVRTC).
//!
//! Tensors arrive as raw device pointers plus shapes and strides already checked by the binding
//! (`py::gpu`); the launchers only check what the kernels themselves assume.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use std::path::PathBuf;

use cudarc::driver::{
    sys, CudaContext, CudaFunction, CudaModule, DriverError, LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::Ptx;
use parking_lot::Mutex;

use super::nvrtc::Target;
use super::{cuda_err, kernels, launch, probe};
use crate::dtype::DType;
use crate::ensure;
use crate::error::{Error, Result};

/// Threads per block of `split_attention` (must match `WARPS * 32` in the source, its launch
/// bound; tests/kernel_abi.rs holds them equal). The rest of the geometry is in `launch`.
pub(crate) const SPLIT_THREADS: u32 = 128;
/// Largest head_dim the kernels take (the source's `MAX_HEAD_DIM`: its register arrays and
/// shared memory are sized for it).
pub const MAX_HEAD_DIM: usize = 256;

pub struct Gpu {
    ctx: Arc<CudaContext>,
    /// Loaded at the first launch (`functions`); a failure is not kept, so it is retried.
    loaded: Mutex<Option<Arc<Functions>>>,
    /// Where compiled kernels are kept; set by the first caller that names one, as long as the
    /// kernels are not loaded yet (a caller that only orders streams names none).
    cache_dir: Mutex<Option<PathBuf>>,
    /// `sm_XY` of the device.
    pub arch: String,
    pub compute_capability: u32,
    pub sm_count: u32,
}

/// The kernels of one loaded module.
pub struct Functions {
    _module: Arc<CudaModule>,
    split: [CudaFunction; 3],
    merge: CudaFunction,
    /// What was loaded: the device's cubin, or PTX the driver compiled.
    pub target: Target,
}

/// The arguments of `split_attention` (see kernels/hybrid_attention.cu), as device pointers.
#[derive(Clone, Copy, Debug)]
pub struct SplitArgs {
    pub dtype: DType,
    pub batch: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub q: u64,
    pub dev_k: u64,
    pub dev_v: u64,
    pub dev_batch_stride: i64,
    pub dev_head_stride: i64,
    /// 0: no mask.
    pub dev_mask: u64,
    pub n_dev: usize,
    pub sinks: usize,
    /// 0 when `m == 0`.
    pub host_logits: u64,
    pub host_v: u64,
    pub m: usize,
    pub host_grouped: bool,
    pub scale: f32,
    pub splits: usize,
    pub part_o: u64,
    pub part_lse: u64,
}

/// The arguments of `merge_partials`.
#[derive(Clone, Copy, Debug)]
pub struct MergeArgs {
    pub rows: usize,
    pub head_dim: usize,
    pub splits: usize,
    pub part_o: u64,
    pub part_lse: u64,
    /// 0: no CPU partial.
    pub host_o: u64,
    pub host_lse: u64,
    pub out: u64,
    /// 0: log-sum-exp not wanted.
    pub out_lse: u64,
}

impl Gpu {
    /// The `Gpu` of device `ordinal` (its context), created on first use. `cache_dir` is where
    /// compiled kernels are kept across processes (the first caller's choice is used).
    pub fn get(ordinal: usize, cache_dir: Option<&Path>) -> Result<Arc<Gpu>> {
        static GPUS: OnceLock<Mutex<HashMap<usize, Arc<Gpu>>>> = OnceLock::new();
        let gpus = GPUS.get_or_init(Default::default);
        let mut map = gpus.lock();
        if let Some(g) = map.get(&ordinal) {
            if let Some(dir) = cache_dir {
                g.cache_dir.lock().get_or_insert_with(|| dir.to_path_buf());
            }
            return Ok(g.clone());
        }
        probe::require_device(ordinal)?;
        // Creating a context makes it current: put back whatever this thread had.
        let previous = cudarc::driver::result::ctx::get_current()
            .map_err(cuda_err("reading the current CUDA context"))?;
        let restore = RestoreContext { previous };
        let ctx = CudaContext::new(ordinal).map_err(cuda_err("creating the CUDA context"))?;
        // Raw pointers only: cudarc's per-allocation event tracking has nothing to track.
        // SAFETY: no cudarc-owned allocations are ever made through this context.
        unsafe { ctx.disable_event_tracking() };
        let (major, minor) = ctx
            .compute_capability()
            .map_err(cuda_err("reading the compute capability"))?;
        let sm_count = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(cuda_err("reading the SM count"))? as u32;
        let compute_capability = (major * 10 + minor) as u32;
        let gpu = Arc::new(Gpu {
            ctx,
            loaded: Mutex::new(None),
            cache_dir: Mutex::new(cache_dir.map(Path::to_path_buf)),
            arch: format!("sm_{compute_capability}"),
            compute_capability,
            sm_count,
        });
        map.insert(ordinal, gpu.clone());
        drop(restore);
        Ok(gpu)
    }

    /// Makes this device's context current for the caller's scope; the returned guard puts
    /// back the context the thread had before (torch's current device may be another GPU), so
    /// no core call leaves the thread on a different device than it found it.
    pub fn enter(&self) -> Result<RestoreContext> {
        let previous = cudarc::driver::result::ctx::get_current()
            .map_err(cuda_err("reading the current CUDA context"))?;
        self.ctx
            .bind_to_thread()
            .map_err(cuda_err("binding the CUDA context"))?;
        Ok(RestoreContext { previous })
    }

    /// The kernels, compiled (or read from the cache) and loaded on first use.
    pub fn functions(&self) -> Result<Arc<Functions>> {
        let mut loaded = self.loaded.lock();
        if let Some(f) = loaded.as_ref() {
            return Ok(f.clone());
        }
        let cache_dir = self.cache_dir.lock().clone();
        let image = kernels::image(self.compute_capability, cache_dir.as_deref())?;
        let _current = self.enter()?;
        let module = self
            .ctx
            .load_module(Ptx::from_binary(image.code.clone()))
            .map_err(|e| load_error(e, image.target, &self.arch))?;
        let function = |name: &str| module.load_function(name).map_err(cuda_err(name));
        let f = Arc::new(Functions {
            split: [
                function(kernels::SPLIT_F16)?,
                function(kernels::SPLIT_BF16)?,
                function(kernels::SPLIT_F32)?,
            ],
            merge: function(kernels::MERGE)?,
            _module: module,
            target: image.target,
        });
        *loaded = Some(f.clone());
        Ok(f)
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// Launches `split_attention` on `stream` (a `CUstream`, e.g. torch's current stream).
    ///
    /// # Safety
    /// Every pointer must be a live device allocation of the described shape on this device, and
    /// `stream` a live stream of this context; the outputs must not be read before the stream
    /// reaches the kernel.
    pub unsafe fn split_attention(&self, stream: u64, a: &SplitArgs) -> Result<()> {
        ensure!(
            a.sinks <= a.n_dev,
            "sinks ({}) exceed the device tokens ({})",
            a.sinks,
            a.n_dev
        );
        ensure!(
            a.m == 0 || (a.host_logits != 0 && a.host_v != 0),
            "host logits and values are required when m > 0"
        );
        let geo = launch::split_attention(
            a.batch,
            a.q_heads,
            a.kv_heads,
            a.head_dim,
            a.n_dev + a.m,
            a.splits,
        )?;
        if geo.launch.is_empty() {
            return Ok(());
        }
        let functions = self.functions()?;
        let func = &functions.split[match a.dtype {
            DType::F16 => 0,
            DType::BF16 => 1,
            DType::F32 => 2,
        }];
        let to_i32 = |name: &str, v: usize| -> Result<i32> {
            i32::try_from(v).map_err(|_| {
                Error::InvalidArgument(format!(
                    "{name} ({v}) does not fit the kernel's 32-bit index"
                ))
            })
        };
        let (n_dev, sinks, m) = (
            to_i32("n_dev", a.n_dev)?,
            to_i32("sinks", a.sinks)?,
            to_i32("m", a.m)?,
        );
        let (hq, hkv, d) = (
            to_i32("q_heads", a.q_heads)?,
            to_i32("kv_heads", a.kv_heads)?,
            to_i32("head_dim", a.head_dim)?,
        );
        let tps = to_i32("tokens per split", geo.tokens_per_split)?;
        let grouped = a.host_grouped as i32;
        let cfg = LaunchConfig {
            grid_dim: geo.launch.grid,
            block_dim: geo.launch.block,
            shared_mem_bytes: geo.launch.shared_mem_bytes,
        };
        let _current = self.enter()?; // the launch binds the context; put the caller's back
        let s = self
            .ctx
            .wrap_borrowed_stream(stream as cudarc::driver::sys::CUstream);
        let mut launch = s.launch_builder(func);
        launch
            .arg(&a.q)
            .arg(&a.dev_k)
            .arg(&a.dev_v)
            .arg(&a.dev_batch_stride)
            .arg(&a.dev_head_stride)
            .arg(&a.dev_mask)
            .arg(&n_dev)
            .arg(&sinks)
            .arg(&a.host_logits)
            .arg(&a.host_v)
            .arg(&m)
            .arg(&grouped)
            .arg(&hq)
            .arg(&hkv)
            .arg(&d)
            .arg(&a.scale)
            .arg(&tps)
            .arg(&a.part_o)
            .arg(&a.part_lse);
        launch
            .launch(cfg)
            .map_err(cuda_err("launching split_attention"))?;
        Ok(())
    }

    /// Launches `merge_partials` on `stream`.
    ///
    /// # Safety
    /// As for [`Gpu::split_attention`].
    pub unsafe fn merge_partials(&self, stream: u64, a: &MergeArgs) -> Result<()> {
        let geo = launch::merge_partials(a.rows, a.head_dim, a.splits)?;
        if geo.is_empty() {
            return Ok(());
        }
        ensure!(
            a.splits <= i32::MAX as usize,
            "too many partials per row: {}",
            a.splits
        );
        let (splits, d) = (a.splits as i32, a.head_dim as i32);
        let cfg = LaunchConfig {
            grid_dim: geo.grid,
            block_dim: geo.block,
            shared_mem_bytes: geo.shared_mem_bytes,
        };
        let functions = self.functions()?;
        let _current = self.enter()?; // the launch binds the context; put the caller's back
        let s = self
            .ctx
            .wrap_borrowed_stream(stream as cudarc::driver::sys::CUstream);
        let mut launch = s.launch_builder(&functions.merge);
        launch
            .arg(&a.part_o)
            .arg(&a.part_lse)
            .arg(&splits)
            .arg(&a.host_o)
            .arg(&a.host_lse)
            .arg(&d)
            .arg(&a.out)
            .arg(&a.out_lse);
        launch
            .launch(cfg)
            .map_err(cuda_err("launching merge_partials"))?;
        Ok(())
    }
}

/// Makes `consumer` wait for the work queued on `producer` so far (an event, no host
/// synchronisation), both streams of device `ordinal` (0 = the legacy default stream).
///
/// # Safety
/// Both must be live streams of the device's primary context.
pub unsafe fn order_after(ordinal: usize, producer: u64, consumer: u64) -> Result<()> {
    let gpu = Gpu::get(ordinal, None)?;
    let _current = gpu.enter()?;
    let mut event: sys::CUevent = std::ptr::null_mut();
    // SAFETY: the context is current; the event is created, recorded, waited on and released
    // here (destroying an event with a wait still queued is allowed: the driver keeps it until
    // the wait completes).
    unsafe {
        sys::cuEventCreate(
            &mut event,
            sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32,
        )
        .result()
        .map_err(cuda_err("creating a CUDA event"))?;
        let ordered = sys::cuEventRecord(event, producer as sys::CUstream)
            .result()
            .and_then(|_| sys::cuStreamWaitEvent(consumer as sys::CUstream, event, 0).result());
        let _ = sys::cuEventDestroy_v2(event).result();
        ordered.map_err(cuda_err(
            "ordering the kernels' stream after the tensor producer's",
        ))
    }
}

/// The context a thread had before a core call made its own current; restored on drop.
#[must_use = "the previous context is restored when this is dropped"]
pub struct RestoreContext {
    previous: Option<sys::CUcontext>,
}

impl Drop for RestoreContext {
    fn drop(&mut self) {
        let previous = self.previous.unwrap_or(std::ptr::null_mut());
        // SAFETY: `previous` was current on this thread when the guard was made (or null: no
        // context); the primary contexts the core uses are retained for the process's life, and
        // another context the caller made current is theirs to keep alive while it is current.
        let _ = unsafe { cudarc::driver::result::ctx::set_current(previous) };
    }
}

/// A module load failure, with the reason a driver refuses PTX when that is what happened.
fn load_error(e: DriverError, target: Target, arch: &str) -> Error {
    let mut context = format!(
        "loading the hybrid attention kernels ({}) on {arch}",
        target.option()
    );
    if let Target::Ptx(_) = target {
        let mut driver: std::ffi::c_int = 0;
        // SAFETY: writes one int; the driver is initialised (a context exists).
        let _ = unsafe { sys::cuDriverGetVersion(&mut driver) };
        let nvrtc = super::nvrtc::get()
            .and_then(|n| n.version())
            .map(|(a, b)| format!("{a}.{b}"))
            .unwrap_or_default();
        context.push_str(&format!(
            ": this GPU is newer than NVRTC {nvrtc}, so the kernels went to the driver as PTX; a driver \
             older than the compiler refuses its PTX (driver CUDA version {}.{}). Update the driver, or use \
             an NVRTC at most as new as the driver (HYBRIDGEN_NVRTC=/path/to/libnvrtc.so.X)",
            driver / 1000,
            (driver % 1000) / 10
        ));
    }
    Error::Cuda { context, source: e }
}

/// How many slices to split each row's tokens into, for `rows` blocks per slice: enough blocks
/// for one full wave on `sm_count` SMs, never slices shorter than `min_tokens` (see
/// [`launch::splits_for`]; [`launch::split_count`] applies it to a `split_attention` launch).
pub fn choose_splits(rows: usize, tokens: usize, sm_count: u32, min_tokens: usize) -> usize {
    launch::splits_for(rows, tokens, sm_count, min_tokens)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_fill_the_device_without_tiny_slices() {
        assert_eq!(choose_splits(32, 100, 132, 64), 2); // short: limited by work
        assert_eq!(choose_splits(8, 1 << 17, 132, 64), 66); // long, batch 1: one wave of 4 blocks per SM
        assert_eq!(choose_splits(4096, 1 << 17, 132, 64), 1); // many rows already fill it
        assert_eq!(choose_splits(1, 0, 132, 64), 1);
    }

    #[test]
    fn reports_unavailable_without_a_device() {
        if probe::probe().available() {
            return;
        }
        match Gpu::get(0, None) {
            Err(Error::Unavailable(msg)) => assert!(!msg.is_empty()),
            Err(e) => panic!("expected Unavailable, got {e}"),
            Ok(_) => panic!("a Gpu without CUDA"),
        }
    }
}
