//! Storage, token map and tier accounting of the host KV store.
//!
//! Layout: per layer and kind (keys, values) one mapping of `batch × kv_heads` strips; strip
//! `(slot, head)` holds that head's rows for host tokens `0..strip_tokens` contiguously, so the
//! CPU scans one contiguous run per head. Strips start on page boundaries, so moving a key range
//! between NUMA nodes is an `mbind` of whole pages with unchanged addresses: zero-copy views and
//! cached pointers stay valid across tier moves.
//!
//! Slots: the `batch` sequences are a pool (`slots`): each slot has its own length in every
//! layer and is added, reset and released on its own (a serving engine's ragged batch). The
//! layer-wide calls (`append(layer, n)`, `evict(layer, ..)`, `host_len(layer)`...) are the
//! lockstep batch: they apply to every active slot, require those to have one length, and are
//! loops over the per-slot logic (all slots checked first, so an error changes nothing).
//!
//! Logical positions of one sequence (slot) in a layer:
//! `[0, sinks)` device (sinks) · `[sinks, sinks+far_keys)` host, keys in the far tier ·
//! `[.., sinks+host)` host, keys in the near tier · `[sinks+host, total)` device (recent).
//! Values of every host token live in the far tier. Tier accounting is per token per slot
//! (`kv_heads` rows of keys or values).
//!
//! Page summaries (`summaries`): per page of `PAGE_TOKENS` host tokens and (slot, KV head) the
//! element-wise maximum and minimum of the keys, kept in the near node's memory beside the
//! keys. Eviction writes them from the rows it writes (plus the rows already in a partial page:
//! at most `PAGE_TOKENS - 1` per head), so they never cost a pass over the store. They hold
//! `2 / PAGE_TOKENS` of the key bytes and are not counted against the tiers' capacities.

use std::sync::Arc;

use super::config::{StoreConfig, MAX_TOKENS};
use super::slots::SlotPool;
use super::spill;
use crate::cpu::pages::summarize_rows;
use crate::cpu::simd::with_element;
use crate::cpu::{PageSummaries, Strips, PAGE_TOKENS};
use crate::ensure;
use crate::error::{Error, Result};
use crate::mem::numa::{self, NodePlacement};
use crate::mem::{round_up_to_page, HostBuffer, PAGE_SIZE};

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
    /// Keys (values) held, in tokens of the whole batch (`token_bytes` each): the per-slot
    /// count below divided by `batch`, rounded down; exact for a lockstep batch.
    pub key_tokens: usize,
    pub value_tokens: usize,
    /// Keys (values) held, one per (layer, slot, position).
    pub key_slot_tokens: usize,
    pub value_slot_tokens: usize,
}

/// One layer's keys or values: `batch × kv_heads` page-aligned strips.
struct Region {
    buf: Arc<HostBuffer>,
    strip_bytes: usize,
}

/// One sequence (slot) in one layer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct SeqState {
    /// Logical length (device + host tokens).
    total: usize,
    /// Host tokens (all have values in the far tier).
    host: usize,
    /// The oldest `far_keys` host tokens have their keys in the far tier.
    far_keys: usize,
    /// Bytes at the start of each of the slot's key strips already migrated to the far node.
    migrated_bytes: usize,
}

impl SeqState {
    fn evictable(&self, sinks: usize) -> usize {
        self.total - self.total.min(sinks) - self.host
    }

    fn near_keys(&self) -> usize {
        self.host - self.far_keys
    }
}

struct TierState {
    placement: NodePlacement,
    capacity: usize,
    used: usize,
    /// Bytes the tier's node was last seen to have to spare (after [`NODE_RESERVE_BYTES`]),
    /// less what the tier wrote since: the node's memory is read again only when a write needs
    /// more than this.
    node_headroom: usize,
}

/// Memory a tier leaves its node when it checks the node has room: the kernel's own
/// watermarks and whatever else the node serves.
pub const NODE_RESERVE_BYTES: usize = 64 << 20;

impl TierState {
    fn free(&self) -> usize {
        self.capacity - self.used
    }

    /// Checks that the tier's node can take `bytes` more before anything is written (memory
    /// bound to one node never falls back: a full node means the OOM killer, not an error).
    /// Counts them as taken; the node is asked again when the last answer no longer covers
    /// a write. No check where the kernel gives no per-node count.
    fn take_node_memory(&mut self, bytes: usize, what: &str) -> Result<()> {
        if bytes <= self.node_headroom {
            self.node_headroom -= bytes;
            return Ok(());
        }
        let node = self.placement.node;
        let Some(available) = numa::node_available_bytes(node) else {
            return Ok(());
        };
        let spare = available.saturating_sub(NODE_RESERVE_BYTES);
        if bytes > spare {
            return Err(Error::Capacity(format!(
                "NUMA node {node} is full: {what} needs {bytes} bytes there, the node has {available} bytes \
                 available ({NODE_RESERVE_BYTES} kept for the kernel); lower the tier's capacity below the \
                 node's memory"
            )));
        }
        self.node_headroom = spare - bytes;
        Ok(())
    }
}

pub struct KvStore {
    cfg: StoreConfig,
    strip_tokens: usize,
    keys: Vec<Region>,
    values: Vec<Region>,
    /// Per layer the page summaries: strip `(slot, head)` holds `max_pages` rows of page maxima,
    /// then at `summary_minima` bytes the rows of page minima.
    summaries: Vec<Region>,
    summary_minima: usize,
    /// Per (layer, slot), at `layer · batch + slot`.
    seqs: Vec<SeqState>,
    slots: SlotPool,
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
            node_headroom: 0,
        };
        let far = TierState {
            placement: NodePlacement::resolve(cfg.far.node),
            capacity: cfg.far.capacity_bytes,
            used: 0,
            node_headroom: 0,
        };
        let region = |node: u32, strip_bytes: usize| -> Result<Region> {
            let buf = HostBuffer::new(strips * strip_bytes)?;
            // Bind before first touch so pages are born on the right node. Refusal (no NUMA
            // support in a container) leaves the default policy: placement is best effort.
            let _ = buf.bind(0, buf.len(), node);
            Ok(Region {
                buf: Arc::new(buf),
                strip_bytes,
            })
        };
        let summary_minima = strip_tokens.div_ceil(PAGE_TOKENS) * cfg.row_bytes();
        let summary_strip = round_up_to_page(2 * summary_minima);
        let mut keys = Vec::with_capacity(cfg.layers);
        let mut values = Vec::with_capacity(cfg.layers);
        let mut summaries = Vec::with_capacity(cfg.layers);
        for _ in 0..cfg.layers {
            keys.push(region(near.placement.node, strip_bytes)?);
            values.push(region(far.placement.node, strip_bytes)?);
            summaries.push(region(near.placement.node, summary_strip)?);
        }
        Ok(KvStore {
            seqs: vec![SeqState::default(); cfg.layers * cfg.batch],
            slots: SlotPool::full(cfg.batch),
            cfg,
            strip_tokens,
            keys,
            values,
            summaries,
            summary_minima,
            near,
            far,
        })
    }

    pub fn config(&self) -> &StoreConfig {
        &self.cfg
    }

    /// Host tokens one sequence can hold at most in one layer (the strip length).
    pub fn strip_tokens(&self) -> usize {
        self.strip_tokens
    }

    /// Bytes of one token of one slot, keys or values: kv_heads × head_dim × dtype.
    pub fn slot_token_bytes(&self) -> usize {
        self.cfg.kv_heads * self.cfg.row_bytes()
    }

    fn check_layer(&self, layer: usize) -> Result<()> {
        ensure!(
            layer < self.cfg.layers,
            "layer {layer} out of range: the store has {} layers",
            self.cfg.layers
        );
        Ok(())
    }

    /// Checks `layer` and that `slot` is in use.
    fn check_seq(&self, layer: usize, slot: usize) -> Result<()> {
        self.check_layer(layer)?;
        self.slots.check(slot)
    }

    fn seq(&self, layer: usize, slot: usize) -> &SeqState {
        &self.seqs[layer * self.cfg.batch + slot]
    }

    fn seq_mut(&mut self, layer: usize, slot: usize) -> &mut SeqState {
        &mut self.seqs[layer * self.cfg.batch + slot]
    }

    // --- the pool of slots -----------------------------------------------------------------

    /// The slots in use, ascending (all `batch` of them in a new store).
    pub fn active_slots(&self) -> Vec<usize> {
        self.slots.active()
    }

    pub fn is_active(&self, slot: usize) -> bool {
        self.slots.is_active(slot)
    }

    /// Takes a free slot (the lowest id) for a new sequence, empty in every layer.
    /// `Error::Capacity` when every slot is in use.
    pub fn add_slot(&mut self) -> Result<usize> {
        self.slots.acquire()
    }

    /// Forgets every token of `slot` in every layer and returns its pages; the slot stays in use.
    pub fn reset_slot(&mut self, slot: usize) -> Result<()> {
        self.slots.check(slot)?;
        self.clear_slot(slot);
        Ok(())
    }

    /// Resets `slot` and gives it back to the pool.
    pub fn release_slot(&mut self, slot: usize) -> Result<()> {
        self.slots.check(slot)?;
        self.clear_slot(slot);
        self.slots.release(slot);
        Ok(())
    }

    fn clear_slot(&mut self, slot: usize) {
        let st = self.slot_token_bytes();
        let span = self.cfg.kv_heads * self.keys[0].strip_bytes;
        for layer in 0..self.cfg.layers {
            let s = *self.seq(layer, slot);
            self.near.used -= s.near_keys() * st;
            self.far.used -= (s.host + s.far_keys) * st;
            for region in [&self.keys[layer], &self.values[layer]] {
                region.buf.release(slot * span, span);
            }
            let summary_span = self.cfg.kv_heads * self.summaries[layer].strip_bytes;
            self.summaries[layer]
                .buf
                .release(slot * summary_span, summary_span);
            if s.migrated_bytes > 0 {
                let _ = self.keys[layer]
                    .buf
                    .bind(slot * span, span, self.near.placement.node);
            }
            *self.seq_mut(layer, slot) = SeqState::default();
        }
    }

    /// Forgets every token of every slot (the slots in use stay in use) and returns the pages.
    pub fn reset(&mut self) {
        for layer in 0..self.cfg.layers {
            for region in [
                &self.keys[layer],
                &self.values[layer],
                &self.summaries[layer],
            ] {
                region.buf.release(0, region.buf.len());
            }
            let seqs = &mut self.seqs[layer * self.cfg.batch..(layer + 1) * self.cfg.batch];
            if seqs.iter().any(|s| s.migrated_bytes > 0) {
                let _ = self.keys[layer].buf.bind(
                    0,
                    self.keys[layer].buf.len(),
                    self.near.placement.node,
                );
            }
            seqs.fill(SeqState::default());
        }
        self.near.used = 0;
        self.far.used = 0;
    }

    // --- one slot ------------------------------------------------------------------------------

    /// Logical length of `slot` in `layer` (device + host).
    pub fn slot_total_len(&self, layer: usize, slot: usize) -> Result<usize> {
        self.check_seq(layer, slot)?;
        Ok(self.seq(layer, slot).total)
    }

    /// Host tokens of `slot` in `layer`.
    pub fn slot_host_len(&self, layer: usize, slot: usize) -> Result<usize> {
        self.check_seq(layer, slot)?;
        Ok(self.seq(layer, slot).host)
    }

    /// Host tokens of `slot` in `layer` whose keys are in the far tier (the oldest ones).
    pub fn slot_far_key_len(&self, layer: usize, slot: usize) -> Result<usize> {
        self.check_seq(layer, slot)?;
        Ok(self.seq(layer, slot).far_keys)
    }

    /// Device tokens of `slot` in `layer` that may be evicted now (non-sink, oldest first).
    pub fn slot_evictable(&self, layer: usize, slot: usize) -> Result<usize> {
        self.check_seq(layer, slot)?;
        Ok(self.seq(layer, slot).evictable(self.cfg.sinks))
    }

    /// Records `n` new device tokens of `slot` in `layer`.
    pub fn append_slot(&mut self, layer: usize, slot: usize, n: usize) -> Result<()> {
        self.check_seq(layer, slot)?;
        self.append_to(layer, &[slot], n)
    }

    /// Moves the `m` oldest non-sink device tokens of `slot` in `layer` to the host: `keys` /
    /// `values` are their rows `[kv_heads, m, head_dim]`, contiguous, as bytes. As `evict`.
    pub fn evict_slot(
        &mut self,
        layer: usize,
        slot: usize,
        m: usize,
        keys: &[u8],
        values: &[u8],
    ) -> Result<()> {
        self.check_seq(layer, slot)?;
        self.evict_from(layer, &[slot], m, keys, values)
    }

    /// Moves the `m` oldest near-tier keys of `slot` in `layer` to the far tier.
    pub fn spill_slot_keys(&mut self, layer: usize, slot: usize, m: usize) -> Result<()> {
        self.check_seq(layer, slot)?;
        self.spill_from(layer, &[slot], m)
    }

    /// The tier of the key at every logical position of `slot` in `layer`.
    pub fn slot_token_map(&self, layer: usize, slot: usize) -> Result<Vec<Tier>> {
        self.check_seq(layer, slot)?;
        let s = self.seq(layer, slot);
        let sinks = s.total.min(self.cfg.sinks);
        let mut map = vec![Tier::Device; s.total];
        map[sinks..sinks + s.far_keys].fill(Tier::Far);
        map[sinks + s.far_keys..sinks + s.host].fill(Tier::Near);
        Ok(map)
    }

    /// Copies host tokens `[start, start+len)` of `slot` in `layer` out as `[kv_heads, len, d]`.
    pub fn read_slot(
        &self,
        layer: usize,
        slot: usize,
        start: usize,
        len: usize,
        keys: &mut [u8],
        values: &mut [u8],
    ) -> Result<()> {
        self.check_seq(layer, slot)?;
        self.read_from(layer, &[slot], start, len, keys, values)
    }

    /// The host strips of `slot` in `layer` (batch 1, the slot's host length), for the CPU
    /// attention operations; they borrow the store as `strips` does.
    pub fn slot_strips(&self, layer: usize, slot: usize) -> Result<Strips<'_>> {
        self.check_seq(layer, slot)?;
        self.all_strips(layer, self.strip_tokens)
            .sequences(slot, 1, self.seq(layer, slot).host)
    }

    /// The page summaries of `slot` in `layer` (batch 1), borrowing the store as `slot_strips`.
    pub fn slot_summaries(&self, layer: usize, slot: usize) -> Result<PageSummaries<'_>> {
        self.check_seq(layer, slot)?;
        let pages = self.seq(layer, slot).host.div_ceil(PAGE_TOKENS);
        self.all_summaries(layer, pages, slot, 1)
    }

    // --- the lockstep batch: every active slot, one length -----------------------------------

    /// `f` of every active slot of `layer`, which must agree (`what` names it in the error).
    fn uniform(&self, layer: usize, what: &str, f: impl Fn(&SeqState) -> usize) -> Result<usize> {
        self.check_layer(layer)?;
        let mut first: Option<(usize, usize)> = None;
        for slot in self.slots.active() {
            let v = f(self.seq(layer, slot));
            match first {
                None => first = Some((slot, v)),
                Some((s0, v0)) if v0 != v => {
                    return crate::invalid!(
                        "slots have different {what} in layer {layer} (slot {s0}: {v0}, slot {slot}: {v}): use the per-slot calls"
                    )
                }
                Some(_) => {}
            }
        }
        Ok(first.map_or(0, |(_, v)| v))
    }

    /// The active slots, after checking they have one logical and one host length in `layer`.
    fn lockstep(&self, layer: usize) -> Result<Vec<usize>> {
        self.uniform(layer, "lengths", |s| s.total)?;
        self.uniform(layer, "host lengths", |s| s.host)?;
        Ok(self.slots.active())
    }

    /// The active slots as one range `a..a+n` (what a strided view of the batch needs).
    pub fn lockstep_slots(&self) -> Result<std::ops::Range<usize>> {
        let active = self.slots.active();
        let (a, n) = (active.first().copied().unwrap_or(0), active.len());
        ensure!(
            active.last().is_none_or(|&last| last + 1 - a == n),
            "the active slots {active:?} are not contiguous: use the per-slot calls (cpu_stage_slots)"
        );
        Ok(a..a + n)
    }

    /// Logical length of `layer` (device + host), the same for every active slot.
    pub fn total_len(&self, layer: usize) -> Result<usize> {
        self.uniform(layer, "lengths", |s| s.total)
    }

    /// Host tokens of `layer`, the same for every active slot.
    pub fn host_len(&self, layer: usize) -> Result<usize> {
        self.uniform(layer, "host lengths", |s| s.host)
    }

    /// Host tokens of `layer` whose keys are in the far tier (the oldest ones).
    pub fn far_key_len(&self, layer: usize) -> Result<usize> {
        self.uniform(layer, "far key counts", |s| s.far_keys)
    }

    /// The most host tokens any active slot holds in `layer` (how far the strips are filled).
    pub fn max_host_len(&self, layer: usize) -> Result<usize> {
        self.check_layer(layer)?;
        Ok(self
            .slots
            .active()
            .iter()
            .map(|&slot| self.seq(layer, slot).host)
            .max()
            .unwrap_or(0))
    }

    /// Logical position of host token 0 (the sinks stay on the device before it).
    pub fn host_start(&self) -> usize {
        self.cfg.sinks
    }

    /// Device tokens of `layer` that may be evicted to the host now (non-sink, oldest first).
    pub fn evictable(&self, layer: usize) -> Result<usize> {
        let sinks = self.cfg.sinks;
        self.uniform(layer, "evictable counts", |s| s.evictable(sinks))
    }

    /// Records `n` new tokens on the device tier of `layer` for every active slot.
    pub fn append(&mut self, layer: usize, n: usize) -> Result<()> {
        let slots = self.lockstep(layer)?;
        self.append_to(layer, &slots, n)
    }

    /// Moves the `m` oldest non-sink device tokens of `layer` to the host for every active slot:
    /// `keys`/`values` are their rows, `[active slots, kv_heads, m, head_dim]` contiguous in the
    /// store's dtype, as bytes.
    ///
    /// Keys go to the near tier; if it overflows, the least recently generated keys (of any
    /// layer and slot) move to the far tier. Values go to the far tier. If the far tier cannot
    /// take all of that, nothing changes and `Error::Capacity` is returned.
    pub fn evict(&mut self, layer: usize, m: usize, keys: &[u8], values: &[u8]) -> Result<()> {
        let slots = self.lockstep(layer)?;
        self.evict_from(layer, &slots, m, keys, values)
    }

    /// Moves the `m` oldest near-tier keys of `layer` to the far tier, for every active slot.
    pub fn spill_keys(&mut self, layer: usize, m: usize) -> Result<()> {
        let slots = self.lockstep(layer)?;
        self.uniform(layer, "far key counts", |s| s.far_keys)?;
        self.spill_from(layer, &slots, m)
    }

    /// The tier of the key at every logical position of `layer` (the same for every active slot).
    pub fn token_map(&self, layer: usize) -> Result<Vec<Tier>> {
        self.uniform(layer, "lengths", |s| s.total)?;
        self.uniform(layer, "host lengths", |s| s.host)?;
        self.uniform(layer, "far key counts", |s| s.far_keys)?;
        match self.slots.active().first() {
            Some(&slot) => self.slot_token_map(layer, slot),
            None => Ok(Vec::new()),
        }
    }

    /// Checks that host tokens `[start, start+len)` exist in `layer` (every active slot).
    pub fn check_host_range(&self, layer: usize, start: usize, len: usize) -> Result<()> {
        let host = self.host_len(layer)?;
        ensure!(
            start.checked_add(len).is_some_and(|end| end <= host),
            "host range [{start}, {}) out of bounds: layer {layer} holds {host} host tokens",
            start.saturating_add(len)
        );
        Ok(())
    }

    /// Copies host tokens `[start, start+len)` of `layer` out as `[active slots, kv_heads, len, d]`.
    pub fn read(
        &self,
        layer: usize,
        start: usize,
        len: usize,
        keys: &mut [u8],
        values: &mut [u8],
    ) -> Result<()> {
        let slots = self.lockstep(layer)?;
        self.read_from(layer, &slots, start, len, keys, values)
    }

    /// The host strips of `layer` for the active slots (`lockstep_slots`, which must be one
    /// range, with one host length), for the CPU attention operations; they borrow the store,
    /// so no eviction or reset can change the rows while they are in use.
    pub fn strips(&self, layer: usize) -> Result<Strips<'_>> {
        let host = self.host_len(layer)?;
        let range = self.lockstep_slots()?;
        self.all_strips(layer, self.strip_tokens)
            .sequences(range.start, range.len(), host)
    }

    /// The page summaries of `layer` for the active slots (as `strips`): `ceil(host / P)` pages.
    pub fn summaries(&self, layer: usize) -> Result<PageSummaries<'_>> {
        let host = self.host_len(layer)?;
        let range = self.lockstep_slots()?;
        self.all_summaries(layer, host.div_ceil(PAGE_TOKENS), range.start, range.len())
    }

    /// Copies the page summaries of `layer` out as `[active slots, kv_heads, pages, d]` maxima
    /// and minima (`pages = ceil(host / PAGE_TOKENS)`).
    pub fn read_summaries(&self, layer: usize, maxima: &mut [u8], minima: &mut [u8]) -> Result<()> {
        let sums = self.summaries(layer)?;
        let run = sums.pages() * self.cfg.row_bytes();
        let need = sums.maxima.batch() * self.cfg.kv_heads * run;
        ensure!(
            maxima.len() == need && minima.len() == need,
            "page summaries of {} pages need {need}-byte outputs, got {} and {}",
            sums.pages(),
            maxima.len(),
            minima.len()
        );
        let first = self.lockstep_slots()?.start;
        let region = &self.summaries[layer];
        for strip in 0..sums.maxima.batch() * self.cfg.kv_heads {
            let base = (first * self.cfg.kv_heads + strip) * region.strip_bytes;
            for (out, offset) in [(&mut *maxima, 0), (&mut *minima, self.summary_minima)] {
                // SAFETY: base + offset + run stays inside the strip (pages <= max_pages).
                let src = unsafe {
                    std::slice::from_raw_parts(region.buf.as_ptr().add(base + offset), run)
                };
                out[strip * run..(strip + 1) * run].copy_from_slice(src);
            }
        }
        Ok(())
    }

    fn all_summaries(
        &self,
        layer: usize,
        pages: usize,
        first: usize,
        count: usize,
    ) -> Result<PageSummaries<'_>> {
        let region = &self.summaries[layer];
        let base = region.buf.as_ptr() as *const u8;
        // SAFETY: as `all_strips`: the region holds batch × kv_heads page-aligned strips of
        // `strip_bytes`, each `max_pages` rows of maxima then (at `summary_minima`) as many of
        // minima; pages <= max_pages; zero-initialised, readable, written only through
        // `&mut self`, which the returned borrow excludes.
        let strips = |keys: *const u8, values: *const u8| unsafe {
            Strips::from_raw(
                keys,
                values,
                region.strip_bytes,
                self.cfg.batch,
                self.cfg.kv_heads,
                self.cfg.head_dim,
                self.cfg.dtype,
                pages,
            )
        };
        // SAFETY: summary_minima < strip_bytes, inside the first strip.
        let minima = unsafe { base.add(self.summary_minima) };
        Ok(PageSummaries {
            maxima: strips(base, minima).sequences(first, count, pages)?,
            minima: strips(minima, base).sequences(first, count, pages)?,
        })
    }

    // --- the one implementation of each change, over a list of slots ----------------------

    fn append_to(&mut self, layer: usize, slots: &[usize], n: usize) -> Result<()> {
        for &slot in slots {
            let total = self.seq(layer, slot).total;
            if total.checked_add(n).is_none_or(|t| t > MAX_TOKENS) {
                return crate::invalid!(
                    "appending {n} tokens to layer {layer} (slot {slot} holding {total}) exceeds the {MAX_TOKENS} tokens a layer may hold"
                );
            }
        }
        for &slot in slots {
            self.seq_mut(layer, slot).total += n;
        }
        Ok(())
    }

    /// `keys`/`values`: `[slots, kv_heads, m, d]` rows, one block per listed slot.
    fn evict_from(
        &mut self,
        layer: usize,
        slots: &[usize],
        m: usize,
        keys: &[u8],
        values: &[u8],
    ) -> Result<()> {
        let st = self.slot_token_bytes();
        let need = slots.len() * m * st;
        ensure!(
            keys.len() == need && values.len() == need,
            "evict of {m} tokens from {} slot(s) needs {need} bytes of keys and of values, got {} and {}",
            slots.len(),
            keys.len(),
            values.len()
        );
        for &slot in slots {
            let s = *self.seq(layer, slot);
            let evictable = s.evictable(self.cfg.sinks);
            ensure!(
                m <= evictable,
                "cannot evict {m} tokens from layer {layer} (slot {slot}): only {evictable} non-sink device tokens"
            );
            if s.host + m > self.strip_tokens {
                return Err(Error::Capacity(format!(
                    "layer {layer} (slot {slot}) would hold {} host tokens, more than the {} reserved \
                     (max_host_tokens / far tier capacity)",
                    s.host + m,
                    self.strip_tokens
                )));
            }
        }
        // Plan the spill over the state as it would be after the write, so the far tier's
        // room is checked against exactly what will move before anything changes.
        let added = slots.len() * m;
        let excess = (self.near.used + added * st)
            .saturating_sub(self.near.capacity)
            .div_ceil(st);
        let (moves, spilled) = if excess == 0 {
            (Vec::new(), 0) // the near tier has room: no need to copy the counters
        } else {
            let mut host: Vec<usize> = self.seqs.iter().map(|s| s.host).collect();
            for &slot in slots {
                host[layer * self.cfg.batch + slot] += m;
            }
            let mut far_keys: Vec<usize> = self.seqs.iter().map(|s| s.far_keys).collect();
            spill::plan(&host, &mut far_keys, self.cfg.batch, excess)
        };
        let far_needed = (added + spilled) * st;
        if far_needed > self.far.free() {
            return Err(Error::Capacity(format!(
                "far tier full: evicting {m} tokens of {} slot(s) needs {far_needed} bytes ({added} slot tokens of \
                 values, {spilled} of spilled keys), {} of {} bytes free",
                slots.len(),
                self.far.free(),
                self.far.capacity
            )));
        }
        self.far.take_node_memory(
            far_needed,
            &format!("evicting {m} tokens of {} slot(s)", slots.len()),
        )?;
        for (i, &slot) in slots.iter().enumerate() {
            let run = m * st;
            let start = self.seq(layer, slot).host;
            self.write_rows(
                layer,
                slot,
                start,
                m,
                &keys[i * run..(i + 1) * run],
                &values[i * run..(i + 1) * run],
            );
            self.seq_mut(layer, slot).host += m;
            self.summarize(layer, slot, start, m);
        }
        self.near.used += added * st;
        self.far.used += added * st;
        for mv in moves {
            self.move_keys_to_far(mv.seq / self.cfg.batch, mv.seq % self.cfg.batch, mv.count);
        }
        Ok(())
    }

    fn spill_from(&mut self, layer: usize, slots: &[usize], m: usize) -> Result<()> {
        for &slot in slots {
            let near_keys = self.seq(layer, slot).near_keys();
            ensure!(
                m <= near_keys,
                "cannot spill {m} keys of layer {layer} (slot {slot}): only {near_keys} keys are in the near tier"
            );
        }
        let bytes = slots.len() * m * self.slot_token_bytes();
        if bytes > self.far.free() {
            return Err(Error::Capacity(format!(
                "far tier full: spilling {m} keys of {} slot(s) needs {bytes} bytes, {} free",
                slots.len(),
                self.far.free()
            )));
        }
        self.far.take_node_memory(
            bytes,
            &format!("spilling {m} keys of {} slot(s)", slots.len()),
        )?;
        for &slot in slots {
            self.move_keys_to_far(layer, slot, m);
        }
        Ok(())
    }

    /// Copies out `[slots, kv_heads, len, d]`.
    fn read_from(
        &self,
        layer: usize,
        slots: &[usize],
        start: usize,
        len: usize,
        keys: &mut [u8],
        values: &mut [u8],
    ) -> Result<()> {
        for &slot in slots {
            let host = self.seq(layer, slot).host;
            ensure!(
                start.checked_add(len).is_some_and(|end| end <= host),
                "host range [{start}, {}) out of bounds: layer {layer} (slot {slot}) holds {host} host tokens",
                start.saturating_add(len)
            );
        }
        let need = slots.len() * len * self.slot_token_bytes();
        ensure!(
            keys.len() == need && values.len() == need,
            "read of {len} tokens of {} slot(s) needs {need}-byte outputs, got {} and {}",
            slots.len(),
            keys.len(),
            values.len()
        );
        let (row, run) = (self.cfg.row_bytes(), len * self.cfg.row_bytes());
        let heads = self.cfg.kv_heads;
        for (i, &slot) in slots.iter().enumerate() {
            for head in 0..heads {
                let strip = i * heads + head;
                for (kind, out) in [(Kind::Keys, &mut *keys), (Kind::Values, &mut *values)] {
                    let src = self.strip_ptr(layer, kind, slot, head);
                    // SAFETY: the range was checked against the slot's host length <= strip_tokens.
                    let src = unsafe { std::slice::from_raw_parts(src.add(start * row), run) };
                    out[strip * run..(strip + 1) * run].copy_from_slice(src);
                }
            }
        }
        Ok(())
    }

    // --- storage ---------------------------------------------------------------------------

    pub fn tier_stats(&self) -> (TierStats, TierStats) {
        let far_keys: usize = self.seqs.iter().map(|s| s.far_keys).sum();
        let host: usize = self.seqs.iter().map(|s| s.host).sum();
        let b = self.cfg.batch;
        let near = TierStats {
            placement: self.near.placement.clone(),
            capacity_bytes: self.near.capacity,
            used_bytes: self.near.used,
            key_tokens: (host - far_keys) / b,
            value_tokens: 0,
            key_slot_tokens: host - far_keys,
            value_slot_tokens: 0,
        };
        let far = TierStats {
            placement: self.far.placement.clone(),
            capacity_bytes: self.far.capacity,
            used_bytes: self.far.used,
            key_tokens: far_keys / b,
            value_tokens: host / b,
            key_slot_tokens: far_keys,
            value_slot_tokens: host,
        };
        (near, far)
    }

    /// Base address of strip `(slot, head)` of `kind` in `layer`: `strip_tokens` rows of
    /// `head_dim` elements; the slot's first `host` rows are valid.
    pub fn strip_ptr(&self, layer: usize, kind: Kind, slot: usize, head: usize) -> *const u8 {
        let region = self.region(layer, kind);
        let offset = (slot * self.cfg.kv_heads + head) * region.strip_bytes;
        // SAFETY: offset < region length for slot < batch and head < kv_heads.
        unsafe { region.buf.as_ptr().add(offset) }
    }

    /// Every strip of `layer` with `len` rows each (`len <= strip_tokens`), to narrow down.
    fn all_strips(&self, layer: usize, len: usize) -> Strips<'_> {
        let (keys, values) = (&self.keys[layer], &self.values[layer]);
        debug_assert!(len <= self.strip_tokens);
        // SAFETY: both regions hold batch × kv_heads page-aligned strips of strip_bytes >=
        // strip_tokens rows >= len rows (rows are whole elements, so aligned for the dtype);
        // the anonymous mappings are readable and zero-initialised throughout and live as long
        // as `self`. The store writes them only through `&mut self` (`evict`, `reset`), which
        // the returned borrow of `self` excludes; the zero-copy views it exports are read-only
        // by contract (`HostKVStore.view`).
        unsafe {
            Strips::from_raw(
                keys.buf.as_ptr(),
                values.buf.as_ptr(),
                keys.strip_bytes,
                self.cfg.batch,
                self.cfg.kv_heads,
                self.cfg.head_dim,
                self.cfg.dtype,
                len,
            )
        }
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

    /// The NUMA node holding host token `index` of `kind` in `layer` (first active slot, head
    /// 0), as the kernel reports it; `None` if the kernel does not say.
    pub fn node_of(&self, layer: usize, kind: Kind, index: usize) -> Result<Option<u32>> {
        self.check_host_range(layer, index, 1)?;
        let slot = self.slots.active().first().copied().unwrap_or(0);
        let offset = slot * self.cfg.kv_heads * self.strip_bytes() + index * self.cfg.row_bytes();
        Ok(self.region(layer, kind).buf.node_at(offset).ok())
    }

    /// Writes rows `[kv_heads, m, d]` of `slot` at host token `start` of `layer`.
    fn write_rows(
        &mut self,
        layer: usize,
        slot: usize,
        start: usize,
        m: usize,
        keys: &[u8],
        values: &[u8],
    ) {
        let (row, run) = (self.cfg.row_bytes(), m * self.cfg.row_bytes());
        for head in 0..self.cfg.kv_heads {
            for (kind, src) in [(Kind::Keys, keys), (Kind::Values, values)] {
                let dst = self.strip_ptr(layer, kind, slot, head) as *mut u8;
                // SAFETY: start + m <= strip_tokens was checked by the caller; the source run
                // has exactly `run` bytes; store writes are serialised by `&mut self`.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        src[head * run..].as_ptr(),
                        dst.add(start * row),
                        run,
                    )
                };
            }
        }
    }

    /// Rewrites the summaries of the pages of `slot` in `layer` that host tokens
    /// `[start, start + m)` (just written) fall in, from the rows of those pages.
    fn summarize(&mut self, layer: usize, slot: usize, start: usize, m: usize) {
        if m == 0 {
            return;
        }
        let (d, row) = (self.cfg.head_dim, self.cfg.row_bytes());
        let end = start + m;
        let region = &self.summaries[layer];
        for head in 0..self.cfg.kv_heads {
            let keys = self.strip_ptr(layer, Kind::Keys, slot, head);
            let strip = (slot * self.cfg.kv_heads + head) * region.strip_bytes;
            for page in start / PAGE_TOKENS..end.div_ceil(PAGE_TOKENS) {
                let first = page * PAGE_TOKENS;
                let rows = PAGE_TOKENS.min(end - first);
                with_element!(self.cfg.dtype, E => {
                    // SAFETY: rows first..first+rows < host <= strip_tokens of this key strip;
                    // page < max_pages rows of each half of this summary strip; the key and
                    // summary regions are distinct mappings; writes are serialised by `&mut self`.
                    unsafe {
                        let max = region.buf.as_ptr().add(strip + page * row);
                        summarize_rows::<E>(
                            keys.add(first * row) as *const E,
                            rows,
                            d,
                            max as *mut E,
                            max.add(self.summary_minima) as *mut E,
                        )
                    }
                });
            }
        }
    }

    fn move_keys_to_far(&mut self, layer: usize, slot: usize, m: usize) {
        let st = self.slot_token_bytes();
        self.seq_mut(layer, slot).far_keys += m;
        self.near.used -= m * st;
        self.far.used += m * st;
        self.migrate_far_key_pages(layer, slot);
    }

    /// Migrates the whole pages now covered by far-tier keys of the strips of `slot` in `layer`.
    fn migrate_far_key_pages(&mut self, layer: usize, slot: usize) {
        if self.near.placement.node == self.far.placement.node {
            return; // same node: the move is pure accounting
        }
        let s = *self.seq(layer, slot);
        let covered = s.far_keys * self.cfg.row_bytes() / PAGE_SIZE * PAGE_SIZE;
        if covered <= s.migrated_bytes {
            return;
        }
        let region = &self.keys[layer];
        for head in 0..self.cfg.kv_heads {
            let strip = slot * self.cfg.kv_heads + head;
            let _ = region.buf.bind(
                strip * region.strip_bytes + s.migrated_bytes,
                covered - s.migrated_bytes,
                self.far.placement.node,
            );
        }
        self.seq_mut(layer, slot).migrated_bytes = covered;
    }
}
