//! The op inside autograd: under `no_grad`, inside larger graphs, used twice, backward with
//! and without `keep_graph`.

mod common;

use common::*;
use tch::{Kind, Tensor};
use vidfuse::{f_vid_loss, vid_loss, Reduction, VidOptions};

#[test]
fn no_grad_builds_no_graph() {
    for opts in all_options() {
        tch::manual_seed(30_000);
        let (mean, target, log_scale, _) =
            leaf_inputs(&[2, 3, 4], Kind::Float, Kind::Float, Mem::Contiguous, &opts);
        let inside = tch::no_grad(|| f_vid_loss(&mean, &target, &log_scale, &opts).unwrap());
        assert!(
            !inside.requires_grad(),
            "{opts:?}: graph built under no_grad"
        );
        let outside = f_vid_loss(&mean, &target, &log_scale, &opts).unwrap();
        assert!(outside.requires_grad());
        assert!(
            inside.equal(&outside),
            "{opts:?}: no_grad changes the value"
        );
        // Nothing requires grad: no graph either.
        let plain =
            f_vid_loss(&mean.detach(), &target.detach(), &log_scale.detach(), &opts).unwrap();
        assert!(!plain.requires_grad());
        assert!(plain.equal(&outside));
    }
}

/// mean = a linear layer of a parameter; the VID loss is added to another loss. The
/// parameter's gradient matches the same graph built on the f64 reference.
#[test]
fn inside_a_larger_graph() {
    tch::manual_seed(31_000);
    let x = Tensor::randn([6, 5], cpu(Kind::Float));
    let teacher = Tensor::randn([6, 4], cpu(Kind::Float));
    let labels = Tensor::randn([6, 4], cpu(Kind::Float));
    let w = (Tensor::randn([4, 5], cpu(Kind::Float)) * 0.3).set_requires_grad(true);
    let alpha = random_log_scale(4, Kind::Float).set_requires_grad(true);
    let opts = VidOptions::default();

    let student = x.linear(&w, None::<Tensor>);
    let task = student.mse_loss(&labels, tch::Reduction::Mean);
    let total = task + vid_loss(&student.relu(), &teacher, &alpha, &opts) * 0.7;
    let got = Tensor::run_backward(&[total], &[&w, &alpha], false, false);

    let (x64, w64) = (x.to_kind(Kind::Double), w.detach().to_kind(Kind::Double));
    let w64 = w64.set_requires_grad(true);
    let a64 = alpha.detach().to_kind(Kind::Double).set_requires_grad(true);
    let student64 = x64.linear(&w64, None::<Tensor>);
    let task64 = student64.mse_loss(&labels.to_kind(Kind::Double), tch::Reduction::Mean);
    let total64 = task64 + reference_loss(&student64.relu(), &teacher, &a64, &opts) * 0.7;
    let want = Tensor::run_backward(&[total64], &[&w64, &a64], false, false);

    // The weight gradient is a sum over the batch of products: f32 matmul-level error.
    assert_close("d/dW", &got[0], &want[0], 1e-6, 1e-5);
    assert_close("d/dalpha", &got[1], &want[1], 1e-6, 1e-5);
}

/// mean = a 1x1 convolution of a feature map (VID-I's regressor), channels-last input.
#[test]
fn after_a_convolution() {
    tch::manual_seed(32_000);
    let feature = random(&[2, 3, 5, 6], Kind::Float, Mem::ChannelsLast);
    let teacher = random(&[2, 4, 5, 6], Kind::Float, Mem::Contiguous);
    let weight = (Tensor::randn([4, 3, 1, 1], cpu(Kind::Float)) * 0.5).set_requires_grad(true);
    let alpha = random_log_scale(4, Kind::Float).set_requires_grad(true);
    let opts = VidOptions::default().reduction(Reduction::Sum);

    let conv = |f: &Tensor, w: &Tensor| f.conv2d(w, None::<Tensor>, [1, 1], [0, 0], [1, 1], 1);
    let loss = vid_loss(&conv(&feature, &weight), &teacher, &alpha, &opts);
    let got = Tensor::run_backward(&[loss], &[&weight, &alpha], false, false);

    let w64 = weight
        .detach()
        .to_kind(Kind::Double)
        .set_requires_grad(true);
    let a64 = alpha.detach().to_kind(Kind::Double).set_requires_grad(true);
    let mean64 = conv(&feature.to_kind(Kind::Double), &w64);
    let want = Tensor::run_backward(
        &[reference_loss(&mean64, &teacher, &a64, &opts)],
        &[&w64, &a64],
        false,
        false,
    );
    assert_close("d/dweight", &got[0], &want[0], 1e-5, 1e-5);
    assert_close("d/dalpha", &got[1], &want[1], 1e-5, 1e-5);
}

/// The same inputs twice in one graph: the losses add, and so do the gradients.
#[test]
fn used_twice_in_one_graph() {
    for opts in all_options() {
        tch::manual_seed(33_000);
        let shape = [3, 4, 5];
        let (mean, target, log_scale, upstream) =
            leaf_inputs(&shape, Kind::Float, Kind::Float, Mem::ChannelsLast, &opts);
        let inputs = [&mean, &target, &log_scale];
        let once = vid_loss(&mean, &target, &log_scale, &opts);
        let single = Tensor::run_backward(
            &[(&once * &upstream).sum(Kind::Float)],
            &inputs,
            false,
            false,
        );
        let twice = vid_loss(&mean, &target, &log_scale, &opts)
            + vid_loss(&mean, &target, &log_scale, &opts);
        let double = Tensor::run_backward(
            &[(&twice * &upstream).sum(Kind::Float)],
            &inputs,
            false,
            false,
        );
        assert!(twice.equal(&(&once * 2.0)), "{opts:?}: loss");
        for (name, (d, s)) in ["mean", "target", "log_scale"]
            .iter()
            .zip(double.iter().zip(&single))
        {
            // Doubling is exact in binary floating point.
            assert!(d.equal(&(s * 2.0)), "{opts:?}: d/d{name} is not doubled");
        }
        // And with different targets, the gradients are the sum of the two.
        let other = random(&shape, Kind::Float, Mem::Contiguous);
        let mixed = vid_loss(&mean, &target, &log_scale, &opts)
            + vid_loss(&mean, &other, &log_scale, &opts);
        let got = Tensor::run_backward(
            &[(&mixed * &upstream).sum(Kind::Float)],
            &[&mean],
            false,
            false,
        );
        let (g1, _, _) = reference_grads(&mean, &target, &log_scale, &opts, &upstream);
        let (g2, _, _) = reference_grads(&mean, &other, &log_scale, &opts, &upstream);
        // Each term has the elementwise error; the f32 addition of the two adds a rounding.
        let (st, cp) = (storage(Kind::Float), compute(Kind::Float));
        let allowed = (g1.abs() + g2.abs()) * (2.0 * st.round + cp.elem) + 1e-30;
        assert_within(
            &format!("{opts:?}: two targets"),
            &got[0],
            &(g1 + g2),
            &allowed,
        );
    }
}

/// backward twice with keep_graph gives the same gradients; then one more without
/// keep_graph works, and a backward after that is an error (not a crash).
#[test]
fn backward_twice() {
    for opts in all_options() {
        tch::manual_seed(34_000);
        let (mean, target, log_scale, upstream) =
            leaf_inputs(&[2, 3, 7], Kind::Float, Kind::Float, Mem::Contiguous, &opts);
        let inputs = [&mean, &target, &log_scale];
        let loss = vid_loss(&mean, &target, &log_scale, &opts);
        let root = (&loss * &upstream).sum(Kind::Float);
        let first = Tensor::f_run_backward(&[&root], &inputs, true, false).unwrap();
        let second = Tensor::f_run_backward(&[&root], &inputs, true, false).unwrap();
        let third = Tensor::f_run_backward(&[&root], &inputs, false, false).unwrap();
        for (i, name) in ["mean", "target", "log_scale"].iter().enumerate() {
            assert!(first[i].equal(&second[i]), "{opts:?}: d/d{name} changed");
            assert!(first[i].equal(&third[i]), "{opts:?}: d/d{name} changed");
        }
        let err = Tensor::f_run_backward(&[&root], &inputs, false, false);
        assert!(
            err.is_err(),
            "{opts:?}: backward through a freed graph succeeded"
        );
        // The process is fine afterwards.
        let again = vid_loss(&mean, &target, &log_scale, &opts);
        assert!(again.equal(&loss));
    }
}

/// The same through `backward()` / `f_backward()` on a scalar loss with leaf `.grad()`s:
/// keep_graph is off there, so a second `f_backward` must fail, with a message.
#[test]
fn second_f_backward_is_an_error() {
    tch::manual_seed(35_000);
    let opts = VidOptions::default();
    let (mean, target, log_scale, _) =
        leaf_inputs(&[2, 3, 4], Kind::Float, Kind::Float, Mem::Contiguous, &opts);
    let loss = vid_loss(&mean, &target, &log_scale, &opts);
    loss.f_backward().unwrap();
    let grad = mean.grad().copy();
    let err = loss.f_backward().expect_err("second backward succeeded");
    let message = err.to_string();
    assert!(
        message.contains("second time"),
        "unexpected message: {message}"
    );
    // The failed backward did not touch the accumulated gradient.
    assert!(mean.grad().equal(&grad));
}

/// Gradients accumulate into `.grad()` over two forward/backward rounds, like any op.
#[test]
fn gradients_accumulate() {
    tch::manual_seed(36_000);
    let opts = VidOptions::default().reduction(Reduction::Sum);
    let (mean, target, log_scale, _) = leaf_inputs(
        &[4, 2, 3],
        Kind::Double,
        Kind::Double,
        Mem::Contiguous,
        &opts,
    );
    vid_loss(&mean, &target, &log_scale, &opts).backward();
    let once: Vec<Tensor> = [&mean, &target, &log_scale]
        .iter()
        .map(|t| t.grad().copy())
        .collect();
    vid_loss(&mean, &target, &log_scale, &opts).backward();
    for (t, g) in [&mean, &target, &log_scale].iter().zip(&once) {
        assert!(t.grad().equal(&(g * 2.0)));
    }
}

/// double backward (create_graph) is refused with an error, not a wrong answer.
#[test]
fn create_graph_is_refused() {
    tch::manual_seed(37_000);
    let opts = VidOptions::default();
    let (mean, target, log_scale, _) =
        leaf_inputs(&[2, 3], Kind::Double, Kind::Double, Mem::Contiguous, &opts);
    let loss = vid_loss(&mean, &target, &log_scale, &opts);
    let result = Tensor::f_run_backward(&[&loss], &[&mean], false, true);
    assert!(result.is_err(), "create_graph backward succeeded");
}
