//! CUDA tensors from Python through DLPack: device pointer, shape, strides (in elements), dtype
//! and device index, imported on the stream the kernels will run on, so the producer (torch)
//! orders its pending writes before them.
//!
//! torch offers DLPack's C exchange API, which hands the consumer the producer's current stream
//! instead of exporting on the consumer's: [`ConsumerStream::wait_for_producer`] orders the
//! kernels' stream after it (nothing to do when they are the same stream, the usual case), so the
//! import needs no Python-level `__dlpack__` fallback (an export, a discard, and a second export).

use dlpark::ffi::{DLDevice, DLDeviceType};
use dlpark::python::consumer::stream;
use dlpark::python::{dlpack_device, from_dlpack, DlpackStream, ImportedDlpack, StreamArg};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

use super::tensor::Elem;

/// The consumer's CUDA stream, as `__dlpack__(stream=...)` expects it.
pub(crate) struct ConsumerStream(pub u64);

// SAFETY: the handle is the caller's live stream (torch's current stream) for the whole call.
unsafe impl DlpackStream for ConsumerStream {
    fn as_python_arg(&self, _py: Python<'_>, _device: DLDevice) -> PyResult<StreamArg> {
        Ok(stream::cuda(self.0 as usize as *mut std::ffi::c_void))
    }

    unsafe fn wait_for_producer(
        &self,
        device: DLDevice,
        producer: *mut std::ffi::c_void,
    ) -> PyResult<bool> {
        if producer as usize as u64 == self.0 {
            return Ok(true); // one stream: already in order
        }
        if device.device_type != DLDeviceType::CUDA {
            return Ok(false);
        }
        // SAFETY: `producer` is the producer's live stream (dlpark's contract), `self.0` ours.
        unsafe {
            crate::gpu::device::order_after(device.device_id as usize, producer as u64, self.0)
        }?;
        Ok(true)
    }
}

/// A CUDA tensor borrowed for one call.
pub(crate) struct CudaTensor {
    _owner: ImportedDlpack,
    pub ptr: u64,
    pub shape: Vec<usize>,
    /// Strides in elements (compact row-major when the producer gave none).
    pub strides: Vec<usize>,
    pub device: usize,
}

impl CudaTensor {
    /// Imports `obj` as argument `name`: a CUDA tensor of dtype `elem` with `shape.len()`
    /// dimensions, each equal to the given size where one is given.
    pub(crate) fn import(
        obj: &Bound<'_, PyAny>,
        name: &str,
        elem: Elem,
        shape: &[Option<usize>],
        on: &ConsumerStream,
    ) -> PyResult<CudaTensor> {
        if !obj.hasattr("__dlpack__")? {
            return Err(PyTypeError::new_err(format!(
                "{name} must be a CUDA tensor, got {}",
                obj.get_type().name()?
            )));
        }
        let device = dlpack_device(obj.as_borrowed())?;
        if device.device_type != DLDeviceType::CUDA {
            return Err(PyValueError::new_err(format!(
                "{name} must be on a CUDA device (DLPack device type {}, got {})",
                DLDeviceType::CUDA.0,
                device.device_type.0
            )));
        }
        let owner = from_dlpack(obj.as_borrowed(), Some(on), Some(false))?;
        let view = owner
            .validate()
            .map_err(|e| PyValueError::new_err(format!("{name}: invalid DLPack tensor: {e}")))?;
        if view.dtype() != elem.dl() {
            return Err(PyTypeError::new_err(format!(
                "{name} must have dtype {}",
                elem.name()
            )));
        }
        let dims: Vec<usize> = view.shape().iter().map(|&d| d as usize).collect();
        if dims.len() != shape.len()
            || dims
                .iter()
                .zip(shape)
                .any(|(&g, w)| w.is_some_and(|w| w != g))
        {
            return Err(PyValueError::new_err(format!(
                "{name} has shape {dims:?}, expected {shape:?} (None = any)"
            )));
        }
        let mut strides: Vec<usize> = match view.strides() {
            Some(st) if st.iter().zip(&dims).all(|(&s, &d)| s >= 0 || d <= 1) => {
                st.iter().map(|&s| s.max(0) as usize).collect()
            }
            Some(st) => {
                return Err(PyValueError::new_err(format!(
                    "{name} has negative strides {st:?}"
                )))
            }
            None => compact_strides(&dims),
        };
        // The stride of a dimension of size 1 is never used to address anything, and producers
        // leave arbitrary values there (torch: a KV cache with one KV head, an MQA model). Give
        // it the compact value, so layout checks see the layout that matters.
        for i in (0..dims.len()).rev() {
            if dims[i] <= 1 {
                strides[i] = strides.get(i + 1).map_or(1, |&s| s * dims[i + 1].max(1));
            }
        }
        let ptr = view.data_ptr() as u64 + view.byte_offset();
        Ok(CudaTensor {
            _owner: owner,
            ptr,
            shape: dims,
            strides,
            device: device.device_id as usize,
        })
    }

    /// Fails unless the tensor is compact row-major (ignoring dimensions of size 1).
    pub(crate) fn require_contiguous(&self, name: &str) -> PyResult<()> {
        let want = compact_strides(&self.shape);
        let ok = self
            .shape
            .iter()
            .zip(self.strides.iter().zip(&want))
            .all(|(&d, (&s, &w))| d <= 1 || s == w);
        if !ok {
            return Err(PyValueError::new_err(format!(
                "{name} must be contiguous (shape {:?}, strides {:?}); call .contiguous()",
                self.shape, self.strides
            )));
        }
        Ok(())
    }
}

fn compact_strides(dims: &[usize]) -> Vec<usize> {
    let mut strides = vec![1; dims.len()];
    for i in (0..dims.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * dims[i + 1];
    }
    strides
}

/// Fails unless every tensor is on device `device`.
pub(crate) fn same_device(device: usize, tensors: &[(&str, &CudaTensor)]) -> PyResult<()> {
    for (name, t) in tensors {
        if t.device != device {
            return Err(PyValueError::new_err(format!(
                "{name} is on cuda:{}, expected cuda:{device}",
                t.device
            )));
        }
    }
    Ok(())
}
