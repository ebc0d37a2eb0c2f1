//! Specifications of kiln's AdamW: the update is PyTorch's AdamW, state round-trips exactly,
//! and without groups it agrees with candle_nn's AdamW.

use candle_core::{Device, Tensor, Var};
use candle_nn::Optimizer;
use kiln::nn::autograd::Backprop;
use kiln::train::optim::{AdamW, AdamWConfig, is_no_decay, split_decay};

fn var(data: &[f32]) -> Var {
    Var::from_slice(data, data.len(), &Device::Cpu).unwrap()
}

fn values(v: &Var) -> Vec<f32> {
    v.as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

/// loss = sum(p * c) so that the gradient is exactly `c`.
fn linear_loss(p: &Var, c: &[f32]) -> Tensor {
    let c = Tensor::new(c, &Device::Cpu).unwrap();
    (p.as_tensor() * c).unwrap().sum_all().unwrap()
}

/// Reference AdamW (PyTorch's formula) in f64, for one parameter vector.
struct RefAdamW {
    m: Vec<f64>,
    v: Vec<f64>,
    t: i32,
}

impl RefAdamW {
    fn step(&mut self, p: &mut [f64], g: &[f64], lr: f64, wd: f64) {
        let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8f64);
        self.t += 1;
        for i in 0..p.len() {
            p[i] *= 1.0 - lr * wd;
            self.m[i] = b1 * self.m[i] + (1.0 - b1) * g[i];
            self.v[i] = b2 * self.v[i] + (1.0 - b2) * g[i] * g[i];
            let m_hat = self.m[i] / (1.0 - b1.powi(self.t));
            let v_hat = self.v[i] / (1.0 - b2.powi(self.t));
            p[i] -= lr * m_hat / (v_hat.sqrt() + eps);
        }
    }
}

#[test]
fn steps_match_hand_computed_adamw() {
    let init = [1.0f32, -2.0, 0.5, 3.0];
    let p = var(&init);
    let (lr, wd) = (0.1, 0.01);
    let mut opt = AdamW::new(AdamWConfig::default());
    opt.add_group("all", lr, wd, vec![("p".into(), p.clone())])
        .unwrap();

    // Step 1 by hand: m_hat = g, v_hat = g^2, so the step is lr * g / (|g| + eps).
    let g1 = [0.5f32, -1.0, 2.0, 1e-3];
    opt.step(&linear_loss(&p, &g1).backprop().unwrap()).unwrap();
    let expected: Vec<f32> = init
        .iter()
        .zip(g1)
        .map(|(&p, g)| {
            let (p, g) = (p as f64, g as f64);
            (p * (1.0 - lr * wd) - lr * g / (g.abs() + 1e-8)) as f32
        })
        .collect();
    let got = values(&p);
    for (a, b) in got.iter().zip(&expected) {
        assert!((a - b).abs() < 1e-6, "step 1: {got:?} vs {expected:?}");
    }

    // Steps 2 and 3 against the f64 reference (bias correction at t > 1).
    let mut reference = RefAdamW {
        m: vec![0.0; 4],
        v: vec![0.0; 4],
        t: 0,
    };
    let mut rp: Vec<f64> = init.iter().map(|&x| x as f64).collect();
    reference.step(&mut rp, &g1.map(|g| g as f64), lr, wd);
    for g in [[0.1f32, 0.2, -0.3, 0.4], [-2.0, 0.0, 1.0, 0.5]] {
        opt.step(&linear_loss(&p, &g).backprop().unwrap()).unwrap();
        reference.step(&mut rp, &g.map(|g| g as f64), lr, wd);
    }
    for (a, b) in values(&p).iter().zip(&rp) {
        // f32 arithmetic on values ~2: a few ulps of slack.
        assert!((*a as f64 - b).abs() < 3e-6, "{a} vs {b}");
    }
}

/// A small least-squares problem: loss = mean((x Wᵀ + b - y)^2).
fn regression_loss(w: &Var, b: &Var) -> Tensor {
    let dev = Device::Cpu;
    let x = Tensor::new(
        &[
            [1f32, 2., -1.],
            [0.5, -0.3, 2.],
            [3., 1., 0.],
            [-1., -2., 1.5],
        ],
        &dev,
    )
    .unwrap();
    let y = Tensor::new(&[[1f32, 0.], [0., 1.], [2., -1.], [-0.5, 0.5]], &dev).unwrap();
    let pred = x
        .matmul(&w.as_tensor().t().unwrap())
        .unwrap()
        .broadcast_add(b.as_tensor())
        .unwrap();
    (pred - y).unwrap().sqr().unwrap().mean_all().unwrap()
}

fn regression_params() -> (Var, Var) {
    let dev = Device::Cpu;
    let w = Var::from_vec(vec![0.1f32, -0.2, 0.3, 0.4, 0.05, -0.6], (2, 3), &dev).unwrap();
    let b = Var::from_vec(vec![0.01f32, -0.02], 2, &dev).unwrap();
    (w, b)
}

#[test]
fn matches_candle_nn_adamw_without_groups() {
    let hp = candle_nn::ParamsAdamW {
        lr: 0.05,
        beta1: 0.9,
        beta2: 0.99,
        eps: 1e-7,
        weight_decay: 0.1,
    };
    let (w0, b0) = regression_params();
    let mut theirs = candle_nn::AdamW::new(vec![w0.clone(), b0.clone()], hp.clone()).unwrap();
    let (w1, b1) = regression_params();
    let mut ours = AdamW::new(AdamWConfig {
        beta1: hp.beta1,
        beta2: hp.beta2,
        eps: hp.eps,
    });
    ours.add_group(
        "all",
        hp.lr,
        hp.weight_decay,
        vec![("w".into(), w1.clone()), ("b".into(), b1.clone())],
    )
    .unwrap();
    for step in 0..8 {
        theirs.backward_step(&regression_loss(&w0, &b0)).unwrap();
        ours.step(&regression_loss(&w1, &b1).backprop().unwrap())
            .unwrap();
        for (a, b) in values(&w0)
            .iter()
            .chain(&values(&b0))
            .zip(values(&w1).iter().chain(&values(&b1)))
        {
            assert!((a - b).abs() < 1e-6, "step {step}: candle {a} vs kiln {b}");
        }
    }
}

#[test]
fn save_then_load_resumes_with_identical_updates() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("optim.safetensors");
    let make = |w: &Var, b: &Var| {
        let mut opt = AdamW::new(AdamWConfig::default());
        opt.add_group("decay", 0.02, 0.05, vec![("w".into(), w.clone())])
            .unwrap();
        opt.add_group("no_decay", 0.03, 0.0, vec![("b".into(), b.clone())])
            .unwrap();
        opt
    };
    let (w, b) = regression_params();
    let mut opt = make(&w, &b);
    for _ in 0..3 {
        opt.step(&regression_loss(&w, &b).backprop().unwrap())
            .unwrap();
    }
    opt.set_lr(0, 0.015).unwrap();
    opt.save(&path).unwrap();

    // A "restarted process": fresh vars holding the same weights, fresh optimizer, load state.
    let w2 = Var::from_tensor(&w.as_tensor().copy().unwrap()).unwrap();
    let b2 = Var::from_tensor(&b.as_tensor().copy().unwrap()).unwrap();
    let mut resumed = make(&w2, &b2);
    resumed.load(&path).unwrap();
    assert_eq!(
        resumed.lr(0).unwrap(),
        0.015,
        "group lr is part of the state"
    );

    for _ in 0..3 {
        opt.step(&regression_loss(&w, &b).backprop().unwrap())
            .unwrap();
        resumed
            .step(&regression_loss(&w2, &b2).backprop().unwrap())
            .unwrap();
        assert_eq!(values(&w), values(&w2));
        assert_eq!(values(&b), values(&b2));
    }

    // Without the state (moments restarted) the trajectory differs: the test above is not vacuous.
    let w3 = Var::from_tensor(&w.as_tensor().copy().unwrap()).unwrap();
    let b3 = Var::from_tensor(&b.as_tensor().copy().unwrap()).unwrap();
    let mut restarted = make(&w3, &b3);
    opt.step(&regression_loss(&w, &b).backprop().unwrap())
        .unwrap();
    restarted
        .step(&regression_loss(&w3, &b3).backprop().unwrap())
        .unwrap();
    assert_ne!(values(&w), values(&w3));
}

#[test]
fn load_rejects_state_that_does_not_fit() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("optim.safetensors");
    let mut opt = AdamW::new(AdamWConfig::default());
    opt.add_group("g", 0.1, 0.0, vec![("p".into(), var(&[1.0, 2.0]))])
        .unwrap();
    opt.save(&path).unwrap();

    let mut other = AdamW::new(AdamWConfig::default());
    other
        .add_group("g", 0.1, 0.0, vec![("p".into(), var(&[1.0, 2.0, 3.0]))])
        .unwrap();
    let err = other.load(&path).unwrap_err().to_string();
    assert!(err.contains("m.p"), "{err}");

    let mut renamed = AdamW::new(AdamWConfig::default());
    renamed
        .add_group("g", 0.1, 0.0, vec![("q".into(), var(&[1.0, 2.0]))])
        .unwrap();
    let err = renamed.load(&path).unwrap_err().to_string();
    assert!(err.contains("`q`"), "{err}");

    std::fs::write(&path, b"not safetensors").unwrap();
    assert!(opt.load(&path).is_err());
}

#[test]
fn groups_have_their_own_lr_and_weight_decay() {
    let a = var(&[1.0, 1.0]);
    let b = var(&[1.0, 1.0]);
    let mut opt = AdamW::new(AdamWConfig::default());
    let ga = opt
        .add_group("backbone", 0.01, 0.0, vec![("a".into(), a.clone())])
        .unwrap();
    let gb = opt
        .add_group("head", 0.1, 0.0, vec![("b".into(), b.clone())])
        .unwrap();
    assert_eq!(opt.group_index("head").unwrap(), gb);
    let loss = (linear_loss(&a, &[1.0, -1.0]) + linear_loss(&b, &[1.0, -1.0])).unwrap();
    opt.step(&loss.backprop().unwrap()).unwrap();
    // First step moves each element by ~lr * sign(g).
    assert!((values(&a)[0] - 0.99).abs() < 1e-6 && (values(&a)[1] - 1.01).abs() < 1e-6);
    assert!((values(&b)[0] - 0.9).abs() < 1e-6 && (values(&b)[1] - 1.1).abs() < 1e-6);

    // Weight decay alone (zero gradient): p *= 1 - lr * wd, only in the group that has it.
    let c = var(&[2.0]);
    let d = var(&[2.0]);
    let mut opt = AdamW::new(AdamWConfig::default());
    opt.add_group("decay", 0.1, 0.5, vec![("c".into(), c.clone())])
        .unwrap();
    opt.add_group("no_decay", 0.1, 0.0, vec![("d".into(), d.clone())])
        .unwrap();
    opt.set_lr(ga, 0.2).unwrap();
    let loss = (linear_loss(&c, &[0.0]) + linear_loss(&d, &[0.0])).unwrap();
    opt.step(&loss.backprop().unwrap()).unwrap();
    assert!((values(&c)[0] - 2.0 * (1.0 - 0.2 * 0.5)).abs() < 1e-6);
    assert_eq!(values(&d)[0], 2.0);
    assert!(opt.set_lr(7, 0.1).is_err());
}

#[test]
fn clipping_returns_the_global_norm_and_equals_scaled_gradients() {
    let g = [3.0f32, 4.0, 0.0, 12.0]; // norm 13
    let (p1, q1) = (var(&[1.0, 1.0]), var(&[1.0, 1.0]));
    let (p2, q2) = (var(&[1.0, 1.0]), var(&[1.0, 1.0]));
    let mk = |p: &Var, q: &Var| {
        let mut opt = AdamW::new(AdamWConfig::default());
        opt.add_group("p", 0.1, 0.01, vec![("p".into(), p.clone())])
            .unwrap();
        opt.add_group("q", 0.1, 0.01, vec![("q".into(), q.clone())])
            .unwrap();
        opt
    };
    let mut clipped = mk(&p1, &q1);
    let mut scaled = mk(&p2, &q2);
    for step in 0..3 {
        let grads = (linear_loss(&p1, &g[..2]) + linear_loss(&q1, &g[2..]))
            .unwrap()
            .backprop()
            .unwrap();
        let norm = clipped.clip_grad_norm(&grads, 1.0).unwrap();
        assert!((norm - 13.0).abs() < 1e-5, "norm {norm}");
        clipped.step(&grads).unwrap();
        // The same gradients scaled by max_norm / (norm + 1e-6) by hand.
        let s = 1.0 / (13.0 + 1e-6);
        let g2: Vec<f32> = g.iter().map(|x| (*x as f64 * s) as f32).collect();
        let grads2 = (linear_loss(&p2, &g2[..2]) + linear_loss(&q2, &g2[2..]))
            .unwrap()
            .backprop()
            .unwrap();
        scaled.step(&grads2).unwrap();
        for (a, b) in values(&p1)
            .iter()
            .chain(&values(&q1))
            .zip(values(&p2).iter().chain(&values(&q2)))
        {
            assert!((a - b).abs() < 1e-6, "step {step}: {a} vs {b}");
        }
    }
    // A norm under the threshold is reported and changes nothing.
    let grads = linear_loss(&p1, &[0.3, 0.4]).backprop().unwrap();
    let norm = clipped.clip_grad_norm(&grads, 1.0).unwrap();
    assert!((norm - 0.5).abs() < 1e-6);
}

#[test]
fn parameters_without_gradient_are_untouched() {
    let a = var(&[1.0]);
    let b = var(&[1.0]);
    let mut opt = AdamW::new(AdamWConfig::default());
    opt.add_group(
        "g",
        0.1,
        0.1,
        vec![("a".into(), a.clone()), ("b".into(), b.clone())],
    )
    .unwrap();
    opt.step(&linear_loss(&a, &[1.0]).backprop().unwrap())
        .unwrap();
    assert_eq!(values(&b), vec![1.0]);
    assert_ne!(values(&a), vec![1.0]);
    // Adding the same parameter twice is refused.
    assert!(
        opt.add_group("h", 0.1, 0.0, vec![("a2".into(), a.clone())])
            .is_err()
    );
}

#[test]
fn no_decay_naming_follows_hf_conventions() {
    for n in [
        "bert.encoder.layer.0.attention.self.query.bias",
        "embeddings.LayerNorm.weight",
        "lm_head.layer_norm.weight",
        "classifier.bias",
    ] {
        assert!(is_no_decay(n), "{n}");
    }
    for n in [
        "bert.encoder.layer.0.attention.self.query.weight",
        "embeddings.word_embeddings.weight",
    ] {
        assert!(!is_no_decay(n), "{n}");
    }
    let named = vec![
        ("x.weight".to_string(), var(&[1.0])),
        ("x.bias".to_string(), var(&[1.0])),
    ];
    let (decay, no_decay) = split_decay(&named);
    assert_eq!(decay[0].0, "x.weight");
    assert_eq!(no_decay[0].0, "x.bias");
}

/// The path GPUs take (moments as tensors on the parameter's device, the update as candle
/// tensor ops) against the fused CPU kernel: same trajectory with clipping, decay and no-decay
/// groups, a parameter that misses a step, and state saved by one path resumed by the other.
#[test]
fn tensor_op_updates_match_the_fused_cpu_kernel_and_share_its_state() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("optim.safetensors");
    let make = |w: &Var, b: &Var, tensor_ops: bool| {
        let mut opt = AdamW::new(AdamWConfig::default());
        opt.add_group("decay", 0.05, 0.1, vec![("w".into(), w.clone())])
            .unwrap();
        opt.add_group("no_decay", 0.03, 0.0, vec![("b".into(), b.clone())])
            .unwrap();
        opt.force_tensor_ops(tensor_ops);
        opt
    };
    let close = |a: &[f32], b: &[f32], what: &str| {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!(
                (x - y).abs() <= 1e-6 * (1.0 + x.abs()),
                "{what}: {a:?} vs {b:?}"
            );
        }
    };
    let (w1, b1) = regression_params();
    let (w2, b2) = regression_params();
    let mut fused = make(&w1, &b1, false);
    let mut ops = make(&w2, &b2, true);
    for step in 0..6 {
        let g1 = regression_loss(&w1, &b1).backprop().unwrap();
        let g2 = regression_loss(&w2, &b2).backprop().unwrap();
        // Clip hard on even steps so the folded gradient scale is exercised.
        if step % 2 == 0 {
            let (n1, n2) = (
                fused.clip_grad_norm(&g1, 0.1).unwrap(),
                ops.clip_grad_norm(&g2, 0.1).unwrap(),
            );
            assert!((n1 - n2).abs() <= 1e-6 * n1, "norms {n1} vs {n2}");
            assert!(n1 > 0.1, "the clip must bite: {n1}");
        }
        fused.step(&g1).unwrap();
        ops.step(&g2).unwrap();
        close(&values(&w1), &values(&w2), &format!("w after step {step}"));
        close(&values(&b1), &values(&b2), &format!("b after step {step}"));
    }
    // A step where only `w` has a gradient: `b` and its moments stay as they are.
    let only_w = |w: &Var| w.as_tensor().sqr().unwrap().sum_all().unwrap();
    let b_before = values(&b2);
    fused.step(&only_w(&w1).backprop().unwrap()).unwrap();
    ops.step(&only_w(&w2).backprop().unwrap()).unwrap();
    assert_eq!(values(&b2), b_before);
    close(&values(&w1), &values(&w2), "w after the w-only step");

    // State written by the tensor-op path resumes on the fused path (and the reverse) with the
    // same next update: the moments live on the device and `save` reads them back.
    ops.save(&path).unwrap();
    let w3 = Var::from_tensor(&w2.as_tensor().copy().unwrap()).unwrap();
    let b3 = Var::from_tensor(&b2.as_tensor().copy().unwrap()).unwrap();
    let mut resumed = make(&w3, &b3, false);
    resumed.load(&path).unwrap();
    let w4 = Var::from_tensor(&w2.as_tensor().copy().unwrap()).unwrap();
    let b4 = Var::from_tensor(&b2.as_tensor().copy().unwrap()).unwrap();
    let mut restarted = make(&w4, &b4, true);
    for step in 0..3 {
        ops.step(&regression_loss(&w2, &b2).backprop().unwrap())
            .unwrap();
        resumed
            .step(&regression_loss(&w3, &b3).backprop().unwrap())
            .unwrap();
        restarted
            .step(&regression_loss(&w4, &b4).backprop().unwrap())
            .unwrap();
        close(&values(&w2), &values(&w3), &format!("resumed w {step}"));
        close(&values(&b2), &values(&b3), &format!("resumed b {step}"));
    }
    // Without the moments the trajectory differs, so the comparison above is not vacuous.
    assert_ne!(values(&w2), values(&w4));
    resumed.save(&path).unwrap();
    let mut back = make(&w2, &b2, true);
    back.load(&path).unwrap();
    back.step(&regression_loss(&w2, &b2).backprop().unwrap())
        .unwrap();
    resumed
        .step(&regression_loss(&w3, &b3).backprop().unwrap())
        .unwrap();
    close(
        &values(&w2),
        &values(&w3),
        "fused state resumed by tensor ops",
    );
}
