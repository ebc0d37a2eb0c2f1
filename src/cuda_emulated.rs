//! kiln's CUDA kernels (`src/cuda/kernels.cu`) run on the CPU and checked against kiln's CPU
//! code, so that they are tested on machines with no GPU (this one, CI).
//!
//! g++ compiles the kernels' very source with `tests/cuda_emulation/cuda_emu.h` standing in for
//! CUDA: one OS thread per CUDA thread, barriers for `__syncthreads` and the warp shuffles.
//! `tests/cuda_emulation/harness.cpp` launches them with the shapes `crate::cuda` uses (block
//! size, grid-stride loops, the norms' block per row and chunked column sums). What this
//! cannot see: the Rust side's argument order and types at launch (read against the kernels'
//! signatures), and anything about the real hardware. `kiln check-device` covers those on a
//! GPU.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor, Var};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The harness, compiled once per test process.
fn harness() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let dir = Path::new(env!("OUT_DIR")).join("cuda-emulation");
        std::fs::create_dir_all(&dir).unwrap();
        let bin = dir.join(format!("harness-{}", std::process::id()));
        let src = Path::new(ROOT).join("tests/cuda_emulation");
        let out = Command::new(std::env::var("CXX").unwrap_or_else(|_| "g++".into()))
            .args(["-std=c++20", "-O1", "-pthread", "-Wall", "-Werror", "-I"])
            .arg(src.join("include"))
            .arg("-o")
            .arg(&bin)
            .arg(src.join("harness.cpp"))
            .output()
            .expect("g++ (C++20) is needed to run the CUDA kernels on the CPU");
        assert!(
            out.status.success(),
            "the kernels do not compile for the CPU:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        bin
    })
}

/// Runs `op` on `inputs` (name, little-endian bytes) with `params`, in a fresh directory.
fn run(op: &str, params: &[u64], inputs: &[(&str, Vec<u8>)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let text: Vec<String> = params.iter().map(u64::to_string).collect();
    std::fs::write(dir.path().join("params.txt"), text.join(" ")).unwrap();
    for (name, bytes) in inputs {
        std::fs::write(dir.path().join(format!("{name}.bin")), bytes).unwrap();
    }
    let out = Command::new(harness())
        .arg(op)
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "harness {op}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir
}

fn bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn floats(dir: &Path, name: &str) -> Vec<f32> {
    std::fs::read(dir.join(format!("{name}.out")))
        .unwrap()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn bits(x: f32) -> u64 {
    u64::from(x.to_bits())
}

/// Deterministic values in [-1, 1].
fn values(seed: u32, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i as f32 + 1.0) * 0.618_034 + seed as f32 * 1.37).sin())
        .collect()
}

/// The largest of |a - b| / max(|a|, floor) over the elements; infinite where either side is
/// not finite (`f32::max` would pass over a NaN).
fn worst(a: &[f32], b: &[f32], floor: f32) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(&x, &y)| {
            let d = (x - y).abs() / x.abs().max(floor);
            if d.is_finite() { d } else { f32::INFINITY }
        })
        .fold(0.0, f32::max)
}

#[test]
fn adamw_kernel_is_the_cpu_update_bit_for_bit() {
    use crate::train::optim::{UpdateConsts, adamw_chunk};
    // 50 tensors: two launches of up to 48; one of several chunks and a partial one, one of
    // exactly a chunk, one of a single element, the rest small; each with its own group
    // constants (decay, step size, bias correction).
    let mut sizes = vec![70_001, 4096, 1, 37];
    sizes.extend((0..46).map(|i| 1 + (i * 389) % 3000));
    let consts: Vec<UpdateConsts> = sizes
        .iter()
        .enumerate()
        .map(|(i, _)| {
            let (lr, step) = (1e-3 * (1 + i % 3) as f32, 1 + (i % 4) as i32);
            UpdateConsts {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                decay: 1.0 - lr * [0.0, 0.01][i % 2],
                step_size: lr / (1.0 - 0.9f32.powi(step)),
                inv_sqrt_bc2: 1.0 / (1.0 - 0.999f32.powi(step)).sqrt(),
                grad_scale: 0.37,
            }
        })
        .collect();
    let total: usize = sizes.iter().sum();
    let theta = values(1, total);
    let m: Vec<f32> = values(2, total).iter().map(|x| x * 0.1).collect();
    let v: Vec<f32> = values(3, total).iter().map(|x| x * x * 0.01).collect();
    let grad = values(4, total);
    let mut params = vec![sizes.len() as u64];
    for (n, k) in sizes.iter().zip(&consts) {
        params.extend([
            *n as u64,
            bits(k.decay),
            bits(k.step_size),
            bits(k.inv_sqrt_bc2),
        ]);
    }
    let k0 = consts[0];
    params.extend([k0.beta1, k0.beta2, k0.eps, k0.grad_scale].map(bits));
    let dir = run(
        "adamw",
        &params,
        &[
            ("theta", bytes(&theta)),
            ("m", bytes(&m)),
            ("v", bytes(&v)),
            ("grad", bytes(&grad)),
        ],
    );
    let (mut theta_cpu, mut m_cpu, mut v_cpu) = (theta.clone(), m.clone(), v.clone());
    let mut at = 0;
    for (n, k) in sizes.iter().zip(&consts) {
        let r = at..at + n;
        adamw_chunk(
            k,
            &mut theta_cpu[r.clone()],
            &grad[r.clone()],
            &mut m_cpu[r.clone()],
            &mut v_cpu[r],
        );
        at += n;
    }
    // The same arithmetic in the same order, no fused multiply-adds: the same bits.
    assert_eq!(floats(dir.path(), "m"), m_cpu);
    assert_eq!(floats(dir.path(), "v"), v_cpu);
    assert_eq!(floats(dir.path(), "theta"), theta_cpu);
    assert_ne!(theta_cpu, theta, "the update changed something");
}

#[test]
fn sum_of_squares_kernel_is_the_sum() {
    // One tensor; several with chunks of every kind; more than one launch's worth.
    let mut many = vec![1, 255, 4096, 100_003, 300_000];
    many.extend((0..50).map(|i| 1 + (i * 733) % 5000));
    for sizes in [vec![1], vec![300_000], many] {
        let total: usize = sizes.iter().sum();
        let x = values(9, total);
        let mut params = vec![sizes.len() as u64];
        params.extend(sizes.iter().map(|&n| n as u64));
        let dir = run("sum_squares", &params, &[("x", bytes(&x))]);
        let out = std::fs::read(dir.path().join("sum.out")).unwrap();
        let got = f64::from_le_bytes(out[..8].try_into().unwrap());
        let want: f64 = x.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
        assert!(
            ((got - want) / want).abs() < 1e-12,
            "{} tensors: {got} against {want}",
            sizes.len()
        );
    }
}

#[test]
fn dropout_kernel_hashes_the_cpus_mask_in_every_dtype() {
    use crate::nn::layers::{dropout, seed_dropout, unseed_dropout};
    use crate::nn::mlp::Dropout;
    let n = 50_003;
    let x = Tensor::from_vec(values(5, n), n, &Device::Cpu).unwrap();
    for (code, dtype) in [(0u64, DType::F32), (1, DType::BF16), (2, DType::F16)] {
        let input = x.to_dtype(dtype).unwrap();
        seed_dropout(77);
        let (seed, threshold, scale) = Dropout::new(0.15).unwrap().parts();
        seed_dropout(77);
        let want = dropout(&input, 0.15, true).unwrap();
        unseed_dropout();
        let (data, want): (Vec<u8>, Vec<u8>) = match dtype {
            DType::F32 => (
                bytes(&input.to_vec1::<f32>().unwrap()),
                bytes(&want.to_vec1::<f32>().unwrap()),
            ),
            DType::BF16 => {
                let b = |t: &Tensor| -> Vec<u8> {
                    t.to_vec1::<half::bf16>()
                        .unwrap()
                        .iter()
                        .flat_map(|v| v.to_bits().to_le_bytes())
                        .collect()
                };
                (b(&input), b(&want))
            }
            _ => {
                let b = |t: &Tensor| -> Vec<u8> {
                    t.to_vec1::<half::f16>()
                        .unwrap()
                        .iter()
                        .flat_map(|v| v.to_bits().to_le_bytes())
                        .collect()
                };
                (b(&input), b(&want))
            }
        };
        let params = [code, n as u64, 3, seed, threshold, bits(scale)];
        let dir = run("dropout", &params, &[("x", data)]);
        let got = std::fs::read(dir.path().join("y.out")).unwrap();
        assert!(
            got == want,
            "{dtype:?}: the kernel's dropout is not the CPU's"
        );
    }
}

/// LayerNorm (`centered`) or RMSNorm forward and backward through the kernels against kiln's
/// fused CPU ops and autograd.
fn check_norm(rows: usize, dim: usize, centered: bool) {
    let eps = 1e-5f32;
    let x = values(11, rows * dim);
    let w: Vec<f32> = values(12, dim).iter().map(|v| 1.0 + 0.5 * v).collect();
    let b = values(13, dim);
    let dy = values(14, rows * dim);
    let params = [rows as u64, dim as u64, bits(eps), u64::from(centered), 32];
    let dir = run(
        "norm",
        &params,
        &[
            ("x", bytes(&x)),
            ("w", bytes(&w)),
            ("b", bytes(&b)),
            ("dy", bytes(&dy)),
        ],
    );
    let dev = Device::Cpu;
    let xv = Var::from_tensor(&Tensor::from_vec(x, (rows, dim), &dev).unwrap()).unwrap();
    let wv = Var::from_tensor(&Tensor::from_vec(w, dim, &dev).unwrap()).unwrap();
    let bv = Var::from_tensor(&Tensor::from_vec(b, dim, &dev).unwrap()).unwrap();
    let y = if centered {
        crate::nn::ops::layer_norm(xv.as_tensor(), wv.as_tensor(), bv.as_tensor(), eps.into())
    } else {
        crate::nn::ops::rms_norm(xv.as_tensor(), wv.as_tensor(), eps.into())
    }
    .unwrap();
    let dyt = Tensor::from_vec(dy, (rows, dim), &dev).unwrap();
    let grads = (&y * &dyt).unwrap().sum_all().unwrap().backward().unwrap();
    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let what = if centered { "LayerNorm" } else { "RMSNorm" };
    let cases = [
        ("y", flat(&y), 1e-5),
        ("dx", flat(grads.get(xv.as_tensor()).unwrap()), 1e-4),
        ("dw", flat(grads.get(wv.as_tensor()).unwrap()), 1e-4),
    ];
    for (name, want, tol) in cases {
        let got = floats(dir.path(), name);
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let w = worst(&want, &got, scale * 1e-2);
        assert!(w < tol, "{what} {rows}x{dim} {name}: worst {w}");
    }
    if centered {
        let want = flat(grads.get(bv.as_tensor()).unwrap());
        let got = floats(dir.path(), "db");
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let w = worst(&want, &got, scale * 1e-2);
        assert!(w < 1e-4, "{what} {rows}x{dim} db: worst {w}");
    }
}

#[test]
fn norm_kernels_match_the_cpu_norms_and_their_gradients() {
    // Rows in a partial chunk of the column sums; rows wider and narrower than a block.
    for (rows, dim) in [(37, 300), (3, 192), (70, 40)] {
        check_norm(rows, dim, true);
        check_norm(rows, dim, false);
    }
}

/// The softmax kernels, forward and backward, against [`crate::nn::ops::attention_softmax`]'s
/// separate ops on the CPU (scale, additive mask, primitive softmax) and autograd: scores of
/// `dims` (`[batch, .., q, s]`), scaled by `scale`, with the mask of `mask_dims` when given.
fn check_softmax(dims: &[usize], scale: f32, mask_dims: Option<&[usize]>) {
    let s = dims[dims.len() - 1];
    let n: usize = dims.iter().product();
    let rows = n / s;
    let mut x: Vec<f32> = values(21, n).iter().map(|v| 8.0 * v).collect();
    x[s - 1] = f32::MIN;
    // A score whose exponential overflows f32 unless the row's true maximum (here held by a
    // thread of a later warp) is subtracted first.
    x[(s + s * 2 / 3).min(n - 1)] = 100.0 / scale;
    let dy = values(22, n);
    let dev = Device::Cpu;
    let (mask, rows_of) = match mask_dims {
        Some(md) => {
            let m: usize = md.iter().product();
            // Hidden keys (f32::MIN) here and there, and small shifts elsewhere.
            let v: Vec<f32> = values(23, m)
                .iter()
                .map(|&v| if v > 0.3 { f32::MIN } else { v })
                .collect();
            let rows = crate::nn::ops::mask_rows(dims, md).expect("a placeable mask");
            (Some(Tensor::from_vec(v, md, &dev).unwrap()), rows)
        }
        None => (None, [rows, 1, 0, 0]),
    };
    let mut params = vec![
        rows as u64,
        s as u64,
        bits(scale),
        u64::from(mask.is_some()),
    ];
    params.extend(rows_of.iter().map(|&r| r as u64));
    let mut inputs = vec![("x", bytes(&x)), ("dy", bytes(&dy))];
    if let Some(m) = &mask {
        inputs.push((
            "mask",
            bytes(&m.flatten_all().unwrap().to_vec1::<f32>().unwrap()),
        ));
    }
    let dir = run("softmax", &params, &inputs);
    let xv = Var::from_tensor(&Tensor::from_vec(x, dims, &dev).unwrap()).unwrap();
    let y = crate::nn::ops::attention_softmax(xv.as_tensor(), scale.into(), mask.as_ref()).unwrap();
    let dyt = Tensor::from_vec(dy, dims, &dev).unwrap();
    let grads = (&y * &dyt).unwrap().sum_all().unwrap().backward().unwrap();
    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for (name, want) in [
        ("y", flat(&y)),
        ("dx", flat(grads.get(xv.as_tensor()).unwrap())),
    ] {
        let got = floats(dir.path(), name);
        let top = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        // Relative to at least 1% of the largest: the gradient's small elements are
        // differences of near-equal terms, rounded differently by the two formulas.
        let w = worst(&want, &got, top * 1e-2);
        assert!(
            w < 1e-4,
            "softmax {dims:?} scale {scale} mask {mask_dims:?} {name}: worst {w}"
        );
    }
}

#[test]
fn softmax_kernels_match_the_cpu_softmax_and_its_gradient() {
    // Rows shorter than a warp, one warp's worth, longer than a block; hidden keys' f32::MIN.
    for (rows, dim) in [(50, 7), (24, 32), (9, 300)] {
        check_softmax(&[rows, dim], 1.0, None);
    }
    // Attention's: scaled, with BERT's padding mask [b, 1, 1, s], a decoder's causal and
    // padding mask [b, 1, 1, t, s] and its causal mask alone [1, 1, 1, t, s].
    check_softmax(&[3, 4, 5, 40], 0.125, Some(&[3, 1, 1, 40]));
    check_softmax(&[2, 2, 3, 6, 6], 1.0, Some(&[2, 1, 1, 6, 6]));
    check_softmax(&[2, 2, 3, 6, 6], 0.5, Some(&[1, 1, 1, 6, 6]));
    check_softmax(&[2, 3, 1, 300], 0.25, None);
}

/// `v` rounded to `dtype` (f32, bf16 or f16): the values as f32 and the bytes.
fn rounded(v: &[f32], dtype: DType) -> (Vec<f32>, Vec<u8>) {
    match dtype {
        DType::BF16 => {
            let h: Vec<half::bf16> = v.iter().map(|&x| half::bf16::from_f32(x)).collect();
            (
                h.iter().map(|x| x.to_f32()).collect(),
                h.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect(),
            )
        }
        DType::F16 => {
            let h: Vec<half::f16> = v.iter().map(|&x| half::f16::from_f32(x)).collect();
            (
                h.iter().map(|x| x.to_f32()).collect(),
                h.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect(),
            )
        }
        _ => (v.to_vec(), bytes(v)),
    }
}

/// An output of `dtype` elements, as f32.
fn read_as_f32(dir: &Path, name: &str, dtype: DType) -> Vec<f32> {
    let raw = std::fs::read(dir.join(format!("{name}.out"))).unwrap();
    let bits = || {
        raw.chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
    };
    match dtype {
        DType::BF16 => bits().map(|b| half::bf16::from_bits(b).to_f32()).collect(),
        DType::F16 => bits().map(|b| half::f16::from_bits(b).to_f32()).collect(),
        _ => floats(dir, name),
    }
}

#[test]
fn activation_kernels_match_the_cpu_gelu_and_gated_silu_and_their_gradients() {
    let n = 20_011;
    // f32 to within the CPU's erf approximation; the half types to within their rounding.
    for (code, dtype, tol) in [
        (0u64, DType::F32, 1e-4f32),
        (1, DType::BF16, 1e-2),
        (2, DType::F16, 2e-3),
    ] {
        let (x, xb) = rounded(
            &values(31, n).iter().map(|v| 6.0 * v).collect::<Vec<_>>(),
            dtype,
        );
        let (u, ub) = rounded(&values(32, n), dtype);
        let (dy, dyb) = rounded(&values(33, n), dtype);
        let dir = run(
            "activations",
            &[code, n as u64, 9],
            &[("x", xb), ("u", ub), ("dy", dyb)],
        );
        // The reference: kiln's fused f32 CPU ops on the same (rounded) values.
        let dev = Device::Cpu;
        let xv = Var::from_tensor(&Tensor::from_vec(x, n, &dev).unwrap()).unwrap();
        let uv = Var::from_tensor(&Tensor::from_vec(u, n, &dev).unwrap()).unwrap();
        let dyt = Tensor::from_vec(dy, n, &dev).unwrap();
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let check = |name: &str, want: Vec<f32>| {
            let got = read_as_f32(dir.path(), name, dtype);
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            // Relative to at least 1% of the largest: the CPU's GELU takes a rational
            // approximation of erf (`ops::erf_f32`), good to about 1e-7 absolute.
            let w = worst(&want, &got, scale * 1e-2);
            assert!(w < tol, "{dtype:?} {name}: worst {w}");
        };
        let gelu = crate::nn::ops::gelu_erf(xv.as_tensor()).unwrap();
        let grads = (&gelu * &dyt)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        check("gelu", flat(&gelu));
        check("gelu_dx", flat(grads.get(xv.as_tensor()).unwrap()));
        let silu = crate::nn::ops::silu_mul(xv.as_tensor(), uv.as_tensor()).unwrap();
        let grads = (&silu * &dyt)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        check("silu", flat(&silu));
        let mut d = flat(grads.get(xv.as_tensor()).unwrap());
        d.extend(flat(grads.get(uv.as_tensor()).unwrap()));
        check("silu_d", d);
    }
}

#[test]
fn rope_kernels_match_the_cpu_rotary_embeddings_and_their_gradient() {
    // [b, heads, t, d] queries: rows of several positions, a grid too small for them all.
    let (b, heads, t, d) = (2, 3, 7, 16);
    let half = d / 2;
    let n = b * heads * t * d;
    for (code, dtype, tol) in [
        (0u64, DType::F32, 1e-6f32),
        (1, DType::BF16, 1e-2),
        (2, DType::F16, 2e-3),
    ] {
        let (x, xb) = rounded(&values(41, n), dtype);
        let (cos, cb) = rounded(
            &(0..t * half)
                .map(|i| ((i / half) as f32 * 0.3 + (i % half) as f32).cos())
                .collect::<Vec<_>>(),
            dtype,
        );
        let (sin, sb) = rounded(
            &(0..t * half)
                .map(|i| ((i / half) as f32 * 0.3 + (i % half) as f32).sin())
                .collect::<Vec<_>>(),
            dtype,
        );
        let (dy, dyb) = rounded(&values(42, n), dtype);
        let rows = (n / d) as u64;
        let dir = run(
            "rope",
            &[code, rows, t as u64, half as u64, 5],
            &[("x", xb), ("cos", cb), ("sin", sb), ("dy", dyb)],
        );
        // The reference: candle's primitive ops in f32 on the same (rounded) values.
        let dev = Device::Cpu;
        let xv = Var::from_tensor(&Tensor::from_vec(x, (b, heads, t, d), &dev).unwrap()).unwrap();
        let cos = Tensor::from_vec(cos, (t, half), &dev).unwrap();
        let sin = Tensor::from_vec(sin, (t, half), &dev).unwrap();
        let y = crate::nn::ops::rope_primitive(xv.as_tensor(), &cos, &sin).unwrap();
        let dyt = Tensor::from_vec(dy, (b, heads, t, d), &dev).unwrap();
        let grads = (&y * &dyt).unwrap().sum_all().unwrap().backward().unwrap();
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (name, want) in [
            ("y", flat(&y)),
            ("dx", flat(grads.get(xv.as_tensor()).unwrap())),
        ] {
            let got = read_as_f32(dir.path(), name, dtype);
            let top = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            let w = worst(&want, &got, top * 1e-2);
            assert!(w < tol, "rope {dtype:?} {name}: worst {w}");
        }
    }
}
