//! Launch geometry of the kernels in `kernels/hybrid_attention.cu`, in one place: grid, block,
//! shared memory, tokens per slice and how many slices to cut. Pure arithmetic, no CUDA: the
//! launches in [`super::device`] use it, and so (through `py::launch`) do the tests that run the
//! kernels on the CPU, so neither restates it.
//!
//! `split_attention` runs one block per (chunk of a GQA group's query heads, slice of the
//! tokens, sequence x KV head): grid `(head_chunks, splits, batch * kv_heads)`. A block serves
//! every query head of its chunk from one read of the KV head's rows; the kernel derives the
//! chunk's heads from `gridDim.x`, so the chunking is decided here only. Chunks of one group are
//! adjacent in the grid, so they run together and the rows they share come from L2.
//! `merge_partials` runs one block per (row, 32 output columns), its warps sharing the slices.

use super::device::{MAX_HEAD_DIM, SPLIT_THREADS};
use crate::ensure;
use crate::error::{Error, Result};

/// Query heads one `split_attention` block serves from one read of their KV head's rows (the
/// kernel's `PASS_HEADS`, which sizes its shared memory). Larger groups are cut into chunks.
pub const GROUP_HEADS: usize = 8;
/// `split_attention` blocks resident on one SM: the kernel's `__launch_bounds__` minimum (4
/// blocks of 128 threads at <= 128 registers; its ~41 KB of shared memory allow 5). One wave
/// of them is what [`split_count`] aims at.
pub const BLOCKS_PER_SM: usize = 4;
/// Shortest slice [`split_count`] cuts: a block's fixed costs (loading the queries, combining
/// its warps, writing a partial that the merge reads back) stay small next to its rows.
pub const MIN_SLICE_TOKENS: usize = 256;
/// Most slices per row.
pub const MAX_SPLITS: usize = 1024;
/// Warps of the largest `merge_partials` block (the kernel's `MERGE_WARPS`).
pub const MERGE_WARPS: usize = 8;
/// Largest head_dim `merge_partials` takes (its grid has one block per 32 columns).
pub const MERGE_MAX_HEAD_DIM: usize = 1024;
/// Limits of a CUDA grid.
const GRID_X_MAX: usize = i32::MAX as usize;
const GRID_YZ_MAX: usize = 65535;

/// Grid, block and dynamic shared memory of one launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Launch {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    pub shared_mem_bytes: u32,
}

impl Launch {
    /// No block at all (an empty batch): nothing to launch.
    pub fn is_empty(&self) -> bool {
        self.grid.0 == 0 || self.grid.1 == 0 || self.grid.2 == 0
    }
}

/// A `split_attention` launch and the values its arguments and outputs depend on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SplitLaunch {
    pub launch: Launch,
    /// Slices per row (`part_o [b * hq, splits, d]`).
    pub splits: usize,
    /// The kernel's `tokens_per_split` argument: slice `s` is tokens `[s * t, (s + 1) * t)` of
    /// the virtual sequence (trailing slices may be empty).
    pub tokens_per_split: usize,
    /// Blocks per (sequence, KV head, slice), each with `heads_per_block` query heads (the last
    /// one fewer if the group does not divide evenly).
    pub head_chunks: usize,
    pub heads_per_block: usize,
}

/// How many blocks serve each GQA group of `q_heads / kv_heads` query heads.
pub fn head_chunks(q_heads: usize, kv_heads: usize) -> usize {
    (q_heads / kv_heads.max(1)).div_ceil(GROUP_HEADS)
}

/// Slices per row for `rows` blocks per slice and `tokens` tokens: as many as keep one wave of
/// `BLOCKS_PER_SM * sm_count` blocks full (never more, which would leave a second wave nearly
/// empty), none shorter than `min_tokens`, at most `MAX_SPLITS`.
pub fn splits_for(rows: usize, tokens: usize, sm_count: u32, min_tokens: usize) -> usize {
    let by_work = tokens.div_ceil(min_tokens.max(1)).max(1);
    let wave = BLOCKS_PER_SM * (sm_count.max(1) as usize);
    let by_occupancy = (wave / rows.max(1)).max(1);
    by_work.min(by_occupancy).min(MAX_SPLITS)
}

/// Slices per row for a `split_attention` launch over `tokens` (device + shipped) tokens.
pub fn split_count(
    batch: usize,
    q_heads: usize,
    kv_heads: usize,
    tokens: usize,
    sm_count: u32,
) -> usize {
    let rows = batch * kv_heads * head_chunks(q_heads, kv_heads);
    splits_for(rows, tokens, sm_count, MIN_SLICE_TOKENS)
}

fn dim(what: &str, v: usize, max: usize) -> Result<u32> {
    ensure!(v <= max, "{what} ({v}) exceeds the CUDA grid limit ({max})");
    Ok(v as u32)
}

/// The `split_attention` launch for `splits` slices of `tokens` tokens.
pub fn split_attention(
    batch: usize,
    q_heads: usize,
    kv_heads: usize,
    head_dim: usize,
    tokens: usize,
    splits: usize,
) -> Result<SplitLaunch> {
    ensure!(
        (1..=MAX_HEAD_DIM).contains(&head_dim),
        "head_dim must be in 1..={MAX_HEAD_DIM}, got {head_dim}"
    );
    ensure!(
        kv_heads > 0 && q_heads.is_multiple_of(kv_heads),
        "query heads ({q_heads}) must be a multiple of KV heads ({kv_heads})"
    );
    ensure!(
        (1..=GRID_YZ_MAX).contains(&splits),
        "splits must be in 1..={GRID_YZ_MAX}, got {splits}"
    );
    ensure!(
        tokens <= i32::MAX as usize,
        "{tokens} tokens do not fit the kernel's 32-bit token index"
    );
    let chunks = head_chunks(q_heads, kv_heads);
    let group = q_heads / kv_heads;
    let groups = batch
        .checked_mul(kv_heads)
        .ok_or_else(|| Error::InvalidArgument("batch * kv_heads overflows".into()))?;
    let grid = (
        dim("head chunks", chunks, GRID_X_MAX)?,
        dim("splits", splits, GRID_YZ_MAX)?,
        dim("batch * kv_heads", groups, GRID_YZ_MAX)?,
    );
    Ok(SplitLaunch {
        launch: Launch {
            grid,
            block: (SPLIT_THREADS, 1, 1),
            shared_mem_bytes: 0,
        },
        splits,
        tokens_per_split: tokens.div_ceil(splits).max(1),
        head_chunks: chunks,
        heads_per_block: if chunks == 0 {
            0
        } else {
            group.div_ceil(chunks)
        },
    })
}

/// The `merge_partials` launch for `rows` rows of `splits` partials of `head_dim` floats.
pub fn merge_partials(rows: usize, head_dim: usize, splits: usize) -> Result<Launch> {
    ensure!(
        (1..=MERGE_MAX_HEAD_DIM).contains(&head_dim),
        "head_dim must be in 1..={MERGE_MAX_HEAD_DIM}, got {head_dim}"
    );
    ensure!(splits >= 1, "at least one partial per row is required");
    let warps = splits.min(MERGE_WARPS) as u32;
    Ok(Launch {
        grid: (
            dim("rows", rows, GRID_X_MAX)?,
            head_dim.div_ceil(32) as u32,
            1,
        ),
        block: (32 * warps, 1, 1),
        shared_mem_bytes: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_wave_of_blocks_without_tiny_slices() {
        // Llama-3-8B shape (32 query heads, 8 KV heads) on 132 SMs: one wave of 528 blocks.
        assert_eq!(split_count(1, 32, 8, 32768, 132), 66);
        assert_eq!(split_count(4, 32, 8, 131072, 132), 16);
        // Short sequences: slices of at least MIN_SLICE_TOKENS.
        assert_eq!(split_count(1, 32, 8, 1000, 132), 4);
        assert_eq!(split_count(1, 32, 8, 0, 132), 1);
        // Never past one wave: 7 groups get 75 slices (525 blocks), not 76 (532).
        assert_eq!(splits_for(7, 1 << 20, 132, 1), 75);
        // More groups than a wave holds: one slice each.
        assert_eq!(split_count(128, 32, 8, 1 << 17, 132), 1);
        assert_eq!(splits_for(1, 1 << 30, 4096, 1), MAX_SPLITS);
    }

    #[test]
    fn groups_share_a_block_up_to_group_heads() {
        let g = split_attention(2, 32, 8, 128, 1000, 3).unwrap();
        assert_eq!(g.launch.grid, (1, 3, 16));
        assert_eq!(g.launch.block, (SPLIT_THREADS, 1, 1));
        assert_eq!(
            (g.head_chunks, g.heads_per_block, g.tokens_per_split),
            (1, 4, 334)
        );
        // A group of 12 takes two chunks of 6, of 16 two of 8, MHA one of 1.
        assert_eq!(
            split_attention(1, 12, 1, 64, 10, 1)
                .unwrap()
                .heads_per_block,
            6
        );
        assert_eq!(
            split_attention(1, 12, 1, 64, 10, 1).unwrap().launch.grid.0,
            2
        );
        assert_eq!(
            split_attention(1, 16, 1, 64, 10, 1)
                .unwrap()
                .heads_per_block,
            8
        );
        assert_eq!(
            split_attention(1, 4, 4, 64, 10, 1).unwrap().heads_per_block,
            1
        );
        // Slices past the end are empty, never zero-length by construction.
        assert_eq!(
            split_attention(1, 1, 1, 1, 0, 4).unwrap().tokens_per_split,
            1
        );
        assert!(split_attention(0, 4, 4, 64, 10, 1)
            .unwrap()
            .launch
            .is_empty());
    }

    #[test]
    fn split_arguments_are_checked() {
        assert!(split_attention(1, 4, 4, 0, 10, 1).is_err());
        assert!(split_attention(1, 4, 4, MAX_HEAD_DIM + 1, 10, 1).is_err());
        assert!(split_attention(1, 6, 4, 64, 10, 1).is_err());
        assert!(split_attention(1, 4, 0, 64, 10, 1).is_err());
        assert!(split_attention(1, 4, 4, 64, 10, 0).is_err());
        assert!(split_attention(1, 4, 4, 64, 10, 65536).is_err());
        assert!(split_attention(70000, 8, 1, 64, 10, 1).is_err()); // grid z
        assert!(split_attention(1, 4, 4, 64, 1 << 31, 1).is_err());
    }

    #[test]
    fn merge_blocks_cover_columns_and_slices() {
        let m = merge_partials(64, 80, 3).unwrap();
        assert_eq!(m.grid, (64, 3, 1));
        assert_eq!(m.block, (96, 1, 1));
        assert_eq!(
            merge_partials(1, 128, 500).unwrap().block,
            (32 * MERGE_WARPS as u32, 1, 1)
        );
        assert!(merge_partials(0, 64, 1).unwrap().is_empty());
        assert!(merge_partials(1, 64, 0).is_err());
        assert!(merge_partials(1, MERGE_MAX_HEAD_DIM + 1, 1).is_err());
    }
}
