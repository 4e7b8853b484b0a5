//! `HostKVStore`: the host KV store and the CPU attention operations over it.

use super::errors::run_core;
use numpy::{PyArray2, PyArrayMethods};
use parking_lot::{Mutex, RwLock};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::args::{isa, non_negative, positive, Int};
use super::export::export_strips;
use super::stage::{OutputArgs, StageCall};
use super::tensor::{distinct, outputs_apart, require_finite, Elem, Tensor};
use crate::cpu::{self, Merge, Scratch};
use crate::dtype::DType;
use crate::gpu::PinnedStrips;
use crate::kv::{Kind, KvStore, StoreConfig, TierConfig, TierStats};

/// Host tier of a decode KV cache. See `hybridgen.HostKVStore` for the documented API.
#[pyclass(name = "HostKVStore", module = "hybridgen._native", frozen)]
pub(crate) struct PyHostKvStore {
    pub(super) store: RwLock<KvStore>,
    pub(super) dtype: DType,
    layers: usize,
    pub(super) batch: usize,
    pub(super) kv_heads: usize,
    pub(super) head_dim: usize,
    /// Page-locking of the key and value strips (`pin`), grown by `evict` as host tokens arrive;
    /// dropped (unregistered, after the device is idle) by `unpin` or with the store, before the
    /// buffers themselves. Taken only with the GIL released (registration can take long) and
    /// always after the store lock, never before it.
    pinned: Mutex<Option<Pins>>,
    /// Working memory of `cpu_stage`, reused from step to step.
    pub(super) scratch: Mutex<Scratch>,
}

fn kind(name: &str) -> PyResult<Kind> {
    match name {
        "keys" | "k" => Ok(Kind::Keys),
        "values" | "v" => Ok(Kind::Values),
        other => Err(PyValueError::new_err(format!(
            "kind must be 'keys' or 'values', got {other:?}"
        ))),
    }
}

fn node(name: &str, node: Option<Int>) -> PyResult<Option<u32>> {
    node.map(|n| {
        let n = n.get(name)?;
        u32::try_from(n).map_err(|_| {
            PyValueError::new_err(format!("{name} must be a NUMA node number >= 0, got {n}"))
        })
    })
    .transpose()
}

/// The store's registrations with one CUDA device.
struct Pins {
    /// Per layer: keys, values.
    layers: Vec<[PinnedStrips; 2]>,
    /// Why growing stopped (page-locked memory exhausted). Copies from rows beyond the locked
    /// prefix are still correct, only synchronous.
    failed: Option<String>,
}

impl Pins {
    /// Locks the first `rows` rows of every strip of `layer`; returns the failure if this call
    /// is the one that ran out of page-locked memory.
    fn grow(&mut self, layer: usize, bytes: usize) -> Option<String> {
        if self.failed.is_some() {
            return None;
        }
        for strips in self.layers[layer].iter_mut() {
            if let Err(e) = strips.grow(bytes) {
                let msg = format!(
                    "page-locking the host store stopped at {} bytes: {e}",
                    self.bytes()
                );
                self.failed = Some(msg.clone());
                return Some(msg);
            }
        }
        None
    }

    fn bytes(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .map(PinnedStrips::pinned_bytes)
            .sum()
    }
}

impl PyHostKvStore {
    fn layer(&self, layer: Int) -> PyResult<usize> {
        let l = non_negative("layer", layer.clone())?;
        if l >= self.layers {
            return Err(PyValueError::new_err(format!(
                "layer {} out of range: the store has {} layers",
                layer.get("layer")?,
                self.layers
            )));
        }
        Ok(l)
    }

    /// The lockstep batch of the layer-wide calls: the slots in use (`batch` in a new store).
    pub(super) fn lockstep_batch(&self) -> usize {
        self.store.read().active_slots().len()
    }

    pub(super) fn slot(&self, slot: Int) -> PyResult<usize> {
        let s = non_negative("slot", slot.clone())?;
        if s >= self.batch {
            return Err(PyValueError::new_err(format!(
                "slot {} out of range: the store has {} slots (its batch)",
                slot.get("slot")?,
                self.batch
            )));
        }
        Ok(s)
    }

    /// `read` (every active slot, outputs `[slots, kv_heads, len, d]`) or `read_slot` (outputs
    /// `[kv_heads, len, d]`): one binding for both.
    fn read_rows(
        &self,
        py: Python<'_>,
        layer: usize,
        slot: Option<usize>,
        start: usize,
        keys_out: &Bound<'_, PyAny>,
        values_out: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let rows = [Some(self.kv_heads), None, Some(self.head_dim)];
        let shape: Vec<Option<usize>> = match slot {
            Some(_) => rows.to_vec(),
            None => std::iter::once(Some(self.lockstep_batch()))
                .chain(rows)
                .collect(),
        };
        let k = Tensor::import(keys_out, "keys_out", Elem::of(self.dtype), &shape)?
            .writable("keys_out")?;
        let v = Tensor::import(values_out, "values_out", Elem::of(self.dtype), &shape)?
            .writable("values_out")?;
        distinct(&[("keys_out", &k), ("values_out", &v)])?;
        let len = k.shape()[shape.len() - 2];
        if v.shape() != k.shape() {
            return Err(PyValueError::new_err(
                "keys_out and values_out must have the same shape",
            ));
        }
        let (kb, vb) = (k.bytes_mut(), v.bytes_mut());
        run_core(py, || {
            let store = self.store.read();
            match slot {
                Some(slot) => store.read_slot(layer, slot, start, len, kb, vb),
                None => store.read(layer, start, len, kb, vb),
            }
        })?;
        Ok(())
    }

    /// `evict` (every active slot, rows `[slots, kv_heads, m, d]`) or `evict_slot` (rows
    /// `[kv_heads, m, d]`): one binding for both.
    fn evict_rows(
        &self,
        py: Python<'_>,
        layer: usize,
        slot: Option<usize>,
        keys: &Bound<'_, PyAny>,
        values: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let rows = [Some(self.kv_heads), None, Some(self.head_dim)];
        let shape: Vec<Option<usize>> = match slot {
            Some(_) => rows.to_vec(),
            None => std::iter::once(Some(self.lockstep_batch()))
                .chain(rows)
                .collect(),
        };
        let k = Tensor::import(keys, "keys", Elem::of(self.dtype), &shape)?;
        let v = Tensor::import(values, "values", Elem::of(self.dtype), &shape)?;
        if k.shape() != v.shape() {
            return Err(PyValueError::new_err(format!(
                "keys {:?} and values {:?} must have the same shape",
                k.shape(),
                v.shape()
            )));
        }
        require_finite("keys", &k, false)?;
        require_finite("values", &v, false)?;
        let m = k.shape()[shape.len() - 2];
        let (kb, vb) = (k.bytes(), v.bytes());
        let failed = run_core(py, || -> crate::Result<Option<String>> {
            let mut store = self.store.write();
            // Lock the rows before they are written, so the first copy of them is asynchronous.
            let held = match slot {
                Some(slot) => store.slot_host_len(layer, slot)?,
                None => store.max_host_len(layer)?,
            };
            let rows = (held + m).min(store.strip_tokens());
            let failed = self
                .pinned
                .lock()
                .as_mut()
                .and_then(|p| p.grow(layer, rows * store.config().row_bytes()));
            match slot {
                Some(slot) => store.evict_slot(layer, slot, m, kb, vb)?,
                None => store.evict(layer, m, kb, vb)?,
            }
            Ok(failed)
        })?;
        if let Some(msg) = failed {
            PyErr::warn(
                py,
                &py.get_type::<pyo3::exceptions::PyResourceWarning>(),
                &std::ffi::CString::new(msg).unwrap_or_default(),
                1,
            )?;
        }
        Ok(())
    }

    pub(super) fn q_heads_of(&self, t: &Tensor, axis: usize) -> PyResult<usize> {
        let h = t.shape()[axis];
        if h == 0 || !h.is_multiple_of(self.kv_heads) {
            return Err(PyValueError::new_err(format!(
                "query heads ({h}) must be a positive multiple of kv_heads ({})",
                self.kv_heads
            )));
        }
        Ok(h)
    }
}

fn tier_dict<'py>(py: Python<'py>, t: &TierStats) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("node", t.placement.node)?;
    d.set_item("requested_node", t.placement.requested)?;
    d.set_item("fallback_reason", t.placement.fallback_reason.clone())?;
    d.set_item("capacity_bytes", t.capacity_bytes)?;
    d.set_item("used_bytes", t.used_bytes)?;
    d.set_item("key_tokens", t.key_tokens)?;
    d.set_item("value_tokens", t.value_tokens)?;
    d.set_item("key_slot_tokens", t.key_slot_tokens)?;
    d.set_item("value_slot_tokens", t.value_slot_tokens)?;
    Ok(d)
}

#[pymethods]
impl PyHostKvStore {
    #[new]
    #[pyo3(signature = (layers, batch, kv_heads, head_dim, dtype, *, near_capacity_bytes, far_capacity_bytes,
                        sinks=Int::ZERO, near_node=None, far_node=None, max_host_tokens=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        layers: Int,
        batch: Int,
        kv_heads: Int,
        head_dim: Int,
        dtype: &str,
        near_capacity_bytes: Int,
        far_capacity_bytes: Int,
        sinks: Int,
        near_node: Option<Int>,
        far_node: Option<Int>,
        max_host_tokens: Option<Int>,
    ) -> PyResult<Self> {
        let cfg = StoreConfig {
            layers: positive("layers", layers)?,
            batch: positive("batch", batch)?,
            kv_heads: positive("kv_heads", kv_heads)?,
            head_dim: positive("head_dim", head_dim)?,
            dtype: DType::parse(dtype)?,
            sinks: non_negative("sinks", sinks)?,
            near: TierConfig {
                node: node("near_node", near_node)?,
                capacity_bytes: positive("near_capacity_bytes", near_capacity_bytes)?,
            },
            far: TierConfig {
                node: node("far_node", far_node)?,
                capacity_bytes: positive("far_capacity_bytes", far_capacity_bytes)?,
            },
            max_host_tokens: max_host_tokens
                .map(|m| positive("max_host_tokens", m))
                .transpose()?,
        };
        let (layers, batch, kv_heads, head_dim, dtype) =
            (cfg.layers, cfg.batch, cfg.kv_heads, cfg.head_dim, cfg.dtype);
        Ok(PyHostKvStore {
            store: RwLock::new(KvStore::new(cfg)?),
            dtype,
            layers,
            batch,
            kv_heads,
            head_dim,
            pinned: Default::default(),
            scratch: Default::default(),
        })
    }

    /// Page-locks the store for CUDA device `device` (so copies from it to the device are
    /// asynchronous): the rows held now, then more as `evict` adds them, in chunks that double
    /// per strip. Idempotent.
    #[pyo3(signature = (device, cache_dir=None))]
    fn pin(
        &self,
        py: Python<'_>,
        device: usize,
        cache_dir: Option<std::path::PathBuf>,
    ) -> PyResult<()> {
        run_core(py, || -> crate::Result<()> {
            let store = self.store.write(); // lock order: store, then pins (as in `evict`)
            let mut pinned = self.pinned.lock();
            if pinned.is_some() {
                return Ok(());
            }
            let gpu = crate::gpu::Gpu::get(device, cache_dir.as_deref())?;
            let (strips, strip_bytes) = (self.batch * self.kv_heads, store.strip_bytes());
            let mut pins = Pins {
                layers: Vec::with_capacity(self.layers),
                failed: None,
            };
            for l in 0..self.layers {
                let make = |kind| {
                    PinnedStrips::new(store.buffer(l, kind), gpu.clone(), strips, strip_bytes)
                };
                pins.layers.push([make(Kind::Keys)?, make(Kind::Values)?]);
                for strips in pins.layers[l].iter_mut() {
                    strips.grow(store.max_host_len(l)? * store.config().row_bytes())?;
                }
            }
            *pinned = Some(pins);
            Ok(())
        })?;
        Ok(())
    }

    /// Undoes `pin` (after the device has finished every queued copy).
    fn unpin(&self, py: Python<'_>) {
        // Unregistering calls the driver; the registrations drop outside the GIL too.
        py.detach(|| self.pinned.lock().take());
    }

    #[getter]
    fn pinned(&self, py: Python<'_>) -> bool {
        py.detach(|| {
            self.pinned
                .lock()
                .as_ref()
                .is_some_and(|p| p.layers.iter().flatten().all(PinnedStrips::is_registered))
        })
    }

    /// Bytes of the store page-locked now (0 when not pinned).
    #[getter]
    fn pinned_bytes(&self, py: Python<'_>) -> usize {
        py.detach(|| self.pinned.lock().as_ref().map_or(0, Pins::bytes))
    }

    /// Bytes of layer ``layer`` (keys and values) page-locked now.
    fn layer_pinned_bytes(&self, py: Python<'_>, layer: Int) -> PyResult<usize> {
        let layer = self.layer(layer)?;
        Ok(py.detach(|| {
            self.pinned.lock().as_ref().map_or(0, |p| {
                p.layers[layer].iter().map(PinnedStrips::pinned_bytes).sum()
            })
        }))
    }

    /// Why page-locking stopped growing, if it did (``None`` otherwise).
    #[getter]
    fn pin_error(&self, py: Python<'_>) -> Option<String> {
        py.detach(|| self.pinned.lock().as_ref().and_then(|p| p.failed.clone()))
    }

    #[getter]
    fn layers(&self) -> usize {
        self.layers
    }
    #[getter]
    fn batch(&self) -> usize {
        self.batch
    }
    #[getter]
    fn kv_heads(&self) -> usize {
        self.kv_heads
    }
    #[getter]
    fn head_dim(&self) -> usize {
        self.head_dim
    }
    #[getter]
    fn dtype(&self) -> &'static str {
        self.dtype.name()
    }
    #[getter]
    fn sinks(&self) -> usize {
        self.store.read().config().sinks
    }
    #[getter]
    fn max_host_tokens(&self) -> usize {
        self.store.read().strip_tokens()
    }
    #[getter]
    fn token_bytes(&self) -> usize {
        self.store.read().config().token_bytes()
    }

    fn total_len(&self, layer: Int) -> PyResult<usize> {
        Ok(self.store.read().total_len(self.layer(layer)?)?)
    }
    fn host_len(&self, layer: Int) -> PyResult<usize> {
        Ok(self.store.read().host_len(self.layer(layer)?)?)
    }
    fn far_key_len(&self, layer: Int) -> PyResult<usize> {
        Ok(self.store.read().far_key_len(self.layer(layer)?)?)
    }
    fn evictable(&self, layer: Int) -> PyResult<usize> {
        Ok(self.store.read().evictable(self.layer(layer)?)?)
    }

    fn append(&self, layer: Int, n: Int) -> PyResult<()> {
        let (layer, n) = (self.layer(layer)?, non_negative("n", n)?);
        Ok(self.store.write().append(layer, n)?)
    }

    fn evict(
        &self,
        py: Python<'_>,
        layer: Int,
        keys: &Bound<'_, PyAny>,
        values: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let layer = self.layer(layer)?;
        self.evict_rows(py, layer, None, keys, values)
    }

    fn spill_keys(&self, layer: Int, m: Int) -> PyResult<()> {
        let (layer, m) = (self.layer(layer)?, non_negative("m", m)?);
        Ok(self.store.write().spill_keys(layer, m)?)
    }

    fn reset(&self) {
        self.store.write().reset()
    }

    fn read(
        &self,
        py: Python<'_>,
        layer: Int,
        start: Int,
        keys_out: &Bound<'_, PyAny>,
        values_out: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let (layer, start) = (self.layer(layer)?, non_negative("start", start)?);
        self.read_rows(py, layer, None, start, keys_out, values_out)
    }

    /// Copies the page summaries of `layer` (every active slot) into `maxima_out` /
    /// `minima_out` `[slots, kv_heads, ceil(host / PAGE_TOKENS), head_dim]` of the store's dtype.
    fn read_summaries(
        &self,
        py: Python<'_>,
        layer: Int,
        maxima_out: &Bound<'_, PyAny>,
        minima_out: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let layer = self.layer(layer)?;
        let shape = [
            Some(self.lockstep_batch()),
            Some(self.kv_heads),
            None,
            Some(self.head_dim),
        ];
        let elem = Elem::of(self.dtype);
        let hi = Tensor::import(maxima_out, "maxima_out", elem, &shape)?.writable("maxima_out")?;
        let lo = Tensor::import(minima_out, "minima_out", elem, &shape)?.writable("minima_out")?;
        distinct(&[("maxima_out", &hi), ("minima_out", &lo)])?;
        let (hb, lb) = (hi.bytes_mut(), lo.bytes_mut());
        run_core(py, || self.store.read().read_summaries(layer, hb, lb))?;
        Ok(())
    }

    /// Zero-copy DLPack capsule of host tokens `[start, stop)` of `kind`.
    fn view(
        &self,
        py: Python<'_>,
        layer: Int,
        kind_name: &str,
        start: Int,
        stop: Int,
    ) -> PyResult<Py<PyAny>> {
        let (layer, kind) = (self.layer(layer)?, kind(kind_name)?);
        let (start, stop) = (non_negative("start", start)?, non_negative("stop", stop)?);
        if stop < start {
            return Err(PyValueError::new_err(format!(
                "stop ({stop}) < start ({start})"
            )));
        }
        let store = self.store.read();
        store.check_host_range(layer, start, stop - start)?;
        let slots = store.lockstep_slots()?;
        let dims = [slots.len(), self.kv_heads, stop - start, self.head_dim];
        let offset = slots.start * self.kv_heads * store.strip_bytes()
            + start * self.head_dim * self.dtype.size();
        export_strips(
            py,
            store.buffer(layer, kind),
            offset,
            dims,
            store.strip_bytes(),
            self.dtype,
        )
    }

    fn token_map<'py>(&self, py: Python<'py>, layer: Int) -> PyResult<Bound<'py, PyArray2<u8>>> {
        let (map, nb) = {
            let store = self.store.read();
            (
                store.token_map(self.layer(layer)?)?,
                store.active_slots().len(),
            )
        };
        let row: Vec<u8> = map.iter().map(|&t| t as u8).collect();
        let total = row.len();
        let all: Vec<u8> = std::iter::repeat_n(row, nb).flatten().collect();
        numpy::PyArray1::from_vec(py, all).reshape([nb, total])
    }

    fn tier_stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let (near, far) = self.store.read().tier_stats();
        let d = PyDict::new(py);
        d.set_item("near", tier_dict(py, &near)?)?;
        d.set_item("far", tier_dict(py, &far)?)?;
        Ok(d)
    }

    /// NUMA node holding host token `index` of `kind` in `layer` (None if the kernel won't say).
    fn node_of(&self, layer: Int, kind_name: &str, index: Int) -> PyResult<Option<u32>> {
        let (layer, kind, index) = (
            self.layer(layer)?,
            kind(kind_name)?,
            non_negative("index", index)?,
        );
        Ok(self.store.read().node_of(layer, kind, index)?)
    }

    #[pyo3(signature = (layer, q, scale, out, indices=None, isa_name=None))]
    #[allow(clippy::too_many_arguments)]
    fn logits(
        &self,
        py: Python<'_>,
        layer: Int,
        q: &Bound<'_, PyAny>,
        scale: f32,
        out: &Bound<'_, PyAny>,
        indices: Option<&Bound<'_, PyAny>>,
        isa_name: Option<&str>,
    ) -> PyResult<()> {
        let (layer, isa, nb) = (self.layer(layer)?, isa(isa_name)?, self.lockstep_batch());
        let q = Tensor::import(q, "q", Elem::F32, &[Some(nb), None, Some(self.head_dim)])?;
        require_finite("q", &q, false)?;
        let hq = self.q_heads_of(&q, 1)?;
        let idx = indices
            .map(|i| {
                Tensor::import(
                    i,
                    "indices",
                    Elem::I64,
                    &[Some(nb), Some(self.kv_heads), None],
                )
            })
            .transpose()?;
        // Without indices the output covers every host token: its length is checked under the
        // same lock the logits are computed under (an eviction in between would change it).
        let n_out = idx.as_ref().map(|i| i.shape()[2]);
        let out =
            Tensor::import(out, "out", Elem::F32, &[Some(nb), Some(hq), n_out])?.writable("out")?;
        let mut inputs = vec![("q", &q)];
        inputs.extend(idx.as_ref().map(|i| ("indices", i)));
        outputs_apart(&[("out", &out)], &inputs)?;
        let (qs, os, is) = (
            q.slice::<f32>(),
            out.slice_mut::<f32>(),
            idx.as_ref().map(|i| i.slice::<i64>()),
        );
        let out_len = out.shape()[2];
        run_core(py, || {
            let store = self.store.read();
            let strips = store.strips(layer)?;
            if is.is_none() && out_len != strips.len() {
                return crate::invalid!(
                    "out holds {out_len} logits per head, but layer {layer} has {} host tokens",
                    strips.len()
                );
            }
            cpu::logits(isa, &strips, qs, hq, scale, is, os)
        })?;
        Ok(())
    }

    fn gather_values(
        &self,
        py: Python<'_>,
        layer: Int,
        indices: &Bound<'_, PyAny>,
        out: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let (layer, nb) = (self.layer(layer)?, self.lockstep_batch());
        let idx = Tensor::import(indices, "indices", Elem::I64, &[Some(nb), None, None])?;
        let hq = self.q_heads_of(&idx, 1)?;
        let k = idx.shape()[2];
        let out = Tensor::import(
            out,
            "out",
            Elem::of(self.dtype),
            &[Some(nb), Some(hq), Some(k), Some(self.head_dim)],
        )?
        .writable("out")?;
        outputs_apart(&[("out", &out)], &[("indices", &idx)])?;
        let (is, os) = (idx.slice::<i64>(), out.bytes_mut());
        run_core(py, || {
            let store = self.store.read();
            cpu::gather_values(&store.strips(layer)?, is, hq, os)
        })?;
        Ok(())
    }

    #[pyo3(signature = (layer, logits, out, lse, indices=None, isa_name=None))]
    #[allow(clippy::too_many_arguments)]
    fn partial_attention(
        &self,
        py: Python<'_>,
        layer: Int,
        logits: &Bound<'_, PyAny>,
        out: &Bound<'_, PyAny>,
        lse: &Bound<'_, PyAny>,
        indices: Option<&Bound<'_, PyAny>>,
        isa_name: Option<&str>,
    ) -> PyResult<()> {
        let (layer, isa, nb) = (self.layer(layer)?, isa(isa_name)?, self.lockstep_batch());
        let x = Tensor::import(logits, "logits", Elem::F32, &[Some(nb), None, None])?;
        require_finite("logits", &x, true)?;
        let hq = self.q_heads_of(&x, 1)?;
        let m = x.shape()[2];
        let idx = indices
            .map(|i| Tensor::import(i, "indices", Elem::I64, &[Some(nb), Some(hq), Some(m)]))
            .transpose()?;
        let out = Tensor::import(
            out,
            "out",
            Elem::F32,
            &[Some(nb), Some(hq), Some(self.head_dim)],
        )?
        .writable("out")?;
        let lse = Tensor::import(lse, "lse", Elem::F32, &[Some(nb), Some(hq)])?.writable("lse")?;
        let mut inputs = vec![("logits", &x)];
        inputs.extend(idx.as_ref().map(|i| ("indices", i)));
        outputs_apart(&[("out", &out), ("lse", &lse)], &inputs)?;
        let (xs, os, ls) = (
            x.slice::<f32>(),
            out.slice_mut::<f32>(),
            lse.slice_mut::<f32>(),
        );
        let is = idx.as_ref().map(|i| i.slice::<i64>());
        run_core(py, || {
            let store = self.store.read();
            cpu::partial_attention(isa, &store.strips(layer)?, xs, hq, is, os, ls)
        })?;
        Ok(())
    }

    // --- request slots ---------------------------------------------------------------------

    /// Takes a free slot (lowest id) for a new sequence; CapacityError when every slot is in use.
    fn add_slot(&self) -> PyResult<usize> {
        Ok(self.store.write().add_slot()?)
    }

    /// Forgets the tokens of `slot` (every layer) and gives it back to the pool.
    fn release_slot(&self, py: Python<'_>, slot: Int) -> PyResult<()> {
        let slot = self.slot(slot)?;
        run_core(py, || self.store.write().release_slot(slot))
    }

    /// Forgets the tokens of `slot` (every layer); the slot stays in use.
    fn reset_slot(&self, py: Python<'_>, slot: Int) -> PyResult<()> {
        let slot = self.slot(slot)?;
        run_core(py, || self.store.write().reset_slot(slot))
    }

    #[getter]
    fn active_slots(&self) -> Vec<usize> {
        self.store.read().active_slots()
    }

    fn slot_total_len(&self, layer: Int, slot: Int) -> PyResult<usize> {
        Ok(self
            .store
            .read()
            .slot_total_len(self.layer(layer)?, self.slot(slot)?)?)
    }
    fn slot_host_len(&self, layer: Int, slot: Int) -> PyResult<usize> {
        Ok(self
            .store
            .read()
            .slot_host_len(self.layer(layer)?, self.slot(slot)?)?)
    }
    fn slot_far_key_len(&self, layer: Int, slot: Int) -> PyResult<usize> {
        Ok(self
            .store
            .read()
            .slot_far_key_len(self.layer(layer)?, self.slot(slot)?)?)
    }
    fn slot_evictable(&self, layer: Int, slot: Int) -> PyResult<usize> {
        Ok(self
            .store
            .read()
            .slot_evictable(self.layer(layer)?, self.slot(slot)?)?)
    }

    fn append_slot(&self, layer: Int, slot: Int, n: Int) -> PyResult<()> {
        let (layer, slot, n) = (self.layer(layer)?, self.slot(slot)?, non_negative("n", n)?);
        Ok(self.store.write().append_slot(layer, slot, n)?)
    }

    /// Moves the `m` oldest non-sink device tokens of `slot`: rows `[kv_heads, m, d]`.
    fn evict_slot(
        &self,
        py: Python<'_>,
        layer: Int,
        slot: Int,
        keys: &Bound<'_, PyAny>,
        values: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let (layer, slot) = (self.layer(layer)?, self.slot(slot)?);
        self.evict_rows(py, layer, Some(slot), keys, values)
    }

    fn spill_slot_keys(&self, layer: Int, slot: Int, m: Int) -> PyResult<()> {
        let (layer, slot, m) = (self.layer(layer)?, self.slot(slot)?, non_negative("m", m)?);
        Ok(self.store.write().spill_slot_keys(layer, slot, m)?)
    }

    /// Copies host tokens `[start, start+len)` of `slot` into `[kv_heads, len, d]` outputs.
    #[allow(clippy::too_many_arguments)]
    fn read_slot(
        &self,
        py: Python<'_>,
        layer: Int,
        slot: Int,
        start: Int,
        keys_out: &Bound<'_, PyAny>,
        values_out: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let (layer, slot, start) = (
            self.layer(layer)?,
            self.slot(slot)?,
            non_negative("start", start)?,
        );
        self.read_rows(py, layer, Some(slot), start, keys_out, values_out)
    }

    /// `uint8 [total]`: the tier of every logical position's key of `slot` in `layer`.
    fn slot_token_map<'py>(
        &self,
        py: Python<'py>,
        layer: Int,
        slot: Int,
    ) -> PyResult<Bound<'py, numpy::PyArray1<u8>>> {
        let map = self
            .store
            .read()
            .slot_token_map(self.layer(layer)?, self.slot(slot)?)?;
        Ok(numpy::PyArray1::from_vec(
            py,
            map.iter().map(|&t| t as u8).collect(),
        ))
    }

    /// The CPU stage over a ragged batch of query rows, each over its own slot's host tokens, in
    /// one call (see `cpu::ragged` for the semantics and `py::slots` for the arguments).
    #[pyo3(signature = (layer, slots, q, scale, merge, top_k=None, positions=None, host_mask=None, isa_name=None,
                        pages=None))]
    #[allow(clippy::too_many_arguments)]
    fn cpu_stage_slots<'py>(
        &self,
        py: Python<'py>,
        layer: Int,
        slots: &Bound<'py, PyAny>,
        q: &Bound<'py, PyAny>,
        scale: f32,
        merge: &str,
        top_k: Option<Int>,
        positions: Option<&Bound<'py, PyAny>>,
        host_mask: Option<&Bound<'py, PyAny>>,
        isa_name: Option<&str>,
        pages: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let call = super::slots::SlotsCall {
            layer: self.layer(layer)?,
            isa: isa(isa_name)?,
            slots,
            q,
            scale,
            merge: Merge::parse(merge)?,
            top_k: top_k.map(|k| non_negative("top_k", k)).transpose()?,
            positions,
            host_mask,
            pages,
        };
        super::slots::cpu_stage_slots(self, py, call)
    }

    /// The CPU stage of one decode step over the host tokens of `layer` in one call (see
    /// `cpu::stage` for the semantics and `py::stage` for how outputs are passed and returned).
    #[pyo3(signature = (layer, q, scale, merge, top_k=None, positions=None, host_mask=None, logits_out=None,
                        values_out=None, indices_out=None, out=None, lse_out=None, isa_name=None,
                        pages=None, per_query_head=false, page_extra=None, kv_indices_out=None))]
    #[allow(clippy::too_many_arguments)]
    fn cpu_stage<'py>(
        &self,
        py: Python<'py>,
        layer: Int,
        q: &Bound<'py, PyAny>,
        scale: f32,
        merge: &str,
        top_k: Option<Int>,
        positions: Option<&Bound<'py, PyAny>>,
        host_mask: Option<&Bound<'py, PyAny>>,
        logits_out: Option<&Bound<'py, PyAny>>,
        values_out: Option<&Bound<'py, PyAny>>,
        indices_out: Option<&Bound<'py, PyAny>>,
        out: Option<&Bound<'py, PyAny>>,
        lse_out: Option<&Bound<'py, PyAny>>,
        isa_name: Option<&str>,
        pages: Option<Int>,
        per_query_head: bool,
        page_extra: Option<&Bound<'py, PyAny>>,
        kv_indices_out: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let call = StageCall {
            pages: pages.map(|p| positive("pages", p)).transpose()?,
            granularity: if per_query_head {
                cpu::Granularity::QueryHead
            } else {
                cpu::Granularity::KvHead
            },
            page_extra,
            layer: self.layer(layer)?,
            isa: isa(isa_name)?,
            q,
            scale,
            merge: Merge::parse(merge)?,
            top_k: top_k.map(|k| non_negative("top_k", k)).transpose()?,
            positions,
            host_mask,
        };
        let outs = OutputArgs {
            logits: logits_out,
            values: values_out,
            indices: indices_out,
            out,
            lse: lse_out,
            kv_indices: kv_indices_out,
        };
        super::stage::cpu_stage(self, py, call, outs)
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyHostKvStore>()
}
