//! What the core's integration tests share: a one-layer store filled with random keys and
//! values, and those values as stored (rounded to the dtype) for the f64 references.

#![allow(dead_code)]

use hybridgen::kv::{KvStore, StoreConfig, TierConfig};
use hybridgen::DType;
use rand::{Rng, SeedableRng};

pub struct Case {
    pub store: KvStore,
    /// Keys / values as stored (rounded to the dtype), `[b][kvh][n][d]`.
    pub keys: Vec<f32>,
    pub values: Vec<f32>,
    /// The stored value bytes, to compare gathered rows exactly.
    pub value_bytes: Vec<u8>,
    pub b: usize,
    pub kvh: usize,
    pub d: usize,
    pub n: usize,
    pub dtype: DType,
}

pub fn encode(x: &[f32], dtype: DType) -> (Vec<u8>, Vec<f32>) {
    let mut bytes = Vec::new();
    let mut rounded = Vec::new();
    for &v in x {
        let r = match dtype {
            DType::F16 => {
                let h = half::f16::from_f32(v);
                bytes.extend_from_slice(&h.to_bits().to_ne_bytes());
                h.to_f32()
            }
            DType::BF16 => {
                let h = half::bf16::from_f32(v);
                bytes.extend_from_slice(&h.to_bits().to_ne_bytes());
                h.to_f32()
            }
            DType::F32 => {
                bytes.extend_from_slice(&v.to_ne_bytes());
                v
            }
        };
        rounded.push(r);
    }
    (bytes, rounded)
}

pub fn case(b: usize, kvh: usize, d: usize, n: usize, dtype: DType, seed: u64) -> Case {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut store = KvStore::new(StoreConfig {
        layers: 1,
        batch: b,
        kv_heads: kvh,
        head_dim: d,
        dtype,
        sinks: 0,
        near: TierConfig {
            node: None,
            capacity_bytes: 1 << 26,
        },
        far: TierConfig {
            node: None,
            capacity_bytes: 1 << 26,
        },
        max_host_tokens: Some(n.max(1)),
    })
    .unwrap();
    let raw_k: Vec<f32> = (0..b * kvh * n * d)
        .map(|_| rng.random_range(-2.0..2.0))
        .collect();
    let raw_v: Vec<f32> = (0..b * kvh * n * d)
        .map(|_| rng.random_range(-2.0..2.0))
        .collect();
    let (kb, keys) = encode(&raw_k, dtype);
    let (vb, values) = encode(&raw_v, dtype);
    store.append(0, n).unwrap();
    store.evict(0, n, &kb, &vb).unwrap();
    Case {
        store,
        keys,
        values,
        value_bytes: vb,
        b,
        kvh,
        d,
        n,
        dtype,
    }
}

/// Reports, visibly, that `test` could not exercise its subject here and why. libtest captures
/// `eprintln!` (shown only with `--nocapture` or on failure), not writes to the stderr handle
/// itself, so this line shows in a plain `cargo test` run.
pub fn skipped(test: &str, why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
}

/// Checks a token map's layout — sinks on the device, then the far keys, then the near keys, then
/// the recent device tokens, every position exactly once — against the store's own counts of
/// host tokens and far keys. Returns `(near, far)` key counts.
pub fn check_token_map(
    map: &[hybridgen::kv::Tier],
    sinks: usize,
    host: usize,
    far_keys: usize,
) -> (usize, usize) {
    use hybridgen::kv::Tier;
    let count = |t: Tier| map.iter().filter(|&&x| x == t).count();
    let (n, f) = (count(Tier::Near), count(Tier::Far));
    assert_eq!(
        n + f + count(Tier::Device),
        map.len(),
        "every position has exactly one tier"
    );
    assert_eq!(n + f, host);
    assert_eq!(f, far_keys);
    let first_host = sinks.min(map.len());
    assert!(map[..first_host].iter().all(|&t| t == Tier::Device));
    assert!(map[first_host..first_host + f]
        .iter()
        .all(|&t| t == Tier::Far));
    assert!(map[first_host + f..first_host + f + n]
        .iter()
        .all(|&t| t == Tier::Near));
    assert!(map[first_host + f + n..].iter().all(|&t| t == Tier::Device));
    (n, f)
}
