//! NUMA placement of the host KV store as the kernel reports it, per page: keys on the near
//! node, values on the far node, spilled keys migrated to the far node, capacity errors that
//! move nothing, fallback of nodes that are not online, and a near tier on a CPU-less node.
//!
//! They need NUMA nodes 0 and 1 online, which no machine this project is built on has, so they
//! are ignored by default (`cargo test` lists them as ignored, never as passed). `bash
//! tests/numa.sh` builds them and runs them with `--ignored` inside a qemu guest whose node 0
//! holds the CPUs and 1 GiB and whose node 1 holds 1 GiB and no CPU (how CXL memory appears);
//! on a two-socket or CXL machine `cargo test --test numa -- --ignored` runs them as they are.
//! Run on a machine with one node they fail, saying so: they never pass without the nodes.
//!
//! The node of a page is always the kernel's answer (`move_pages(2)` in query mode, which
//! neither moves nor faults pages in), never the store's own bookkeeping; the store's `node_of`
//! (`get_mempolicy`) and `tier_stats` are then checked against it.

use hybridgen::cpu;
use hybridgen::kv::{Kind, KvStore, StoreConfig, Tier, TierConfig, TierStats, NODE_RESERVE_BYTES};
use hybridgen::mem::numa::{self, page_nodes};
use hybridgen::mem::PAGE_SIZE;
use hybridgen::{DType, Error};

const B: usize = 2;
const KVH: usize = 2;
/// f32 rows of 512 bytes: 8 tokens per page, so a few dozen tokens span several pages.
const D: usize = 128;
const ROW: usize = D * 4;
const ROWS_PER_PAGE: usize = PAGE_SIZE / ROW;
/// Bytes of one token of the whole batch (keys or values): the unit of the tier capacities.
const TOKEN: usize = B * KVH * ROW;

/// Fails (never skips) unless nodes 0 and 1 are online; prints the topology the tests run on.
fn require_two_nodes() {
    let online = numa::online_nodes();
    assert!(
        online.contains(&0) && online.contains(&1),
        "this machine has NUMA nodes {online:?} online; these tests need nodes 0 and 1: run \
         `bash tests/numa.sh`, which boots a guest that has them"
    );
}

fn node_cpus(node: u32) -> String {
    std::fs::read_to_string(format!("/sys/devices/system/node/node{node}/cpulist"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn config(
    near: Option<u32>,
    far: Option<u32>,
    near_tokens: usize,
    far_tokens: usize,
) -> StoreConfig {
    StoreConfig {
        layers: 2,
        batch: B,
        kv_heads: KVH,
        head_dim: D,
        dtype: DType::F32,
        sinks: 0,
        near: TierConfig {
            node: near,
            capacity_bytes: near_tokens * TOKEN,
        },
        far: TierConfig {
            node: far,
            capacity_bytes: far_tokens * TOKEN,
        },
        max_host_tokens: None,
    }
}

/// The value stored for (layer, kind, position, slot, head, dim): unique and exact in f32.
fn datum(layer: usize, kind: usize, pos: usize, s: usize, h: usize, i: usize) -> f32 {
    (((((layer * 2 + kind) * 512 + pos) * B + s) * KVH + h) * D + i) as f32 * 0.25
}

/// Rows `[slots, kv_heads, m, d]` of positions `[from, from + m)`, as bytes.
fn rows(layer: usize, kind: usize, slots: &[usize], from: usize, m: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(slots.len() * KVH * m * ROW);
    for &s in slots {
        for h in 0..KVH {
            for t in from..from + m {
                for i in 0..D {
                    out.extend_from_slice(&datum(layer, kind, t, s, h, i).to_ne_bytes());
                }
            }
        }
    }
    out
}

/// Appends and evicts `m` tokens of every slot of `layer` (lockstep).
fn evict(store: &mut KvStore, layer: usize, m: usize) -> hybridgen::Result<()> {
    let from = store.host_len(layer).unwrap();
    let slots: Vec<usize> = (0..B).collect();
    store.append(layer, m)?;
    store.evict(
        layer,
        m,
        &rows(layer, 0, &slots, from, m),
        &rows(layer, 1, &slots, from, m),
    )
}

/// Every host token of `layer` reads back as written (page migration keeps the bytes).
fn check_contents(store: &KvStore, layer: usize) {
    let host = store.host_len(layer).unwrap();
    let slots: Vec<usize> = (0..B).collect();
    let (mut k, mut v) = (vec![0u8; host * TOKEN], vec![0u8; host * TOKEN]);
    store.read(layer, 0, host, &mut k, &mut v).unwrap();
    assert!(
        k == rows(layer, 0, &slots, 0, host),
        "keys of layer {layer} changed"
    );
    assert!(
        v == rows(layer, 1, &slots, 0, host),
        "values of layer {layer} changed"
    );
}

/// The kernel's node of every page holding host tokens `[0, tokens)` of one strip.
fn strip_nodes(
    store: &KvStore,
    layer: usize,
    kind: Kind,
    slot: usize,
    head: usize,
    tokens: usize,
) -> Vec<u32> {
    let base = store.strip_ptr(layer, kind, slot, head);
    let pages = (tokens * ROW).div_ceil(PAGE_SIZE);
    let addrs: Vec<*const u8> = (0..pages)
        .map(|p| base.wrapping_add(p * PAGE_SIZE))
        .collect();
    page_nodes(&addrs)
        .expect("move_pages refused")
        .into_iter()
        .enumerate()
        .map(|(p, r)| {
            r.unwrap_or_else(|errno| {
                panic!("{kind:?} page {p} of layer {layer} slot {slot} head {head}: errno {errno}")
            })
        })
        .collect()
}

/// Every written page of every strip of `kind` in `layer` is on `want(page)`, says the kernel.
fn expect_pages(
    store: &KvStore,
    layer: usize,
    kind: Kind,
    slot: usize,
    want: impl Fn(usize) -> u32,
) {
    let host = store.slot_host_len(layer, slot).unwrap();
    for head in 0..KVH {
        let got = strip_nodes(store, layer, kind, slot, head, host);
        let expected: Vec<u32> = (0..got.len()).map(&want).collect();
        assert_eq!(
            got, expected,
            "{kind:?} pages of layer {layer}, slot {slot}, head {head} ({host} tokens, \
             {ROWS_PER_PAGE} per page): kernel's nodes vs expected"
        );
    }
}

fn expect_all(store: &KvStore, layer: usize, kind: Kind, node: u32) {
    for slot in store.active_slots() {
        expect_pages(store, layer, kind, slot, |_| node);
    }
}

/// `store.node_of` (get_mempolicy) agrees with move_pages for every host token of `layer`.
fn check_node_of_agrees(store: &KvStore, layer: usize) {
    let host = store.host_len(layer).unwrap();
    let slot = store.active_slots()[0];
    for kind in [Kind::Keys, Kind::Values] {
        let pages = strip_nodes(store, layer, kind, slot, 0, host);
        for i in 0..host {
            assert_eq!(
                store.node_of(layer, kind, i).unwrap(),
                Some(pages[i / ROWS_PER_PAGE]),
                "node_of({layer}, {kind:?}, {i}) disagrees with move_pages"
            );
        }
    }
}

fn check_placement(stats: &TierStats, requested: Option<u32>, node: u32) {
    assert_eq!(stats.placement.requested, requested);
    assert_eq!(stats.placement.node, node, "{:?}", stats.placement);
    assert!(!stats.placement.fell_back(), "{:?}", stats.placement);
}

#[test]
#[ignore = "needs NUMA nodes 0 and 1 online: run `bash tests/numa.sh` (a qemu guest)"]
fn the_machine_has_two_nodes() {
    require_two_nodes();
    for node in numa::online_nodes() {
        let cpus = node_cpus(node);
        let cpus = if cpus.is_empty() { "none" } else { &cpus };
        println!("numa: node {node}: cpus {cpus}");
    }
}

#[test]
#[ignore = "needs NUMA nodes 0 and 1 online: run `bash tests/numa.sh` (a qemu guest)"]
fn keys_land_on_the_near_node_and_values_on_the_far_node() {
    require_two_nodes();
    let mut store = KvStore::new(config(Some(0), Some(1), 1000, 1000)).unwrap();
    let (near, far) = store.tier_stats();
    check_placement(&near, Some(0), 0);
    check_placement(&far, Some(1), 1);
    for layer in 0..2 {
        // 40 tokens: 5 pages per strip; the second eviction fills pages the first began.
        evict(&mut store, layer, 13).unwrap();
        evict(&mut store, layer, 27).unwrap();
        expect_all(&store, layer, Kind::Keys, 0);
        expect_all(&store, layer, Kind::Values, 1);
        check_node_of_agrees(&store, layer);
        check_contents(&store, layer);
    }
    let (near, far) = store.tier_stats();
    assert_eq!(
        (near.key_tokens, far.key_tokens, far.value_tokens),
        (80, 0, 80)
    );
}

#[test]
#[ignore = "needs NUMA nodes 0 and 1 online: run `bash tests/numa.sh` (a qemu guest)"]
fn near_overflow_spills_the_oldest_keys_to_the_far_node() {
    require_two_nodes();
    // Near holds 20 tokens (one layer used here).
    let mut store = KvStore::new(config(Some(0), Some(1), 20, 1000)).unwrap();
    evict(&mut store, 0, 16).unwrap();
    assert_eq!(store.far_key_len(0).unwrap(), 0);
    expect_all(&store, 0, Kind::Keys, 0);

    // 40 keys, room for 20: the 20 oldest positions move, pages wholly holding far keys migrate
    // (2 pages: tokens 0..16); page 2 (tokens 16..24) still holds near keys 20..24 and stays.
    evict(&mut store, 0, 24).unwrap();
    assert_eq!(store.far_key_len(0).unwrap(), 20);
    let (near, far) = store.tier_stats();
    assert_eq!(
        (near.key_tokens, far.key_tokens, far.value_tokens),
        (20, 20, 40),
        "tier_stats reports the spill"
    );
    assert_eq!(near.used_bytes, 20 * TOKEN);
    assert_eq!(far.used_bytes, 60 * TOKEN);
    let map = store.token_map(0).unwrap();
    assert!(
        map[..20].iter().all(|&t| t == Tier::Far) && map[20..].iter().all(|&t| t == Tier::Near)
    );
    let spilled =
        |far_keys: usize| move |page: usize| u32::from((page + 1) * ROWS_PER_PAGE <= far_keys);
    for slot in 0..B {
        expect_pages(&store, 0, Kind::Keys, slot, spilled(20));
    }
    expect_all(&store, 0, Kind::Values, 1);
    assert_eq!(
        store.node_of(0, Kind::Keys, 0).unwrap(),
        Some(1),
        "oldest key"
    );
    assert_eq!(
        store.node_of(0, Kind::Keys, 39).unwrap(),
        Some(0),
        "newest key"
    );
    check_node_of_agrees(&store, 0);
    check_contents(&store, 0);

    // An explicit spill completes page 2.
    store.spill_keys(0, 4).unwrap();
    assert_eq!(store.tier_stats().1.key_tokens, 24);
    for slot in 0..B {
        expect_pages(&store, 0, Kind::Keys, slot, spilled(24));
    }
    check_node_of_agrees(&store, 0);
    check_contents(&store, 0);

    // One slot alone: its pages move, the other slot's stay.
    store.spill_slot_keys(0, 1, 8).unwrap();
    expect_pages(&store, 0, Kind::Keys, 0, spilled(24));
    expect_pages(&store, 0, Kind::Keys, 1, spilled(32));

    // A released slot's key pages go back to the near node for its next sequence, and after a
    // reset every key page does.
    store.release_slot(1).unwrap();
    assert_eq!(store.add_slot().unwrap(), 1);
    store.append_slot(0, 1, 8).unwrap();
    let one = [1usize];
    store
        .evict_slot(0, 1, 8, &rows(0, 0, &one, 0, 8), &rows(0, 1, &one, 0, 8))
        .unwrap();
    expect_pages(&store, 0, Kind::Keys, 1, |_| 0);
    expect_pages(&store, 0, Kind::Values, 1, |_| 1);
    store.reset();
    evict(&mut store, 0, 16).unwrap();
    expect_all(&store, 0, Kind::Keys, 0);
    expect_all(&store, 0, Kind::Values, 1);
    check_node_of_agrees(&store, 0);
    check_contents(&store, 0);
}

/// What a refused request must leave unchanged: lengths, token maps, stats, pages, bytes.
#[derive(Debug, PartialEq)]
struct Snapshot {
    lengths: Vec<(usize, usize, usize)>,
    maps: Vec<Vec<Tier>>,
    stats: Vec<(usize, usize, usize, usize)>,
    pages: Vec<Vec<u32>>,
    contents: Vec<(Vec<u8>, Vec<u8>)>,
}

fn snapshot(store: &KvStore) -> Snapshot {
    let layers = 0..2;
    let (near, far) = store.tier_stats();
    let mut pages = Vec::new();
    let mut contents = Vec::new();
    for layer in layers.clone() {
        let host = store.host_len(layer).unwrap();
        for kind in [Kind::Keys, Kind::Values] {
            for slot in 0..B {
                for head in 0..KVH {
                    pages.push(strip_nodes(store, layer, kind, slot, head, host));
                }
            }
        }
        let (mut k, mut v) = (vec![0u8; host * TOKEN], vec![0u8; host * TOKEN]);
        store.read(layer, 0, host, &mut k, &mut v).unwrap();
        contents.push((k, v));
    }
    Snapshot {
        lengths: layers
            .clone()
            .map(|l| {
                let host = store.host_len(l).unwrap();
                (
                    store.total_len(l).unwrap(),
                    host,
                    store.far_key_len(l).unwrap(),
                )
            })
            .collect(),
        maps: layers.map(|l| store.token_map(l).unwrap()).collect(),
        stats: [near, far]
            .iter()
            .map(|s| (s.used_bytes, s.key_tokens, s.value_tokens, s.capacity_bytes))
            .collect(),
        pages,
        contents,
    }
}

#[test]
#[ignore = "needs NUMA nodes 0 and 1 online: run `bash tests/numa.sh` (a qemu guest)"]
fn a_full_far_tier_is_a_capacity_error_that_moves_nothing() {
    require_two_nodes();
    // Near 8 tokens, far 40: 24 tokens give 24 values + 16 spilled keys, far exactly full.
    let mut store = KvStore::new(config(Some(0), Some(1), 8, 40)).unwrap();
    evict(&mut store, 0, 24).unwrap();
    let (near, far) = store.tier_stats();
    assert_eq!(far.used_bytes, far.capacity_bytes, "the far tier is full");
    assert_eq!((near.key_tokens, far.key_tokens), (8, 16));
    let before = snapshot(&store);
    // Two pages of every key strip hold far keys only and are on node 1.
    assert!(before.pages[..B * KVH].iter().all(|p| p == &[1, 1, 0]));

    for (what, result) in [
        ("evict into layer 0", evict(&mut store, 0, 1)),
        ("evict into layer 1", evict(&mut store, 1, 1)),
        ("spill", store.spill_keys(0, 1)),
    ] {
        match result {
            Err(Error::Capacity(msg)) => assert!(msg.contains("far tier full"), "{what}: {msg}"),
            other => panic!("{what}: expected a capacity error, got {other:?}"),
        }
        let mut after = snapshot(&store);
        // A refused evict keeps the device tokens its append recorded; the host side is equal.
        for (l, (total, _, _)) in after.lengths.iter_mut().enumerate() {
            *total = before.lengths[l].0;
        }
        for (l, map) in after.maps.iter_mut().enumerate() {
            map.truncate(before.maps[l].len());
        }
        assert_eq!(before, after, "{what} changed the store or moved pages");
    }
    check_node_of_agrees(&store, 0);
}

#[test]
#[ignore = "needs NUMA nodes 0 and 1 online: run `bash tests/numa.sh` (a qemu guest)"]
fn nodes_that_are_not_online_fall_back_with_a_reason_naming_them() {
    require_two_nodes();
    let online = numa::online_nodes();
    let absent = online.iter().max().unwrap() + 1;
    let store_with = |near, far| {
        let mut store = KvStore::new(config(near, far, 100, 100)).unwrap();
        evict(&mut store, 0, 20).unwrap();
        store
    };

    let store = store_with(Some(absent), Some(4000));
    let (near, far) = store.tier_stats();
    for (stats, node) in [(&near, absent), (&far, 4000)] {
        let p = &stats.placement;
        assert!(p.fell_back(), "{p:?}");
        assert_eq!(p.requested, Some(node));
        assert!(online.contains(&p.node), "{p:?}");
        let reason = p.fallback_reason.as_deref().unwrap();
        assert!(
            reason.contains(&format!("NUMA node {node} is not online"))
                && reason.contains(&format!("{online:?}")),
            "the reason names the node and the online ones: {reason}"
        );
    }
    if node_cpus(1).is_empty() {
        // Node 1 has no CPU, so the local node the store falls back to is node 0.
        assert_eq!((near.placement.node, far.placement.node), (0, 0));
    }
    expect_all(&store, 0, Kind::Keys, near.placement.node);
    expect_all(&store, 0, Kind::Values, far.placement.node);
    check_node_of_agrees(&store, 0);

    // Only the absent one falls back.
    let store = store_with(Some(1), Some(absent));
    let (near, far) = store.tier_stats();
    check_placement(&near, Some(1), 1);
    assert!(far.placement.fell_back());
    expect_all(&store, 0, Kind::Keys, 1);
    expect_all(&store, 0, Kind::Values, far.placement.node);
    check_node_of_agrees(&store, 0);
}

#[test]
#[ignore = "needs NUMA nodes 0 and 1 online: run `bash tests/numa.sh` (a qemu guest)"]
fn a_near_tier_on_node_1_holds_the_keys_there() {
    require_two_nodes();
    // Both tiers on node 1 (where a CXL expander's node has no CPU): spilling is accounting only.
    let mut store = KvStore::new(config(Some(1), Some(1), 16, 1000)).unwrap();
    check_placement(&store.tier_stats().0, Some(1), 1);
    evict(&mut store, 0, 40).unwrap();
    assert_eq!(store.far_key_len(0).unwrap(), 24);
    expect_all(&store, 0, Kind::Keys, 1);
    expect_all(&store, 0, Kind::Values, 1);
    check_node_of_agrees(&store, 0);
    check_contents(&store, 0);

    // Keys on node 1, values on node 0: spilled key pages migrate from 1 to 0.
    let mut inverted = KvStore::new(config(Some(1), Some(0), 16, 1000)).unwrap();
    evict(&mut inverted, 0, 40).unwrap();
    for slot in 0..B {
        expect_pages(&inverted, 0, Kind::Keys, slot, |page| {
            u32::from((page + 1) * ROWS_PER_PAGE > 24)
        });
    }
    expect_all(&inverted, 0, Kind::Values, 0);
    check_node_of_agrees(&inverted, 0);
    check_contents(&inverted, 0);

    // The CPU reads keys on the CPU-less node: the logits are those of keys on node 0.
    let mut local = KvStore::new(config(Some(0), Some(1), 1000, 1000)).unwrap();
    evict(&mut local, 0, 40).unwrap();
    let mut remote = KvStore::new(config(Some(1), Some(1), 1000, 1000)).unwrap();
    evict(&mut remote, 0, 40).unwrap();
    expect_all(&remote, 0, Kind::Keys, 1);
    let hq = 2 * KVH;
    let q: Vec<f32> = (0..B * hq * D)
        .map(|i| ((i % 17) as f32 - 8.0) / 64.0)
        .collect();
    let logits = |store: &KvStore| {
        let mut out = vec![0f32; B * hq * 40];
        let strips = store.strips(0).unwrap();
        cpu::logits(cpu::isa(), &strips, &q, hq, 0.125, None, &mut out).unwrap();
        out
    };
    let (near_logits, far_logits) = (logits(&local), logits(&remote));
    assert!(near_logits.iter().any(|&x| x != 0.0));
    assert_eq!(near_logits, far_logits);
}

#[test]
#[ignore = "needs NUMA nodes 0 and 1 online: run `bash tests/numa.sh` (a qemu guest)"]
fn a_far_node_without_room_is_a_capacity_error_not_the_oom_killer() {
    require_two_nodes();
    // The far tier may hold 512 MiB more than node 1 has: filling it must stop with a capacity
    // error naming the node while the node still has its reserve (memory bound to one node
    // never falls back; without the check the kernel's OOM killer ends the process). Keys spill
    // to the far node too (a near tier of 1024 tokens), so node 0 stays nearly empty.
    let available = numa::node_available_bytes(1).expect("sysfs lists node 1's memory");
    let (heads, d) = (2, 512);
    let token = heads * d * 4;
    let m = 1024;
    let cfg = StoreConfig {
        layers: 1,
        batch: 1,
        kv_heads: heads,
        head_dim: d,
        dtype: DType::F32,
        sinks: 0,
        near: TierConfig {
            node: Some(0),
            capacity_bytes: m * token,
        },
        far: TierConfig {
            node: Some(1),
            capacity_bytes: available + (512 << 20),
        },
        max_host_tokens: None,
    };
    let mut store = KvStore::new(cfg).unwrap();
    let rows = vec![1u8; m * token];
    let mut evicted = 0;
    let err = loop {
        store.append(0, m).unwrap();
        match store.evict(0, m, &rows, &rows) {
            Ok(()) => evicted += m,
            Err(e) => break e,
        }
        assert!(
            evicted * token <= available,
            "{evicted} tokens of values written to a node that had {available} bytes, with no error"
        );
    };
    match err {
        Error::Capacity(msg) => assert!(msg.contains("NUMA node 1 is full"), "{msg}"),
        other => panic!("expected a capacity error, got {other:?}"),
    }
    assert_eq!(
        store.host_len(0).unwrap(),
        evicted,
        "the refused evict moved tokens"
    );
    assert!(evicted > 0, "the node took nothing at all");
    let left = numa::node_available_bytes(1).unwrap();
    println!(
        "node 1: {available} bytes available before, {evicted} tokens evicted, {left} bytes left"
    );
    assert!(
        left >= NODE_RESERVE_BYTES / 2,
        "node 1 kept only {left} bytes"
    );
}
