//! The host KV store under long random sequences of append / evict / spill / reset: every
//! token is in exactly one tier, byte accounting is exact, read-back equals what was written,
//! and a request that does not fit changes nothing.

mod common;

use hybridgen::kv::{Kind, KvStore, StoreConfig, Tier, TierConfig};
use hybridgen::{DType, Error};
use rand::{Rng, SeedableRng};

const B: usize = 2;
const KVH: usize = 2;
const D: usize = 3;

/// The value stored for (layer, kind, logical position, seq, head, dim): unique and exact in f32.
fn datum(layer: usize, kind: usize, pos: usize, s: usize, h: usize, i: usize) -> f32 {
    (((((layer * 2 + kind) * 4096 + pos) * B + s) * KVH + h) * D + i) as f32
}

fn rows(layer: usize, kind: usize, from: usize, m: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(B * KVH * m * D * 4);
    for s in 0..B {
        for h in 0..KVH {
            for t in 0..m {
                for i in 0..D {
                    out.extend_from_slice(&datum(layer, kind, from + t, s, h, i).to_ne_bytes());
                }
            }
        }
    }
    out
}

fn config(layers: usize, sinks: usize, near_tokens: usize, far_tokens: usize) -> StoreConfig {
    let tb = B * KVH * D * 4;
    StoreConfig {
        layers,
        batch: B,
        kv_heads: KVH,
        head_dim: D,
        dtype: DType::F32,
        sinks,
        near: TierConfig {
            node: None,
            capacity_bytes: near_tokens * tb,
        },
        far: TierConfig {
            node: None,
            capacity_bytes: far_tokens * tb,
        },
        max_host_tokens: None,
    }
}

fn check_invariants(store: &KvStore, layers: usize) {
    let tb = store.config().token_bytes();
    let sinks = store.config().sinks;
    let (near, far) = store.tier_stats();
    let (mut near_keys, mut far_keys, mut host) = (0, 0, 0);
    for l in 0..layers {
        let map = store.token_map(l).unwrap();
        assert_eq!(
            map.len(),
            store.total_len(l).unwrap(),
            "every position has exactly one tier"
        );
        let (n, f) = common::check_token_map(
            &map,
            sinks,
            store.host_len(l).unwrap(),
            store.far_key_len(l).unwrap(),
        );
        near_keys += n;
        far_keys += f;
        host += n + f;
        // Read-back of every host token equals what was written for that position.
        let h = n + f;
        if h > 0 {
            let (mut k, mut v) = (vec![0u8; h * tb], vec![0u8; h * tb]);
            store.read(l, 0, h, &mut k, &mut v).unwrap();
            assert_eq!(k, rows(l, 0, sinks, h), "keys of layer {l}");
            assert_eq!(v, rows(l, 1, sinks, h), "values of layer {l}");
        }
    }
    assert_eq!(near.used_bytes, near_keys * tb, "near accounting");
    assert_eq!(far.used_bytes, (far_keys + host) * tb, "far accounting");
    assert_eq!(
        (near.key_tokens, far.key_tokens, far.value_tokens),
        (near_keys, far_keys, host)
    );
    assert!(near.used_bytes <= near.capacity_bytes && far.used_bytes <= far.capacity_bytes);
}

fn snapshot(store: &KvStore, layers: usize) -> Vec<(usize, usize, usize, Vec<Tier>)> {
    (0..layers)
        .map(|l| {
            (
                store.total_len(l).unwrap(),
                store.host_len(l).unwrap(),
                store.far_key_len(l).unwrap(),
                store.token_map(l).unwrap(),
            )
        })
        .collect()
}

#[test]
fn random_sequences_keep_every_token_exactly_once() {
    let mut capacity_errors = 0;
    for seed in 0..12u64 {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let layers = rng.random_range(1..4);
        let sinks = rng.random_range(0..4);
        let near = rng.random_range(1..40);
        let far = rng.random_range(20..400);
        let mut store = KvStore::new(config(layers, sinks, near, far)).unwrap();
        for _step in 0..1000 {
            let layer = rng.random_range(0..layers);
            match rng.random_range(0..10) {
                0..=3 => store.append(layer, rng.random_range(0..6)).unwrap(),
                4..=7 => {
                    let avail = store.evictable(layer).unwrap();
                    let m = rng.random_range(0..=avail);
                    let from = sinks + store.host_len(layer).unwrap();
                    let before = snapshot(&store, layers);
                    match store.evict(layer, m, &rows(layer, 0, from, m), &rows(layer, 1, from, m))
                    {
                        Ok(()) => {}
                        Err(Error::Capacity(_)) => {
                            capacity_errors += 1;
                            assert_eq!(
                                before,
                                snapshot(&store, layers),
                                "a refused evict changes nothing"
                            );
                        }
                        Err(e) => panic!("unexpected error {e}"),
                    }
                }
                8 => {
                    let near_keys =
                        store.host_len(layer).unwrap() - store.far_key_len(layer).unwrap();
                    let m = rng.random_range(0..=near_keys);
                    match store.spill_keys(layer, m) {
                        Ok(()) | Err(Error::Capacity(_)) => {}
                        Err(e) => panic!("unexpected error {e}"),
                    }
                }
                _ => {
                    if rng.random_range(0..20) == 0 {
                        store.reset();
                    }
                }
            }
            check_invariants(&store, layers);
        }
    }
    assert!(
        capacity_errors > 0,
        "the sequences must also exercise refused evictions"
    );
}

#[test]
fn near_overflow_spills_least_recently_generated_keys_across_layers() {
    // Near holds 4 tokens; two layers evict 3 tokens each in lockstep.
    let mut store = KvStore::new(config(2, 1, 4, 100)).unwrap();
    for l in 0..2 {
        store.append(l, 4).unwrap();
        store
            .evict(l, 3, &rows(l, 0, 1, 3), &rows(l, 1, 1, 3))
            .unwrap();
    }
    // 6 keys, room for 4: two keys spill, and the oldest position exists in both layers.
    let (near, far) = store.tier_stats();
    assert_eq!(near.key_tokens, 4);
    assert_eq!(far.key_tokens, 2);
    // Both layers lost their oldest key (position 1): fair, least recently generated first.
    assert_eq!(store.far_key_len(0).unwrap(), 1);
    assert_eq!(store.far_key_len(1).unwrap(), 1);
    check_invariants(&store, 2);
}

#[test]
fn far_tier_full_is_a_capacity_error() {
    let mut store = KvStore::new(config(1, 0, 2, 4)).unwrap();
    store.append(0, 10).unwrap();
    store
        .evict(0, 3, &rows(0, 0, 0, 3), &rows(0, 1, 0, 3))
        .unwrap();
    // Far now holds 3 values + 1 spilled key: one more token needs 2 more tokens of far space.
    let err = store
        .evict(0, 1, &rows(0, 0, 3, 1), &rows(0, 1, 3, 1))
        .unwrap_err();
    assert!(matches!(err, Error::Capacity(_)), "{err}");
    assert_eq!(store.host_len(0).unwrap(), 3);
}

#[test]
fn invalid_configs_and_requests_are_rejected() {
    let bad = |f: fn(&mut StoreConfig)| {
        let mut c = config(1, 0, 4, 4);
        f(&mut c);
        KvStore::new(c).is_err()
    };
    assert!(bad(|c| c.layers = 0));
    assert!(bad(|c| c.batch = 0));
    assert!(bad(|c| c.kv_heads = 0));
    assert!(bad(|c| c.head_dim = 0));
    assert!(bad(|c| c.near.capacity_bytes = 0));
    assert!(bad(|c| c.far.capacity_bytes = 0));
    assert!(bad(|c| c.far.capacity_bytes = 1));
    assert!(bad(|c| c.max_host_tokens = Some(0)));

    let mut store = KvStore::new(config(1, 2, 4, 8)).unwrap();
    assert!(store.append(1, 1).is_err(), "layer out of range");
    store.append(0, 3).unwrap();
    assert_eq!(store.evictable(0).unwrap(), 1, "two sinks stay");
    assert!(
        store
            .evict(0, 2, &rows(0, 0, 2, 2), &rows(0, 1, 2, 2))
            .is_err(),
        "more than evictable"
    );
    assert!(
        store
            .evict(0, 1, &rows(0, 0, 2, 2), &rows(0, 1, 2, 1))
            .is_err(),
        "wrong byte count"
    );
    assert!(store.spill_keys(0, 1).is_err(), "no near keys yet");
    let mut buf = vec![0u8; 48];
    assert!(
        store.read(0, 0, 1, &mut buf.clone(), &mut buf).is_err(),
        "nothing on the host"
    );
}

#[test]
fn placement_is_reported_and_unknown_nodes_fall_back() {
    let mut cfg = config(1, 0, 4, 8);
    cfg.far.node = Some(4095);
    let mut store = KvStore::new(cfg).unwrap();
    let (near, far) = store.tier_stats();
    assert!(!near.placement.fell_back());
    assert!(far.placement.fell_back(), "node 4095 is not online here");
    assert_eq!(far.placement.requested, Some(4095));
    store.append(0, 2).unwrap();
    store
        .evict(0, 2, &rows(0, 0, 0, 2), &rows(0, 1, 0, 2))
        .unwrap();
    let online = hybridgen::mem::numa::online_nodes();
    for kind in [Kind::Keys, Kind::Values] {
        if let Some(node) = store.node_of(0, kind, 1).unwrap() {
            assert!(
                online.contains(&node),
                "{kind:?} on node {node}, online {online:?}"
            );
            let want = if kind == Kind::Keys {
                near.placement.node
            } else {
                far.placement.node
            };
            assert_eq!(node, want);
        }
    }
}
