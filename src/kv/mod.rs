//! The host KV store: per layer and sequence slot, the keys and values of the tokens that left
//! the device tier, with tier budgets, key spilling from the near to the far tier, and a token map.

mod config;
mod slots;
mod spill;
mod store;

pub use config::{
    StoreConfig, TierConfig, MAX_BATCH, MAX_KV_HEADS, MAX_LAYERS, MAX_RESERVED_BYTES, MAX_TOKENS,
};
pub use store::{Kind, KvStore, Tier, TierStats, NODE_RESERVE_BYTES};
