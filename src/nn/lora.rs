//! LoRA: low-rank adapters on chosen linear layers, with the base model frozen.
//!
//! `y = W x + b + scale · B (A dropout(x))`, `scale = alpha / rank`, `A: [rank, in]` initialised
//! uniform (PEFT's Kaiming-uniform bound, `1/sqrt(in)`), `B: [out, rank]` zeros, so the adapted
//! model starts exactly equal to the base model. Adapter weights are registered in the `VarMap`
//! under PEFT's names (`<layer>.lora_A.weight`, `<layer>.lora_B.weight`).

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::layers::{WeightSource, dropout};
use super::{NnError, Result};

/// Which linear layers of a BERT layer get an adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoraTarget {
    /// `attention.self.query`
    Query,
    /// `attention.self.key`
    Key,
    /// `attention.self.value`
    Value,
    /// `attention.output.dense`
    AttentionOutput,
    /// `intermediate.dense`
    Intermediate,
    /// `output.dense` (the feed-forward down-projection)
    Output,
}

impl LoraTarget {
    /// The checkpoint sub-name of the targeted linear inside `encoder.layer.N`.
    pub fn module_name(self) -> &'static str {
        match self {
            LoraTarget::Query => "attention.self.query",
            LoraTarget::Key => "attention.self.key",
            LoraTarget::Value => "attention.self.value",
            LoraTarget::AttentionOutput => "attention.output.dense",
            LoraTarget::Intermediate => "intermediate.dense",
            LoraTarget::Output => "output.dense",
        }
    }
}

/// LoRA hyperparameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    /// Rank of the update (`r`).
    pub rank: usize,
    /// Scaling numerator; the update is multiplied by `alpha / rank`.
    pub alpha: f64,
    /// Dropout on the adapter's input during training.
    pub dropout: f64,
    /// Layers to adapt (the classic choice is query and value).
    pub targets: Vec<LoraTarget>,
    /// Seed of `A`'s initialisation, so runs are reproducible.
    pub seed: u64,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            rank: 8,
            alpha: 16.0,
            dropout: 0.1,
            targets: vec![LoraTarget::Query, LoraTarget::Value],
            seed: 0,
        }
    }
}

impl LoraConfig {
    /// Checks rank and dropout.
    pub fn validate(&self) -> Result<()> {
        if self.rank == 0 {
            return Err(NnError::InvalidConfig("LoRA rank must be > 0".into()));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(NnError::InvalidConfig(format!(
                "LoRA dropout must be in [0, 1), got {}",
                self.dropout
            )));
        }
        Ok(())
    }
}

/// The adapter of one linear layer.
#[derive(Clone, Debug)]
pub struct LoraAdapter {
    /// Down-projection `[rank, in]`.
    pub a: Tensor,
    /// Up-projection `[out, rank]`.
    pub b: Tensor,
    /// `alpha / rank`.
    pub scale: f64,
    /// Input dropout probability (training only).
    pub dropout: f64,
}

impl LoraAdapter {
    /// Creates trainable `A`/`B` for the linear `name` (`[out, in]`) and registers them in the
    /// source's `VarMap` as `{name}.lora_A.weight` / `{name}.lora_B.weight`.
    pub fn create(
        src: &mut WeightSource,
        name: &str,
        in_dim: usize,
        out_dim: usize,
        cfg: &LoraConfig,
        rng: &mut StdRng,
        device: &Device,
    ) -> Result<Self> {
        let bound = 1.0 / (in_dim as f32).sqrt();
        let a: Vec<f32> = (0..cfg.rank * in_dim)
            .map(|_| rng.random_range(-bound..=bound))
            .collect();
        let a = Tensor::from_vec(a, (cfg.rank, in_dim), device)?;
        let b = Tensor::zeros((out_dim, cfg.rank), candle_core::DType::F32, device)?;
        Ok(Self {
            a: src.new_var(&format!("{name}.lora_A.weight"), &a)?,
            b: src.new_var(&format!("{name}.lora_B.weight"), &b)?,
            scale: cfg.alpha / cfg.rank as f64,
            dropout: cfg.dropout,
        })
    }

    /// The adapter's contribution `scale · dropout(x) Aᵀ Bᵀ` for `x: [.., in]`.
    pub fn delta(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        if super::dense::runs_on(x.device())
            && let Some(y) = self.delta_nodes(x, train)?
        {
            return Ok(y);
        }
        let dims = x.dims().to_vec();
        let in_dim = dims.last().copied().unwrap_or(1);
        let rows = x.elem_count() / in_dim.max(1);
        let x = dropout(&x.reshape((rows, in_dim))?, self.dropout, train)?;
        let (a, b) = (self.a.to_dtype(x.dtype())?, self.b.to_dtype(x.dtype())?);
        let y = (x.matmul(&a.t()?)?.matmul(&b.t()?)? * self.scale)?;
        let mut out_dims = dims;
        if let Some(last) = out_dims.last_mut() {
            *last = self.b.dim(0)?;
        }
        y.reshape(out_dims)
    }

    /// [`LoraAdapter::delta`] as two [`super::dense`] nodes, `A`'s and `B`'s gradients
    /// deposited (what a CUDA GPU runs: four edges of candle's graph instead of ten);
    /// `None` where they do not apply.
    pub(crate) fn delta_nodes(
        &self,
        x: &Tensor,
        train: bool,
    ) -> candle_core::Result<Option<Tensor>> {
        let x = dropout(x, self.dropout, train)?;
        let Some(h) = super::dense::dense(&x, &self.a, None)? else {
            return Ok(None);
        };
        super::dense::dense(&h, &self.b, None)?
            .map(|y| y * self.scale)
            .transpose()
    }

    /// `W + scale · B A`, detached: the merged weight of a plain linear layer.
    pub fn merge_into(&self, weight: &Tensor) -> candle_core::Result<Tensor> {
        let update = (self.b.matmul(&self.a)? * self.scale)?;
        Ok((weight + update)?.detach())
    }
}

/// A reproducible RNG for adapter initialisation.
pub fn lora_rng(cfg: &LoraConfig) -> StdRng {
    StdRng::seed_from_u64(cfg.seed)
}
