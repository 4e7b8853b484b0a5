//! Host memory handed to Python zero-copy as DLPack capsules (`torch.from_dlpack` takes them):
//! ranges of the store's strips, and compact arrays that Rust allocated or that alias a prefix of
//! a caller's buffer. Every capsule owns what keeps its memory alive.

use std::sync::Arc;

use dlpark::ffi::DLDevice;
use dlpark::metadata::Fixed;
use dlpark::versioned;
use dlpark::OpaqueContext;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use super::tensor::{Elem, Tensor};
use crate::dtype::DType;
use crate::mem::HostBuffer;

/// A capsule over `shape` elements `strides` apart (in elements) at `data`.
///
/// # Safety
/// Every addressed element of `elem` at `data` must be initialised and stay valid for as long
/// as `owner` lives (the capsule drops `owner` when its consumer is done).
unsafe fn capsule<const N: usize>(
    py: Python<'_>,
    owner: impl OpaqueContext,
    data: *mut u8,
    shape: [usize; N],
    strides: [i64; N],
    elem: Elem,
    device: DLDevice,
) -> PyResult<Py<PyAny>> {
    let shape = shape.map(|d| d as i64);
    let mut init = Fixed::new(shape, strides)
        .initialize(owner)
        .map_err(|e| PyValueError::new_err(format!("cannot describe the array: {e}")))?;
    init.set_data(data.cast())
        .set_dtype(elem.dl())
        .set_device(device);
    // SAFETY: data, shape and strides describe memory kept alive by the installed owner (the
    // caller's contract).
    let managed: versioned::Dlpack = unsafe { init.finish() };
    Ok(managed.into_pyobject(py)?.into_any().unbind())
}

/// Row-major strides (in elements) of a compact `shape`.
fn compact_strides<const N: usize>(shape: [usize; N]) -> [i64; N] {
    let mut strides = [1i64; N];
    for i in (0..N.saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1] as i64;
    }
    strides
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
    // SAFETY: offset + the strided extent lies inside the buffer (the store checked the range).
    let data = unsafe { buf.as_ptr().add(offset) };
    // SAFETY: the rows exist in the mapping, which the Arc (the owner) keeps mapped.
    unsafe { capsule(py, buf, data, dims, strides, Elem::of(dtype), DLDevice::CPU) }
}

/// An array Rust allocated for a result; the capsule owns it.
pub(crate) enum Owned {
    F32(Vec<f32>),
    I64(Vec<i64>),
    /// Elements of a 2- or 4-byte dtype, stored in u32 words so they are aligned for any of them.
    Words(Vec<u32>, Elem),
}

impl Owned {
    /// Room for `bytes` bytes of `elem` elements.
    pub(crate) fn words(bytes: usize, elem: Elem) -> Owned {
        Owned::Words(vec![0; bytes.div_ceil(4)], elem)
    }

    /// The storage as bytes (to be written by the core).
    pub(crate) fn bytes_mut(&mut self) -> &mut [u8] {
        match self {
            Owned::F32(v) => as_bytes_mut(v),
            Owned::I64(v) => as_bytes_mut(v),
            Owned::Words(v, _) => as_bytes_mut(v),
        }
    }

    /// Hands the array to Python as a `shape` capsule (which must not exceed the storage).
    pub(crate) fn export<const N: usize>(
        mut self,
        py: Python<'_>,
        shape: [usize; N],
    ) -> PyResult<Py<PyAny>> {
        let (elem, size) = match &self {
            Owned::F32(_) => (Elem::F32, 4),
            Owned::I64(_) => (Elem::I64, 8),
            Owned::Words(_, e) => (*e, e.dl().element_size()),
        };
        let bytes = shape.iter().product::<usize>() * size;
        let data = self.bytes_mut();
        assert!(
            bytes <= data.len(),
            "export of {bytes} bytes from a {}-byte array",
            data.len()
        );
        let data = data.as_mut_ptr();
        // SAFETY: the vector's heap storage does not move when the vector is boxed; the box is
        // the owner, and the storage holds `bytes` initialised bytes (zeroed at allocation).
        unsafe {
            capsule(
                py,
                Box::new(self),
                data,
                shape,
                compact_strides(shape),
                elem,
                DLDevice::CPU,
            )
        }
    }
}

/// `v` as bytes.
fn as_bytes_mut<T: Copy>(v: &mut [T]) -> &mut [u8] {
    // SAFETY: T is one of f32/i64/u32 (plain data, no padding, any bit pattern valid); the byte
    // view borrows `v` mutably, so nothing else can access it meanwhile.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast(), std::mem::size_of_val(v)) }
}

/// Keeps a caller's buffer alive for a capsule through a DLPack import of it, never through its
/// Python object: a consumer (torch) may free the capsule's tensor with the GIL released (inside
/// a garbage collection, say), where dropping a Python object aborts the interpreter, while a
/// DLPack producer's deleter may be called from any thread.
struct KeepAlive(#[allow(dead_code)] Tensor);

// SAFETY: the import is never read through, only dropped, which calls its producer's deleter:
// the DLPack contract lets that run on any thread, with or without the GIL.
unsafe impl Send for KeepAlive {}

/// A capsule over the first `shape` elements (row-major) of the caller's contiguous `buffer`
/// (the Python object `obj`), which stays alive as long as the capsule needs it.
pub(crate) fn export_prefix<const N: usize>(
    py: Python<'_>,
    obj: &Bound<'_, PyAny>,
    buffer: &Tensor,
    shape: [usize; N],
) -> PyResult<Py<PyAny>> {
    let need: usize = shape.iter().product();
    if need > buffer.numel() {
        return Err(PyValueError::new_err(format!(
            "a buffer of {} elements cannot hold {shape:?}",
            buffer.numel()
        )));
    }
    let keep = Tensor::import_any_shape(obj, "buffer", &[buffer.elem()])?;
    if keep.ptr() != buffer.ptr() {
        return Err(PyValueError::new_err(
            "the buffer moved between two imports of it",
        ));
    }
    // SAFETY: the first `need` elements lie inside the caller's tensor (checked above), which the
    // import kept by the capsule keeps alive; they were written by the call.
    unsafe {
        capsule(
            py,
            Box::new(KeepAlive(keep)),
            buffer.ptr() as *mut u8,
            shape,
            compact_strides(shape),
            buffer.elem(),
            buffer.device(),
        )
    }
}
