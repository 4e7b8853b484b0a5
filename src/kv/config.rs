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
/// `batch` is the number of sequence slots: each slot has its own length per layer (a ragged
/// batch); a new store has every slot in use, and the layer-wide calls treat the slots in use as
/// one lockstep batch (the same number of tokens per step, as in batched decoding with left
/// padding).
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

/// Documented limits of a store, refused with a `ValueError` naming the argument: far above any
/// model (Llama-3.1-405B has 126 layers and 8 KV heads), low enough that no size computed from
/// them overflows.
pub const MAX_LAYERS: usize = 1 << 12;
pub const MAX_BATCH: usize = 1 << 16;
pub const MAX_KV_HEADS: usize = 1 << 12;
/// Tokens one layer may hold in total (device and host): the kernels index rows with 32 bits.
pub const MAX_TOKENS: usize = (1 << 31) - 1;
/// Address space a store may reserve (128 TiB: the x86-64 and aarch64 user address space).
pub const MAX_RESERVED_BYTES: usize = 1 << 47;

impl StoreConfig {
    /// Bytes of one token of one layer for the whole batch, keys or values:
    /// batch × kv_heads × head_dim × dtype.
    pub fn token_bytes(&self) -> usize {
        self.batch * self.kv_heads * self.head_dim * self.dtype.size()
    }

    /// Bytes of one token of one head (one row of a key or value strip).
    pub fn row_bytes(&self) -> usize {
        self.head_dim * self.dtype.size()
    }

    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.layers > 0 && self.layers <= MAX_LAYERS,
            "layers must be in 1..={MAX_LAYERS}, got {}",
            self.layers
        );
        ensure!(
            self.batch > 0 && self.batch <= MAX_BATCH,
            "batch must be in 1..={MAX_BATCH}, got {}",
            self.batch
        );
        ensure!(
            self.kv_heads > 0 && self.kv_heads <= MAX_KV_HEADS,
            "kv_heads must be in 1..={MAX_KV_HEADS}, got {}",
            self.kv_heads
        );
        ensure!(
            self.head_dim > 0 && self.head_dim <= 1024,
            "head_dim must be in 1..=1024, got {}",
            self.head_dim
        );
        ensure!(
            self.near.capacity_bytes > 0,
            "near tier capacity must be positive (bytes), got 0"
        );
        ensure!(
            self.far.capacity_bytes > 0,
            "far tier capacity must be positive (bytes), got 0"
        );
        ensure!(
            self.far.capacity_bytes >= self.token_bytes(),
            "far tier capacity ({} bytes) cannot hold the values of a single token ({} bytes)",
            self.far.capacity_bytes,
            self.token_bytes()
        );
        if let Some(max) = self.max_host_tokens {
            ensure!(max > 0, "max_host_tokens must be positive, got 0");
        }
        ensure!(
            self.sinks <= MAX_TOKENS,
            "sinks must be at most {MAX_TOKENS}, got {}",
            self.sinks
        );
        // The virtual reservation (2 buffers per layer of batch × kv_heads strips) must be
        // addressable; the limits above keep every product here far from overflowing.
        let reserved = self
            .strip_tokens()
            .checked_mul(self.row_bytes())
            .and_then(|strip| strip.checked_mul(self.batch * self.kv_heads * 2 * self.layers))
            .filter(|&bytes| bytes <= MAX_RESERVED_BYTES);
        ensure!(
            reserved.is_some(),
            "the store would reserve more than {MAX_RESERVED_BYTES} bytes of address space ({} layers x \
             {} host tokens x {} bytes per token, keys and values): lower max_host_tokens or the far tier capacity",
            self.layers,
            self.strip_tokens(),
            self.token_bytes()
        );
        Ok(())
    }

    /// Host tokens one layer can ever hold: the strip length reserved per head.
    pub fn strip_tokens(&self) -> usize {
        let by_capacity = self.far.capacity_bytes / self.token_bytes();
        self.max_host_tokens
            .map_or(by_capacity, |m| m.min(by_capacity))
            .min(MAX_TOKENS)
    }
}
