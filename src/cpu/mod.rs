//! The CPU half of hybrid attention: logits over host keys, top-K selection, gathering of the
//! selected value rows, and partial attention with log-sum-exp.

pub mod bandwidth;
mod kernels;
pub mod ops;
pub mod simd;
mod softmax;
pub mod topk;

pub use ops::{attend, gather_values, logits, partial_attention, Strips};
pub use simd::{isa, Isa};
pub use softmax::merge_partials;
pub use topk::topk;
