//! Replays the committed corpus of every fuzz target (corpus/<target>/*) on stable Rust, and a
//! few thousand seeded random inputs besides: the same bodies cargo-fuzz runs.

use std::path::Path;

fn replay(target: &str, body: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus").join(target);
    let mut files = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        body(&std::fs::read(entry.unwrap().path()).unwrap());
        files += 1;
    }
    assert!(files > 0, "the {target} corpus is empty");
    // A cheap xorshift stream: seeded, so a failure replays.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for _ in 0..2000 {
        let len = (x % 200) as usize;
        let input: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        body(&input);
    }
}

#[test]
fn store_ops_corpus() {
    replay("store_ops", hybridgen_fuzz::store_ops);
}

#[test]
fn slot_ops_corpus() {
    replay("slot_ops", hybridgen_fuzz::slot_ops);
}

#[test]
fn kernels_corpus() {
    replay("kernels", hybridgen_fuzz::kernels);
}
