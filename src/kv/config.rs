//! What a host KV store is created with.

use crate::dtype::DType;
use crate::ensure;
use crate::error::Result;

/// One memory tier: the NUMA node it should live on and how many bytes it may hold.
#[derive(Clone, Debug)]
pub struct TierConfig {
    /// NUMA node to bind to; `None` is the local node. A node that is not online falls back.
    pub node: Option<u32>,
    pub capacity_bytes: usize,
}

/// Shape and budgets of a host KV store.
///
/// All sequences of the batch advance in lockstep (the same number of tokens per step, as in
/// batched decoding with left padding), so one token map serves the whole batch of a layer.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    pub layers: usize,
    pub batch: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub dtype: DType,
    /// Leading tokens of every sequence that never leave the device tier (attention sinks).
    pub sinks: usize,
    /// Keys live here first (the CPU reads them every step).
    pub near: TierConfig,
    /// Values live here, and keys spill here once `near` is full.
    pub far: TierConfig,
    /// Most host tokens one layer may hold; bounds the virtual reservation. `None`: as many as
    /// the far tier can hold values for.
    pub max_host_tokens: Option<usize>,
}

impl StoreConfig {
    /// Bytes of one token of one layer, keys or values: batch × kv_heads × head_dim × dtype.
    pub fn token_bytes(&self) -> usize {
        self.batch * self.kv_heads * self.head_dim * self.dtype.size()
    }

    /// Bytes of one token of one head (one row of a key or value strip).
    pub fn row_bytes(&self) -> usize {
        self.head_dim * self.dtype.size()
    }

    pub fn validate(&self) -> Result<()> {
        ensure!(self.layers > 0, "layers must be positive, got {}", self.layers);
        ensure!(self.batch > 0, "batch must be positive, got {}", self.batch);
        ensure!(self.kv_heads > 0, "kv_heads must be positive, got {}", self.kv_heads);
        ensure!(
            self.head_dim > 0 && self.head_dim <= 1024,
            "head_dim must be in 1..=1024, got {}",
            self.head_dim
        );
        ensure!(self.near.capacity_bytes > 0, "near tier capacity must be positive (bytes), got 0");
        ensure!(self.far.capacity_bytes > 0, "far tier capacity must be positive (bytes), got 0");
        ensure!(
            self.far.capacity_bytes >= self.token_bytes(),
            "far tier capacity ({} bytes) cannot hold the values of a single token ({} bytes)",
            self.far.capacity_bytes,
            self.token_bytes()
        );
        if let Some(max) = self.max_host_tokens {
            ensure!(max > 0, "max_host_tokens must be positive, got 0");
        }
        Ok(())
    }

    /// Host tokens one layer can ever hold: the strip length reserved per head.
    pub fn strip_tokens(&self) -> usize {
        let by_capacity = self.far.capacity_bytes / self.token_bytes();
        self.max_host_tokens.map_or(by_capacity, |m| m.min(by_capacity))
    }
}
