//! Element types of stored keys and values.

use crate::error::{Error, Result};

/// Storage dtype of the host KV store. Computation always accumulates in f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F16,
    BF16,
    F32,
}

impl DType {
    /// Every storage dtype, in the order the Python package lists them.
    pub const ALL: [DType; 3] = [DType::F16, DType::BF16, DType::F32];

    pub const fn size(self) -> usize {
        match self {
            DType::F16 | DType::BF16 => 2,
            DType::F32 => 4,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            DType::F32 => "float32",
        }
    }

    /// Parses the names torch and numpy use (`"float16"`, `"torch.bfloat16"`, `"f32"`...).
    pub fn parse(name: &str) -> Result<Self> {
        let name = name.strip_prefix("torch.").unwrap_or(name);
        match name {
            "float16" | "f16" | "half" => Ok(DType::F16),
            "bfloat16" | "bf16" => Ok(DType::BF16),
            "float32" | "f32" | "float" => Ok(DType::F32),
            other => Err(Error::InvalidArgument(format!(
                "unsupported dtype {other:?}: expected float16, bfloat16 or float32"
            ))),
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
