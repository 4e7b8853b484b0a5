//! The CPU half of hybrid attention: logits over host keys, top-K selection, gathering of the
//! selected value rows, partial attention with log-sum-exp, and the stage that runs them in one
//! call per layer.

pub mod bandwidth;
mod kernels;
pub mod ops;
pub mod simd;
mod softmax;
pub mod split;
pub mod stage;
pub mod topk;

pub use ops::{attend, gather_values, logits, partial_attention, Strips};
pub use simd::{isa, Isa};
pub use softmax::merge_partials;
pub use stage::{cpu_stage, Merge, Scratch, Selection, StageArgs, StageOutputs};
pub use topk::topk;
