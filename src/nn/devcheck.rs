//! Does a device train what the CPU trains? `kiln check-device --device cuda:0` loads a small
//! random model of every family kiln trains (BERT encoder, decoder with and without LoRA,
//! ResNet, ViT) twice from the same files: once on the CPU in f32 through kiln's kernels (the
//! reference the test suite checks against candle-transformers and PyTorch), once on the
//! device. Both run one training forward and backward on the same inputs; every trainable
//! variable's gradient (and every BatchNorm running statistic) must agree.
//!
//! A GPU runs candle's ops and CUDA kernels (candle's, and kiln's own in `crate::cuda`: the
//! norms, dropout, the optimizer), which no CPU test executes: a wrong kernel there trains
//! silently worse rather than failing (candle 0.9.2's CUDA convolution multiplied a strided
//! weight gradient in the wrong order, `conv::conv2d_ops`). This check finds such a thing in
//! seconds, naming the variable. The device side loads its model as training does there. On
//! the CPU the second model runs candle's ops instead of kiln's CPU kernels, the code path a
//! GPU takes where kiln has no kernel of its own (with the GPU's single-node dense layers,
//! LoRA adapters and head splits), so the same check runs in the test suite.
//!
//! With a half dtype (bf16 where the device computes it natively, f16 on the CPU, whose matmul
//! has no bf16) the text families also run under mixed precision, with a looser tolerance.
//!
//! Last, the optimizer: three AdamW steps with global-norm clipping on the device against the
//! CPU's fused update, the parameters, the saved moments and the norms compared (on a CUDA GPU
//! kiln's own kernels do that update; on the CPU the second side runs it as candle's ops); and
//! seeded dropout, whose output and gradient must be the CPU's (the same hashed mask).

use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use serde::Serialize;

use super::bert::{BertEncoder, LoadOptions};
use super::decoder::{Decoder, DecoderLoadOptions};
use super::lora::{LoraConfig, LoraTarget};
use super::resnet::{ResNetForImageClassification, tiny_resnet_config, write_tiny_resnet};
use super::tiny::{
    tiny_bert_config, tiny_decoder_config, write_tiny_bert, write_tiny_decoder_with,
};
use super::vision::{ImageClassifier, VisionLoadOptions};
use super::vit::{VitForImageClassification, tiny_vit_config, write_tiny_vit};

/// Largest relative difference of a gradient in f32 (computed in a different order, and by
/// candle's kernels instead of kiln's, it agrees to about 1e-6 on the CPU).
pub const F32_TOLERANCE: f32 = 1e-3;
/// The same under mixed precision (the layers compute in bf16 or f16).
pub const HALF_TOLERANCE: f32 = 0.3;

/// Dropout's: the device must hash the same mask as the CPU and multiply the same way, so the
/// output and gradient agree exactly and the loss but for its sum's order (one element masked
/// differently out of the 99,459 would give about 5e-3).
pub const DROPOUT_TOLERANCE: f32 = 1e-4;

/// The least norm a tensor's difference is measured against, as a share of the largest norm
/// of any compared tensor (see [`compare`]).
pub const SCALE_FLOOR: f32 = 1e-3;

/// One family's comparison.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// `bert`, `decoder`, `decoder-lora`, `resnet`, `vit`.
    pub family: &'static str,
    /// The device side's compute dtype: `f32`, `bf16` or `f16`.
    pub dtype: String,
    /// Gradients and running statistics compared.
    pub compared: usize,
    pub loss_cpu: f32,
    pub loss_device: f32,
    /// The largest difference of any compared tensor (or of the loss): the norm of the
    /// difference relative to the tensor's norm on the CPU (see [`compare`]).
    pub worst: f32,
    /// The tensor `worst` is of.
    pub worst_of: String,
    pub tolerance: f32,
    pub passed: bool,
    /// Why the check could not run (a failed op on the device, say), if it could not.
    pub error: Option<String>,
}

/// A training step's outcome on one side: the loss, and named tensors to compare
/// (gradients, running statistics), as f32 on the host.
struct Outcome {
    loss: f32,
    tensors: Vec<(String, Vec<f32>)>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Family {
    Bert,
    Decoder,
    DecoderLora,
    ResNet,
    Vit,
}

impl Family {
    fn name(self) -> &'static str {
        match self {
            Family::Bert => "bert",
            Family::Decoder => "decoder",
            Family::DecoderLora => "decoder-lora",
            Family::ResNet => "resnet",
            Family::Vit => "vit",
        }
    }

    fn text(self) -> bool {
        matches!(self, Family::Bert | Family::Decoder | Family::DecoderLora)
    }
}

/// The mixed-precision dtype a device is checked in: bf16 where it computes it natively, f16
/// on the CPU (the same casts; candle's CPU matmul has no bf16), none elsewhere.
pub fn half_dtype(device: &Device) -> Option<DType> {
    if crate::device::supports_bf16(device) {
        Some(DType::BF16)
    } else if device.is_cpu() {
        Some(DType::F16)
    } else {
        None
    }
}

/// Every family on `device` against the CPU, in f32, then the text families in
/// [`half_dtype`]. A check that cannot run (an op the device lacks) is a failed check with
/// its error, and the others still run.
pub fn check_device(device: &Device) -> crate::nn::Result<Vec<Check>> {
    let dir = crate::ScratchDir::new("kiln-check-device");
    std::fs::create_dir_all(dir.path()).map_err(|source| crate::nn::NnError::Io {
        path: dir.path().to_path_buf(),
        source,
    })?;
    write_models(dir.path())?;
    let families = [
        Family::Bert,
        Family::Decoder,
        Family::DecoderLora,
        Family::ResNet,
        Family::Vit,
    ];
    let mut checks = Vec::new();
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = device
        && crate::cuda::kernels_on()
        && let Some(e) = crate::cuda::load_error(cuda)
    {
        checks.push(Check {
            error: Some(format!(
                "kiln's CUDA kernels did not load: {e}; the checks below ran candle's ops instead"
            )),
            ..failed("kernels", DType::F32, 0.0)
        });
    }
    let reference: Vec<_> = families
        .iter()
        .map(|&f| run(f, dir.path(), &Device::Cpu, DType::F32, true))
        .collect();
    let half = half_dtype(device);
    for (&family, cpu) in families.iter().zip(&reference) {
        let mut dtypes = vec![DType::F32];
        if family.text() {
            dtypes.extend(half);
        }
        for dtype in dtypes {
            let tolerance = if dtype == DType::F32 {
                F32_TOLERANCE
            } else {
                HALF_TOLERANCE
            };
            // Off the CPU, the options training uses there (kiln's kernels for that device
            // where it has them, candle's ops elsewhere); on the CPU, candle's ops.
            let device_side = run(family, dir.path(), device, dtype, !device.is_cpu());
            checks.push(judge(
                (family.name(), dtype, tolerance),
                cpu.as_ref(),
                device_side,
            ));
        }
    }
    let cpu = run_adamw(dir.path(), &Device::Cpu, true);
    let dev = run_adamw(dir.path(), device, false);
    checks.push(judge(
        ("adamw", DType::F32, F32_TOLERANCE),
        cpu.as_ref(),
        dev,
    ));
    let mut dtypes = vec![DType::F32];
    dtypes.extend(half_dtype(device));
    for dtype in dtypes {
        let cpu = run_dropout(&Device::Cpu, dtype, true);
        let dev = run_dropout(device, dtype, false);
        checks.push(judge(
            ("dropout", dtype, DROPOUT_TOLERANCE),
            cpu.as_ref(),
            dev,
        ));
    }
    Ok(checks)
}

/// The check `(family, dtype, tolerance)` of a CPU and a device outcome: compared when both
/// sides ran, else the error of the side that did not.
fn judge(
    (family, dtype, tolerance): (&'static str, DType, f32),
    cpu: std::result::Result<&Outcome, &crate::nn::NnError>,
    dev: crate::nn::Result<Outcome>,
) -> Check {
    let mut check = failed(family, dtype, tolerance);
    match (cpu, dev) {
        (Ok(cpu), Ok(dev)) => compare(&mut check, cpu, &dev),
        (Err(e), _) => check.error = Some(format!("on the CPU: {e}")),
        (_, Err(e)) => check.error = Some(format!("on the device: {e}")),
    }
    check
}

/// A check of `family` in `dtype` that has compared nothing yet (failed until it has).
fn failed(family: &'static str, dtype: DType, tolerance: f32) -> Check {
    Check {
        family,
        dtype: dtype.as_str().to_owned(),
        compared: 0,
        loss_cpu: f32::NAN,
        loss_device: f32::NAN,
        worst: f32::NAN,
        worst_of: String::new(),
        tolerance,
        passed: false,
        error: None,
    }
}

/// Seeded dropout (p = 0.1) of a tensor in `dtype`, forward and backward: the output and the
/// input's gradient. On the CPU, `kiln_op` false takes the path of devices kiln has no kernel
/// for (the mask made on the host and multiplied by candle's ops); a CUDA GPU runs kiln's
/// kernel, which must hash the same mask.
fn run_dropout(device: &Device, dtype: DType, kiln_op: bool) -> crate::nn::Result<Outcome> {
    use super::layers::{dropout, dropout_with_host_mask, seed_dropout, unseed_dropout};
    let shape = (3, 257, 129);
    let x = Var::from_tensor(&Tensor::from_vec(values(60, 3 * 257 * 129), shape, device)?)?;
    let input = x.as_tensor().to_dtype(dtype)?;
    seed_dropout(2024);
    let y = if kiln_op || !device.is_cpu() {
        dropout(&input, 0.1, true)
    } else {
        dropout_with_host_mask(&input, 0.1, true)
    };
    unseed_dropout();
    let y = y?;
    let loss = weighted_sum(&y, 61)?;
    let grads = super::backward(&loss)?;
    let grad = grads
        .get(x.as_tensor())
        .ok_or_else(|| crate::nn::NnError::InvalidInput("dropout: no gradient".into()))?;
    Ok(Outcome {
        loss: loss.to_dtype(DType::F32)?.to_scalar::<f32>()?,
        tensors: vec![
            ("output".to_owned(), host(&y)?),
            ("input (gradient)".to_owned(), host(grad)?),
        ],
    })
}

/// Three AdamW steps (two groups, one with weight decay; the gradients clipped to a global
/// norm they exceed, so the clipping scale is in every update) of parameters of awkward sizes,
/// one larger than a GPU kernel's grid covers in one pass. The outcome: the first step's
/// gradient norm as its "loss", the norms, the parameters after the steps and the moments as
/// `AdamW::save` writes them. `fused` false on the CPU runs the update as candle's ops.
fn run_adamw(dir: &Path, device: &Device, fused: bool) -> crate::nn::Result<Outcome> {
    use crate::nn::NnError;
    use crate::train::optim::{AdamW, AdamWConfig, OptimError};
    let err = |e: OptimError| match e {
        OptimError::Candle(e) => NnError::Candle(e),
        e => NnError::InvalidInput(format!("AdamW: {e}")),
    };
    let shapes: [(&str, &[usize]); 3] = [("w", &[1100, 1031]), ("b", &[37]), ("e", &[129, 257])];
    let mut vars = Vec::new();
    for (i, (name, shape)) in shapes.iter().enumerate() {
        let n = shape.iter().product();
        let t = Tensor::from_vec(values(40 + i as u32, n), *shape, device)?;
        vars.push((name.to_string(), Var::from_tensor(&t)?));
    }
    let mut opt = AdamW::new(AdamWConfig::default());
    if device.is_cpu() && !fused {
        opt.force_tensor_ops(true);
    }
    opt.add_group("decay", 1e-2, 0.1, vec![vars[0].clone(), vars[2].clone()])
        .map_err(err)?;
    opt.add_group("no_decay", 3e-2, 0.0, vec![vars[1].clone()])
        .map_err(err)?;
    let mut norms = Vec::new();
    for step in 0..3u32 {
        // Σ x² r / n over every parameter: gradients 2 x r / n, which change as x does.
        let mut loss = Tensor::zeros((), DType::F32, device)?;
        for (i, (_, var)) in vars.iter().enumerate() {
            let x = var.as_tensor();
            loss = (loss + weighted_sum(&x.sqr()?, 50 + 3 * step + i as u32)?)?;
        }
        let grads = super::backward(&loss)?;
        let norm = opt.clip_grad_norm(&grads, 1e-4).map_err(err)?;
        norms.push(norm as f32);
        opt.step(&grads).map_err(err)?;
    }
    let side = if fused { "cpu" } else { "device" };
    let path = dir.join(format!("adamw-{side}.safetensors"));
    opt.save(&path).map_err(err)?;
    let saved = candle_core::safetensors::load(&path, &Device::Cpu)?;
    let mut saved: Vec<_> = saved.into_iter().collect();
    saved.sort_by(|a, b| a.0.cmp(&b.0));
    let mut tensors = vec![("gradient norms".to_owned(), norms.clone())];
    for (name, var) in &vars {
        tensors.push((format!("{name} (after 3 steps)"), host(var.as_tensor())?));
    }
    for (name, t) in saved {
        tensors.push((format!("{name} (moment)"), host(&t)?));
    }
    Ok(Outcome {
        loss: norms[0],
        tensors,
    })
}

fn compare(check: &mut Check, cpu: &Outcome, dev: &Outcome) {
    check.loss_cpu = cpu.loss;
    check.loss_device = dev.loss;
    let mut worst = (cpu.loss - dev.loss).abs() / cpu.loss.abs().max(1e-6);
    let mut worst_of = "loss".to_owned();
    let mut missing = Vec::new();
    // A tensor's difference is the norm of the difference relative to the tensor's norm (so
    // that half precision's rounding of single elements averages out), but relative to at
    // least a share of the largest norm of any tensor: some gradients are zero but for
    // rounding (a key projection's bias: softmax ignores what it adds to every score), and
    // their rounding would otherwise count as a whole difference.
    let norm = |v: &[f32]| {
        v.iter()
            .map(|&x| f64::from(x) * f64::from(x))
            .sum::<f64>()
            .sqrt()
    };
    let largest = cpu
        .tensors
        .iter()
        .map(|(_, a)| norm(a))
        .fold(0f64, f64::max);
    let floor = (largest * f64::from(SCALE_FLOOR)).max(1e-30);
    for (name, a) in &cpu.tensors {
        let Some((_, b)) = dev.tensors.iter().find(|(n, _)| n == name) else {
            missing.push(name.clone());
            continue;
        };
        check.compared += 1;
        let rel = if a.len() == b.len() {
            let diff = a
                .iter()
                .zip(b)
                .map(|(&x, &y)| (f64::from(x) - f64::from(y)).powi(2))
                .sum::<f64>()
                .sqrt();
            (diff / norm(a).max(floor)) as f32
        } else {
            f32::INFINITY
        };
        let rel = if rel.is_nan() { f32::INFINITY } else { rel };
        if rel > worst {
            worst = rel;
            worst_of = name.clone();
        }
    }
    for (name, _) in &dev.tensors {
        if !cpu.tensors.iter().any(|(n, _)| n == name) {
            missing.push(name.clone());
        }
    }
    if !worst.is_finite() {
        worst = f32::INFINITY;
    }
    check.worst = worst;
    check.worst_of = worst_of;
    check.passed = missing.is_empty() && worst <= check.tolerance;
    if !missing.is_empty() {
        check.error = Some(format!(
            "a gradient on one side only: {}",
            missing.join(", ")
        ));
    }
}

/// The random models, under `dir/{bert,decoder,resnet,vit}`, without dropout (so both sides
/// compute the same function).
fn write_models(dir: &Path) -> crate::nn::Result<()> {
    let mut bert = tiny_bert_config();
    bert.hidden_dropout_prob = 0.0;
    bert.attention_probs_dropout_prob = 0.0;
    write_tiny_bert(&dir.join("bert"), &bert, 11)?;
    write_tiny_decoder_with(&dir.join("decoder"), &tiny_decoder_config("qwen2"), 12)?;
    write_tiny_resnet(&dir.join("resnet"), &tiny_resnet_config(), 13)?;
    let mut vit = tiny_vit_config();
    vit.hidden_dropout_prob = 0.0;
    vit.attention_probs_dropout_prob = 0.0;
    write_tiny_vit(&dir.join("vit"), &vit, 14)?;
    Ok(())
}

/// A tensor's values as f32 on the host.
fn host(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
}

/// Deterministic values in [-1, 1] (the same on every machine).
fn values(seed: u32, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i as f32 + 1.0) * 0.618_034 + seed as f32 * 1.37).sin())
        .collect()
}

/// `Σ x·r / n` for fixed weights `r`: a loss whose gradient reaches every output.
fn weighted_sum(x: &Tensor, seed: u32) -> candle_core::Result<Tensor> {
    let x = x.to_dtype(DType::F32)?;
    let n = x.elem_count();
    let r = Tensor::from_vec(values(seed, n), x.shape(), x.device())?;
    (x * r)?.sum_all()? / n as f64
}

/// Gradients of `vars` (and `buffers` as they are after the step) on the host.
fn outcome(
    loss: &Tensor,
    vars: &[(String, Var)],
    buffers: &[(String, Var)],
) -> crate::nn::Result<Outcome> {
    let grads = super::backward(loss)?;
    let mut tensors = Vec::new();
    for (name, var) in vars {
        if let Some(g) = grads.get(var.as_tensor()) {
            tensors.push((format!("{name} (gradient)"), host(g)?));
        }
    }
    for (name, var) in buffers {
        tensors.push((name.clone(), host(var.as_tensor())?));
    }
    Ok(Outcome {
        loss: loss.to_dtype(DType::F32)?.to_scalar::<f32>()?,
        tensors,
    })
}

/// One training forward and backward of `family` on `device`, computing in `dtype`; `fused`
/// false runs candle's ops where kiln has its own kernels (on the CPU, the path a GPU takes
/// where kiln has no CUDA kernel, with the single-node dense layers, LoRA adapters and head
/// splits a GPU takes: `nn::dense`, `nn::heads`).
fn run(
    family: Family,
    dir: &Path,
    device: &Device,
    dtype: DType,
    fused: bool,
) -> crate::nn::Result<Outcome> {
    if device.is_cpu() && !fused {
        return super::dense::with_nodes_on_cpu(|| run_family(family, dir, device, dtype, fused));
    }
    run_family(family, dir, device, dtype, fused)
}

/// [`run`]'s step.
fn run_family(
    family: Family,
    dir: &Path,
    device: &Device,
    dtype: DType,
    fused: bool,
) -> crate::nn::Result<Outcome> {
    match family {
        Family::Bert => {
            let opts = LoadOptions {
                fused_ops: fused,
                ..LoadOptions::default()
            };
            let mut enc = BertEncoder::load_dir(&dir.join("bert"), &VarMap::new(), device, &opts)?;
            enc.set_compute_dtype(dtype);
            let ids: [[u32; 7]; 3] = [
                [2, 15, 27, 33, 41, 8, 3],
                [2, 90, 11, 3, 0, 0, 0],
                [2, 5, 3, 0, 0, 0, 0],
            ];
            let types: [[u32; 7]; 3] = [[0, 0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 0, 0, 0], [0; 7]];
            let mask: [[u32; 7]; 3] = [[1; 7], [1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0]];
            let hidden = enc.forward(
                &Tensor::new(&ids, device)?,
                Some(&Tensor::new(&types, device)?),
                &Tensor::new(&mask, device)?,
                true,
            )?;
            let loss = weighted_sum(&hidden, 1)?;
            outcome(&loss, enc.named_trainable_vars(), &[])
        }
        Family::Decoder | Family::DecoderLora => {
            let lora = family == Family::DecoderLora;
            let opts = DecoderLoadOptions {
                lora: lora.then(|| LoraConfig {
                    rank: 4,
                    alpha: 8.0,
                    dropout: 0.0,
                    targets: vec![LoraTarget::Query, LoraTarget::Value],
                    seed: 5,
                }),
                lora_modules: if lora {
                    vec!["all-linear".into()]
                } else {
                    Vec::new()
                },
                ..DecoderLoadOptions::default()
            };
            let mut dec = Decoder::load_dir(&dir.join("decoder"), &VarMap::new(), device, &opts)?;
            dec.set_fused_ops(fused);
            dec.set_compute_dtype(dtype);
            if lora {
                // Adapters start with B = 0, which leaves A without a gradient: give B values
                // (the same on both sides).
                for (name, v) in dec.named_trainable_vars() {
                    if name.contains("lora_B") {
                        let n = v.as_tensor().elem_count();
                        let t = Tensor::from_vec(values(3, n), v.as_tensor().shape(), device)?;
                        v.set(&(t * 0.05)?)?;
                    }
                }
            }
            let vocab = dec.config().vocab_size as u32;
            let ids: Vec<u32> = (0..12u32).map(|i| (i * 7 + 3) % vocab).collect();
            let ids = Tensor::from_vec(ids, (2, 6), device)?;
            let mask = Tensor::new(&[[1u32; 6], [1, 1, 1, 1, 0, 0]], device)?;
            let logits = dec.forward(&ids, &mask, true)?;
            let loss = weighted_sum(&logits, 2)?;
            outcome(&loss, dec.named_trainable_vars(), &[])
        }
        Family::ResNet | Family::Vit => {
            let opts = VisionLoadOptions::default();
            let (model, pixels): (Box<dyn ImageClassifier>, Tensor) = if family == Family::ResNet {
                let mut m = ResNetForImageClassification::from_dir(
                    &dir.join("resnet"),
                    None,
                    &VarMap::new(),
                    device,
                    &opts,
                    3,
                )?;
                m.candle_ops(!fused);
                // Odd sizes: windows that leave rows and columns over.
                let px = Tensor::from_vec(values(4, 4 * 3 * 33 * 31), (4, 3, 33, 31), device)?;
                (Box::new(m), px)
            } else {
                let mut m = VitForImageClassification::from_dir(
                    &dir.join("vit"),
                    None,
                    &VarMap::new(),
                    device,
                    &opts,
                    3,
                )?;
                m.set_fused_ops(fused);
                let s = m.config().image_size;
                let px = Tensor::from_vec(values(5, 4 * 3 * s * s), (4, 3, s, s), device)?;
                (Box::new(m), px)
            };
            let logits = model.forward(&pixels, true)?;
            let loss = weighted_sum(&logits, 6)?;
            let mut vars = model.backbone_vars();
            vars.extend(model.head_vars());
            outcome(&loss, &vars, &model.buffers())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_passes_its_own_check_and_a_wrong_gradient_fails_it() {
        let checks = check_device(&Device::Cpu).unwrap();
        // Five families in f32, the three text ones in f16, the optimizer, dropout in f32
        // and f16.
        assert_eq!(checks.len(), 11, "{checks:#?}");
        assert_eq!(checks[8].family, "adamw");
        // Two groups' parameters, their moments and the norms.
        assert_eq!(checks[8].compared, 1 + 3 + 6, "{:#?}", checks[8]);
        assert_eq!(
            (checks[9].family, checks[10].family),
            ("dropout", "dropout")
        );
        assert_eq!(checks[9].compared, 2, "{:#?}", checks[9]);
        for c in &checks {
            assert!(c.passed, "{c:#?}");
            assert!(c.compared > 0 && c.error.is_none(), "{c:#?}");
        }
        // The comparison itself: one wrong value in one gradient fails it, by name.
        let cpu = Outcome {
            loss: 1.0,
            tensors: vec![("w (gradient)".into(), vec![0.5, -1.0, 0.25])],
        };
        let mut dev = Outcome {
            loss: 1.0,
            tensors: vec![("w (gradient)".into(), vec![0.5, -1.0, 0.2])],
        };
        let fresh = || failed("bert", DType::F32, F32_TOLERANCE);
        let mut check = fresh();
        compare(&mut check, &cpu, &dev);
        assert!(
            !check.passed && check.worst_of == "w (gradient)",
            "{check:?}"
        );
        let expected = 0.05 / (0.25f32 + 1.0 + 0.0625).sqrt();
        assert!((check.worst - expected).abs() < 1e-6, "{check:?}");
        dev.tensors[0].1[2] = 0.25;
        let mut check = fresh();
        compare(&mut check, &cpu, &dev);
        assert!(check.passed && check.worst == 0.0, "{check:?}");
        dev.tensors.clear();
        let mut check = fresh();
        compare(&mut check, &cpu, &dev);
        assert!(!check.passed && check.error.is_some(), "{check:?}");
    }
}
