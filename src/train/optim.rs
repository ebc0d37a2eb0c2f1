//! kiln's AdamW: parameter groups, global-norm clipping, and state kiln owns.
//!
//! candle_nn's `AdamW` has no parameter groups, no clipping, and no way to save its moments, so
//! a resumed job would restart them (DESIGN.md). It also runs a dozen allocating tensor ops per
//! parameter per step (~500 ms/step on MiniLM). Here the moments live in plain `Vec<f32>`
//! buffers and the whole update for one parameter is one fused loop that writes the parameter in
//! place (candle's `InplaceOp2`). On a CUDA GPU the same update is one kernel of kiln's per 48
//! parameters, the moments in device buffers, and the global norm's sum of squares one kernel
//! per 48 gradients (`optim_cuda`); elsewhere, or with `KILN_DEVICE_KERNELS=candle`, the update
//! is written as candle tensor ops on the device. The saved state is the same on every path.
//!
//! The update is PyTorch's `torch.optim.AdamW` (decoupled weight decay, bias correction, eps
//! added to the bias-corrected sqrt(v)), which candle_nn's AdamW also implements.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, DType, InplaceOp2, Layout, Storage, Tensor, Var};
use safetensors::tensor::{Dtype as StDtype, TensorView};
use serde::{Deserialize, Serialize};

use crate::nn::simd::{sum_f64_lanes, wide_fn};

/// Errors from the optimizer.
#[derive(Debug, thiserror::Error)]
pub enum OptimError {
    /// A parameter or its gradient is not something the optimizer can update.
    #[error("parameter `{name}`: {msg}")]
    Param {
        /// Parameter name.
        name: String,
        /// What is wrong.
        msg: String,
    },
    /// Unknown parameter group.
    #[error("no parameter group {0}")]
    NoGroup(String),
    /// A saved state does not fit this optimizer.
    #[error("optimizer state {path}: {msg}")]
    State {
        /// State file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// File I/O failed.
    #[error("{path}: {source}")]
    Io {
        /// File concerned.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// An error from candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result type of the optimizer.
pub type Result<T> = std::result::Result<T, OptimError>;

/// Hyperparameters shared by all groups.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    /// Decay of the first moment.
    pub beta1: f64,
    /// Decay of the second moment.
    pub beta2: f64,
    /// Added to the bias-corrected sqrt(v).
    pub eps: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        }
    }
}

/// A parameter group: one learning rate and weight decay for a set of parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParamGroup {
    /// Name, e.g. `"backbone/decay"`, `"head/no_decay"`; unique within an optimizer.
    pub name: String,
    /// Current learning rate.
    pub lr: f64,
    /// Decoupled weight decay coefficient (applied as `p -= lr * wd * p`).
    pub weight_decay: f64,
}

/// State of one parameter.
struct ParamState {
    name: String,
    var: Var,
    group: usize,
    /// Updates applied to this parameter (PyTorch keeps the step per parameter too, so a
    /// parameter that had no gradient on some steps gets the right bias correction).
    step: u64,
    /// The moments on the host: the CPU path updates them in place; on other devices they
    /// are what was loaded or last synced (see `on_device`).
    m: Vec<f32>,
    v: Vec<f32>,
    /// The moments on the parameter's device, for devices other than the CPU (and the CPU
    /// when tensor ops are forced): made from `m`/`v` at the first step and authoritative
    /// from then on; `save` reads them back.
    on_device: Option<DeviceMoments>,
}

/// A parameter's moments off the host.
enum DeviceMoments {
    /// As candle tensors, for the update written as tensor ops.
    Tensors(Tensor, Tensor),
    /// As device buffers, for kiln's CUDA kernel.
    #[cfg(feature = "cuda")]
    Cuda(super::optim_cuda::Moments),
}

impl ParamState {
    /// The moments as host vectors, from the device copy where there is one.
    fn host_moments(&self) -> Result<(Vec<f32>, Vec<f32>)> {
        match &self.on_device {
            Some(DeviceMoments::Tensors(m, v)) => Ok((
                m.flatten_all()?.to_vec1::<f32>()?,
                v.flatten_all()?.to_vec1::<f32>()?,
            )),
            #[cfg(feature = "cuda")]
            Some(DeviceMoments::Cuda(moments)) => Ok(moments.download()?),
            None => Ok((self.m.clone(), self.v.clone())),
        }
    }

    /// The moments in device buffers for kiln's CUDA kernels, uploaded from wherever they
    /// are at the first step.
    #[cfg(feature = "cuda")]
    fn cuda_moments(
        &mut self,
        device: &candle_core::cuda_backend::CudaDevice,
    ) -> Result<&mut super::optim_cuda::Moments> {
        if !matches!(self.on_device, Some(DeviceMoments::Cuda(_))) {
            let (m, v) = self.host_moments()?;
            let moments = super::optim_cuda::Moments::upload(device, &m, &v)?;
            self.on_device = Some(DeviceMoments::Cuda(moments));
        }
        match &mut self.on_device {
            Some(DeviceMoments::Cuda(moments)) => Ok(moments),
            _ => unreachable!("set just above"),
        }
    }

    /// One AdamW update as tensor operations on the parameter's own device: no copy to the
    /// host, the same arithmetic as [`adamw_chunk`].
    fn step_with_tensor_ops(&mut self, k: &UpdateConsts, grad: &Tensor) -> Result<()> {
        let (m, v) = match self.on_device.take() {
            Some(DeviceMoments::Tensors(m, v)) => (m, v),
            other => {
                // The first step (or moments held another way): from wherever they are.
                self.on_device = other;
                let (m, v) = self.host_moments()?;
                let (device, shape) = (self.var.device(), self.var.shape());
                (
                    Tensor::from_vec(m, shape, device)?,
                    Tensor::from_vec(v, shape, device)?,
                )
            }
        };
        let g = if k.grad_scale == 1.0 {
            grad.clone()
        } else {
            grad.affine(k.grad_scale as f64, 0.0)?
        };
        let m = ((m * k.beta1 as f64)? + (&g * (1.0 - k.beta1) as f64)?)?;
        let v = ((v * k.beta2 as f64)? + (g.sqr()? * (1.0 - k.beta2) as f64)?)?;
        let denom = v.sqrt()?.affine(k.inv_sqrt_bc2 as f64, k.eps as f64)?;
        let update = (&m / denom)?.affine(k.step_size as f64, 0.0)?;
        let theta = (self.var.as_tensor().affine(k.decay as f64, 0.0)? - update)?;
        self.var.set(&theta)?;
        self.on_device = Some(DeviceMoments::Tensors(m, v));
        Ok(())
    }
}

/// Parameters with their names (names key the saved state and pick the decay group).
pub type NamedVars = Vec<(String, Var)>;

/// True for parameters conventionally excluded from weight decay: biases and LayerNorm
/// scales/shifts (HF names: `*.bias`, `*LayerNorm.weight`, `*layer_norm.weight`, `gamma`/`beta`).
pub fn is_no_decay(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    lower.ends_with("bias")
        || lower.contains("layernorm")
        || lower.contains("layer_norm")
        || lower.ends_with(".gamma")
        || lower.ends_with(".beta")
}

/// Splits named parameters into `(decay, no_decay)` by [`is_no_decay`].
pub fn split_decay(named: &[(String, Var)]) -> (NamedVars, NamedVars) {
    named.iter().cloned().partition(|(n, _)| !is_no_decay(n))
}

/// AdamW with parameter groups, clipping and exact save/resume.
pub struct AdamW {
    config: AdamWConfig,
    groups: Vec<ParamGroup>,
    params: Vec<ParamState>,
    /// Scale from the last [`AdamW::clip_grad_norm`], folded into the next step.
    pending_grad_scale: Option<f32>,
    /// Update CPU parameters with tensor ops too (the path GPUs take), so CPU tests cover it.
    force_tensor_ops: bool,
}

const FORMAT: &str = "kiln-adamw-v1";

#[derive(Serialize, Deserialize)]
struct StateMeta {
    format: String,
    config: AdamWConfig,
    groups: Vec<ParamGroup>,
    /// Per-parameter step counts, by parameter name.
    steps: BTreeMap<String, u64>,
}

impl AdamW {
    /// An optimizer with no groups yet.
    pub fn new(config: AdamWConfig) -> Self {
        Self {
            config,
            groups: Vec::new(),
            params: Vec::new(),
            pending_grad_scale: None,
            force_tensor_ops: false,
        }
    }

    /// Updates parameters with candle tensor operations even on the CPU, the path every
    /// other device takes (moments kept on the device). For tests: the fused CPU kernel is
    /// faster there.
    pub fn force_tensor_ops(&mut self, on: bool) {
        self.force_tensor_ops = on;
    }

    /// The shared hyperparameters.
    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    /// Adds a group and returns its index. Parameters must be f32, contiguous, and not already
    /// in another group; names must be unique (they key the saved state).
    pub fn add_group(
        &mut self,
        name: &str,
        lr: f64,
        weight_decay: f64,
        params: Vec<(String, Var)>,
    ) -> Result<usize> {
        if self.groups.iter().any(|g| g.name == name) {
            return Err(OptimError::NoGroup(format!(
                "`{name}` (duplicate group name)"
            )));
        }
        let group = self.groups.len();
        for (pname, var) in params {
            let bad = |msg: &str| OptimError::Param {
                name: pname.clone(),
                msg: msg.to_string(),
            };
            if var.dtype() != DType::F32 {
                return Err(bad("only f32 parameters are supported"));
            }
            if !var.as_tensor().is_contiguous() {
                return Err(bad("parameter is not contiguous"));
            }
            if self
                .params
                .iter()
                .any(|p| p.name == pname || p.var.as_tensor().id() == var.as_tensor().id())
            {
                return Err(bad("parameter is already in the optimizer"));
            }
            let n = var.elem_count();
            self.params.push(ParamState {
                name: pname,
                var,
                group,
                step: 0,
                m: vec![0.0; n],
                v: vec![0.0; n],
                on_device: None,
            });
        }
        self.groups.push(ParamGroup {
            name: name.to_string(),
            lr,
            weight_decay,
        });
        Ok(group)
    }

    /// The groups, in creation order (index = group id).
    pub fn groups(&self) -> &[ParamGroup] {
        &self.groups
    }

    /// Index of the group called `name`.
    pub fn group_index(&self, name: &str) -> Result<usize> {
        self.groups
            .iter()
            .position(|g| g.name == name)
            .ok_or_else(|| OptimError::NoGroup(name.to_string()))
    }

    /// Sets the learning rate of group `group` (schedulers call this every step).
    pub fn set_lr(&mut self, group: usize, lr: f64) -> Result<()> {
        let g = self
            .groups
            .get_mut(group)
            .ok_or_else(|| OptimError::NoGroup(group.to_string()))?;
        g.lr = lr;
        Ok(())
    }

    /// Learning rate of group `group`.
    pub fn lr(&self, group: usize) -> Result<f64> {
        self.groups
            .get(group)
            .map(|g| g.lr)
            .ok_or_else(|| OptimError::NoGroup(group.to_string()))
    }

    /// Number of parameters (tensors) managed.
    pub fn num_params(&self) -> usize {
        self.params.len()
    }

    /// L2 norm of all gradients of this optimizer's parameters, taken together.
    pub fn grad_norm(&self, grads: &GradStore) -> Result<f64> {
        let mut sum_sq = 0f64;
        // Off the CPU the per-tensor sums stay on the device and are read back once.
        let mut on_device: Option<Tensor> = None;
        #[cfg(feature = "cuda")]
        let mut cuda: Vec<&Tensor> = Vec::new();
        for p in &self.params {
            if let Some(g) = grads.get(p.var.as_tensor()) {
                #[cfg(feature = "cuda")]
                if crate::cuda::kernel_device(g.device()).is_some() {
                    cuda.push(g);
                    continue;
                }
                if g.device().is_cpu() {
                    sum_sq += sum_squares(g)?;
                } else {
                    let s = g.sqr()?.sum_all()?;
                    on_device = Some(match on_device {
                        Some(acc) => (acc + s)?,
                        None => s,
                    });
                }
            }
        }
        if let Some(s) = on_device {
            sum_sq += s.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        }
        #[cfg(feature = "cuda")]
        if let Some(device) = cuda
            .first()
            .and_then(|g| crate::cuda::kernel_device(g.device()))
        {
            sum_sq += super::optim_cuda::sum_squares(device, &cuda)?;
        }
        Ok(sum_sq.sqrt())
    }

    /// Clips the global gradient norm to `max_norm`, like `torch.nn.utils.clip_grad_norm_`,
    /// and returns the norm before clipping.
    ///
    /// The scale `max_norm / (norm + 1e-6)` (when below 1) is not written into the gradients;
    /// it is folded into the next [`AdamW::step`], which saves a pass over every gradient.
    pub fn clip_grad_norm(&mut self, grads: &GradStore, max_norm: f64) -> Result<f64> {
        let norm = self.grad_norm(grads)?;
        let coef = max_norm / (norm + 1e-6);
        self.pending_grad_scale = (coef < 1.0).then_some(coef as f32);
        Ok(norm)
    }

    /// Applies one AdamW update to every parameter that has a gradient in `grads`.
    /// Parameters without a gradient are left alone, moments and step included (as PyTorch).
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        let grad_scale = self.pending_grad_scale.take().unwrap_or(1.0);
        let AdamWConfig { beta1, beta2, eps } = self.config;
        // On a CUDA GPU, the updates are gathered and run as kiln's kernels, many parameters
        // per launch, once the loop has checked them all.
        #[cfg(feature = "cuda")]
        let mut cuda: Vec<(
            candle_core::cuda_backend::CudaDevice,
            super::optim_cuda::Update<'_>,
        )> = Vec::new();
        for p in &mut self.params {
            let Some(grad) = grads.get(p.var.as_tensor()) else {
                continue;
            };
            if grad.dims() != p.var.dims() || grad.dtype() != DType::F32 {
                return Err(OptimError::Param {
                    name: p.name.clone(),
                    msg: format!(
                        "gradient is {:?} {:?}, parameter is {:?} f32",
                        grad.dtype(),
                        grad.dims(),
                        p.var.dims()
                    ),
                });
            }
            let group = &self.groups[p.group];
            p.step += 1;
            let t = p.step as i32;
            let bc1 = 1.0 - beta1.powi(t);
            let bc2 = 1.0 - beta2.powi(t);
            let k = UpdateConsts {
                beta1: beta1 as f32,
                beta2: beta2 as f32,
                eps: eps as f32,
                decay: (1.0 - group.lr * group.weight_decay) as f32,
                step_size: (group.lr / bc1) as f32,
                inv_sqrt_bc2: (1.0 / bc2.sqrt()) as f32,
                grad_scale,
            };
            let grad = grad.contiguous()?;
            if p.var.device().is_cpu() && !self.force_tensor_ops {
                let op = FusedAdamW {
                    k,
                    m: Mutex::new(&mut p.m),
                    v: Mutex::new(&mut p.v),
                };
                p.var.as_tensor().inplace_op2(&grad, &op)?;
            } else {
                #[cfg(feature = "cuda")]
                if let Some(device) = crate::cuda::kernel_device(p.var.device()).cloned() {
                    let param = p.var.as_tensor().clone();
                    let moments = p.cuda_moments(&device)?;
                    let update = super::optim_cuda::Update {
                        param,
                        moments,
                        k,
                        grad,
                    };
                    cuda.push((device, update));
                    continue;
                }
                p.step_with_tensor_ops(&k, &grad)?;
            }
        }
        #[cfg(feature = "cuda")]
        while let Some((device, _)) = cuda.first() {
            // One device's updates at a time (a job trains on one).
            let device = device.clone();
            let (mine, rest): (Vec<_>, Vec<_>) =
                cuda.into_iter().partition(|(d, _)| d.id() == device.id());
            let mut updates: Vec<_> = mine.into_iter().map(|(_, u)| u).collect();
            super::optim_cuda::adamw(&device, &mut updates)?;
            cuda = rest;
        }
        Ok(())
    }

    /// Writes the moments, per-parameter steps, groups and hyperparameters to a safetensors
    /// file (moments as `m.<param>` / `v.<param>` f32 tensors, the rest as JSON metadata).
    pub fn save(&self, path: &Path) -> Result<()> {
        let meta = StateMeta {
            format: FORMAT.to_string(),
            config: self.config,
            groups: self.groups.clone(),
            steps: self
                .params
                .iter()
                .map(|p| (p.name.clone(), p.step))
                .collect(),
        };
        let meta_json = serde_json::to_string(&meta).map_err(|e| OptimError::State {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })?;
        let mut bytes: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        for p in &self.params {
            let shape = p.var.dims().to_vec();
            let (m, v) = p.host_moments()?;
            bytes.push((format!("m.{}", p.name), shape.clone(), f32_bytes(&m)));
            bytes.push((format!("v.{}", p.name), shape, f32_bytes(&v)));
        }
        let views = bytes
            .iter()
            .map(|(name, shape, data)| {
                TensorView::new(StDtype::F32, shape.clone(), data)
                    .map(|v| (name.clone(), v))
                    .map_err(|e| OptimError::State {
                        path: path.to_path_buf(),
                        msg: e.to_string(),
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        let metadata = HashMap::from([("kiln_optim".to_string(), meta_json)]);
        safetensors::serialize_to_file(views, Some(metadata), path).map_err(|e| OptimError::State {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })
    }

    /// Restores state written by [`AdamW::save`]. Every parameter of this optimizer must be in
    /// the file with the same size; group learning rates and weight decays are restored by group
    /// name. Hyperparameters (betas, eps) are restored too, so the next update is identical.
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let err = |msg: String| OptimError::State {
            path: path.to_path_buf(),
            msg,
        };
        let data = std::fs::read(path).map_err(|source| OptimError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let (_, header) = safetensors::SafeTensors::read_metadata(&data)
            .map_err(|e| err(format!("not a safetensors file: {e}")))?;
        let meta_json = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get("kiln_optim"))
            .ok_or_else(|| err("no `kiln_optim` metadata; not a kiln optimizer state".into()))?;
        let meta: StateMeta =
            serde_json::from_str(meta_json).map_err(|e| err(format!("bad metadata: {e}")))?;
        if meta.format != FORMAT {
            return Err(err(format!(
                "format `{}`, expected `{FORMAT}`",
                meta.format
            )));
        }
        let st = safetensors::SafeTensors::deserialize(&data)
            .map_err(|e| err(format!("not a safetensors file: {e}")))?;
        // Read everything before touching self, so a bad file leaves the optimizer unchanged.
        let mut restored = Vec::with_capacity(self.params.len());
        for p in &self.params {
            let step = *meta
                .steps
                .get(&p.name)
                .ok_or_else(|| err(format!("no step for parameter `{}`", p.name)))?;
            let read = |key: String| -> Result<Vec<f32>> {
                let view = st
                    .tensor(&key)
                    .map_err(|_| err(format!("missing tensor `{key}`")))?;
                if view.dtype() != StDtype::F32 || view.shape() != p.var.dims() {
                    return Err(err(format!(
                        "`{key}` is {:?} {:?}, parameter is f32 {:?}",
                        view.dtype(),
                        view.shape(),
                        p.var.dims()
                    )));
                }
                Ok(view
                    .data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect())
            };
            restored.push((
                step,
                read(format!("m.{}", p.name))?,
                read(format!("v.{}", p.name))?,
            ));
        }
        for (p, (step, m, v)) in self.params.iter_mut().zip(restored) {
            p.step = step;
            p.m = m;
            p.v = v;
            p.on_device = None;
        }
        for saved in meta.groups {
            if let Some(g) = self.groups.iter_mut().find(|g| g.name == saved.name) {
                g.lr = saved.lr;
                g.weight_decay = saved.weight_decay;
            }
        }
        self.config = meta.config;
        self.pending_grad_scale = None;
        Ok(())
    }
}

fn f32_bytes(xs: &[f32]) -> Vec<u8> {
    xs.iter().flat_map(|x| x.to_le_bytes()).collect()
}

wide_fn! {
    /// `Σ x²` of a chunk, in f64.
    fn sum_squares_chunk(c: &[f32]) -> f64 {
        sum_f64_lanes(c, |x| x * x)
    }
}

/// Sum of squares of a tensor's elements, read in place on the CPU.
fn sum_squares(t: &Tensor) -> Result<f64> {
    if t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous() {
        let (storage, layout) = t.storage_and_layout();
        if let (Storage::Cpu(CpuStorage::F32(data)), Some((start, end))) =
            (&*storage, layout.contiguous_offsets())
        {
            use rayon::prelude::*;
            return Ok(data[start..end]
                .par_chunks(PAR_CHUNK)
                .map(sum_squares_chunk)
                .sum());
        }
    }
    Ok(t.to_dtype(DType::F64)?
        .sqr()?
        .sum_all()?
        .to_scalar::<f64>()?)
}

/// Per-step constants of the update, precomputed in f64 and rounded once.
#[derive(Clone, Copy)]
pub(crate) struct UpdateConsts {
    pub(crate) beta1: f32,
    pub(crate) beta2: f32,
    pub(crate) eps: f32,
    /// `1 - lr * weight_decay`.
    pub(crate) decay: f32,
    /// `lr / (1 - beta1^t)`.
    pub(crate) step_size: f32,
    /// `1 / sqrt(1 - beta2^t)`.
    pub(crate) inv_sqrt_bc2: f32,
    /// Multiplies every gradient (global-norm clipping).
    pub(crate) grad_scale: f32,
}

/// Elements per parallel task of the optimizer's passes: large tensors (the word embeddings)
/// split over every core, small ones stay on one.
const PAR_CHUNK: usize = 1 << 15;

/// The fused AdamW update over one parameter's elements, in parallel chunks.
fn adamw_kernel(k: &UpdateConsts, theta: &mut [f32], grad: &[f32], m: &mut [f32], v: &mut [f32]) {
    use rayon::prelude::*;
    if theta.len() <= PAR_CHUNK {
        return adamw_chunk(k, theta, grad, m, v);
    }
    theta
        .par_chunks_mut(PAR_CHUNK)
        .zip(grad.par_chunks(PAR_CHUNK))
        .zip(m.par_chunks_mut(PAR_CHUNK))
        .zip(v.par_chunks_mut(PAR_CHUNK))
        .for_each(|(((theta, grad), m), v)| adamw_chunk(k, theta, grad, m, v));
}

wide_fn! {
    /// The AdamW update over a run of elements.
    pub(crate) fn adamw_chunk(k: &UpdateConsts, theta: &mut [f32], grad: &[f32], m: &mut [f32], v: &mut [f32]) {
        let (b1, b2) = (k.beta1, k.beta2);
        let (c1, c2) = (1.0 - b1, 1.0 - b2);
        for (((p, &g), m), v) in theta
            .iter_mut()
            .zip(grad)
            .zip(m.iter_mut())
            .zip(v.iter_mut())
        {
            let g = g * k.grad_scale;
            let mi = b1 * *m + c1 * g;
            let vi = b2 * *v + c2 * g * g;
            *m = mi;
            *v = vi;
            let denom = vi.sqrt() * k.inv_sqrt_bc2 + k.eps;
            *p = *p * k.decay - k.step_size * mi / denom;
        }
    }
}

/// In-place AdamW on a CPU parameter: `s1` is the parameter, `s2` the gradient. The moments
/// are borrowed through mutexes because candle's in-place op trait takes `&self`.
struct FusedAdamW<'a> {
    k: UpdateConsts,
    m: Mutex<&'a mut Vec<f32>>,
    v: Mutex<&'a mut Vec<f32>>,
}

impl InplaceOp2 for FusedAdamW<'_> {
    fn name(&self) -> &'static str {
        "kiln-adamw"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let (CpuStorage::F32(theta), CpuStorage::F32(grad)) = (s1, s2) else {
            candle_core::bail!("adamw: parameter and gradient must be f32")
        };
        let (Some((a0, a1)), Some((b0, b1))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("adamw: parameter and gradient must be contiguous")
        };
        let mut m = self
            .m
            .lock()
            .map_err(|_| candle_core::Error::Msg("adamw: poisoned".into()))?;
        let mut v = self
            .v
            .lock()
            .map_err(|_| candle_core::Error::Msg("adamw: poisoned".into()))?;
        let theta = &mut theta[a0..a1];
        let grad = &grad[b0..b1];
        if theta.len() != grad.len() || theta.len() != m.len() || theta.len() != v.len() {
            candle_core::bail!("adamw: size mismatch between parameter, gradient and state")
        }
        adamw_kernel(&self.k, theta, grad, m.as_mut_slice(), v.as_mut_slice());
        Ok(())
    }
}
