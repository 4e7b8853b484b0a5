//! Tensors from Python through DLPack: zero-copy import with the checks every binding needs
//! (device, dtype, rank, shape, contiguity), and the check that outputs share no memory with
//! other arguments. Exports (DLPack producers) are in `export`.

use dlpark::ffi::{DLDataType, DLDevice, DLDeviceType};
use dlpark::python::{dlpack_device, from_dlpack, ImportedDlpack};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

use crate::dtype::DType;

/// Element types a binding may ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Elem {
    F16,
    BF16,
    F32,
    I64,
    U8,
    /// One byte per element, 0 or 1 (torch.bool).
    Bool,
}

impl Elem {
    pub(crate) fn dl(self) -> DLDataType {
        match self {
            Elem::F16 => DLDataType::F16,
            Elem::BF16 => DLDataType::BF16,
            Elem::F32 => DLDataType::F32,
            Elem::I64 => DLDataType::I64,
            Elem::U8 => DLDataType::U8,
            Elem::Bool => DLDataType::BOOL,
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Elem::F16 => "float16",
            Elem::BF16 => "bfloat16",
            Elem::F32 => "float32",
            Elem::I64 => "int64",
            Elem::U8 => "uint8",
            Elem::Bool => "bool",
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
    for e in [
        Elem::F16,
        Elem::BF16,
        Elem::F32,
        Elem::I64,
        Elem::U8,
        Elem::Bool,
    ] {
        if e.dl() == dt {
            return e.name().to_string();
        }
    }
    format!(
        "dlpack(code={}, bits={}, lanes={})",
        dt.code.0, dt.bits, dt.lanes
    )
}

/// A CPU tensor borrowed from Python for the duration of one call.
pub(crate) struct Tensor {
    _owner: ImportedDlpack,
    ptr: *mut u8,
    shape: Vec<usize>,
    elem: Elem,
    /// Bytes from `ptr` to the end of the last element (more than the elements for strips).
    extent: usize,
    device: DLDevice,
}

/// The DLPack import every binding starts with: a tensor-like object on a CPU-accessible device,
/// zero-copy, with one of the `accept`ed dtypes (the one found is returned).
fn open(
    obj: &Bound<'_, PyAny>,
    name: &str,
    accept: &[Elem],
) -> PyResult<(ImportedDlpack, Elem, DLDevice)> {
    if !obj.hasattr("__dlpack__")? {
        return Err(PyTypeError::new_err(format!(
            "{name} must be a tensor (torch or any DLPack array), got {}",
            obj.get_type().name()?
        )));
    }
    let device = dlpack_device(obj.as_borrowed())?;
    check_device(name, device)?;
    let owner = from_dlpack(obj.as_borrowed(), None, Some(false))?;
    let dtype = owner
        .validate()
        .map_err(|e| PyValueError::new_err(format!("{name}: invalid DLPack tensor: {e}")))?
        .dtype();
    let Some(&elem) = accept.iter().find(|e| e.dl() == dtype) else {
        let names: Vec<&str> = accept.iter().map(|e| e.name()).collect();
        return Err(PyTypeError::new_err(format!(
            "{name} must have dtype {}, got {}",
            names.join(" or "),
            dl_name(dtype)
        )));
    };
    Ok((owner, elem, device))
}

impl Tensor {
    /// Imports `obj` (a torch tensor or any DLPack producer) as argument `name`, requiring
    /// dtype `elem` and, where given, the dimensions of `shape` (`None` = any size).
    pub(crate) fn import(
        obj: &Bound<'_, PyAny>,
        name: &str,
        elem: Elem,
        shape: &[Option<usize>],
    ) -> PyResult<Tensor> {
        Self::import_one_of(obj, name, &[elem], shape)
    }

    /// As [`Tensor::import`], accepting any of the dtypes `elems` (see [`Tensor::elem`]).
    pub(crate) fn import_one_of(
        obj: &Bound<'_, PyAny>,
        name: &str,
        elems: &[Elem],
        shape: &[Option<usize>],
    ) -> PyResult<Tensor> {
        let t = Self::import_any_shape(obj, name, elems)?;
        if t.shape.len() != shape.len() {
            return Err(PyValueError::new_err(format!(
                "{name} must have {} dimensions, got shape {:?}",
                shape.len(),
                t.shape
            )));
        }
        for (axis, (&got, want)) in t.shape.iter().zip(shape).enumerate() {
            if let Some(want) = *want {
                if got != want {
                    return Err(PyValueError::new_err(format!(
                        "{name} has shape {:?}; dimension {axis} must be {want}",
                        t.shape
                    )));
                }
            }
        }
        Ok(t)
    }

    /// A contiguous tensor of any rank and shape with one of the dtypes `elems`.
    pub(crate) fn import_any_shape(
        obj: &Bound<'_, PyAny>,
        name: &str,
        elems: &[Elem],
    ) -> PyResult<Tensor> {
        let (owner, elem, device) = open(obj, name, elems)?;
        let view = owner
            .validate()
            .map_err(|e| PyValueError::new_err(format!("{name}: {e}")))?;
        let dims: Vec<usize> = view.shape().iter().map(|&d| d as usize).collect();
        // Row-major, ignoring the strides of dimensions of size 1 (torch leaves any there,
        // e.g. on a slice `x[:, i]`, and still calls the tensor contiguous) and of empty tensors.
        let compact = match view.strides() {
            None => true,
            Some(_) if dims.contains(&0) => true,
            Some(strides) => {
                let mut want = 1i64;
                dims.iter().zip(strides).rev().all(|(&dim, &stride)| {
                    let ok = dim <= 1 || stride == want;
                    want *= dim as i64;
                    ok
                })
            }
        };
        if !compact {
            return Err(PyValueError::new_err(format!(
                "{name} must be contiguous (shape {dims:?}, strides {:?}); call .contiguous()",
                view.strides().unwrap_or(&[])
            )));
        }
        // SAFETY: byte_offset is inside the allocation by the DLPack contract.
        let ptr = unsafe { (view.data_ptr() as *mut u8).add(view.byte_offset() as usize) };
        aligned(name, ptr, elem)?;
        let extent = dims.iter().product::<usize>() * elem.dl().element_size();
        Ok(Tensor {
            _owner: owner,
            ptr,
            shape: dims,
            elem,
            extent,
            device,
        })
    }

    /// Imports a `[batch, heads, n, d]` tensor whose rows are contiguous and whose sequences are
    /// `heads` head-strides apart (e.g. a prefix view of a larger cache buffer); returns it with
    /// its head stride in elements.
    pub(crate) fn import_strips(
        obj: &Bound<'_, PyAny>,
        name: &str,
        elem: Elem,
        shape: &[Option<usize>; 4],
    ) -> PyResult<(Tensor, usize)> {
        let (owner, elem, device) = open(obj, name, &[elem])?;
        let view = owner
            .validate()
            .map_err(|e| PyValueError::new_err(format!("{name}: {e}")))?;
        let dims: Vec<usize> = view.shape().iter().map(|&d| d as usize).collect();
        if dims.len() != 4
            || dims
                .iter()
                .zip(shape)
                .any(|(&g, w)| w.is_some_and(|w| w != g))
        {
            return Err(PyValueError::new_err(format!(
                "{name} has shape {dims:?}, expected {shape:?} (None = any)"
            )));
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
        aligned(name, ptr, elem)?;
        let head_stride = strides[1];
        let numel: usize = dims.iter().product();
        let last = if numel == 0 {
            0
        } else {
            (dims[0] * heads - 1) * head_stride + rows * d
        };
        let extent = last * elem.dl().element_size();
        Ok((
            Tensor {
                _owner: owner,
                ptr,
                shape: dims,
                elem,
                extent,
                device,
            },
            head_stride,
        ))
    }

    /// `self`, if it may be written: an output must not be a read-only array (a read-only
    /// `np.memmap`, an array over `bytes`), which DLPack marks with its `READ_ONLY` flag.
    pub(crate) fn writable(self, name: &str) -> PyResult<Tensor> {
        if self._owner.flags().contains(dlpark::DlpackFlags::READ_ONLY) {
            return Err(PyValueError::new_err(format!(
                "{name} is read-only, but it is an output: pass a writable tensor"
            )));
        }
        Ok(self)
    }

    pub(crate) fn ptr(&self) -> *const u8 {
        self.ptr
    }

    pub(crate) fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub(crate) fn elem(&self) -> Elem {
        self.elem
    }

    pub(crate) fn device(&self) -> DLDevice {
        self.device
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
        // DLPack owner is held; ptr is aligned for the dtype (checked by `aligned` at import).
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
        // `distinct` / `outputs_apart`. Other Python threads must not touch the arguments of a
        // call in progress (the contract of every GIL-releasing binding).
        unsafe { std::slice::from_raw_parts_mut(self.ptr as *mut T, self.numel()) }
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        if self.numel() == 0 {
            return &[]; // an empty tensor's pointer may be null
        }
        // SAFETY: as in `slice`, viewed as bytes.
        unsafe { std::slice::from_raw_parts(self.ptr, self.bytes_len()) }
    }

    #[allow(clippy::mut_from_ref)]
    pub(crate) fn bytes_mut(&self) -> &mut [u8] {
        if self.numel() == 0 {
            return &mut [];
        }
        // SAFETY: as in `slice_mut`, viewed as bytes.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.bytes_len()) }
    }

    fn range(&self) -> (usize, usize) {
        let start = self.ptr as usize;
        (start, start + self.extent)
    }

    fn overlaps(&self, other: &Tensor) -> bool {
        let ((a0, a1), (b0, b1)) = (self.range(), other.range());
        a0 < b1 && b0 < a1
    }
}

/// Attention inputs must be finite: a NaN or an infinity in a query, key, value or logit has no
/// meaningful attention (torch returns NaN for the row), and the kernels' softmax, which treats
/// `-inf` as "masked", would otherwise turn it into a plausible-looking number. hybridgen refuses
/// such input instead. `-inf` is allowed where it means "masked" (logits).
pub(crate) fn require_finite(name: &str, t: &Tensor, allow_masked: bool) -> PyResult<()> {
    let bad = match t.elem {
        Elem::F32 => t
            .slice::<u32>()
            .iter()
            .position(|&x| (x & 0x7f80_0000) == 0x7f80_0000 && !(allow_masked && x == 0xff80_0000)),
        Elem::F16 => t
            .slice::<u16>()
            .iter()
            .position(|&x| (x & 0x7c00) == 0x7c00),
        Elem::BF16 => t
            .slice::<u16>()
            .iter()
            .position(|&x| (x & 0x7f80) == 0x7f80),
        _ => None,
    };
    match bad {
        None => Ok(()),
        Some(i) => Err(PyValueError::new_err(format!(
            "{name} holds NaN or {}infinity (element {i}): attention over it is undefined (torch gives NaN); \
             hybridgen refuses non-finite inputs",
            if allow_masked { "+" } else { "" }
        ))),
    }
}

/// Fails if any two of `tensors` (name, tensor) share memory: outputs are written in place.
pub(crate) fn distinct(tensors: &[(&str, &Tensor)]) -> PyResult<()> {
    for (i, (a_name, a)) in tensors.iter().enumerate() {
        for (b_name, b) in &tensors[i + 1..] {
            if a.overlaps(b) {
                return Err(PyValueError::new_err(format!(
                    "{a_name} and {b_name} must not share memory"
                )));
            }
        }
    }
    Ok(())
}

/// Fails if an output shares memory with another output or with any input (inputs may share
/// memory with each other: they are only read).
pub(crate) fn outputs_apart(
    outputs: &[(&str, &Tensor)],
    inputs: &[(&str, &Tensor)],
) -> PyResult<()> {
    distinct(outputs)?;
    for (o_name, o) in outputs {
        if let Some((i_name, _)) = inputs.iter().find(|(_, i)| o.overlaps(i)) {
            return Err(PyValueError::new_err(format!(
                "{o_name} must not share memory with {i_name}"
            )));
        }
    }
    Ok(())
}

/// The kernels read elements through typed pointers: the data must be aligned for its dtype.
fn aligned(name: &str, ptr: *const u8, elem: Elem) -> PyResult<()> {
    if !(ptr as usize).is_multiple_of(elem.dl().element_size()) {
        return Err(PyValueError::new_err(format!(
            "{name} is not aligned for {}",
            elem.name()
        )));
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
