//! Streaming reads over a buffer on the kernels' threads: the machine's read bandwidth, which
//! bounds every logit kernel (benchmarks report kernels as a share of it). Two variants: a plain
//! loop, and one that also prefetches `PREFETCH_AHEAD` bytes ahead in software (on CPUs whose
//! hardware prefetcher falls behind, a higher ceiling; see `simd::tuning`).

use rayon::prelude::*;

use super::simd::prefetch;
use super::split::run;

/// Prefetch distance of the prefetching read (the distance the kernels use where they prefetch).
const PREFETCH_AHEAD: usize = 2048;

/// Reads every byte of `buf` once (in parallel chunks) and returns a checksum so the reads
/// cannot be optimised away. With `prefetch`, software prefetches run `PREFETCH_AHEAD` bytes
/// ahead, as in the logit kernels.
pub fn stream_read(buf: &[u8], prefetch: bool) -> u64 {
    const CHUNK: usize = 1 << 20;
    run(buf.len(), || {
        buf.par_chunks(CHUNK)
            .map(|c| sum_words(c, prefetch))
            .reduce(|| 0, u64::wrapping_add)
    })
}

fn sum_words(chunk: &[u8], with_prefetch: bool) -> u64 {
    // Eight independent lanes: the compiler vectorises this to full-width loads and adds.
    let mut lanes = [0u64; 8];
    let mut blocks = chunk.chunks_exact(64);
    for block in &mut blocks {
        if with_prefetch {
            prefetch(block.as_ptr().wrapping_add(PREFETCH_AHEAD));
        }
        for (lane, word) in lanes.iter_mut().zip(block.chunks_exact(8)) {
            *lane = lane.wrapping_add(u64::from_ne_bytes(word.try_into().unwrap()));
        }
    }
    let tail: u64 = blocks.remainder().iter().map(|&b| b as u64).sum();
    lanes.iter().fold(tail, |a, &b| a.wrapping_add(b))
}

#[cfg(test)]
mod tests {
    #[test]
    fn checksum_counts_every_byte() {
        let buf = vec![1u8; (1 << 20) * 3 + 7];
        let words = ((buf.len() / 64 * 64 / 8) as u64).wrapping_mul(0x0101010101010101);
        for prefetch in [false, true] {
            assert_eq!(super::stream_read(&buf, prefetch), words.wrapping_add(7));
        }
    }
}
