//! Trainable neural-network architectures for kiln.
//!
//! candle-transformers' models are inference-only: several fused ops they use have no backward
//! and silently drop gradients (see DESIGN.md, "Training on candle"). Everything here is built
//! from differentiable pieces, or from kiln's fused ops in [`ops`] that carry a hand-written
//! backward, and loads the same safetensors names as Hugging Face.

pub mod attention;
pub mod autograd;
pub mod bert;
pub mod block;
pub mod classifier;
pub mod conv;
pub mod decoder;
mod dense;
pub mod devcheck;
mod gemm;
mod heads;
pub mod layers;
pub mod lora;
pub mod mlp;
pub mod ops;
pub mod packed;
pub mod resnet;
pub mod sampling;
pub mod simd;
pub mod tiny;
pub mod vision;
pub mod vit;
mod winograd;

use std::path::PathBuf;

pub use autograd::backward;

/// Errors raised while loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum NnError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file concerned.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// `config.json` is not valid JSON for the expected schema.
    #[error("invalid config {path}: {source}")]
    ConfigParse {
        /// The config file.
        path: PathBuf,
        /// The parse error.
        source: serde_json::Error,
    },
    /// The config parsed but describes something kiln cannot build.
    #[error("unsupported or inconsistent config: {0}")]
    InvalidConfig(String),
    /// A weight the architecture needs is absent from the checkpoint.
    #[error("checkpoint is missing tensor `{name}`")]
    MissingTensor {
        /// Full name of the tensor, as looked up in the checkpoint.
        name: String,
    },
    /// A weight is present but has the wrong shape for the config.
    #[error("tensor `{name}` has shape {actual:?}, the config implies {expected:?}")]
    ShapeMismatch {
        /// Full name of the tensor.
        name: String,
        /// Shape implied by the config.
        expected: Vec<usize>,
        /// Shape found in the checkpoint.
        actual: Vec<usize>,
    },
    /// Inputs to a forward pass are inconsistent (shapes, dtypes).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// An error from candle itself.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result type of the `nn` module.
pub type Result<T> = std::result::Result<T, NnError>;
