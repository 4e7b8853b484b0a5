//! The host KV store as a pool of request slots, under long random sequences of add / release /
//! reset / append / evict / spill over many slots and layers: every token is in exactly one
//! tier, byte accounting is exact, each slot reads back exactly the rows written for it, a
//! request that does not fit changes nothing, and released slot ids are reused.

mod common;

use hybridgen::kv::{KvStore, StoreConfig, TierConfig};
use hybridgen::{DType, Error};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const KVH: usize = 2;
const D: usize = 3;
const ST: usize = KVH * D * 4; // bytes of one token of one slot (f32)

/// The datum for (sequence, layer, kind, position, head, element), unique per sequence: a
/// reused slot holding a new sequence must never show the old one's rows.
fn datum(seq: usize, layer: usize, kind: usize, pos: usize, h: usize, i: usize) -> u32 {
    (((((seq * 4 + layer) * 2 + kind) * 8192 + pos) * KVH + h) * D + i) as u32
}

/// Rows `[kv_heads, m, d]` of positions `from..from+m`.
fn rows(seq: usize, layer: usize, kind: usize, from: usize, m: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(KVH * m * D * 4);
    for h in 0..KVH {
        for t in 0..m {
            for i in 0..D {
                out.extend_from_slice(&datum(seq, layer, kind, from + t, h, i).to_ne_bytes());
            }
        }
    }
    out
}

fn config(
    layers: usize,
    batch: usize,
    sinks: usize,
    near_tokens: usize,
    far_tokens: usize,
) -> StoreConfig {
    StoreConfig {
        layers,
        batch,
        kv_heads: KVH,
        head_dim: D,
        dtype: DType::F32,
        sinks,
        near: TierConfig {
            node: None,
            capacity_bytes: near_tokens * ST,
        },
        far: TierConfig {
            node: None,
            capacity_bytes: far_tokens * ST,
        },
        max_host_tokens: Some(64),
    }
}

/// What the test knows: which sequence each slot holds (`None`: free).
struct Model {
    seq_of: Vec<Option<usize>>,
    next_seq: usize,
}

impl Model {
    fn fresh(&mut self) -> usize {
        self.next_seq += 1;
        self.next_seq
    }
}

/// Every observable of the store, to prove a refused request changed nothing.
fn snapshot(store: &KvStore, layers: usize, batch: usize) -> Vec<String> {
    let mut out = vec![format!("{:?}", store.active_slots())];
    let (near, far) = store.tier_stats();
    out.push(format!(
        "{} {} {} {}",
        near.used_bytes, far.used_bytes, near.key_slot_tokens, far.value_slot_tokens
    ));
    for l in 0..layers {
        for s in 0..batch {
            if store.is_active(s) {
                out.push(format!("{:?}", store.slot_token_map(l, s).unwrap()));
            }
        }
    }
    out
}

fn check_invariants(store: &KvStore, model: &Model, layers: usize) {
    let sinks = store.config().sinks;
    let (near, far) = store.tier_stats();
    let (mut near_keys, mut far_keys, mut host) = (0, 0, 0);
    for (slot, seq) in model.seq_of.iter().enumerate() {
        assert_eq!(store.is_active(slot), seq.is_some(), "slot {slot} in use");
        let Some(seq) = *seq else {
            assert!(
                store.slot_host_len(0, slot).is_err(),
                "a free slot has no length"
            );
            continue;
        };
        for l in 0..layers {
            let map = store.slot_token_map(l, slot).unwrap();
            assert_eq!(
                map.len(),
                store.slot_total_len(l, slot).unwrap(),
                "every position has exactly one tier"
            );
            let (n, f) = common::check_token_map(
                &map,
                sinks,
                store.slot_host_len(l, slot).unwrap(),
                store.slot_far_key_len(l, slot).unwrap(),
            );
            (near_keys, far_keys, host) = (near_keys + n, far_keys + f, host + n + f);
            let h = n + f;
            let (mut k, mut v) = (vec![0u8; h * ST], vec![0u8; h * ST]);
            store.read_slot(l, slot, 0, h, &mut k, &mut v).unwrap();
            assert_eq!(
                k,
                rows(seq, l, 0, sinks, h),
                "keys of slot {slot}, layer {l}"
            );
            assert_eq!(
                v,
                rows(seq, l, 1, sinks, h),
                "values of slot {slot}, layer {l}"
            );
            let strips = store.slot_strips(l, slot).unwrap();
            assert_eq!((strips.batch(), strips.len()), (1, h));
        }
    }
    assert_eq!(near.used_bytes, near_keys * ST, "near accounting");
    assert_eq!(far.used_bytes, (far_keys + host) * ST, "far accounting");
    assert_eq!(
        (
            near.key_slot_tokens,
            far.key_slot_tokens,
            far.value_slot_tokens
        ),
        (near_keys, far_keys, host)
    );
    assert!(near.used_bytes <= near.capacity_bytes && far.used_bytes <= far.capacity_bytes);
}

fn random_active(rng: &mut StdRng, store: &KvStore) -> Option<usize> {
    let active = store.active_slots();
    (!active.is_empty()).then(|| active[rng.random_range(0..active.len())])
}

#[test]
fn random_join_leave_evict_keeps_every_token_exactly_once() {
    let (mut capacity_errors, mut reused, mut lockstep_evicts) = (0, 0, 0);
    for seed in 0..10u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let layers = rng.random_range(1..4);
        let batch = rng.random_range(1..7);
        let sinks = rng.random_range(0..3);
        let mut store = KvStore::new(config(
            layers,
            batch,
            sinks,
            rng.random_range(1..60),
            rng.random_range(10..150),
        ))
        .unwrap();
        let mut model = Model {
            seq_of: vec![None; batch],
            next_seq: 0,
        };
        for slot in 0..batch {
            model.seq_of[slot] = Some(model.fresh());
        }
        for _step in 0..1500 {
            let layer = rng.random_range(0..layers);
            match rng.random_range(0..20) {
                0 => {
                    let lowest_free = model.seq_of.iter().position(Option::is_none);
                    let before = snapshot(&store, layers, batch);
                    match store.add_slot() {
                        Ok(slot) => {
                            assert_eq!(Some(slot), lowest_free, "the lowest free id is reused");
                            model.seq_of[slot] = Some(model.fresh());
                            reused += 1;
                        }
                        Err(Error::Capacity(_)) => {
                            assert!(lowest_free.is_none());
                            assert_eq!(
                                before,
                                snapshot(&store, layers, batch),
                                "a refused add changes nothing"
                            );
                        }
                        Err(e) => panic!("unexpected error {e}"),
                    }
                }
                1 => {
                    if let Some(slot) = random_active(&mut rng, &store) {
                        store.release_slot(slot).unwrap();
                        model.seq_of[slot] = None;
                        assert!(
                            store.release_slot(slot).is_err(),
                            "a free slot cannot be released twice"
                        );
                    }
                }
                2 => {
                    if let Some(slot) = random_active(&mut rng, &store) {
                        store.reset_slot(slot).unwrap();
                        model.seq_of[slot] = Some(model.fresh());
                    }
                }
                3..=8 => {
                    if let Some(slot) = random_active(&mut rng, &store) {
                        store
                            .append_slot(layer, slot, rng.random_range(0..6))
                            .unwrap();
                    }
                }
                9..=15 => {
                    let Some(slot) = random_active(&mut rng, &store) else {
                        continue;
                    };
                    let seq = model.seq_of[slot].unwrap();
                    let m = rng.random_range(0..=store.slot_evictable(layer, slot).unwrap());
                    let from = sinks + store.slot_host_len(layer, slot).unwrap();
                    let before = snapshot(&store, layers, batch);
                    match store.evict_slot(
                        layer,
                        slot,
                        m,
                        &rows(seq, layer, 0, from, m),
                        &rows(seq, layer, 1, from, m),
                    ) {
                        Ok(()) => {}
                        Err(Error::Capacity(_)) => {
                            capacity_errors += 1;
                            assert_eq!(
                                before,
                                snapshot(&store, layers, batch),
                                "a refused evict changes nothing"
                            );
                        }
                        Err(e) => panic!("unexpected error {e}"),
                    }
                }
                16 => {
                    // The lockstep call over the active slots: only when they have one length.
                    let active = store.active_slots();
                    if store.total_len(layer).is_err() || store.host_len(layer).is_err() {
                        let err = store.evict(layer, 0, &[], &[]).unwrap_err();
                        assert!(err.to_string().contains("use the per-slot calls"), "{err}");
                        continue;
                    }
                    let avail = store.evictable(layer).unwrap();
                    let m = rng.random_range(0..=avail);
                    let from = sinks + store.host_len(layer).unwrap();
                    let (mut k, mut v) = (Vec::new(), Vec::new());
                    for &slot in &active {
                        let seq = model.seq_of[slot].unwrap();
                        k.extend(rows(seq, layer, 0, from, m));
                        v.extend(rows(seq, layer, 1, from, m));
                    }
                    let before = snapshot(&store, layers, batch);
                    match store.evict(layer, m, &k, &v) {
                        Ok(()) => lockstep_evicts += 1,
                        Err(Error::Capacity(_)) => {
                            assert_eq!(before, snapshot(&store, layers, batch))
                        }
                        Err(e) => panic!("unexpected error {e}"),
                    }
                }
                17 | 18 => {
                    let Some(slot) = random_active(&mut rng, &store) else {
                        continue;
                    };
                    let near = store.slot_host_len(layer, slot).unwrap()
                        - store.slot_far_key_len(layer, slot).unwrap();
                    match store.spill_slot_keys(layer, slot, rng.random_range(0..=near)) {
                        Ok(()) | Err(Error::Capacity(_)) => {}
                        Err(e) => panic!("unexpected error {e}"),
                    }
                }
                _ => {
                    if rng.random_range(0..10) == 0 {
                        store.reset();
                        for seq in model.seq_of.iter_mut().flatten() {
                            *seq = {
                                model.next_seq += 1;
                                model.next_seq
                            };
                        }
                    }
                }
            }
            check_invariants(&store, &model, layers);
        }
    }
    assert!(
        capacity_errors > 0,
        "the sequences must also exercise refused evictions"
    );
    assert!(
        reused > 0 && lockstep_evicts > 0,
        "and slot reuse ({reused}) and lockstep evictions ({lockstep_evicts})"
    );
}

#[test]
fn layer_wide_calls_need_one_length_and_name_the_slots() {
    let mut store = KvStore::new(config(4, 3, 0, 100, 100)).unwrap();
    store.append(3, 5).unwrap();
    assert_eq!(store.total_len(3).unwrap(), 5);
    store.append_slot(3, 2, 4).unwrap();
    let err = store.total_len(3).unwrap_err().to_string();
    assert_eq!(
        err,
        "slots have different lengths in layer 3 (slot 0: 5, slot 2: 9): use the per-slot calls"
    );
    let before = snapshot(&store, 4, 3);
    assert!(
        store.append(3, 1).is_err(),
        "a layer-wide append over ragged slots is refused"
    );
    assert_eq!(before, snapshot(&store, 4, 3), "and changes nothing");
    // Releasing the odd one out makes the rest a lockstep batch again.
    store.release_slot(2).unwrap();
    assert_eq!(store.total_len(3).unwrap(), 5);
    assert_eq!(store.lockstep_slots().unwrap(), 0..2);
    store.release_slot(0).unwrap();
    assert_eq!(store.lockstep_slots().unwrap(), 1..2);
    assert_eq!(store.add_slot().unwrap(), 0);
    store.release_slot(1).unwrap();
    store.add_slot().unwrap();
    store.add_slot().unwrap();
    assert!(store.add_slot().is_err(), "all three in use");
    assert!(
        store.reset_slot(3).is_err() && store.append_slot(0, 7, 1).is_err(),
        "slot out of range"
    );
}

#[test]
fn near_overflow_spills_the_oldest_position_across_slots() {
    // Near holds 4 slot tokens. Slot 0 evicts 3 tokens (positions 0..3), then slot 1 evicts
    // 3: two keys must spill, the oldest positions first: slot 0's and slot 1's position 0.
    let mut store = KvStore::new(config(1, 2, 0, 4, 100)).unwrap();
    for slot in 0..2 {
        store.append_slot(0, slot, 3).unwrap();
        store
            .evict_slot(0, slot, 3, &rows(slot, 0, 0, 0, 3), &rows(slot, 0, 1, 0, 3))
            .unwrap();
    }
    assert_eq!(store.slot_far_key_len(0, 0).unwrap(), 1);
    assert_eq!(store.slot_far_key_len(0, 1).unwrap(), 1);
    let (near, far) = store.tier_stats();
    assert_eq!((near.key_slot_tokens, far.key_slot_tokens), (4, 2));
}

#[test]
fn a_released_slot_returns_its_pages_and_reads_as_new() {
    let mut store = KvStore::new(config(2, 2, 0, 1000, 1000)).unwrap();
    store.append_slot(1, 1, 40).unwrap();
    store
        .evict_slot(1, 1, 40, &rows(7, 1, 0, 0, 40), &rows(7, 1, 1, 0, 40))
        .unwrap();
    store.release_slot(1).unwrap();
    assert_eq!(
        store.tier_stats().1.used_bytes,
        0,
        "its bytes are returned to the tiers"
    );
    assert_eq!(store.add_slot().unwrap(), 1);
    assert_eq!(store.slot_host_len(1, 1).unwrap(), 0);
    let first_row = store.strip_ptr(1, hybridgen::kv::Kind::Keys, 1, 0);
    // SAFETY: the strip is inside the store's live mapping; nothing writes it meanwhile.
    let bytes = unsafe { std::slice::from_raw_parts(first_row, 40 * D * 4) };
    assert!(
        bytes.iter().all(|&b| b == 0),
        "released pages read back as zero (returned to the OS)"
    );
}
