//! The CPU half of hybrid attention: logits over host keys, top-K selection, gathering of the
//! selected value rows, partial attention with log-sum-exp, and the stage that runs them in one
//! call per layer.
//!
//! - Instruction sets (`simd`): AVX2 + FMA + F16C, AVX-512 and NEON kernels behind one
//!   vocabulary, the best one chosen at run time (`isa()`); every operation takes the `Isa` to
//!   use, so tests and benchmarks force each one the CPU has. How the kernels stream memory
//!   (software prefetch or not) is chosen at run time from the CPU vendor (`tuning()`).
//! - Ragged batches (`ragged`): the stage over a list of query rows, each over its own
//!   sequence's strips (a serving engine's request slots), in one call.
//! - Threads (`split`): the kernels run on a pool of their own, sized by the environment
//!   variable `HYBRIDGEN_THREADS` at first use (default: every CPU this process may run on);
//!   small work stays on the calling thread.
//! - Partial attention over every host token (`attend`, and the stage's LSE merge without a
//!   selection) is fused: one pass reads each key row and each value row once per GQA group,
//!   logits stay in L1 (online softmax); top-K selection is one streaming pass over the logits
//!   plus an exact selection among the few candidates it keeps.

pub mod bandwidth;
mod kernels;
pub mod ops;
pub mod pages;
pub mod ragged;
pub mod simd;
mod softmax;
pub mod split;
pub mod stage;
pub mod topk;

pub use ops::{attend, gather_values, logits, partial_attention, Strips};
pub use pages::{Granularity, PageSelect, PageSummaries, PAGE_TOKENS};
pub use ragged::{
    ragged_selections, ragged_stage, RaggedArgs, RaggedOutputs, RowPages, RowPositions,
};
pub use simd::{cpu_vendor, isa, tuning, Isa, Tuning};
pub use softmax::merge_partials;
pub use split::threads;
pub use stage::{cpu_stage, Merge, Scratch, Selection, StageArgs, StageOutputs};
pub use topk::topk;
