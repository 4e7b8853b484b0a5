//! Tensors from Python through DLPack: zero-copy import with the checks every binding needs
//! (device, dtype, rank, shape, contiguity), and zero-copy export of host-store ranges.

use std::sync::Arc;

use dlpark::ffi::{DLDataType, DLDevice, DLDeviceType};
use dlpark::metadata::Fixed;
use dlpark::python::{dlpack_device, from_dlpack, ImportedDlpack};
use dlpark::versioned;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

use crate::dtype::DType;
use crate::mem::HostBuffer;

/// Element types a binding may ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Elem {
    F16,
    BF16,
    F32,
    I64,
    U8,
}

impl Elem {
    pub(crate) fn dl(self) -> DLDataType {
        match self {
            Elem::F16 => DLDataType::F16,
            Elem::BF16 => DLDataType::BF16,
            Elem::F32 => DLDataType::F32,
            Elem::I64 => DLDataType::I64,
            Elem::U8 => DLDataType::U8,
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Elem::F16 => "float16",
            Elem::BF16 => "bfloat16",
            Elem::F32 => "float32",
            Elem::I64 => "int64",
            Elem::U8 => "uint8",
        }
    }

    pub(crate) fn of(dtype: DType) -> Elem {
        match dtype {
            DType::F16 => Elem::F16,
            DType::BF16 => Elem::BF16,
            DType::F32 => Elem::F32,
        }
    }
}

fn dl_name(dt: DLDataType) -> String {
    for e in [Elem::F16, Elem::BF16, Elem::F32, Elem::I64, Elem::U8] {
        if e.dl() == dt {
            return e.name().to_string();
        }
    }
    format!("dlpack(code={}, bits={}, lanes={})", dt.code.0, dt.bits, dt.lanes)
}

/// A contiguous CPU tensor borrowed from Python for the duration of one call.
pub(crate) struct Tensor {
    _owner: ImportedDlpack,
    ptr: *mut u8,
    shape: Vec<usize>,
    elem: Elem,
}

/// The DLPack import every binding starts with: a tensor-like object on a CPU-accessible device,
/// zero-copy, with the requested dtype.
fn open(obj: &Bound<'_, PyAny>, name: &str, elem: Elem) -> PyResult<ImportedDlpack> {
    if !obj.hasattr("__dlpack__")? {
        return Err(PyTypeError::new_err(format!(
            "{name} must be a tensor (torch or any DLPack array), got {}",
            obj.get_type().name()?
        )));
    }
    check_device(name, dlpack_device(obj.as_borrowed())?)?;
    let owner = from_dlpack(obj.as_borrowed(), None, Some(false))?;
    let dtype = owner
        .validate()
        .map_err(|e| PyValueError::new_err(format!("{name}: invalid DLPack tensor: {e}")))?
        .dtype();
    if dtype != elem.dl() {
        return Err(PyTypeError::new_err(format!("{name} must have dtype {}, got {}", elem.name(), dl_name(dtype))));
    }
    Ok(owner)
}

impl Tensor {
    /// Imports `obj` (a torch tensor or any DLPack producer) as argument `name`, requiring
    /// dtype `elem` and, where given, the dimensions of `shape` (`None` = any size).
    pub(crate) fn import(obj: &Bound<'_, PyAny>, name: &str, elem: Elem, shape: &[Option<usize>]) -> PyResult<Tensor> {
        let owner = open(obj, name, elem)?;
        let view = owner.validate().map_err(|e| PyValueError::new_err(format!("{name}: {e}")))?;
        let dims: Vec<usize> = view.shape().iter().map(|&d| d as usize).collect();
        if dims.len() != shape.len() {
            return Err(PyValueError::new_err(format!(
                "{name} must have {} dimensions, got shape {:?}",
                shape.len(),
                dims
            )));
        }
        for (axis, (&got, want)) in dims.iter().zip(shape).enumerate() {
            if let Some(want) = *want {
                if got != want {
                    return Err(PyValueError::new_err(format!(
                        "{name} has shape {dims:?}; dimension {axis} must be {want}"
                    )));
                }
            }
        }
        let compact = view
            .is_compact()
            .map_err(|e| PyValueError::new_err(format!("{name}: invalid strides: {e}")))?;
        if !compact {
            return Err(PyValueError::new_err(format!(
                "{name} must be contiguous (shape {dims:?}, strides {:?}); call .contiguous()",
                view.strides().unwrap_or(&[])
            )));
        }
        // SAFETY: byte_offset is inside the allocation by the DLPack contract.
        let ptr = unsafe { (view.data_ptr() as *mut u8).add(view.byte_offset() as usize) };
        Ok(Tensor { _owner: owner, ptr, shape: dims, elem })
    }

    /// Imports a `[batch, heads, n, d]` tensor whose rows are contiguous and whose sequences are
    /// `heads` head-strides apart (e.g. a prefix view of a larger cache buffer); returns it with
    /// its head stride in elements.
    pub(crate) fn import_strips(obj: &Bound<'_, PyAny>, name: &str, elem: Elem, shape: &[Option<usize>; 4]) -> PyResult<(Tensor, usize)> {
        let owner = open(obj, name, elem)?;
        let view = owner.validate().map_err(|e| PyValueError::new_err(format!("{name}: {e}")))?;
        let dims: Vec<usize> = view.shape().iter().map(|&d| d as usize).collect();
        if dims.len() != 4 || dims.iter().zip(shape).any(|(&g, w)| w.is_some_and(|w| w != g)) {
            return Err(PyValueError::new_err(format!("{name} has shape {dims:?}, expected {shape:?} (None = any)")));
        }
        let strides: Vec<usize> = match view.strides() {
            Some(st) => st.iter().map(|&x| x as usize).collect(),
            None => vec![dims[1] * dims[2] * dims[3], dims[2] * dims[3], dims[3], 1],
        };
        let (heads, rows, d) = (dims[1], dims[2], dims[3]);
        let ok = (d <= 1 || strides[3] == 1)
            && (rows <= 1 || strides[2] == d)
            && strides[1] >= rows * d
            && (dims[0] <= 1 || strides[0] == heads * strides[1]);
        if !ok {
            return Err(PyValueError::new_err(format!(
                "{name} (shape {dims:?}, strides {strides:?}) must have contiguous rows and equally spaced heads"
            )));
        }
        // SAFETY: byte_offset is inside the allocation by the DLPack contract.
        let ptr = unsafe { (view.data_ptr() as *mut u8).add(view.byte_offset() as usize) };
        let head_stride = strides[1];
        Ok((Tensor { _owner: owner, ptr, shape: dims, elem }, head_stride))
    }

    pub(crate) fn ptr(&self) -> *const u8 {
        self.ptr
    }

    pub(crate) fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub(crate) fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    fn bytes_len(&self) -> usize {
        self.numel() * self.elem.dl().element_size()
    }

    /// The data as `T` (which must match the imported dtype's size).
    pub(crate) fn slice<T>(&self) -> &[T] {
        assert_eq!(std::mem::size_of::<T>(), self.elem.dl().element_size());
        if self.numel() == 0 {
            return &[];
        }
        // SAFETY: a contiguous tensor of numel elements of this size lives at ptr while the
        // DLPack owner is held; the exporter's allocation is suitably aligned for its dtype.
        unsafe { std::slice::from_raw_parts(self.ptr as *const T, self.numel()) }
    }

    /// The data as mutable `T`. Outputs are written in place: the caller must not pass the
    /// same tensor as input and output of one call (bindings check that with `distinct`).
    #[allow(clippy::mut_from_ref)]
    pub(crate) fn slice_mut<T>(&self) -> &mut [T] {
        assert_eq!(std::mem::size_of::<T>(), self.elem.dl().element_size());
        if self.numel() == 0 {
            return &mut [];
        }
        // SAFETY: as in `slice`; exclusivity across the arguments of one call is checked by
        // `distinct`, and Python code cannot run while the call holds the data.
        unsafe { std::slice::from_raw_parts_mut(self.ptr as *mut T, self.numel()) }
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        // SAFETY: as in `slice`, viewed as bytes.
        unsafe { std::slice::from_raw_parts(self.ptr, self.bytes_len()) }
    }

    #[allow(clippy::mut_from_ref)]
    pub(crate) fn bytes_mut(&self) -> &mut [u8] {
        // SAFETY: as in `slice_mut`, viewed as bytes.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.bytes_len()) }
    }

    fn range(&self) -> (usize, usize) {
        let start = self.ptr as usize;
        (start, start + self.bytes_len())
    }
}

/// Fails if any two of `tensors` (name, tensor) share memory: outputs are written in place.
pub(crate) fn distinct(tensors: &[(&str, &Tensor)]) -> PyResult<()> {
    for (i, (a_name, a)) in tensors.iter().enumerate() {
        for (b_name, b) in &tensors[i + 1..] {
            let ((a0, a1), (b0, b1)) = (a.range(), b.range());
            if a0 < b1 && b0 < a1 {
                return Err(PyValueError::new_err(format!("{a_name} and {b_name} must not share memory")));
            }
        }
    }
    Ok(())
}

fn check_device(name: &str, device: DLDevice) -> PyResult<()> {
    match device.device_type {
        DLDeviceType::CPU | DLDeviceType::CUDAHOST => Ok(()),
        DLDeviceType::CUDA => Err(PyValueError::new_err(format!(
            "{name} is a CUDA tensor (cuda:{}), but this operation runs on the CPU over host \
             memory: pass {name}.cpu()",
            device.device_id
        ))),
        other => Err(PyValueError::new_err(format!(
            "{name} is on an unsupported device (DLPack device type {}); pass a CPU tensor",
            other.0
        ))),
    }
}

/// A zero-copy DLPack capsule over `[batch, heads, len, head_dim]` rows of a host buffer, strip
/// `(seq, head)` starting `strip_bytes` apart. The capsule keeps the buffer alive.
pub(crate) fn export_strips(
    py: Python<'_>,
    buf: Arc<HostBuffer>,
    offset: usize,
    dims: [usize; 4],
    strip_bytes: usize,
    dtype: DType,
) -> PyResult<Py<PyAny>> {
    let elem = dtype.size();
    let [_, heads, _, head_dim] = dims;
    let strip = (strip_bytes / elem) as i64;
    let strides = [strip * heads as i64, strip, head_dim as i64, 1];
    let shape = dims.map(|d| d as i64);
    // SAFETY: offset + the strided extent lies inside the buffer (the store checked the range).
    let data = unsafe { buf.as_ptr().add(offset) } as *mut std::ffi::c_void;
    let mut init = Fixed::new(shape, strides)
        .initialize(buf)
        .map_err(|e| PyValueError::new_err(format!("cannot describe view: {e}")))?;
    init.set_data(data).set_dtype(Elem::of(dtype).dl()).set_device(DLDevice::CPU);
    // SAFETY: data, shape and strides describe live memory owned by the context (the Arc).
    let managed: versioned::Dlpack = unsafe { init.finish() };
    Ok(managed.into_pyobject(py)?.into_any().unbind())
}
