//! Layers shared by kiln's architectures, and the weight source that turns checkpoint tensors
//! into trainable `Var`s (registered in a `VarMap` under their Hugging Face names) or frozen
//! plain tensors.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{D, DType, Device, Tensor, Var};
use candle_nn::VarMap;

use super::lora::LoraAdapter;
use super::{NnError, Result, ops};

/// Trainable variables with their checkpoint names.
pub type NamedVars = Vec<(String, Var)>;

/// Tensors of a checkpoint, by name, already on the target device in f32.
pub type Checkpoint = HashMap<String, Tensor>;

/// Reads every weight of a model directory: `model.safetensors`, or each shard named by
/// `model.safetensors.index.json` (large checkpoints on the hub are sharded).
pub fn load_model_weights(dir: &Path, device: &Device) -> Result<Checkpoint> {
    let files =
        crate::models::weight_files(dir).map_err(|e| NnError::InvalidConfig(e.to_string()))?;
    if files.is_empty() {
        return load_safetensors(&dir.join("model.safetensors"), device);
    }
    let mut all = Checkpoint::new();
    for file in files {
        all.extend(load_safetensors(&file, device)?);
    }
    Ok(all)
}

/// Reads a `.safetensors` file onto `device`, converting every floating tensor to f32.
///
/// Training runs in f32 (half-precision checkpoints are common on the hub); integer tensors,
/// such as the `position_ids` buffer some exporters keep, are left as they are.
pub fn load_safetensors(path: &Path, device: &Device) -> Result<Checkpoint> {
    if !path.exists() {
        return Err(NnError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        });
    }
    let raw = candle_core::safetensors::load(path, device).map_err(|e| {
        NnError::InvalidInput(format!("cannot read safetensors {}: {e}", path.display()))
    })?;
    raw.into_iter()
        .map(|(name, t)| {
            let t = if t.dtype().is_float() && t.dtype() != DType::F32 {
                t.to_dtype(DType::F32)?
            } else {
                t
            };
            Ok((name, t))
        })
        .collect()
}

/// Hands out the weights a model asks for, by full checkpoint name, as either trainable `Var`s
/// (inserted into a `VarMap`, so an optimizer and `VarMap::save` see them by their HF names) or
/// frozen plain tensors, which candle's autograd never tracks: nothing below a frozen layer
/// costs backward time.
pub struct WeightSource<'a> {
    tensors: &'a Checkpoint,
    varmap: &'a VarMap,
    trainable: Vec<(String, Var)>,
    frozen: Vec<(String, Tensor)>,
}

impl<'a> WeightSource<'a> {
    /// A source reading from `tensors` and registering trainable weights in `varmap`.
    pub fn new(tensors: &'a Checkpoint, varmap: &'a VarMap) -> Self {
        Self {
            tensors,
            varmap,
            trainable: Vec::new(),
            frozen: Vec::new(),
        }
    }

    /// Whether the checkpoint has a tensor of this name.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The tensor `name`, checked against `shape`; a fresh `Var` when `trainable`.
    pub fn get(&mut self, name: &str, shape: &[usize], trainable: bool) -> Result<Tensor> {
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| NnError::MissingTensor {
                name: name.to_string(),
            })?;
        if t.dims() != shape {
            return Err(NnError::ShapeMismatch {
                name: name.to_string(),
                expected: shape.to_vec(),
                actual: t.dims().to_vec(),
            });
        }
        if !trainable {
            self.frozen.push((name.to_string(), t.clone()));
            return Ok(t.clone());
        }
        self.new_var(name, t)
    }

    /// Registers a copy of `init` as a new trainable `Var` called `name` (e.g. a LoRA matrix).
    pub fn new_var(&mut self, name: &str, init: &Tensor) -> Result<Tensor> {
        // Var::from_tensor copies, so the checkpoint map stays untouched by training.
        let var = Var::from_tensor(init)?;
        let mut data = self
            .varmap
            .data()
            .lock()
            .map_err(|_| NnError::InvalidInput("VarMap mutex poisoned".into()))?;
        if data.contains_key(name) {
            return Err(NnError::InvalidInput(format!(
                "`{name}` is already registered in this VarMap; load each model into its own"
            )));
        }
        data.insert(name.to_string(), var.clone());
        self.trainable.push((name.to_string(), var.clone()));
        Ok(var.as_tensor().clone())
    }

    /// Trainable weights handed out so far, with their names, in load order.
    pub fn into_parts(self) -> (NamedVars, Vec<(String, Tensor)>) {
        (self.trainable, self.frozen)
    }
}

/// A dense layer `y = x Wᵀ + b` with the PyTorch weight layout `[out, in]`, optionally with a
/// LoRA adapter added to its output.
#[derive(Clone, Debug)]
pub struct Linear {
    /// Checkpoint name prefix (`...attention.self.query`); weights are `{name}.weight`/`.bias`.
    pub name: String,
    /// Weight, `[out_features, in_features]`.
    pub weight: Tensor,
    /// Optional bias, `[out_features]`.
    pub bias: Option<Tensor>,
    /// Low-rank adapter, when this layer is a LoRA target.
    pub lora: Option<LoraAdapter>,
}

impl Linear {
    /// Loads `{prefix}.weight` and `{prefix}.bias`.
    pub fn load(
        src: &mut WeightSource,
        prefix: &str,
        in_dim: usize,
        out_dim: usize,
        trainable: bool,
    ) -> Result<Self> {
        let weight = src.get(&format!("{prefix}.weight"), &[out_dim, in_dim], trainable)?;
        let bias = src.get(&format!("{prefix}.bias"), &[out_dim], trainable)?;
        Ok(Self {
            name: prefix.to_string(),
            weight,
            bias: Some(bias),
            lora: None,
        })
    }

    /// Applies the layer with its LoRA adapter (if any); `train` enables the adapter's dropout.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let y = self.forward(x)?;
        match &self.lora {
            Some(lora) => y + lora.delta(x, train)?,
            None => Ok(y),
        }
    }

    /// The weight with the LoRA update folded in (`W + scale·B·A`), or the weight itself.
    pub fn merged_weight(&self) -> candle_core::Result<Tensor> {
        match &self.lora {
            Some(lora) => lora.merge_into(&self.weight),
            None => Ok(self.weight.clone()),
        }
    }

    /// Applies the base layer only (no adapter) to `[.., in]`. Inputs of rank > 2 are flattened
    /// to one 2-D product because candle's broadcast matmul is far slower, in backward
    /// especially; on the CPU in f32 that product is kiln's fused [`ops::linear`].
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        // On a CUDA GPU: one graph node, the weight's and bias's gradients deposited
        // (`nn::dense` says why), the f32 master weights cast inside under mixed precision.
        if let Some(y) = super::dense::on_device(x, &self.weight, self.bias.as_ref())? {
            return Ok(y);
        }
        let dims = x.dims().to_vec();
        let in_dim = dims.last().copied().unwrap_or(1);
        let rows = x.elem_count() / in_dim.max(1);
        let x = x.reshape((rows, in_dim))?;
        // Mixed precision: the f32 master weights are cast to the activations' dtype (bf16),
        // and the cast's backward brings their gradients back to f32.
        let (weight, bias) = if x.dtype() != self.weight.dtype() {
            (
                self.weight.to_dtype(x.dtype())?,
                self.bias
                    .as_ref()
                    .map(|b| b.to_dtype(x.dtype()))
                    .transpose()?,
            )
        } else {
            (self.weight.clone(), self.bias.clone())
        };
        let y = match ops::linear(&x, &weight, bias.as_ref())? {
            Some(y) => y,
            None => {
                let y = x.matmul(&weight.t()?)?;
                match &bias {
                    Some(b) => y.broadcast_add(b)?,
                    None => y,
                }
            }
        };
        let mut out_dims = dims;
        if let Some(last) = out_dims.last_mut() {
            *last = self.weight.dim(0)?;
        }
        y.reshape(out_dims)
    }
}

/// LayerNorm over the last dimension with learned scale and shift.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    /// Checkpoint names of the scale and shift.
    pub names: (String, String),
    /// Scale (`gamma`), `[hidden]`.
    pub weight: Tensor,
    /// Shift (`beta`), `[hidden]`.
    pub bias: Tensor,
    /// Added to the variance.
    pub eps: f64,
    /// Use kiln's fused kernel where it applies (CPU f32); primitive ops otherwise.
    pub fused: bool,
}

impl LayerNorm {
    /// Loads `{prefix}.weight`/`{prefix}.bias`, falling back to the TF-era names
    /// `{prefix}.gamma`/`{prefix}.beta` that some old BERT checkpoints still use.
    pub fn load(
        src: &mut WeightSource,
        prefix: &str,
        dim: usize,
        eps: f64,
        fused: bool,
        trainable: bool,
    ) -> Result<Self> {
        let (w, b) = if src.contains(&format!("{prefix}.gamma")) {
            ("gamma", "beta")
        } else {
            ("weight", "bias")
        };
        let names = (format!("{prefix}.{w}"), format!("{prefix}.{b}"));
        let weight = src.get(&names.0, &[dim], trainable)?;
        let bias = src.get(&names.1, &[dim], trainable)?;
        Ok(Self {
            names,
            weight,
            bias,
            eps,
            fused,
        })
    }

    /// Normalises `x` over its last dimension. Activations in another dtype than the weights
    /// (bf16 under mixed precision) are normalised in the weights' f32 and cast back.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if x.dtype() != self.weight.dtype() {
            return self
                .forward(&x.to_dtype(self.weight.dtype())?)?
                .to_dtype(x.dtype());
        }
        if self.fused {
            ops::layer_norm(x, &self.weight, &self.bias, self.eps)
        } else {
            ops::layer_norm_primitive(x, &self.weight, &self.bias, self.eps)
        }
    }
}

/// A lookup table `[num, dim]` indexed by integer ids.
#[derive(Clone, Debug)]
pub struct Embedding {
    /// Checkpoint name of the table.
    pub name: String,
    /// The table, `[num_embeddings, dim]`.
    pub weight: Tensor,
}

impl Embedding {
    /// Looks up `ids` (any shape, integer dtype) and returns `[..ids.shape, dim]`.
    pub fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let mut dims = ids.dims().to_vec();
        dims.push(self.weight.dim(D::Minus1)?);
        if let Some(rows) = ops::embedding_rows(&self.weight, ids)? {
            return rows.reshape(dims);
        }
        // index_select has a backward (index_add into the table); gather of rows is all we need.
        self.weight
            .index_select(&ids.flatten_all()?, 0)?
            .reshape(dims)
    }
}

/// RMSNorm over the last dimension with a learned scale (Llama, Qwen2, Mistral).
#[derive(Clone, Debug)]
pub struct RmsNorm {
    /// Checkpoint name of the scale (`...input_layernorm.weight`).
    pub name: String,
    /// Scale, `[hidden]`.
    pub weight: Tensor,
    /// Added to the mean square.
    pub eps: f64,
    /// Use kiln's fused kernel where it applies (CPU f32); primitive ops otherwise.
    pub fused: bool,
}

impl RmsNorm {
    /// Loads the scale `name` (a full tensor name).
    pub fn load(
        src: &mut WeightSource,
        name: &str,
        dim: usize,
        eps: f64,
        trainable: bool,
    ) -> Result<Self> {
        Ok(Self {
            name: name.to_string(),
            weight: src.get(name, &[dim], trainable)?,
            eps,
            fused: true,
        })
    }

    /// Normalises `x` over its last dimension (in f32 for bf16 activations, as LayerNorm).
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if x.dtype() != self.weight.dtype() {
            return self
                .forward(&x.to_dtype(self.weight.dtype())?)?
                .to_dtype(x.dtype());
        }
        if self.fused {
            ops::rms_norm(x, &self.weight, self.eps)
        } else {
            ops::rms_norm_primitive(x, &self.weight, self.eps)
        }
    }
}

thread_local! {
    /// The generator dropout masks come from on this thread, once seeded.
    static DROPOUT_RNG: std::cell::RefCell<Option<rand::rngs::StdRng>> =
        const { std::cell::RefCell::new(None) };
}

/// Seeds the dropout masks drawn on this thread from now on.
///
/// candle's own dropout draws from an unseeded generator, so two runs (or a run and its
/// resumption) would differ. Training reseeds from `(run seed, step)` before every step: the
/// masks of step N are then the same however the run got there.
pub fn seed_dropout(seed: u64) {
    use rand::SeedableRng;
    DROPOUT_RNG.with(|r| *r.borrow_mut() = Some(rand::rngs::StdRng::seed_from_u64(seed)));
}

/// A seed for a kernel that draws its own dropout masks (kiln's fused attention): from the
/// thread's seeded generator when there is one (so runs and resumptions repeat), random
/// otherwise.
pub fn dropout_seed() -> u64 {
    use rand::Rng;
    DROPOUT_RNG.with(|r| match r.borrow_mut().as_mut() {
        Some(rng) => rng.random(),
        None => rand::random(),
    })
}

/// Forgets the seed: dropout on this thread goes back to candle's generator.
pub fn unseed_dropout() {
    DROPOUT_RNG.with(|r| *r.borrow_mut() = None);
}

/// Applies dropout when `train` and `p > 0`; identity otherwise. Masks come from the
/// thread's seeded generator when there is one (see [`seed_dropout`]): one seed drawn from it
/// per call, the mask that seed's hash of each element's index (as kiln's fused blocks draw
/// theirs), so the same seed gives the same mask on every device. This is the path off the
/// CPU's fused blocks (a GPU's). It is one op ([`HashedDropout`]) whose backward applies the
/// same mask to the gradient: on the CPU over every core, on a CUDA GPU one kernel of kiln's
/// that hashes as it goes (`KILN_DEVICE_KERNELS=candle` there, and other devices, make the
/// mask on the host and copy it over instead, [`dropout_with_host_mask`]).
pub fn dropout(x: &Tensor, p: f64, train: bool) -> candle_core::Result<Tensor> {
    if !(train && p > 0.0) {
        return Ok(x.clone());
    }
    if DROPOUT_RNG.with(|r| r.borrow().is_none()) {
        return candle_nn::ops::dropout(x, p as f32);
    }
    let Some(hashed) = super::mlp::Dropout::new(p as f32) else {
        // p ≥ 1: nothing is kept.
        return x.zeros_like();
    };
    let op = HashedDropout(hashed);
    match x.device() {
        Device::Cpu if x.dtype() == DType::F32 => x.contiguous()?.apply_op1(op),
        Device::Cpu => x
            .to_dtype(DType::F32)?
            .contiguous()?
            .apply_op1(op)?
            .to_dtype(x.dtype()),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) if crate::cuda::kernel_device(x.device()).is_some() => {
            x.contiguous()?.apply_op1(op)
        }
        _ => host_mask(x, &hashed),
    }
}

/// [`dropout`] as it runs where kiln has no kernel: the hashed mask made on the host (on every
/// core), copied to the device, and multiplied in f32. The same values as [`dropout`]'s, from
/// candle's ops; `kiln check-device` compares the two.
pub fn dropout_with_host_mask(x: &Tensor, p: f64, train: bool) -> candle_core::Result<Tensor> {
    if !(train && p > 0.0) {
        return Ok(x.clone());
    }
    match super::mlp::Dropout::new(p as f32) {
        Some(hashed) => host_mask(x, &hashed),
        None => x.zeros_like(),
    }
}

fn host_mask(x: &Tensor, hashed: &super::mlp::Dropout) -> candle_core::Result<Tensor> {
    let mut mask = vec![1f32; x.elem_count()];
    hashed.apply_parallel(&mut mask);
    let mask = Tensor::from_vec(mask, x.shape(), x.device())?;
    (x.to_dtype(DType::F32)? * mask)?.to_dtype(x.dtype())
}

/// Inverted dropout by a hashed mask (`mlp::Dropout`'s) as one op on a contiguous tensor: f32
/// on the CPU (other dtypes are cast around it), f32, bf16 or f16 on a CUDA GPU, where the
/// product is taken in f32 and rounded once. The backward is the same op on the gradient.
#[derive(Clone, Copy)]
struct HashedDropout(super::mlp::Dropout);

impl candle_core::CustomOp1 for HashedDropout {
    fn name(&self) -> &'static str {
        "kiln-dropout"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let x = ops::cpu_f32(storage, layout, "kiln-dropout")?;
        let mut y = x.to_vec();
        self.0.apply_parallel(&mut y);
        Ok((candle_core::CpuStorage::F32(y), layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
        let (seed, threshold, scale) = self.0.parts();
        let y = crate::cuda::dropout(storage, layout, seed, threshold, scale)?;
        Ok((y, layout.shape().clone()))
    }

    fn bwd(&self, _: &Tensor, _: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1(*self)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_dropout_repeats_keeps_the_right_share_and_scales_the_rest() {
        let x = Tensor::ones((64, 1000), DType::F32, &Device::Cpu).unwrap();
        let draw = |seed: u64, p: f64| {
            seed_dropout(seed);
            let y = dropout(&x, p, true).unwrap();
            unseed_dropout();
            y.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        let a = draw(7, 0.1);
        assert_eq!(a, draw(7, 0.1), "the same seed gives the same mask");
        assert_ne!(a, draw(8, 0.1), "another seed another");
        let kept = a.iter().filter(|&&v| v != 0.0).count() as f64 / a.len() as f64;
        assert!((kept - 0.9).abs() < 0.01, "kept {kept}");
        let scale = (1.0 / 0.9) as f32;
        assert!(a.iter().all(|&v| v == 0.0 || (v - scale).abs() < 1e-6));
        // Successive calls on one seeded thread draw different masks.
        seed_dropout(7);
        let first = dropout(&x, 0.5, true).unwrap();
        let second = dropout(&x, 0.5, true).unwrap();
        unseed_dropout();
        let diff = (first - second).unwrap().abs().unwrap().sum_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() > 0.0);
        // Identity out of training or at p = 0; nothing kept at p = 1.
        assert_eq!(draw(7, 0.0), vec![1.0; a.len()]);
        seed_dropout(7);
        let off = dropout(&x, 0.5, false).unwrap().sum_all().unwrap();
        assert_eq!(off.to_scalar::<f32>().unwrap(), a.len() as f32);
        unseed_dropout();
        assert_eq!(draw(7, 1.0), vec![0.0; a.len()]);
    }

    #[test]
    fn seeded_dropout_backward_applies_the_forwards_mask_and_the_host_mask_path_agrees() {
        let x = Var::from_tensor(
            &Tensor::arange(0f32, 6000.0, &Device::Cpu)
                .unwrap()
                .affine(1e-3, -3.0)
                .unwrap()
                .reshape((2, 3000))
                .unwrap(),
        )
        .unwrap();
        let run = |host: bool, dtype: DType| {
            seed_dropout(31);
            let input = x.as_tensor().to_dtype(dtype).unwrap();
            let y = if host {
                dropout_with_host_mask(&input, 0.25, true)
            } else {
                dropout(&input, 0.25, true)
            }
            .unwrap();
            unseed_dropout();
            let grads = y
                .to_dtype(DType::F32)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let g = grads.get(x.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
            let y = y.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap();
            (y, g)
        };
        let (y, g) = run(false, DType::F32);
        let xs = x.as_tensor().to_vec2::<f32>().unwrap();
        let scale = (1.0 / 0.75f64) as f32;
        let mut dropped = 0;
        for ((yr, gr), xr) in y.iter().zip(&g).zip(&xs) {
            for ((&y, &g), &x) in yr.iter().zip(gr).zip(xr) {
                // The gradient of Σ y is the mask: `scale` where kept, 0 where dropped.
                assert!(g == 0.0 || g == scale, "{g}");
                assert_eq!(y, x * g);
                dropped += usize::from(g == 0.0);
            }
        }
        assert!((1300..1700).contains(&dropped), "{dropped} of 6000 dropped");
        // The host's mask, multiplied by candle's ops (devices without kiln's kernel): the same.
        assert_eq!(run(true, DType::F32), (y, g));
        // In f16 (cast around the op on the CPU) the same mask, rounded once.
        assert_eq!(run(false, DType::F16), run(true, DType::F16));
    }

    /// A MiniLM step's dropout calls off the fused blocks (batch 16, length 32: 13 over the
    /// hidden states, 6 over the attention probabilities, 3.7 M elements), three ways: as
    /// [`dropout`]'s one op (hashing as it multiplies), as [`dropout_with_host_mask`] (the
    /// hashed mask made, then multiplied by candle: the path before the op, and still where
    /// kiln has no device kernel), and the masks alone drawn element by element from the
    /// thread's generator (the path before hashing).
    /// `cargo test --release --lib -- --ignored --nocapture dropout_masks_timing`
    #[test]
    #[ignore = "timing; run with --release"]
    fn dropout_masks_timing() {
        use rand::{Rng, SeedableRng};
        let hidden = Tensor::ones((16 * 32, 384), DType::F32, &Device::Cpu).unwrap();
        let probs = Tensor::ones((16 * 12, 32 * 32), DType::F32, &Device::Cpu).unwrap();
        let calls = || std::iter::repeat_n(&hidden, 13).chain(std::iter::repeat_n(&probs, 6));
        for round in 0..3 {
            seed_dropout(round);
            let t = std::time::Instant::now();
            for x in calls() {
                dropout(x, 0.1, true).unwrap();
            }
            let op = t.elapsed();
            let t = std::time::Instant::now();
            for x in calls() {
                dropout_with_host_mask(x, 0.1, true).unwrap();
            }
            let host = t.elapsed();
            unseed_dropout();
            let mut rng = rand::rngs::StdRng::seed_from_u64(round);
            let threshold = (0.9 * u32::MAX as f64) as u32;
            let t = std::time::Instant::now();
            for x in calls() {
                let mask: Vec<f32> = (0..x.elem_count())
                    .map(|_| {
                        if rng.random::<u32>() < threshold {
                            1.0 / 0.9
                        } else {
                            0.0
                        }
                    })
                    .collect();
                std::hint::black_box(mask);
            }
            let drawn = t.elapsed();
            eprintln!(
                "round {round}: one op {op:?}; hashed mask then product {host:?}; masks drawn \
                 one by one (no products) {drawn:?}"
            );
        }
    }
}
