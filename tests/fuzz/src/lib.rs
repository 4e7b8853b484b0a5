//! The bodies of the fuzz targets: bytes in, a sequence of core calls out, and a panic (the
//! fuzzer's finding) only if the core panics or breaks an invariant. Every call that the core
//! refuses must be refused with an error, never a panic; every call it accepts is checked.

use hybridgen::cpu::{self, Isa};
use hybridgen::dtype::DType;
use hybridgen::kv::{KvStore, StoreConfig, TierConfig};

/// Reads small numbers from the input, then zeros once it runs out.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (usize::from(self.byte()) << 8 | usize::from(self.byte())) % n
        }
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn store(layers: usize, batch: usize, kv_heads: usize, head_dim: usize, sinks: usize, near: usize, far: usize) -> Option<KvStore> {
    let tb = batch * kv_heads * head_dim * 4;
    let cfg = StoreConfig {
        layers,
        batch,
        kv_heads,
        head_dim,
        dtype: DType::F32,
        sinks,
        near: TierConfig { node: None, capacity_bytes: near * tb },
        far: TierConfig { node: None, capacity_bytes: far * tb },
        max_host_tokens: None,
    };
    KvStore::new(cfg).ok() // a refused config is a valid outcome
}

/// A value that encodes where a row came from, so lost or duplicated tokens show.
fn datum(layer: usize, kind: usize, pos: usize) -> f32 {
    (layer * 1_000_000 + kind * 500_000 + pos) as f32
}

/// Random sequences of append / evict / spill / reset; after each, every layer's tokens are
/// exactly once on the device or the host, host rows hold the tokens they should, in order.
pub fn store_ops(data: &[u8]) {
    let mut b = Bytes(data);
    let (layers, sinks) = (1 + b.below(3), b.below(4));
    let (near, far) = (b.below(40), 1 + b.below(300));
    let (batch, kv_heads, head_dim) = (1 + b.below(2), 1 + b.below(2), 1 + b.below(4));
    let Some(mut s) = store(layers, batch, kv_heads, head_dim, sinks, near.max(1), far) else { return };
    let tb = batch * kv_heads * head_dim;
    // Per layer: logical tokens appended so far and the next token to evict.
    let mut next_evicted = vec![0usize; layers];
    while !b.is_empty() {
        let layer = b.below(layers + 1); // one past the end: must be refused
        match b.below(5) {
            0 | 1 => {
                let n = b.below(8);
                let ok = s.append(layer, n).is_ok();
                assert_eq!(ok, layer < layers, "append to layer {layer}");
            }
            2 => {
                let m = b.below(8);
                let Ok(evictable) = s.evictable(layer) else { continue };
                let host = s.host_len(layer).unwrap();
                let first = sinks.min(s.total_len(layer).unwrap()) + host;
                let rows = |kind| -> Vec<u8> {
                    let mut out = Vec::with_capacity(m * tb * 4);
                    for _ in 0..batch * kv_heads {
                        for t in 0..m {
                            for _ in 0..head_dim {
                                out.extend_from_slice(&datum(layer, kind, first + t).to_le_bytes());
                            }
                        }
                    }
                    out
                };
                let result = s.evict(layer, m, &rows(0), &rows(1));
                if m > evictable {
                    assert!(result.is_err(), "evicting {m} of {evictable} evictable tokens must fail");
                }
                if result.is_ok() {
                    next_evicted[layer] = first + m;
                }
            }
            3 => {
                let m = b.below(6);
                let _ = s.spill_keys(layer, m); // refusals are fine; panics are not
            }
            _ => {
                if b.below(10) == 0 {
                    s.reset();
                    next_evicted.iter_mut().for_each(|n| *n = 0);
                }
            }
        }
        check(&s, layers, sinks, head_dim);
    }
}

fn check(s: &KvStore, layers: usize, sinks: usize, head_dim: usize) {
    for layer in 0..layers {
        let (total, host) = (s.total_len(layer).unwrap(), s.host_len(layer).unwrap());
        let device = s.evictable(layer).unwrap() + sinks.min(total);
        assert_eq!(device + host, total, "layer {layer}: tokens lost or duplicated");
        let map = s.token_map(layer).unwrap();
        assert_eq!(map.len(), total);
        // Host rows hold tokens sinks.. in order, keys and values alike.
        let rb = head_dim * 4;
        let per = s.config().batch * s.config().kv_heads;
        let (mut k, mut v) = (vec![0u8; per * host * rb], vec![0u8; per * host * rb]);
        s.read(layer, 0, host, &mut k, &mut v).unwrap();
        for (kind, buf) in [(0, &k), (1, &v)] {
            for t in 0..host {
                let got = f32::from_le_bytes(buf[t * rb..t * rb + 4].try_into().unwrap());
                assert_eq!(got, datum(layer, kind, sinks.min(total) + t), "layer {layer} kind {kind} host row {t}");
            }
        }
    }
}

/// Logits, partial attention, top-K and gather over a random store with random (often invalid)
/// index lists and shapes: refused with an error, or equal to an f64 reference.
pub fn kernels(data: &[u8]) {
    let mut b = Bytes(data);
    let (batch, kv_heads, g) = (1 + b.below(2), 1 + b.below(3), 1 + b.below(4));
    let head_dim = 1 + b.below(40);
    let n = b.below(50);
    let Some(mut s) = store(1, batch, kv_heads, head_dim, 0, 64, 64) else { return };
    let tb = batch * kv_heads * head_dim;
    let keys: Vec<f32> = (0..n * tb).map(|i| ((i * 7 + 3) % 17) as f32 / 8.0 - 1.0).collect();
    let values: Vec<f32> = (0..n * tb).map(|i| ((i * 5 + 1) % 13) as f32 / 6.0 - 1.0).collect();
    let bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    s.append(0, n).unwrap();
    s.evict(0, n, &bytes(&keys), &bytes(&values)).unwrap();
    let strips = s.strips(0).unwrap();
    let hq = kv_heads * g;
    let q: Vec<f32> = (0..batch * hq * head_dim).map(|i| ((i * 3) % 11) as f32 / 5.0 - 1.0).collect();
    let isa = [Isa::Scalar, cpu::isa()][b.below(2)];
    // Indices: m per (sequence, KV head), some possibly out of range.
    let m = b.below(8);
    let idx: Vec<i64> = (0..batch * kv_heads * m).map(|_| b.below(n + 3) as i64 - 1).collect();
    let valid = idx.iter().all(|&i| i >= 0 && (i as usize) < n);
    let key = |bi: usize, h: usize, t: usize, c: usize| keys[((bi * kv_heads + h) * n + t) * head_dim + c] as f64;
    let dot = |bi: usize, qh: usize, t: usize| -> f64 {
        (0..head_dim).map(|c| q[(bi * hq + qh) * head_dim + c] as f64 * key(bi, qh / g, t, c)).sum::<f64>() * 0.5
    };

    let mut out = vec![0f32; batch * hq * m];
    let r = cpu::logits(isa, &strips, &q, hq, 0.5, Some(&idx), &mut out);
    assert_eq!(r.is_ok(), valid, "logits with indices {idx:?} over {n} tokens");
    if r.is_ok() {
        for bi in 0..batch {
            for qh in 0..hq {
                for j in 0..m {
                    let t = idx[(bi * kv_heads + qh / g) * m + j] as usize;
                    let want = dot(bi, qh, t);
                    let got = out[(bi * hq + qh) * m + j] as f64;
                    assert!((got - want).abs() <= 1e-3 * (1.0 + want.abs()), "logit {got} vs {want}");
                }
            }
        }
    }

    // Top-K over every host token's logits, then partial attention and gather on the picks.
    let mut all = vec![0f32; batch * hq * n];
    cpu::logits(isa, &strips, &q, hq, 0.5, None, &mut all).unwrap();
    let k = b.below(n + 2);
    let mut top_idx = vec![0i64; batch * hq * k];
    let mut top_val = vec![0f32; batch * hq * k];
    let r = cpu::topk(&all, n, k, &mut top_idx, &mut top_val);
    assert_eq!(r.is_ok(), n > 0 && k > 0 && k <= n, "topk k={k} n={n}");
    if r.is_ok() {
        for row in 0..batch * hq {
            let mut sorted: Vec<f32> = all[row * n..(row + 1) * n].to_vec();
            sorted.sort_by(|a, b| b.total_cmp(a));
            let mut picked: Vec<f32> = top_idx[row * k..(row + 1) * k].iter().map(|&i| all[row * n + i as usize]).collect();
            picked.sort_by(|a, b| b.total_cmp(a));
            assert_eq!(picked, sorted[..k].to_vec(), "top-{k} of row {row}");
        }
        let picked_logits: Vec<f32> = (0..batch * hq * k).map(|i| all[i / k * n + top_idx[i] as usize]).collect();
        let (mut o, mut lse) = (vec![0f32; batch * hq * head_dim], vec![0f32; batch * hq]);
        cpu::partial_attention(isa, &strips, &picked_logits, hq, Some(&top_idx), &mut o, &mut lse).unwrap();
        let mut gathered = vec![0u8; batch * hq * k * head_dim * 4];
        cpu::gather_values(&strips, &top_idx, hq, &mut gathered).unwrap();
        for row in 0..batch * hq {
            let (bi, qh) = (row / hq, row % hq);
            let x: Vec<f64> = (0..k).map(|j| picked_logits[row * k + j] as f64).collect();
            let mx = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = x.iter().map(|v| (v - mx).exp()).sum();
            assert!((lse[row] as f64 - (mx + sum.ln())).abs() <= 1e-3 * (1.0 + mx.abs()), "lse of row {row}");
            for c in 0..head_dim {
                let want: f64 = (0..k)
                    .map(|j| {
                        let t = top_idx[row * k + j] as usize;
                        (x[j] - mx).exp() / sum * values[((bi * kv_heads + qh / g) * n + t) * head_dim + c] as f64
                    })
                    .sum();
                assert!((o[row * head_dim + c] as f64 - want).abs() <= 1e-3, "output of row {row}");
                let off = ((row * k) * head_dim + c) * 4;
                let first = f32::from_le_bytes(gathered[off..off + 4].try_into().unwrap()) as f64;
                let t0 = top_idx[row * k] as usize;
                assert_eq!(first, values[((bi * kv_heads + qh / g) * n + t0) * head_dim + c] as f64, "gathered row");
            }
        }
    }
}

/// The bits stored for (sequence, layer, kind, position): unique per sequence, so a reused
/// slot that showed an earlier sequence's rows would be caught.
fn slot_datum(seq: usize, layer: usize, kind: usize, pos: usize) -> u32 {
    ((((seq * 4 + layer) * 2 + kind) as u32) << 16) ^ pos as u32
}

/// Random sequences of add / release / reset of request slots, per-slot append / evict / spill
/// and the ragged CPU stage over the active slots; after each, every active slot holds each of
/// its tokens exactly once, its host rows are the ones written for it, in order, and the tiers'
/// bytes add up. Calls on a free or nonexistent slot must be refused.
pub fn slot_ops(data: &[u8]) {
    let mut b = Bytes(data);
    let (layers, sinks) = (1 + b.below(3), b.below(3));
    let (near, far) = (1 + b.below(30), 1 + b.below(200));
    let (batch, kv_heads, head_dim) = (1 + b.below(4), 1 + b.below(2), 1 + b.below(4));
    let Some(mut s) = store(layers, batch, kv_heads, head_dim, sinks, near, far) else { return };
    let mut seq_of: Vec<Option<usize>> = (0..batch).map(Some).collect();
    let mut next_seq = batch;
    while !b.is_empty() {
        let layer = b.below(layers);
        let slot = b.below(batch + 1); // one past the end: must be refused
        let active = seq_of.get(slot).copied().flatten();
        match b.below(9) {
            0 => match s.add_slot() {
                Ok(id) => {
                    assert!(seq_of[id].is_none() && seq_of[..id].iter().all(Option::is_some), "lowest free id");
                    seq_of[id] = Some(next_seq);
                    next_seq += 1;
                }
                Err(_) => assert!(seq_of.iter().all(Option::is_some), "a free slot was refused"),
            },
            1 => {
                assert_eq!(s.release_slot(slot).is_ok(), active.is_some(), "release of slot {slot}");
                if active.is_some() {
                    seq_of[slot] = None;
                }
            }
            2 => {
                assert_eq!(s.reset_slot(slot).is_ok(), active.is_some(), "reset of slot {slot}");
                if active.is_some() {
                    seq_of[slot] = Some(next_seq);
                    next_seq += 1;
                }
            }
            3 | 4 => {
                let ok = s.append_slot(layer, slot, b.below(8)).is_ok();
                assert_eq!(ok, active.is_some(), "append to slot {slot}");
            }
            5 | 6 => {
                let m = b.below(8);
                let Some(seq) = active else {
                    assert!(s.evict_slot(layer, slot, 0, &[], &[]).is_err());
                    continue;
                };
                let evictable = s.slot_evictable(layer, slot).unwrap();
                let first = sinks.min(s.slot_total_len(layer, slot).unwrap()) + s.slot_host_len(layer, slot).unwrap();
                let rows = |kind| -> Vec<u8> {
                    let mut out = Vec::with_capacity(kv_heads * m * head_dim * 4);
                    for _ in 0..kv_heads {
                        for t in 0..m {
                            for _ in 0..head_dim {
                                out.extend_from_slice(&slot_datum(seq, layer, kind, first + t).to_le_bytes());
                            }
                        }
                    }
                    out
                };
                let result = s.evict_slot(layer, slot, m, &rows(0), &rows(1));
                if m > evictable {
                    assert!(result.is_err(), "evicting {m} of {evictable} evictable tokens must fail");
                }
            }
            7 => {
                let _ = s.spill_slot_keys(layer, slot, b.below(6)); // refusals are fine; panics are not
            }
            _ => ragged_stage(&s, layer, &seq_of, kv_heads, head_dim),
        }
        check_slots(&s, &seq_of, layers, sinks, kv_heads, head_dim);
    }
}

/// The LSE stage over one query row per active slot: accepted, and a row over no host tokens
/// gives `-inf`.
fn ragged_stage(s: &KvStore, layer: usize, seq_of: &[Option<usize>], kv_heads: usize, head_dim: usize) {
    let slots: Vec<usize> = (0..seq_of.len()).filter(|&i| seq_of[i].is_some()).collect();
    let strips: Vec<_> = slots.iter().map(|&slot| s.slot_strips(layer, slot).unwrap()).collect();
    let (r, hq) = (slots.len(), kv_heads);
    let q = vec![0.25f32; r * hq * head_dim];
    let args = cpu::RaggedArgs { q: &q, q_heads: hq, scale: 1.0, merge: cpu::Merge::Lse, top_k: None, positions: None, mask: None, pages: None };
    let (mut out, mut lse) = (vec![0f32; r * hq * head_dim], vec![0f32; r * hq]);
    let outs = cpu::RaggedOutputs { out: &mut out, lse: &mut lse, ..Default::default() };
    cpu::ragged_stage(Isa::Scalar, &strips, &args, 0, outs).unwrap();
    for (i, st) in strips.iter().enumerate() {
        assert_eq!(st.is_empty(), lse[i * hq] == f32::NEG_INFINITY, "row {i}: lse over {} tokens", st.len());
    }
}

fn check_slots(s: &KvStore, seq_of: &[Option<usize>], layers: usize, sinks: usize, kv_heads: usize, head_dim: usize) {
    let st = kv_heads * head_dim * 4;
    let (mut near_keys, mut far_keys, mut host_all) = (0, 0, 0);
    assert_eq!(s.active_slots(), (0..seq_of.len()).filter(|&i| seq_of[i].is_some()).collect::<Vec<_>>());
    for (slot, seq) in seq_of.iter().enumerate() {
        let Some(seq) = *seq else {
            assert!(s.slot_host_len(0, slot).is_err(), "a free slot has no length");
            continue;
        };
        for layer in 0..layers {
            let (total, host) = (s.slot_total_len(layer, slot).unwrap(), s.slot_host_len(layer, slot).unwrap());
            let device = s.slot_evictable(layer, slot).unwrap() + sinks.min(total);
            assert_eq!(device + host, total, "slot {slot} layer {layer}: tokens lost or duplicated");
            assert_eq!(s.slot_token_map(layer, slot).unwrap().len(), total);
            let far = s.slot_far_key_len(layer, slot).unwrap();
            (near_keys, far_keys, host_all) = (near_keys + host - far, far_keys + far, host_all + host);
            let rb = head_dim * 4;
            let (mut k, mut v) = (vec![0u8; kv_heads * host * rb], vec![0u8; kv_heads * host * rb]);
            s.read_slot(layer, slot, 0, host, &mut k, &mut v).unwrap();
            for (kind, buf) in [(0, &k), (1, &v)] {
                for t in 0..host {
                    let got = u32::from_le_bytes(buf[t * rb..t * rb + 4].try_into().unwrap());
                    let want = slot_datum(seq, layer, kind, sinks.min(total) + t);
                    assert_eq!(got, want, "slot {slot} layer {layer} kind {kind} host row {t}");
                }
            }
        }
    }
    let (near, far) = s.tier_stats();
    assert_eq!(near.used_bytes, near_keys * st, "near tier bytes");
    assert_eq!(far.used_bytes, (far_keys + host_all) * st, "far tier bytes");
}
