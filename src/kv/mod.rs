//! The host KV store: per layer, the keys and values of the tokens that left the device tier,
//! with tier budgets, key spilling from the near to the far tier, and a token map.

mod config;
mod store;

pub use config::{StoreConfig, TierConfig};
pub use store::{Kind, KvStore, Tier, TierStats};
