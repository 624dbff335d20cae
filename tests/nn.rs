//! The VID modules: parameters, initial variance, pooling, gradients, save/load, training,
//! and the multi-layer distiller. Expected values come from plain tch formulas.

use std::collections::HashMap;

use tch::nn::{self, OptimizerConfig};
use tch::{Device, Kind, Tensor};
use vidfuse::nn::{VidConfig, VidDistiller, VidLoss, VidPair};
use vidfuse::{Reduction, VidError};

const F32: (Kind, Device) = (Kind::Float, Device::Cpu);

fn randn(shape: &[i64]) -> Tensor {
    Tensor::randn(shape, F32)
}

/// Plain-tch VID loss (mean reduction), in f64.
fn plain_loss(mean: &Tensor, target: &Tensor, log_scale: &Tensor, eps: f64) -> Tensor {
    let mut view = vec![1i64; mean.dim()];
    view[1] = -1;
    let var = (log_scale.to_kind(Kind::Double).softplus() + eps).view(&view[..]);
    let d = mean.to_kind(Kind::Double) - target.to_kind(Kind::Double);
    ((d.square() / &var + var.log()) * 0.5).mean(Kind::Double)
}

/// Average pooling by an integer factor per dimension, by reshaping (independent of
/// adaptive_avg_pool2d), in `x`'s dtype.
fn pool_by(x: &Tensor, fh: i64, fw: i64) -> Tensor {
    let s = x.size();
    x.view([s[0], s[1], s[2] / fh, fh, s[3] / fw, fw])
        .mean_dim(&[3i64, 5][..], false, x.kind())
}

fn close(a: &Tensor, b: &Tensor, tol: f64) -> bool {
    let diff = (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[]);
    let scale = b
        .to_kind(Kind::Double)
        .abs()
        .max()
        .double_value(&[])
        .max(1.0);
    diff <= tol * scale
}

fn shapes(vs: &nn::VarStore) -> HashMap<String, Vec<i64>> {
    vs.variables()
        .into_iter()
        .map(|(k, v)| (k, v.size()))
        .collect()
}

#[test]
fn vid_i_registers_named_parameters_under_the_path() {
    tch::manual_seed(1);
    let vs = nn::VarStore::new(Device::Cpu);
    let _vid = VidLoss::new(&vs.root() / "vid1", 6, 10, Default::default());
    let expected: HashMap<String, Vec<i64>> = [
        ("vid1.log_scale", vec![10]),
        ("vid1.regressor.0.weight", vec![10, 6, 1, 1]),
        ("vid1.regressor.2.weight", vec![10, 10, 1, 1]),
        ("vid1.regressor.4.weight", vec![10, 10, 1, 1]),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    assert_eq!(shapes(&vs), expected);
    assert_eq!(vs.trainable_variables().len(), 4);
    let numel: i64 = vs
        .trainable_variables()
        .iter()
        .map(|t| t.numel() as i64)
        .sum();
    assert_eq!(numel, 10 + 60 + 100 + 100);

    // hidden width from the config; a second module under another path
    let cfg = VidConfig {
        hidden_channels: Some(7),
        ..Default::default()
    };
    let _vid2 = VidLoss::new(vs.root() / "deep" / "vid2", 3, 5, cfg);
    let s = shapes(&vs);
    assert_eq!(s["deep.vid2.regressor.0.weight"], vec![7, 3, 1, 1]);
    assert_eq!(s["deep.vid2.regressor.2.weight"], vec![7, 7, 1, 1]);
    assert_eq!(s["deep.vid2.regressor.4.weight"], vec![5, 7, 1, 1]);
    assert_eq!(s["deep.vid2.log_scale"], vec![5]);
    assert_eq!(vs.len(), 8);
}

#[test]
fn linear_and_vector_to_map_register_parameters() {
    let vs = nn::VarStore::new(Device::Cpu);
    let lp = VidLoss::linear(&vs.root() / "lp", 10, 24, Default::default());
    let v2m = VidLoss::vector_to_map(&vs.root() / "v2m", 32, 6, (3, 5), Default::default());
    let s = shapes(&vs);
    assert_eq!(s["lp.regressor.weight"], vec![24, 10]);
    assert_eq!(s["lp.regressor.bias"], vec![24]);
    assert_eq!(s["lp.log_scale"], vec![24]);
    assert_eq!(s["v2m.regressor.weight"], vec![6 * 3 * 5, 32]);
    assert_eq!(s["v2m.regressor.bias"], vec![6 * 3 * 5]);
    assert_eq!(s["v2m.log_scale"], vec![6]);
    assert_eq!(vs.len(), 6);
    assert_eq!(lp.regress(&randn(&[4, 10])).size(), vec![4, 24]);
    assert_eq!(v2m.regress(&randn(&[4, 32])).size(), vec![4, 6, 3, 5]);
    assert_eq!((lp.student_dim(), lp.teacher_dim()), (10, 24));
}

#[test]
fn initial_variance_is_init_variance() {
    for &v in &[5.0, 1.0, 0.1, 0.01, 37.5] {
        let vs = nn::VarStore::new(Device::Cpu);
        let cfg = VidConfig {
            init_variance: v,
            ..Default::default()
        };
        let vid = VidLoss::new(&vs.root() / "vid", 4, 9, cfg);
        assert_eq!(vid.variance().size(), vec![9]);
        assert_eq!(vid.variance().kind(), Kind::Float);
        // independent: softplus in f64 of the stored parameter, + eps
        let a = vid.log_scale().to_kind(Kind::Double);
        let var = ((a.exp() + 1.0).log() + 1e-5).to_kind(Kind::Double);
        let err = (var - v).abs().max().double_value(&[]);
        assert!(err <= 1e-6 * v.max(1.0), "init {v}: off by {err}");
        let reported = (vid.variance().to_kind(Kind::Double) - v)
            .abs()
            .max()
            .double_value(&[]);
        assert!(
            reported <= 1e-6 * v.max(1.0),
            "variance() off by {reported}"
        );
    }
    // the default is 5
    let vs = nn::VarStore::new(Device::Cpu);
    let vid = VidLoss::linear(vs.root(), 3, 4, Default::default());
    let var = vid.variance().to_kind(Kind::Double);
    assert!((var - 5.0).abs().max().double_value(&[]) < 1e-6);
}

#[test]
fn forward_matches_plain_formula_same_size() {
    tch::manual_seed(2);
    let vs = nn::VarStore::new(Device::Cpu);
    let vid = VidLoss::new(&vs.root() / "vid", 5, 7, Default::default());
    // move log_scale away from its constant init so channels differ
    tch::no_grad(|| {
        vid.log_scale().shallow_clone().copy_(&randn(&[7]));
    });
    let (s, t) = (randn(&[3, 5, 4, 6]), randn(&[3, 7, 4, 6]));
    let got = vid.forward(&s, &t);
    let want = plain_loss(&vid.regress(&s), &t, vid.log_scale(), 1e-5);
    assert!(close(&got, &want, 1e-5), "{got:?} vs {want:?}");
}

#[test]
fn larger_map_is_pooled_to_the_smaller_in_both_directions() {
    tch::manual_seed(3);
    let vs = nn::VarStore::new(Device::Cpu);
    let vid = VidLoss::new(&vs.root() / "vid", 4, 6, Default::default());
    tch::no_grad(|| {
        vid.log_scale().shallow_clone().copy_(&randn(&[6]));
    });

    // student larger (non-square): the student is pooled before the regressor
    let (s, t) = (randn(&[2, 4, 8, 6]), randn(&[2, 6, 4, 3]));
    let want = plain_loss(&vid.regress(&pool_by(&s, 2, 2)), &t, vid.log_scale(), 1e-5);
    assert!(close(&vid.forward(&s, &t), &want, 1e-5));

    // teacher larger: the teacher is pooled
    let (s, t) = (randn(&[2, 4, 4, 3]), randn(&[2, 6, 8, 9]));
    let want = plain_loss(&vid.regress(&s), &pool_by(&t, 2, 3), vid.log_scale(), 1e-5);
    assert!(close(&vid.forward(&s, &t), &want, 1e-5));

    // mixed: student taller, teacher wider -> both pooled to the per-dimension minimum
    let (s, t) = (randn(&[2, 4, 8, 3]), randn(&[2, 6, 4, 6]));
    let want = plain_loss(
        &vid.regress(&pool_by(&s, 2, 1)),
        &pool_by(&t, 1, 2),
        vid.log_scale(),
        1e-5,
    );
    assert!(close(&vid.forward(&s, &t), &want, 1e-5));

    // per-element output has the pooled shape
    let cfg = VidConfig {
        reduction: Reduction::None,
        ..Default::default()
    };
    let vid_none = VidLoss::new(&vs.root() / "none", 4, 6, cfg);
    assert_eq!(
        vid_none
            .forward(&randn(&[2, 4, 8, 6]), &randn(&[2, 6, 4, 3]))
            .size(),
        vec![2, 6, 4, 3]
    );
}

#[test]
fn vector_to_map_pools_teacher_or_prediction() {
    tch::manual_seed(4);
    let vs = nn::VarStore::new(Device::Cpu);
    let vid = VidLoss::vector_to_map(&vs.root() / "v2m", 12, 3, (2, 2), Default::default());
    let s = randn(&[5, 12]);
    // teacher 4x4 -> pooled to the regressor's 2x2
    let t = randn(&[5, 3, 4, 4]);
    let want = plain_loss(&vid.regress(&s), &pool_by(&t, 2, 2), vid.log_scale(), 1e-5);
    assert!(close(&vid.forward(&s, &t), &want, 1e-5));
    // teacher 1x2 -> the prediction is pooled
    let t = randn(&[5, 3, 1, 2]);
    let want = plain_loss(&pool_by(&vid.regress(&s), 2, 1), &t, vid.log_scale(), 1e-5);
    assert!(close(&vid.forward(&s, &t), &want, 1e-5));
}

#[test]
fn linear_form_matches_plain_formula() {
    tch::manual_seed(5);
    let vs = nn::VarStore::new(Device::Cpu);
    let cfg = VidConfig {
        init_variance: 0.7,
        eps: 1e-3,
        ..Default::default()
    };
    let vid = VidLoss::linear(&vs.root() / "lp", 10, 16, cfg);
    let (s, t) = (randn(&[9, 10]), randn(&[9, 16]));
    let vars = vs.variables();
    let mean = s.linear(
        &vars["lp.regressor.weight"],
        Some(&vars["lp.regressor.bias"]),
    );
    let want = plain_loss(&mean, &t, vid.log_scale(), 1e-3);
    assert!(close(&vid.forward(&s, &t), &want, 1e-5));
}

#[test]
fn gradients_reach_student_regressor_and_log_scale_never_teacher() {
    tch::manual_seed(6);
    let vs = nn::VarStore::new(Device::Cpu);
    let vid = VidLoss::new(&vs.root() / "vid", 4, 6, Default::default());
    tch::no_grad(|| {
        vid.log_scale().shallow_clone().copy_(&randn(&[6]));
    });
    let s = randn(&[3, 4, 6, 6]).set_requires_grad(true);
    let t = randn(&[3, 6, 3, 3]).set_requires_grad(true);
    vid.forward(&s, &t).backward();
    assert!(!t.grad().defined(), "the teacher received a gradient");
    let s_grad = s.grad().copy();
    assert!(s_grad.abs().sum(Kind::Double).double_value(&[]) > 0.0);
    let vars = vs.variables();
    let mut names: Vec<_> = vars.keys().cloned().collect();
    names.sort();
    let got: Vec<Tensor> = names.iter().map(|n| vars[n].grad().copy()).collect();
    for (n, g) in names.iter().zip(&got) {
        assert!(
            g.abs().sum(Kind::Double).double_value(&[]) > 0.0,
            "{n} has no gradient"
        );
    }

    // the same gradients from a plain-tch loss on the same parameters
    for v in vars.values() {
        let _ = v.grad().zero_();
    }
    let s2 = s.detach().set_requires_grad(true);
    let mean = vid.regress(&s2.adaptive_avg_pool2d([3, 3]));
    plain_loss(&mean, &t.detach(), vid.log_scale(), 1e-5).backward();
    assert!(close(&s_grad, &s2.grad(), 1e-4));
    for (n, g) in names.iter().zip(&got) {
        assert!(close(g, &vars[n].grad(), 1e-4), "{n}: gradient differs");
    }
}

#[test]
fn varstore_save_load_round_trip() {
    tch::manual_seed(7);
    let dir = std::env::temp_dir().join(format!("vidfuse-nn-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("vid.safetensors");

    let vs1 = nn::VarStore::new(Device::Cpu);
    let vid1 = VidLoss::new(&vs1.root() / "vid", 4, 6, Default::default());
    let mut opt = nn::Adam::default().build(&vs1, 1e-2).unwrap();
    let (s, t) = (randn(&[2, 4, 5, 5]), randn(&[2, 6, 5, 5]));
    for _ in 0..3 {
        opt.backward_step(&vid1.forward(&s, &t));
    }
    vs1.save(&file).unwrap();

    tch::manual_seed(8);
    let mut vs2 = nn::VarStore::new(Device::Cpu);
    let vid2 = VidLoss::new(&vs2.root() / "vid", 4, 6, Default::default());
    assert!(!close(&vid1.forward(&s, &t), &vid2.forward(&s, &t), 1e-6));
    vs2.load(&file).unwrap();
    let (v1, v2) = (vs1.variables(), vs2.variables());
    for (k, a) in &v1 {
        assert!(a.equal(&v2[k]), "{k} differs after load");
    }
    assert!(vid1.variance().equal(&vid2.variance()));
    assert!(!vid2.variance().equal(&Tensor::full([6], 5.0, F32)));
    assert!(close(&vid1.forward(&s, &t), &vid2.forward(&s, &t), 1e-7));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn optimizer_steps_reduce_the_loss() {
    tch::manual_seed(9);
    let vs = nn::VarStore::new(Device::Cpu);
    let vid = VidLoss::new(&vs.root() / "vid", 8, 4, Default::default());
    // a teacher that is a function of the student, plus a little noise
    let s = randn(&[16, 8, 4, 4]);
    let mix = randn(&[4, 8, 1, 1]);
    let t = s.conv2d(&mix, None::<&Tensor>, [1, 1], [0, 0], [1, 1], 1) * 0.5
        + randn(&[16, 4, 4, 4]) * 0.1;
    let mut opt = nn::Adam::default().build(&vs, 1e-2).unwrap();
    let first = vid.forward(&s, &t).double_value(&[]);
    for _ in 0..120 {
        opt.backward_step(&vid.forward(&s, &t));
    }
    let last = vid.forward(&s, &t).double_value(&[]);
    assert!(last < first - 0.2, "loss went from {first} to {last}");
    // the variance fell from 5 towards the residual's
    assert!(vid.variance().max().double_value(&[]) < 5.0);
}

#[test]
fn forward_errors_name_the_problem() {
    let vs = nn::VarStore::new(Device::Cpu);
    let vid = VidLoss::new(&vs.root() / "vid", 4, 6, Default::default());
    let msg = |r: Result<Tensor, VidError>| r.unwrap_err().to_string();
    let e = msg(vid.f_forward(&randn(&[2, 3, 4, 4]), &randn(&[2, 6, 4, 4])));
    assert!(e.contains("student") && e.contains("[N, 4, H, W]"), "{e}");
    let e = msg(vid.f_forward(&randn(&[2, 4, 4, 4]), &randn(&[2, 5, 4, 4])));
    assert!(e.contains("teacher") && e.contains("[N, 6, H, W]"), "{e}");
    let e = msg(vid.f_forward(&randn(&[2, 4, 4]), &randn(&[2, 6, 4, 4])));
    assert!(e.contains("student"), "{e}");
    let e = msg(vid.f_forward(&randn(&[2, 4, 4, 4]), &randn(&[3, 6, 4, 4])));
    assert!(e.contains("batch"), "{e}");
    let int = Tensor::ones([2, 4, 4, 4], (Kind::Int64, Device::Cpu));
    assert!(vid.f_forward(&int, &randn(&[2, 6, 4, 4])).is_err());

    let lp = VidLoss::linear(&vs.root() / "lp", 3, 5, Default::default());
    assert!(lp.f_forward(&randn(&[2, 3]), &randn(&[2, 6])).is_err());
    assert!(lp
        .f_forward(&randn(&[2, 3, 1, 1]), &randn(&[2, 5]))
        .is_err());

    let bad = |cfg: VidConfig| VidLoss::f_new(&vs.root() / "bad", 4, 6, cfg).is_err();
    assert!(bad(VidConfig {
        init_variance: 1e-6,
        ..Default::default()
    }));
    assert!(bad(VidConfig {
        eps: 0.0,
        ..Default::default()
    }));
    assert!(bad(VidConfig {
        hidden_channels: Some(0),
        ..Default::default()
    }));
    assert!(VidLoss::f_new(&vs.root() / "bad", 0, 6, Default::default()).is_err());
}

#[test]
#[should_panic(expected = "student")]
fn forward_panics_on_bad_input() {
    let vs = nn::VarStore::new(Device::Cpu);
    let vid = VidLoss::new(vs.root(), 4, 6, Default::default());
    let _ = vid.forward(&randn(&[2, 5, 4, 4]), &randn(&[2, 6, 4, 4]));
}

#[test]
fn distiller_is_the_weighted_sum() {
    tch::manual_seed(10);
    let vs = nn::VarStore::new(Device::Cpu);
    let (l0, l1) = (0.7, 2.5);
    let d = VidDistiller::new(
        &vs.root() / "vid",
        &[(3, 5, l0), (4, 2, l1)],
        Default::default(),
    );
    assert_eq!(d.len(), 2);
    assert!(vs.variables().contains_key("vid.0.log_scale"));
    assert!(vs.variables().contains_key("vid.1.regressor.4.weight"));
    for (vid, _) in d.pairs() {
        tch::no_grad(|| {
            let n = vid.teacher_dim();
            vid.log_scale().shallow_clone().copy_(&randn(&[n]));
        });
    }
    let s = [randn(&[2, 3, 4, 4]), randn(&[2, 4, 6, 6])];
    let t = [randn(&[2, 5, 4, 4]), randn(&[2, 2, 3, 3])];
    let got = d.forward(&s, &t);
    let p = d.pairs();
    let want0 = plain_loss(&p[0].0.regress(&s[0]), &t[0], p[0].0.log_scale(), 1e-5);
    let want1 = plain_loss(
        &p[1].0.regress(&pool_by(&s[1], 2, 2)),
        &t[1],
        p[1].0.log_scale(),
        1e-5,
    );
    let want = want0 * l0 + want1 * l1;
    assert!(close(&got, &want, 1e-5), "{got:?} vs {want:?}");

    // mixed kinds via push
    let mut mixed = VidDistiller::empty();
    mixed
        .push(
            VidLoss::new(&vs.root() / "m0", 3, 5, Default::default()),
            1.0,
        )
        .push(
            VidLoss::linear(&vs.root() / "m1", 10, 8, Default::default()),
            0.5,
        );
    let loss = mixed.forward(
        &[randn(&[2, 3, 4, 4]), randn(&[2, 10])],
        &[randn(&[2, 5, 4, 4]), randn(&[2, 8])],
    );
    assert_eq!(loss.dim(), 0);
    assert_eq!(
        mixed
            .f_forward_each(
                &[randn(&[2, 3, 4, 4]), randn(&[2, 10])],
                &[randn(&[2, 5, 4, 4]), randn(&[2, 8]),]
            )
            .unwrap()
            .len(),
        2
    );
}

#[test]
fn distiller_errors() {
    let vs = nn::VarStore::new(Device::Cpu);
    let d = VidDistiller::new(
        &vs.root() / "vid",
        &[(3, 5, 1.0), (4, 2, 1.0)],
        Default::default(),
    );
    let s = [randn(&[2, 3, 4, 4]), randn(&[2, 4, 4, 4])];
    let t = [randn(&[2, 5, 4, 4]), randn(&[2, 2, 4, 4])];
    let e = d.f_forward(&s[..1], &t).unwrap_err().to_string();
    assert!(e.contains("1 student tensors for 2 VID pairs"), "{e}");
    let e = d.f_forward(&s, &t[..1]).unwrap_err().to_string();
    assert!(e.contains("1 teacher tensors for 2 VID pairs"), "{e}");
    // channel mismatch in pair 1 names the pair
    let bad_t = [t[0].shallow_clone(), randn(&[2, 3, 4, 4])];
    let e = d.f_forward(&s, &bad_t).unwrap_err().to_string();
    assert!(e.contains("pair 1") && e.contains("[N, 2, H, W]"), "{e}");
    let bad_s = [randn(&[2, 4, 4, 4]), s[1].shallow_clone()];
    let e = d.f_forward(&bad_s, &t).unwrap_err().to_string();
    assert!(e.contains("pair 0") && e.contains("[N, 3, H, W]"), "{e}");
    assert!(VidDistiller::empty().f_forward(&[], &[]).is_err());
    let cfg = VidConfig {
        reduction: Reduction::None,
        ..Default::default()
    };
    let none = VidDistiller::new(&vs.root() / "none", &[(3, 5, 1.0)], cfg);
    assert!(none.f_forward(&s[..1], &t[..1]).is_err());
    assert!(VidDistiller::empty()
        .f_push(
            VidLoss::linear(&vs.root() / "x", 2, 2, Default::default()),
            f64::NAN
        )
        .is_err());
}

/// The regressor's output computed by plain tch ops from the VarStore's tensors, with the
/// weights cast to `kind` (the reference for the autocast-like behaviour).
fn plain_regress_conv(vs: &nn::VarStore, prefix: &str, s: &Tensor, kind: Kind) -> Tensor {
    let vars = vs.variables();
    let w = |i: usize| vars[&format!("{prefix}.regressor.{i}.weight")].to_kind(kind);
    let conv = |x: &Tensor, w: &Tensor| x.conv2d(w, None::<&Tensor>, [1, 1], [0, 0], [1, 1], 1);
    let x = conv(s, &w(0)).relu();
    let x = conv(&x, &w(2)).relu();
    conv(&x, &w(4))
}

fn grads(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .map(|(k, t)| (k, t.grad().copy()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn zero_grads(vs: &nn::VarStore) {
    for v in vs.variables().values() {
        let _ = v.grad().zero_();
    }
}

#[test]
fn half_features_with_f32_parameters_compute_in_their_dtype() {
    half_features_with_f32_parameters(Kind::BFloat16);
    half_features_with_f32_parameters(Kind::Half);
}

/// bf16 or f16 features, f32 parameters.
fn half_features_with_f32_parameters(kind: Kind) {
    tch::manual_seed(21);
    let vs = nn::VarStore::new(Device::Cpu);
    let vid = VidLoss::new(&vs.root() / "vid", 6, 8, Default::default());
    tch::no_grad(|| {
        vid.log_scale().shallow_clone().copy_(&randn(&[8]));
    });
    let s = randn(&[4, 6, 5, 5]).to_kind(kind);
    let t = randn(&[4, 8, 5, 5]).to_kind(kind);

    let mean = vid.regress(&s);
    assert_eq!(mean.kind(), kind, "the regressor ran in {:?}", mean.kind());
    let loss = vid.forward(&s, &t);
    assert_eq!(loss.kind(), kind);
    loss.backward();
    let got = grads(&vs);
    for (name, g) in &got {
        assert_eq!(
            g.kind(),
            Kind::Float,
            "{kind:?}, {name}: gradient in {:?}",
            g.kind()
        );
        assert!(
            g.abs().sum(Kind::Double).double_value(&[]) > 0.0,
            "{kind:?}, {name}"
        );
    }
    for (name, v) in vs.variables() {
        assert_eq!(v.kind(), Kind::Float, "{kind:?}: {name} changed dtype");
    }

    // Reference: the same regressor in `kind` by plain tch ops, the loss in f64. The op
    // accumulates in f32 and rounds its result to `kind`: one rounding (2^-9 relative for
    // bf16, 2^-12 for f16) separates the two.
    zero_grads(&vs);
    let mean_ref = plain_regress_conv(&vs, "vid", &s, kind);
    assert!(
        mean.equal(&mean_ref),
        "the regressor differs from plain {kind:?} ops"
    );
    let want = plain_loss(&mean_ref, &t, vid.log_scale(), 1e-5);
    assert!(close(&loss, &want, 4e-3), "{kind:?}: {loss:?} vs {want:?}");
    want.backward();
    // The mean's gradient reaches the weights through the same convolutions in `kind`; it
    // is rounded to `kind` from f32 (the op) or from f64 (the reference).
    for ((name, g), (_, r)) in got.iter().zip(grads(&vs)) {
        assert!(
            close(g, &r, 2e-2),
            "{kind:?}, {name}: gradient differs from the reference"
        );
    }
}

#[test]
fn f64_features_give_an_f64_loss() {
    tch::manual_seed(22);
    let vs = nn::VarStore::new(Device::Cpu);
    let vid = VidLoss::new(&vs.root() / "vid", 5, 7, Default::default());
    tch::no_grad(|| {
        vid.log_scale().shallow_clone().copy_(&randn(&[7]));
    });
    let s = randn(&[3, 5, 4, 4]).to_kind(Kind::Double);
    let t = randn(&[3, 7, 2, 2]).to_kind(Kind::Double);
    let loss = vid.forward(&s, &t);
    assert_eq!(loss.kind(), Kind::Double);
    // f32 weights widen to f64 exactly: the reference is the same computation in f64.
    let mean = plain_regress_conv(&vs, "vid", &pool_by(&s, 2, 2), Kind::Double);
    let want = plain_loss(&mean, &pool_by(&t, 1, 1), vid.log_scale(), 1e-5);
    assert!(close(&loss, &want, 1e-12), "{loss:?} vs {want:?}");
    loss.backward();
    for (name, g) in grads(&vs) {
        assert_eq!(g.kind(), Kind::Float, "{name}");
    }

    // the linear form too
    let lp = VidLoss::linear(&vs.root() / "lp", 6, 3, Default::default());
    let (s, t) = (
        randn(&[5, 6]).to_kind(Kind::Double),
        randn(&[5, 3]).to_kind(Kind::Double),
    );
    let loss = lp.forward(&s, &t);
    assert_eq!(loss.kind(), Kind::Double);
    let vars = vs.variables();
    let mean = s.linear(
        &vars["lp.regressor.weight"].to_kind(Kind::Double),
        Some(&vars["lp.regressor.bias"].to_kind(Kind::Double)),
    );
    assert!(close(
        &loss,
        &plain_loss(&mean, &t, lp.log_scale(), 1e-5),
        1e-12
    ));
}

#[test]
fn f32_features_stay_f32_after_varstore_half() {
    tch::manual_seed(23);
    let mut vs = nn::VarStore::new(Device::Cpu);
    let vid = VidLoss::new(&vs.root() / "vid", 4, 6, Default::default());
    let v2m = VidLoss::vector_to_map(&vs.root() / "v2m", 10, 3, (2, 2), Default::default());
    vs.half();
    assert_eq!(vid.log_scale().kind(), Kind::Half);

    let (s, t) = (randn(&[2, 4, 3, 3]), randn(&[2, 6, 3, 3]));
    let loss = vid.forward(&s, &t);
    assert_eq!(loss.kind(), Kind::Float);
    let mean = plain_regress_conv(&vs, "vid", &s, Kind::Float);
    let want = plain_loss(&mean, &t, vid.log_scale(), 1e-5);
    assert!(close(&loss, &want, 1e-5), "{loss:?} vs {want:?}");

    let (s, t) = (randn(&[2, 10]), randn(&[2, 3, 2, 2]));
    let loss2 = v2m.forward(&s, &t);
    assert_eq!(loss2.kind(), Kind::Float);
    let vars = vs.variables();
    let mean = s
        .linear(
            &vars["v2m.regressor.weight"].to_kind(Kind::Float),
            Some(&vars["v2m.regressor.bias"].to_kind(Kind::Float)),
        )
        .view([2, 3, 2, 2]);
    assert!(close(
        &loss2,
        &plain_loss(&mean, &t, v2m.log_scale(), 1e-5),
        1e-5
    ));

    (loss + loss2).backward();
    for (name, g) in grads(&vs) {
        assert_eq!(
            g.kind(),
            Kind::Half,
            "{name}: the gradient left the VarStore's dtype"
        );
        assert!(g.abs().sum(Kind::Double).double_value(&[]) > 0.0, "{name}");
    }
}

#[test]
fn regressor_init_is_pytorchs_default() {
    // PyTorch's Conv2d / Linear: weights (kaiming_uniform_ with a = sqrt(5)) and biases are
    // uniform in +-1/sqrt(fan_in). Checked: the bound is respected and nearly reached, and
    // the moments and the median of |w| are those of that uniform law.
    fn check_uniform(name: &str, w: &Tensor, fan_in: i64) {
        let w = w.to_kind(Kind::Double).flatten(0, -1);
        let n = w.size()[0] as f64;
        let bound = 1.0 / (fan_in as f64).sqrt();
        let max = w.abs().max().double_value(&[]);
        assert!(max <= bound, "{name}: max |w| {max} above {bound}");
        assert!(
            max >= 0.99 * bound,
            "{name}: max |w| {max} well below {bound}"
        );
        let mean = w.mean(Kind::Double).double_value(&[]);
        let sd = bound / 3f64.sqrt();
        assert!(mean.abs() < 5.0 * sd / n.sqrt(), "{name}: mean {mean}");
        let var = w.square().mean(Kind::Double).double_value(&[]);
        let rel = (var / (sd * sd) - 1.0).abs();
        // relative sd of the variance estimate of a uniform law: sqrt(0.8 / n)
        assert!(
            rel < 6.0 * (0.8 / n).sqrt(),
            "{name}: variance {var} vs {}",
            sd * sd
        );
        let below_half = w
            .abs()
            .lt(bound / 2.0)
            .to_kind(Kind::Double)
            .mean(Kind::Double);
        let below_half = below_half.double_value(&[]);
        assert!(
            (below_half - 0.5).abs() < 6.0 * 0.5 / n.sqrt(),
            "{name}: {below_half}"
        );
    }
    tch::manual_seed(24);
    let vs = nn::VarStore::new(Device::Cpu);
    let cfg = VidConfig {
        hidden_channels: Some(300),
        ..Default::default()
    };
    let _vid = VidLoss::new(&vs.root() / "vid", 200, 250, cfg);
    let _lp = VidLoss::linear(&vs.root() / "lp", 50, 4000, Default::default());
    let _v2m = VidLoss::vector_to_map(&vs.root() / "v2m", 80, 100, (6, 6), Default::default());
    let v = vs.variables();
    check_uniform("conv 0", &v["vid.regressor.0.weight"], 200);
    check_uniform("conv 2", &v["vid.regressor.2.weight"], 300);
    check_uniform("conv 4", &v["vid.regressor.4.weight"], 300);
    check_uniform("linear weight", &v["lp.regressor.weight"], 50);
    check_uniform("linear bias", &v["lp.regressor.bias"], 50);
    check_uniform("v2m weight", &v["v2m.regressor.weight"], 80);
    check_uniform("v2m bias", &v["v2m.regressor.bias"], 80);
}

#[test]
fn log_scale_group_gets_its_own_learning_rate() {
    tch::manual_seed(25);
    let vs = nn::VarStore::new(Device::Cpu);
    let cfg = VidConfig {
        log_scale_group: Some(1),
        ..Default::default()
    };
    let vid = VidLoss::new(&vs.root() / "vid", 4, 6, cfg);
    let mut opt = nn::Adam::default().build(&vs, 1e-3).unwrap();
    opt.set_lr_group(1, 0.05);
    let before: HashMap<String, Tensor> = vs
        .variables()
        .into_iter()
        .map(|(k, v)| (k, v.copy()))
        .collect();
    let (s, t) = (randn(&[8, 4, 3, 3]), randn(&[8, 6, 3, 3]) * 3.0);
    opt.backward_step(&vid.forward(&s, &t));
    // Adam's first step moves every parameter with a non-zero gradient by its group's
    // learning rate (up to Adam's eps).
    for (name, v) in vs.variables() {
        let step = (v.to_kind(Kind::Double) - before[&name].to_kind(Kind::Double)).abs();
        let (max, min) = (step.max().double_value(&[]), step.min().double_value(&[]));
        let lr = if name.ends_with("log_scale") {
            0.05
        } else {
            1e-3
        };
        assert!(
            (max - lr).abs() < 1e-3 * lr,
            "{name}: moved up to {max}, lr {lr}"
        );
        if name.ends_with("log_scale") {
            assert!((min - lr).abs() < 1e-3 * lr, "{name}: moved {min}, lr {lr}");
        }
    }
}

#[test]
fn distiller_lambdas_can_change() {
    tch::manual_seed(26);
    let vs = nn::VarStore::new(Device::Cpu);
    let pairs = [VidPair::new(3, 5, 1.0), VidPair::new(4, 2, 0.5)];
    let mut d = VidDistiller::with_pairs(&vs.root() / "vid", &pairs, Default::default());
    assert_eq!(d.lambdas(), vec![1.0, 0.5]);
    assert!(vs.variables().contains_key("vid.1.regressor.4.weight"));
    let s = [randn(&[2, 3, 4, 4]), randn(&[2, 4, 4, 4])];
    let t = [randn(&[2, 5, 4, 4]), randn(&[2, 2, 4, 4])];
    let each = d.forward_each(&s, &t);
    let each: Vec<f64> = each.iter().map(|l| l.double_value(&[])).collect();
    d.set_lambda(1, 3.0);
    assert_eq!(d.lambdas(), vec![1.0, 3.0]);
    let got = d.forward(&s, &t).double_value(&[]);
    let want = each[0] + 3.0 * each[1];
    assert!((got - want).abs() <= 1e-6 * want.abs(), "{got} vs {want}");

    let e = d.f_set_lambda(2, 1.0).unwrap_err().to_string();
    assert!(e.contains("no pair 2") && e.contains("2 pairs"), "{e}");
    let e = d.f_set_lambda(0, f64::INFINITY).unwrap_err().to_string();
    assert!(e.contains("pair 0") && e.contains("lambda"), "{e}");
    assert_eq!(
        d.lambdas(),
        vec![1.0, 3.0],
        "a refused change changed a weight"
    );

    // positional tuples and named pairs give the same module
    let vs2 = nn::VarStore::new(Device::Cpu);
    let _ = VidDistiller::new(
        &vs2.root() / "vid",
        &[(3, 5, 1.0), (4, 2, 0.5)],
        Default::default(),
    );
    assert_eq!(shapes(&vs), shapes(&vs2));
    assert!(VidDistiller::f_with_pairs(
        &vs2.root() / "bad",
        &[VidPair::new(3, 5, f64::NAN)],
        Default::default()
    )
    .is_err());
}

#[test]
#[should_panic(expected = "1 student tensors for 2 VID pairs")]
fn forward_each_panics_on_bad_input() {
    let vs = nn::VarStore::new(Device::Cpu);
    let d = VidDistiller::new(vs.root(), &[(3, 5, 1.0), (4, 2, 1.0)], Default::default());
    let _ = d.forward_each(&[randn(&[2, 3, 4, 4])], &[randn(&[2, 5, 4, 4])]);
}

/// The distiller's forward is one grouped op: the same value as the weighted sum of each
/// pair's own loss, and the same gradients for the regressors and log_scale.
#[test]
fn distiller_forward_is_the_weighted_sum_of_its_pairs() {
    let vs = nn::VarStore::new(Device::Cpu);
    let d = VidDistiller::new(
        vs.root() / "vid",
        &[(4, 8, 1.0), (6, 5, 0.25), (3, 16, 2.0)],
        Default::default(),
    );
    let o = (Kind::Float, Device::Cpu);
    let s = [
        Tensor::randn([2, 4, 6, 6], o),
        Tensor::randn([2, 6, 4, 4], o),
        Tensor::randn([2, 3, 2, 2], o),
    ];
    let t = [
        Tensor::randn([2, 8, 6, 6], o),
        Tensor::randn([2, 5, 2, 2], o),
        Tensor::randn([2, 16, 2, 2], o),
    ];
    let grouped = d.forward(&s, &t);
    let each = d.forward_each(&s, &t);
    let summed = each
        .iter()
        .zip([1.0, 0.25, 2.0])
        .map(|(l, w)| l.to_kind(Kind::Double) * w)
        .reduce(|a, b| a + b)
        .unwrap();
    let (g, e) = (grouped.double_value(&[]), summed.double_value(&[]));
    assert!((g - e).abs() <= 1e-6 * e.abs(), "grouped {g} vs summed {e}");
    let params: Vec<Tensor> = vs.trainable_variables();
    let refs: Vec<&Tensor> = params.iter().collect();
    let g1 = Tensor::run_backward(&[&grouped], &refs, false, false);
    let g2 = Tensor::run_backward(&[&summed], &refs, false, false);
    for (a, b) in g1.iter().zip(&g2) {
        let diff = (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
            .abs()
            .max()
            .double_value(&[]);
        let scale = b.to_kind(Kind::Double).abs().max().double_value(&[]);
        assert!(
            diff <= 1e-5 * scale + 1e-12,
            "gradient differs: {diff} (scale {scale})"
        );
    }
}

// ---------------------------------------------------------------------------------------
// The variance's learning rate, per-pair configs, the Module impl, checkpoints

/// One plain SGD step (no momentum, no weight decay) on `loss`; returns how far each
/// `log_scale` entry moved divided by its gradient: the learning rate it was given.
fn observed_lr(vid: &VidLoss, opt: &mut nn::Optimizer, loss: &Tensor) -> f64 {
    let before = vid.log_scale().detach().copy();
    opt.zero_grad();
    loss.backward();
    let grad = vid.log_scale().grad().copy();
    opt.step();
    let moved = &before - vid.log_scale().detach();
    (moved / grad).mean(Kind::Double).double_value(&[])
}

#[test]
fn set_log_scale_lr_gives_the_variance_its_rate_and_survives_later_variables() {
    let vs = nn::VarStore::new(Device::Cpu);
    // The optimizer exists before the module: its group appears only at the next
    // zero_grad/step, which tch's own set_lr_group would not wait for (a panic in libtorch).
    let mut opt = nn::Sgd::default().build(&vs, 0.01).unwrap();
    let cfg = VidConfig {
        log_scale_group: Some(1),
        ..Default::default()
    };
    let vid = VidLoss::new(&vs.root() / "vid", 4, 6, cfg);
    vid.f_set_log_scale_lr(&mut opt, 0.5).unwrap();
    let (s, t) = (randn(&[3, 4, 2, 2]), randn(&[3, 6, 2, 2]));
    let lr = observed_lr(&vid, &mut opt, &vid.forward(&s, &t));
    assert!(
        (lr - 0.5).abs() < 1e-4,
        "log_scale moved at rate {lr}, not 0.5"
    );
    // set_lr sets every group; setting the variance's rate again restores it.
    opt.set_lr(0.01);
    let lr = observed_lr(&vid, &mut opt, &vid.forward(&s, &t));
    assert!((lr - 0.01).abs() < 1e-5, "{lr}");
    vid.set_log_scale_lr(&mut opt, 2.0);
    let lr = observed_lr(&vid, &mut opt, &vid.forward(&s, &t));
    assert!((lr - 2.0).abs() < 1e-3, "{lr}");
}

#[test]
fn set_log_scale_lr_refusals_are_errors_not_panics() {
    let vs = nn::VarStore::new(Device::Cpu);
    let shared = VidLoss::new(&vs.root() / "a", 4, 6, VidConfig::default());
    let own = VidLoss::new(
        &vs.root() / "b",
        4,
        6,
        VidConfig {
            log_scale_group: Some(2),
            ..Default::default()
        },
    );
    let mut opt = nn::Adam::default().build(&vs, 1e-3).unwrap();
    let err = shared.f_set_log_scale_lr(&mut opt, 0.1).unwrap_err();
    assert!(err.to_string().contains("log_scale_group"), "{err}");
    for lr in [f64::NAN, -1.0, f64::INFINITY] {
        assert!(own.f_set_log_scale_lr(&mut opt, lr).is_err(), "lr {lr}");
    }
    // An optimizer of another VarStore does not hold this log_scale.
    let other = nn::VarStore::new(Device::Cpu);
    let _x = other.root().zeros("x", &[3]);
    let mut other_opt = nn::Adam::default().build(&other, 1e-3).unwrap();
    let err = own.f_set_log_scale_lr(&mut other_opt, 0.1).unwrap_err();
    assert!(err.to_string().contains("does not optimise"), "{err}");
    // A distiller: every pair must have its own group; the message names the pair.
    let d = VidDistiller::new(&vs.root() / "d", &[(4, 6, 1.0)], VidConfig::default());
    let err = d.f_set_log_scale_lr(&mut opt, 0.1).unwrap_err();
    assert!(err.to_string().contains("pair 0"), "{err}");
}

#[test]
fn distiller_pairs_take_their_own_configs() {
    let vs = nn::VarStore::new(Device::Cpu);
    let a = VidConfig {
        hidden_channels: Some(5),
        log_scale_group: Some(1),
        ..Default::default()
    };
    let b = VidConfig {
        init_variance: 0.5,
        log_scale_group: Some(1),
        ..Default::default()
    };
    let d = VidDistiller::with_pair_configs(
        &vs.root() / "vid",
        &[(VidPair::new(4, 6, 1.0), a), (VidPair::new(3, 8, 0.5), b)],
    );
    let shapes = shapes(&vs);
    assert_eq!(shapes["vid.0.regressor.0.weight"], [5, 4, 1, 1]);
    assert_eq!(shapes["vid.1.regressor.0.weight"], [8, 3, 1, 1]);
    let variance = d.pairs()[1].0.variance();
    assert!(
        close(&variance, &Tensor::full([8], 0.5, F32), 1e-6),
        "{variance}"
    );
    // A refused config (the second pair's eps) leaves the store untouched, naming the pair.
    let vs2 = nn::VarStore::new(Device::Cpu);
    let bad = VidConfig {
        eps: -1.0,
        ..Default::default()
    };
    let err = VidDistiller::f_with_pair_configs(
        &vs2.root() / "vid",
        &[(VidPair::new(4, 6, 1.0), a), (VidPair::new(3, 8, 0.5), bad)],
    )
    .unwrap_err();
    assert!(err.to_string().contains("pair 1"), "{err}");
    assert_eq!(vs2.len(), 0);
    // Both pairs' variances get the rate of group 1.
    let mut opt = nn::Sgd::default().build(&vs, 0.01).unwrap();
    d.set_log_scale_lr(&mut opt, 0.3);
    let students = [randn(&[2, 4, 3, 3]), randn(&[2, 3, 3, 3])];
    let teachers = [randn(&[2, 6, 3, 3]), randn(&[2, 8, 3, 3])];
    let lr = observed_lr(&d.pairs()[1].0, &mut opt, &d.forward(&students, &teachers));
    assert!((lr - 0.3).abs() < 1e-4, "{lr}");
}

#[test]
fn vid_loss_is_a_module_whose_forward_is_the_regressor() {
    use tch::nn::Module;
    let vs = nn::VarStore::new(Device::Cpu);
    let vid = VidLoss::new(&vs.root() / "vid", 4, 6, VidConfig::default());
    let s = randn(&[2, 4, 3, 3]);
    let via_module = s.apply(&vid);
    assert!(via_module.equal(&vid.regress(&s)));
    assert!(Module::forward(&vid, &s).equal(&via_module));
}

#[test]
fn student_checkpoint_without_the_vid_parameters_round_trips() {
    // The pattern the README shows: the student in its VarStore, VID in another, each with
    // its optimizer; the student's checkpoint holds only the student.
    let student_vs = nn::VarStore::new(Device::Cpu);
    let vid_vs = nn::VarStore::new(Device::Cpu);
    let student = nn::conv2d(student_vs.root() / "conv", 3, 4, 3, Default::default());
    let vid = VidLoss::new(&vid_vs.root() / "vid", 4, 6, VidConfig::default());
    let mut opt_student = nn::Sgd::default().build(&student_vs, 0.1).unwrap();
    let mut opt_vid = nn::Sgd::default().build(&vid_vs, 0.1).unwrap();
    let x = randn(&[2, 3, 5, 5]);
    let loss = vid.forward(&x.apply(&student), &randn(&[2, 6, 3, 3]));
    opt_student.zero_grad();
    opt_vid.zero_grad();
    loss.backward();
    opt_student.step();
    opt_vid.step();
    let dir = std::env::temp_dir().join(format!("vidfuse-ckpt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("student.safetensors");
    student_vs.save(&file).unwrap();
    let mut fresh = nn::VarStore::new(Device::Cpu);
    let reloaded = nn::conv2d(fresh.root() / "conv", 3, 4, 3, Default::default());
    fresh.load(&file).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        reloaded.ws.equal(&student.ws),
        "weights differ after the round trip"
    );
    let names: Vec<String> = fresh.variables().into_keys().collect();
    assert!(names.iter().all(|n| n.starts_with("conv.")), "{names:?}");
}
