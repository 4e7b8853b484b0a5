//! Bindings of `crate::gpu`: the CUDA probe, NVRTC compilation, the two attention kernels on
//! CUDA tensors (DLPack, launched on the caller's stream), and pinned host buffers.

use super::errors::run_core;
use std::path::PathBuf;
use std::sync::Arc;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::cuda_tensor::{same_device, ConsumerStream, CudaTensor};
use super::export::export_strips;
use super::tensor::Elem;
use crate::dtype::DType;
use crate::gpu::{self, Gpu, MergeArgs, PinnedBuffer, SplitArgs};

/// What CUDA this process can use: `{"available", "driver", "nvrtc", "devices", "reason"}`.
#[pyfunction]
fn cuda_probe(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let p = py.detach(gpu::probe);
    let d = PyDict::new(py);
    d.set_item("available", p.available())?;
    d.set_item("driver", p.driver)?;
    d.set_item("nvrtc", p.nvrtc)?;
    d.set_item("devices", p.devices)?;
    d.set_item("reason", p.reason)?;
    Ok(d)
}

/// The CUDA source of the kernels (built into the library).
#[pyfunction]
fn kernel_source() -> &'static str {
    gpu::kernels::SOURCE
}

/// Compiles the kernels for ``arch`` (``"sm_90"``: cubin, ``"compute_90"``: PTX) with extra
/// NVRTC ``options`` (e.g. ``["-Xptxas", "-v"]``), uncached: ``{"code": bytes, "log": str}``.
/// Needs NVRTC only, not a GPU.
#[pyfunction]
#[pyo3(signature = (arch, options=None))]
fn compile_kernels<'py>(
    py: Python<'py>,
    arch: &str,
    options: Option<Vec<String>>,
) -> PyResult<Bound<'py, PyDict>> {
    let target = gpu::kernels::parse_arch(arch)?;
    let options = options.unwrap_or_default();
    let out = run_core(py, || {
        gpu::kernels::build(
            target,
            &options.iter().map(String::as_str).collect::<Vec<_>>(),
        )
    })?;
    let d = PyDict::new(py);
    d.set_item("code", pyo3::types::PyBytes::new(py, &out.code))?;
    d.set_item("log", out.log)?;
    Ok(d)
}

/// The kernels a device of compute capability ``cc`` (e.g. 90) would load, as the loader gets
/// them (cached in memory and, with ``cache_dir``, on disk): ``{"target": "sm_90" or
/// "compute_XY", "code": bytes}``.
#[pyfunction]
#[pyo3(signature = (cc, cache_dir=None))]
fn kernel_image<'py>(
    py: Python<'py>,
    cc: u32,
    cache_dir: Option<PathBuf>,
) -> PyResult<Bound<'py, PyDict>> {
    let image = run_core(py, || gpu::kernels::image(cc, cache_dir.as_deref()))?;
    let d = PyDict::new(py);
    d.set_item("target", image.target.name())?;
    d.set_item("code", pyo3::types::PyBytes::new(py, &image.code))?;
    Ok(d)
}

/// Puts the NVRTC library at ``path`` ahead of the library-path search (see ``nvrtc_info``).
#[pyfunction]
fn prefer_nvrtc(path: &str) {
    gpu::nvrtc::prefer(path)
}

/// The NVRTC the kernels are compiled with: ``{"path", "version", "archs"}`` (loads it), or
/// raises ``CudaUnavailableError`` saying what was tried.
#[pyfunction]
fn nvrtc_info(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let (path, version, archs) = run_core(py, || -> crate::Result<_> {
        let n = gpu::nvrtc::get()?;
        Ok((n.source.clone(), n.version()?, n.supported_archs()?))
    })?;
    let d = PyDict::new(py);
    d.set_item("path", path)?;
    d.set_item("version", format!("{}.{}", version.0, version.1))?;
    d.set_item("archs", archs)?;
    Ok(d)
}

/// Opens device ``device`` (its context; no compilation); returns ``{"arch", "sm_count"}``.
#[pyfunction]
#[pyo3(signature = (device, cache_dir=None))]
fn cuda_device_info(
    py: Python<'_>,
    device: usize,
    cache_dir: Option<PathBuf>,
) -> PyResult<Bound<'_, PyDict>> {
    let g = run_core(py, || Gpu::get(device, cache_dir.as_deref()))?;
    let d = PyDict::new(py);
    d.set_item("arch", g.arch.clone())?;
    d.set_item("sm_count", g.sm_count)?;
    Ok(d)
}

/// Compiles (or reads from the cache) and loads the kernels on device ``device``; returns the
/// target loaded (``"sm_XY"``, or ``"compute_XY"`` PTX for a GPU newer than NVRTC).
#[pyfunction]
#[pyo3(signature = (device, cache_dir=None))]
fn load_kernels(py: Python<'_>, device: usize, cache_dir: Option<PathBuf>) -> PyResult<String> {
    let f = run_core(py, || Gpu::get(device, cache_dir.as_deref())?.functions())?;
    Ok(f.target.name())
}

fn elem_of(dtype: &str) -> PyResult<(Elem, DType)> {
    let dt = DType::parse(dtype).map_err(PyErr::from)?;
    Ok((Elem::of(dt), dt))
}

/// Launches ``split_attention`` (kernels/hybrid_attention.cu) on ``stream``.
///
/// ``q [b, hq, d]`` contiguous; ``dev_k``/``dev_v [b, hkv, n_dev, d]`` with contiguous rows and
/// equal strides; ``dev_mask`` uint8 ``[b, n_dev]`` (1 = ignore) or None; ``host_logits``
/// float32 ``[b, hq, m]`` and ``host_v [b, hq or hkv, m, d]`` contiguous, or both None;
/// ``part_o`` float32 ``[b * hq, splits, d]``, ``part_lse`` float32 ``[b * hq, splits]``.
#[pyfunction]
#[pyo3(signature = (q, dev_k, dev_v, dev_mask, sinks, host_logits, host_v, scale, part_o, part_lse, stream, cache_dir=None))]
#[allow(clippy::too_many_arguments)]
fn split_attention(
    py: Python<'_>,
    q: &Bound<'_, PyAny>,
    dev_k: &Bound<'_, PyAny>,
    dev_v: &Bound<'_, PyAny>,
    dev_mask: Option<&Bound<'_, PyAny>>,
    sinks: usize,
    host_logits: Option<&Bound<'_, PyAny>>,
    host_v: Option<&Bound<'_, PyAny>>,
    scale: f32,
    part_o: &Bound<'_, PyAny>,
    part_lse: &Bound<'_, PyAny>,
    stream: u64,
    cache_dir: Option<PathBuf>,
) -> PyResult<()> {
    let on = ConsumerStream(stream);
    let dtype_name: String = q.getattr("dtype")?.str()?.to_string();
    let (elem, dtype) = elem_of(dtype_name.trim_start_matches("torch."))?;
    let q = CudaTensor::import(q, "q", elem, &[None, None, None], &on)?;
    q.require_contiguous("q")?;
    let (b, hq, d) = (q.shape[0], q.shape[1], q.shape[2]);
    let k = CudaTensor::import(dev_k, "dev_k", elem, &[Some(b), None, None, Some(d)], &on)?;
    let (hkv, n_dev) = (k.shape[1], k.shape[2]);
    let v = CudaTensor::import(
        dev_v,
        "dev_v",
        elem,
        &[Some(b), Some(hkv), Some(n_dev), Some(d)],
        &on,
    )?;
    if hkv == 0 || hq % hkv != 0 {
        return Err(PyValueError::new_err(format!(
            "query heads ({hq}) must be a multiple of KV heads ({hkv})"
        )));
    }
    let rows_ok =
        |t: &CudaTensor| (d <= 1 || t.strides[3] == 1) && (n_dev <= 1 || t.strides[2] == d);
    if !rows_ok(&k) || !rows_ok(&v) || k.strides[..2] != v.strides[..2] {
        return Err(PyValueError::new_err(format!(
            "dev_k/dev_v must have contiguous rows and the same strides (got {:?} and {:?})",
            k.strides, v.strides
        )));
    }
    let mask = dev_mask
        .map(|m| CudaTensor::import(m, "dev_mask", Elem::U8, &[Some(b), Some(n_dev)], &on))
        .transpose()?;
    if let Some(m) = &mask {
        m.require_contiguous("dev_mask")?;
    }
    let (logits, hv, m, grouped) = match (host_logits, host_v) {
        (Some(l), Some(hv)) => {
            let l =
                CudaTensor::import(l, "host_logits", Elem::F32, &[Some(b), Some(hq), None], &on)?;
            l.require_contiguous("host_logits")?;
            let m = l.shape[2];
            let hv =
                CudaTensor::import(hv, "host_v", elem, &[Some(b), None, Some(m), Some(d)], &on)?;
            hv.require_contiguous("host_v")?;
            let grouped = match hv.shape[1] {
                h if h == hkv => true,
                h if h == hq => false,
                h => {
                    return Err(PyValueError::new_err(format!(
                        "host_v has {h} heads; expected {hkv} (KV) or {hq} (query)"
                    )))
                }
            };
            (Some(l), Some(hv), m, grouped)
        }
        (None, None) => (None, None, 0, false),
        _ => {
            return Err(PyValueError::new_err(
                "host_logits and host_v go together: pass both or neither",
            ))
        }
    };
    if sinks > n_dev {
        return Err(PyValueError::new_err(format!(
            "sinks ({sinks}) exceed the device tokens ({n_dev})"
        )));
    }
    let po = CudaTensor::import(
        part_o,
        "part_o",
        Elem::F32,
        &[Some(b * hq), None, Some(d)],
        &on,
    )?;
    po.require_contiguous("part_o")?;
    let splits = po.shape[1];
    let pl = CudaTensor::import(
        part_lse,
        "part_lse",
        Elem::F32,
        &[Some(b * hq), Some(splits)],
        &on,
    )?;
    pl.require_contiguous("part_lse")?;
    let mut all = vec![
        ("q", &q),
        ("dev_k", &k),
        ("dev_v", &v),
        ("part_o", &po),
        ("part_lse", &pl),
    ];
    for (name, t) in [
        ("dev_mask", &mask),
        ("host_logits", &logits),
        ("host_v", &hv),
    ] {
        if let Some(t) = t {
            all.push((name, t));
        }
    }
    same_device(q.device, &all)?;
    let args = SplitArgs {
        dtype,
        batch: b,
        q_heads: hq,
        kv_heads: hkv,
        head_dim: d,
        q: q.ptr,
        dev_k: k.ptr,
        dev_v: v.ptr,
        dev_batch_stride: k.strides[0] as i64,
        dev_head_stride: k.strides[1] as i64,
        dev_mask: mask.as_ref().map_or(0, |t| t.ptr),
        n_dev,
        sinks,
        host_logits: logits.as_ref().map_or(0, |t| t.ptr),
        host_v: hv.as_ref().map_or(0, |t| t.ptr),
        m,
        host_grouped: grouped,
        scale,
        splits,
        part_o: po.ptr,
        part_lse: pl.ptr,
    };
    let device = q.device;
    run_core(py, || {
        let g = Gpu::get(device, cache_dir.as_deref())?;
        // SAFETY: every pointer was imported above from a live CUDA tensor of the checked shape
        // on `device`, held until this call returns; the kernel runs on the caller's stream,
        // which orders it with the producer's work (DLPack stream handshake).
        unsafe { g.split_attention(stream, &args) }
    })?;
    Ok(())
}

/// Launches ``merge_partials`` on ``stream``: ``out [rows, d]`` float32 (and ``out_lse [rows]``
/// if given) from ``part_o [rows, splits, d]``, ``part_lse [rows, splits]`` and, if given, the
/// CPU's ``host_o [rows, d]`` / ``host_lse [rows]`` (all float32, contiguous).
#[pyfunction]
#[pyo3(signature = (part_o, part_lse, host_o, host_lse, out, out_lse, stream, cache_dir=None))]
#[allow(clippy::too_many_arguments)]
fn merge_partials(
    py: Python<'_>,
    part_o: &Bound<'_, PyAny>,
    part_lse: &Bound<'_, PyAny>,
    host_o: Option<&Bound<'_, PyAny>>,
    host_lse: Option<&Bound<'_, PyAny>>,
    out: &Bound<'_, PyAny>,
    out_lse: Option<&Bound<'_, PyAny>>,
    stream: u64,
    cache_dir: Option<PathBuf>,
) -> PyResult<()> {
    let on = ConsumerStream(stream);
    let po = CudaTensor::import(part_o, "part_o", Elem::F32, &[None, None, None], &on)?;
    let (rows, splits, d) = (po.shape[0], po.shape[1], po.shape[2]);
    let pl = CudaTensor::import(
        part_lse,
        "part_lse",
        Elem::F32,
        &[Some(rows), Some(splits)],
        &on,
    )?;
    let o = CudaTensor::import(out, "out", Elem::F32, &[Some(rows), Some(d)], &on)?;
    let mut all = vec![("part_o", &po), ("part_lse", &pl), ("out", &o)];
    let host = match (host_o, host_lse) {
        (Some(ho), Some(hl)) => Some((
            CudaTensor::import(ho, "host_o", Elem::F32, &[Some(rows), Some(d)], &on)?,
            CudaTensor::import(hl, "host_lse", Elem::F32, &[Some(rows)], &on)?,
        )),
        (None, None) => None,
        _ => {
            return Err(PyValueError::new_err(
                "host_o and host_lse go together: pass both or neither",
            ))
        }
    };
    let ol = out_lse
        .map(|t| CudaTensor::import(t, "out_lse", Elem::F32, &[Some(rows)], &on))
        .transpose()?;
    if let Some((ho, hl)) = &host {
        all.push(("host_o", ho));
        all.push(("host_lse", hl));
    }
    if let Some(t) = &ol {
        all.push(("out_lse", t));
    }
    for (name, t) in &all {
        t.require_contiguous(name)?;
    }
    same_device(po.device, &all)?;
    let args = MergeArgs {
        rows,
        head_dim: d,
        splits,
        part_o: po.ptr,
        part_lse: pl.ptr,
        host_o: host.as_ref().map_or(0, |h| h.0.ptr),
        host_lse: host.as_ref().map_or(0, |h| h.1.ptr),
        out: o.ptr,
        out_lse: ol.as_ref().map_or(0, |t| t.ptr),
    };
    let device = po.device;
    run_core(py, || {
        let g = Gpu::get(device, cache_dir.as_deref())?;
        // SAFETY: as in `split_attention`.
        unsafe { g.merge_partials(stream, &args) }
    })?;
    Ok(())
}

/// How many slices `split_attention` should cut each row into (see `gpu::device::choose_splits`).
#[pyfunction]
#[pyo3(signature = (rows, tokens, sm_count, min_tokens=64))]
fn choose_splits(rows: usize, tokens: usize, sm_count: u32, min_tokens: usize) -> usize {
    gpu::device::choose_splits(rows, tokens, sm_count, min_tokens)
}

/// Page-locked host memory, mbind-placed on a NUMA node, registered with the CUDA driver
/// (``cuMemHostRegister``, not write-combined): copies from and to it are truly asynchronous.
#[pyclass(name = "PinnedHostBuffer", module = "hybridgen._native", frozen)]
pub(crate) struct PyPinnedHostBuffer {
    inner: PinnedBuffer,
}

#[pymethods]
impl PyPinnedHostBuffer {
    #[new]
    #[pyo3(signature = (nbytes, device, *, node=None, cache_dir=None))]
    fn new(
        py: Python<'_>,
        nbytes: usize,
        device: usize,
        node: Option<u32>,
        cache_dir: Option<PathBuf>,
    ) -> PyResult<Self> {
        if nbytes == 0 {
            return Err(PyValueError::new_err("nbytes must be > 0"));
        }
        let inner = run_core(py, || -> crate::Result<PinnedBuffer> {
            let g = Gpu::get(device, cache_dir.as_deref())?;
            PinnedBuffer::allocate(nbytes, node, g)
        })?;
        Ok(PyPinnedHostBuffer { inner })
    }

    #[getter]
    fn nbytes(&self) -> usize {
        self.inner.buffer().len()
    }

    #[getter]
    fn registered(&self) -> bool {
        self.inner.is_registered()
    }

    /// A zero-copy CPU tensor (DLPack capsule) of ``count`` elements of ``dtype`` at ``offset``
    /// bytes; it keeps the memory alive (but not its registration) while it exists.
    #[pyo3(signature = (dtype, count, offset=0))]
    fn view(
        &self,
        py: Python<'_>,
        dtype: &str,
        count: usize,
        offset: usize,
    ) -> PyResult<Py<PyAny>> {
        let dt = DType::parse(dtype).map_err(PyErr::from)?;
        let end = offset + count * dt.size();
        if end > self.inner.buffer().len() || !offset.is_multiple_of(dt.size()) {
            return Err(PyValueError::new_err(format!(
                "{count} {dtype} elements at byte {offset} do not fit this {}-byte buffer (or are misaligned)",
                self.inner.buffer().len()
            )));
        }
        export_strips(
            py,
            Arc::clone(self.inner.buffer()),
            offset,
            [1, 1, 1, count],
            count * dt.size(),
            dt,
        )
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(cuda_probe, m)?)?;
    m.add_function(wrap_pyfunction!(kernel_source, m)?)?;
    m.add_function(wrap_pyfunction!(compile_kernels, m)?)?;
    m.add_function(wrap_pyfunction!(kernel_image, m)?)?;
    m.add_function(wrap_pyfunction!(prefer_nvrtc, m)?)?;
    m.add_function(wrap_pyfunction!(nvrtc_info, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_device_info, m)?)?;
    m.add_function(wrap_pyfunction!(load_kernels, m)?)?;
    m.add_function(wrap_pyfunction!(split_attention, m)?)?;
    m.add_function(wrap_pyfunction!(merge_partials, m)?)?;
    m.add_function(wrap_pyfunction!(choose_splits, m)?)?;
    m.add_class::<PyPinnedHostBuffer>()
}
