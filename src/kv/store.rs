//! Storage, token map and tier accounting of the host KV store.
//!
//! Layout: per layer and kind (keys, values) one mapping of `batch × kv_heads` strips; strip
//! `(seq, head)` holds that head's rows for host tokens `0..strip_tokens` contiguously, so the
//! CPU scans one contiguous run per head. Strips start on page boundaries, so moving a key range
//! between NUMA nodes is an `mbind` of whole pages with unchanged addresses: zero-copy views and
//! cached pointers stay valid across tier moves.
//!
//! Logical positions of a layer (identical for every sequence in the batch):
//! `[0, sinks)` device (sinks) · `[sinks, sinks+far_keys)` host, keys in the far tier ·
//! `[.., sinks+host)` host, keys in the near tier · `[sinks+host, total)` device (recent).
//! Values of every host token live in the far tier.

use std::sync::Arc;

use super::config::StoreConfig;
use crate::cpu::Strips;
use crate::ensure;
use crate::error::{Error, Result};
use crate::mem::{numa::NodePlacement, round_up_to_page, HostBuffer, PAGE_SIZE};

/// Where a token's key lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Tier {
    Device = 0,
    Near = 1,
    Far = 2,
}

impl Tier {
    /// Every tier, indexed by its value in a token map.
    pub const ALL: [Tier; 3] = [Tier::Device, Tier::Near, Tier::Far];

    pub fn name(self) -> &'static str {
        match self {
            Tier::Device => "device",
            Tier::Near => "near",
            Tier::Far => "far",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Keys,
    Values,
}

/// Accounting of one tier, for reporting and tests.
#[derive(Clone, Debug)]
pub struct TierStats {
    pub placement: NodePlacement,
    pub capacity_bytes: usize,
    pub used_bytes: usize,
    pub key_tokens: usize,
    pub value_tokens: usize,
}

/// One layer's keys or values: `batch × kv_heads` page-aligned strips.
struct Region {
    buf: Arc<HostBuffer>,
    strip_bytes: usize,
}

#[derive(Clone, Copy, Debug, Default)]
struct LayerState {
    /// Logical length (device + host tokens).
    total: usize,
    /// Host tokens (all have values in the far tier).
    host: usize,
    /// The oldest `far_keys` host tokens have their keys in the far tier.
    far_keys: usize,
    /// Bytes at the start of every key strip already migrated to the far node.
    migrated_bytes: usize,
}

struct TierState {
    placement: NodePlacement,
    capacity: usize,
    used: usize,
}

impl TierState {
    fn free(&self) -> usize {
        self.capacity - self.used
    }
}

pub struct KvStore {
    cfg: StoreConfig,
    strip_tokens: usize,
    keys: Vec<Region>,
    values: Vec<Region>,
    layers: Vec<LayerState>,
    near: TierState,
    far: TierState,
}

impl KvStore {
    pub fn new(cfg: StoreConfig) -> Result<Self> {
        cfg.validate()?;
        let strip_tokens = cfg.strip_tokens();
        let strip_bytes = round_up_to_page(strip_tokens * cfg.row_bytes());
        let strips = cfg.batch * cfg.kv_heads;
        let near = TierState {
            placement: NodePlacement::resolve(cfg.near.node),
            capacity: cfg.near.capacity_bytes,
            used: 0,
        };
        let far = TierState {
            placement: NodePlacement::resolve(cfg.far.node),
            capacity: cfg.far.capacity_bytes,
            used: 0,
        };
        let region = |node: u32| -> Result<Region> {
            let buf = HostBuffer::new(strips * strip_bytes)?;
            // Bind before first touch so pages are born on the right node. Refusal (no NUMA
            // support in a container) leaves the default policy: placement is best effort.
            let _ = buf.bind(0, buf.len(), node);
            Ok(Region { buf: Arc::new(buf), strip_bytes })
        };
        let mut keys = Vec::with_capacity(cfg.layers);
        let mut values = Vec::with_capacity(cfg.layers);
        for _ in 0..cfg.layers {
            keys.push(region(near.placement.node)?);
            values.push(region(far.placement.node)?);
        }
        Ok(KvStore {
            layers: vec![LayerState::default(); cfg.layers],
            cfg,
            strip_tokens,
            keys,
            values,
            near,
            far,
        })
    }

    pub fn config(&self) -> &StoreConfig {
        &self.cfg
    }

    /// Host tokens one layer can hold at most (the strip length).
    pub fn strip_tokens(&self) -> usize {
        self.strip_tokens
    }

    fn check_layer(&self, layer: usize) -> Result<()> {
        ensure!(
            layer < self.cfg.layers,
            "layer {layer} out of range: the store has {} layers",
            self.cfg.layers
        );
        Ok(())
    }

    /// Logical length of `layer` (device + host).
    pub fn total_len(&self, layer: usize) -> Result<usize> {
        self.check_layer(layer)?;
        Ok(self.layers[layer].total)
    }

    /// Host tokens of `layer`.
    pub fn host_len(&self, layer: usize) -> Result<usize> {
        self.check_layer(layer)?;
        Ok(self.layers[layer].host)
    }

    /// Host tokens of `layer` whose keys are in the far tier (the oldest ones).
    pub fn far_key_len(&self, layer: usize) -> Result<usize> {
        self.check_layer(layer)?;
        Ok(self.layers[layer].far_keys)
    }

    /// Logical position of host token 0 (the sinks stay on the device before it).
    pub fn host_start(&self) -> usize {
        self.cfg.sinks
    }

    /// Device tokens of `layer` that may be evicted to the host now (non-sink, oldest first).
    pub fn evictable(&self, layer: usize) -> Result<usize> {
        self.check_layer(layer)?;
        let s = &self.layers[layer];
        Ok(s.total - s.total.min(self.cfg.sinks) - s.host)
    }

    /// Records `n` new tokens on the device tier of `layer` (their data stays with the caller).
    pub fn append(&mut self, layer: usize, n: usize) -> Result<()> {
        self.check_layer(layer)?;
        let total = self.layers[layer].total;
        match total.checked_add(n).filter(|&t| t <= super::config::MAX_TOKENS) {
            Some(t) => self.layers[layer].total = t,
            None => {
                return crate::invalid!(
                    "appending {n} tokens to layer {layer} (holding {total}) exceeds the {} tokens a layer may hold",
                    super::config::MAX_TOKENS
                )
            }
        }
        Ok(())
    }

    /// Moves the `m` oldest non-sink device tokens of `layer` to the host: `keys`/`values` are
    /// their rows, `[batch, kv_heads, m, head_dim]` contiguous in the store's dtype, as bytes.
    ///
    /// Keys go to the near tier; if it overflows, the least recently generated keys (of any
    /// layer) move to the far tier. Values go to the far tier. If the far tier cannot take all
    /// of that, nothing changes and `Error::Capacity` is returned.
    pub fn evict(&mut self, layer: usize, m: usize, keys: &[u8], values: &[u8]) -> Result<()> {
        self.check_layer(layer)?;
        let tb = self.cfg.token_bytes();
        ensure!(
            keys.len() == m * tb && values.len() == m * tb,
            "evict of {m} tokens needs {} bytes of keys and of values, got {} and {}",
            m * tb,
            keys.len(),
            values.len()
        );
        let evictable = self.evictable(layer)?;
        ensure!(
            m <= evictable,
            "cannot evict {m} tokens from layer {layer}: only {evictable} non-sink device tokens"
        );
        let host = self.layers[layer].host;
        if host + m > self.strip_tokens {
            return Err(Error::Capacity(format!(
                "layer {layer} would hold {} host tokens, more than the {} reserved \
                 (max_host_tokens / far tier capacity)",
                host + m,
                self.strip_tokens
            )));
        }
        let spill = (self.near.used + m * tb).saturating_sub(self.near.capacity).div_ceil(tb);
        let far_needed = (m + spill) * tb;
        if far_needed > self.far.free() {
            return Err(Error::Capacity(format!(
                "far tier full: evicting {m} tokens needs {far_needed} bytes ({m} tokens of \
                 values, {spill} of spilled keys), {} of {} bytes free",
                self.far.free(),
                self.far.capacity
            )));
        }
        self.write_rows(layer, host, m, keys, values);
        self.layers[layer].host += m;
        self.near.used += m * tb;
        self.far.used += m * tb;
        while self.near.used > self.near.capacity {
            let deficit = (self.near.used - self.near.capacity).div_ceil(tb);
            let (victim, count) = self.oldest_near_keys(deficit);
            self.move_keys_to_far(victim, count);
        }
        Ok(())
    }

    /// Moves the `m` oldest near-tier keys of `layer` to the far tier.
    pub fn spill_keys(&mut self, layer: usize, m: usize) -> Result<()> {
        self.check_layer(layer)?;
        let s = self.layers[layer];
        let near_keys = s.host - s.far_keys;
        ensure!(
            m <= near_keys,
            "cannot spill {m} keys of layer {layer}: only {near_keys} keys are in the near tier"
        );
        let bytes = m * self.cfg.token_bytes();
        if bytes > self.far.free() {
            return Err(Error::Capacity(format!(
                "far tier full: spilling {m} keys needs {bytes} bytes, {} free",
                self.far.free()
            )));
        }
        self.move_keys_to_far(layer, m);
        Ok(())
    }

    /// Forgets every token of every layer (a new batch of sequences) and returns the pages.
    pub fn reset(&mut self) {
        for layer in 0..self.cfg.layers {
            for region in [&self.keys[layer], &self.values[layer]] {
                region.buf.release(0, region.buf.len());
            }
            if self.layers[layer].migrated_bytes > 0 {
                let _ = self.keys[layer].buf.bind(0, self.keys[layer].buf.len(), self.near.placement.node);
            }
            self.layers[layer] = LayerState::default();
        }
        self.near.used = 0;
        self.far.used = 0;
    }

    /// The tier of the key at every logical position of `layer` (the same for every sequence).
    pub fn token_map(&self, layer: usize) -> Result<Vec<Tier>> {
        self.check_layer(layer)?;
        let s = self.layers[layer];
        let sinks = s.total.min(self.cfg.sinks);
        let mut map = vec![Tier::Device; s.total];
        map[sinks..sinks + s.far_keys].fill(Tier::Far);
        map[sinks + s.far_keys..sinks + s.host].fill(Tier::Near);
        Ok(map)
    }

    pub fn tier_stats(&self) -> (TierStats, TierStats) {
        let far_keys: usize = self.layers.iter().map(|s| s.far_keys).sum();
        let host: usize = self.layers.iter().map(|s| s.host).sum();
        let near = TierStats {
            placement: self.near.placement.clone(),
            capacity_bytes: self.near.capacity,
            used_bytes: self.near.used,
            key_tokens: host - far_keys,
            value_tokens: 0,
        };
        let far = TierStats {
            placement: self.far.placement.clone(),
            capacity_bytes: self.far.capacity,
            used_bytes: self.far.used,
            key_tokens: far_keys,
            value_tokens: host,
        };
        (near, far)
    }

    /// Base address of strip `(seq, head)` of `kind` in `layer`: `strip_tokens` rows of
    /// `head_dim` elements; the first `host_len(layer)` rows are valid.
    pub fn strip_ptr(&self, layer: usize, kind: Kind, seq: usize, head: usize) -> *const u8 {
        let region = self.region(layer, kind);
        let offset = (seq * self.cfg.kv_heads + head) * region.strip_bytes;
        // SAFETY: offset < region length for seq < batch and head < kv_heads.
        unsafe { region.buf.as_ptr().add(offset) }
    }

    /// The host strips of `layer`, for the CPU attention operations; they borrow the store, so
    /// no eviction or reset can change the rows while they are in use.
    pub fn strips(&self, layer: usize) -> Result<Strips<'_>> {
        self.check_layer(layer)?;
        let (keys, values) = (&self.keys[layer], &self.values[layer]);
        // SAFETY: both regions hold batch × kv_heads page-aligned strips of strip_bytes >=
        // strip_tokens rows >= host rows (rows are whole elements, so aligned for the dtype);
        // the mappings live as long as `self`. The store writes them only through `&mut self`
        // (`evict`, `reset`), which the returned borrow of `self` excludes; the zero-copy views
        // it exports are read-only by contract (`HostKVStore.view`).
        Ok(unsafe {
            Strips::from_raw(
                keys.buf.as_ptr(),
                values.buf.as_ptr(),
                keys.strip_bytes,
                self.cfg.batch,
                self.cfg.kv_heads,
                self.cfg.head_dim,
                self.cfg.dtype,
                self.layers[layer].host,
            )
        })
    }

    /// Distance in bytes between consecutive strips (heads) of a region.
    pub fn strip_bytes(&self) -> usize {
        self.keys[0].strip_bytes
    }

    /// The mapping behind `kind` of `layer` (kept alive by zero-copy views).
    pub fn buffer(&self, layer: usize, kind: Kind) -> Arc<HostBuffer> {
        Arc::clone(&self.region(layer, kind).buf)
    }

    fn region(&self, layer: usize, kind: Kind) -> &Region {
        match kind {
            Kind::Keys => &self.keys[layer],
            Kind::Values => &self.values[layer],
        }
    }

    /// Checks that host tokens `[start, start+len)` exist in `layer`.
    pub fn check_host_range(&self, layer: usize, start: usize, len: usize) -> Result<()> {
        self.check_layer(layer)?;
        let host = self.layers[layer].host;
        ensure!(
            start.checked_add(len).is_some_and(|end| end <= host),
            "host range [{start}, {}) out of bounds: layer {layer} holds {host} host tokens",
            start.saturating_add(len)
        );
        Ok(())
    }

    /// Copies host tokens `[start, start+len)` of `layer` out as `[batch, kv_heads, len, d]`.
    pub fn read(&self, layer: usize, start: usize, len: usize, keys: &mut [u8], values: &mut [u8]) -> Result<()> {
        self.check_host_range(layer, start, len)?;
        let need = len * self.cfg.token_bytes();
        ensure!(
            keys.len() == need && values.len() == need,
            "read of {len} tokens needs {need}-byte outputs, got {} and {}",
            keys.len(),
            values.len()
        );
        let (row, run) = (self.cfg.row_bytes(), len * self.cfg.row_bytes());
        for (strip, seq, head) in self.strip_indices() {
            for (kind, out) in [(Kind::Keys, &mut *keys), (Kind::Values, &mut *values)] {
                let src = self.strip_ptr(layer, kind, seq, head);
                // SAFETY: the range was checked against host_len <= strip_tokens.
                let src = unsafe { std::slice::from_raw_parts(src.add(start * row), run) };
                out[strip * run..(strip + 1) * run].copy_from_slice(src);
            }
        }
        Ok(())
    }

    /// The NUMA node holding host token `index` of `kind` in `layer` (sequence 0, head 0), as
    /// the kernel reports it; `None` if the kernel does not say.
    pub fn node_of(&self, layer: usize, kind: Kind, index: usize) -> Result<Option<u32>> {
        self.check_host_range(layer, index, 1)?;
        let offset = index * self.cfg.row_bytes();
        Ok(self.region(layer, kind).buf.node_at(offset).ok())
    }

    /// Every strip of a region as `(index, seq, head)`, in storage order.
    fn strip_indices(&self) -> impl Iterator<Item = (usize, usize, usize)> {
        let heads = self.cfg.kv_heads;
        (0..self.cfg.batch * heads).map(move |i| (i, i / heads, i % heads))
    }

    fn write_rows(&mut self, layer: usize, start: usize, m: usize, keys: &[u8], values: &[u8]) {
        let (row, run) = (self.cfg.row_bytes(), m * self.cfg.row_bytes());
        for (strip, seq, head) in self.strip_indices() {
            for (kind, src) in [(Kind::Keys, keys), (Kind::Values, values)] {
                let dst = self.strip_ptr(layer, kind, seq, head) as *mut u8;
                // SAFETY: start + m <= strip_tokens was checked by the caller; the source run
                // has exactly `run` bytes; store writes are serialised by `&mut self`.
                unsafe { std::ptr::copy_nonoverlapping(src[strip * run..].as_ptr(), dst.add(start * row), run) };
            }
        }
    }

    /// The layer holding the least recently generated near-tier key, and how many of its
    /// oldest near keys to move (at most `want`, never past another layer's oldest near key).
    fn oldest_near_keys(&self, want: usize) -> (usize, usize) {
        let mut candidates = self
            .layers
            .iter()
            .enumerate()
            .filter(|(_, s)| s.host > s.far_keys)
            .map(|(l, s)| (s.far_keys, l));
        let (pos, layer) = candidates.next().expect("near tier over budget but holds no keys");
        let (mut best_pos, mut best_layer, mut runner_up) = (pos, layer, usize::MAX);
        for (pos, l) in candidates {
            if pos < best_pos {
                runner_up = best_pos;
                best_pos = pos;
                best_layer = l;
            } else {
                runner_up = runner_up.min(pos);
            }
        }
        let s = self.layers[best_layer];
        let until_runner_up = runner_up.saturating_sub(best_pos).max(1);
        (best_layer, want.min(s.host - s.far_keys).min(until_runner_up))
    }

    fn move_keys_to_far(&mut self, layer: usize, m: usize) {
        let tb = self.cfg.token_bytes();
        self.layers[layer].far_keys += m;
        self.near.used -= m * tb;
        self.far.used += m * tb;
        self.migrate_far_key_pages(layer);
    }

    /// Migrates the whole pages now covered by far-tier keys of every strip of `layer`.
    fn migrate_far_key_pages(&mut self, layer: usize) {
        if self.near.placement.node == self.far.placement.node {
            return; // same node: the move is pure accounting
        }
        let covered = self.layers[layer].far_keys * self.cfg.row_bytes() / PAGE_SIZE * PAGE_SIZE;
        let done = self.layers[layer].migrated_bytes;
        if covered <= done {
            return;
        }
        let region = &self.keys[layer];
        for strip in 0..self.cfg.batch * self.cfg.kv_heads {
            let _ = region.buf.bind(strip * region.strip_bytes + done, covered - done, self.far.placement.node);
        }
        self.layers[layer].migrated_bytes = covered;
    }
}
