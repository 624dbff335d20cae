//! Gradients: a finite-difference check in f64, upstream gradient scaling through the
//! ordinary `backward()` / `.grad()` path, gradient dtypes, and which inputs get a gradient.

mod common;

use common::*;
use tch::{Kind, Tensor};
use vidfuse::{f_vid_loss, vid_loss, Reduction, VidOptions};

/// `sum(upstream * loss)` in f64, as a plain number.
fn objective(
    mean: &Tensor,
    target: &Tensor,
    log_scale: &Tensor,
    opts: &VidOptions,
    upstream: &Tensor,
) -> f64 {
    let loss = f_vid_loss(mean, target, log_scale, opts).unwrap();
    (loss * upstream).sum(Kind::Double).double_value(&[])
}

/// Central differences of `objective` wrt every element of `inputs[which]`.
fn numeric_grad(
    inputs: &[Tensor; 3],
    which: usize,
    opts: &VidOptions,
    upstream: &Tensor,
    h: f64,
) -> Tensor {
    let base = &inputs[which];
    let n = base.numel();
    let mut out = vec![0f64; n];
    for (i, o) in out.iter_mut().enumerate() {
        let at = |delta: f64| {
            let mut shifted: Vec<Tensor> = inputs.iter().map(|t| t.copy()).collect();
            let flat = Vec::<f64>::try_from(base.flatten(0, -1)).unwrap();
            let mut v = flat.clone();
            v[i] += delta;
            shifted[which] = Tensor::from_slice(&v).view(&base.size()[..]);
            objective(&shifted[0], &shifted[1], &shifted[2], opts, upstream)
        };
        *o = (at(h) - at(-h)) / (2.0 * h);
    }
    Tensor::from_slice(&out).view(&base.size()[..])
}

/// The analytic gradients of the op agree with central differences of the op itself, in
/// f64, for all three inputs. With step h = 1e-5 the truncation error is ~h^2 * f''' / 6
/// and the cancellation error ~1e-16 * |f| / h, both well under 1e-8 for these O(1)
/// problems; 1e-7 absolute + 1e-6 relative leaves room without hiding a wrong formula
/// (which would be off by O(1)).
#[test]
fn finite_differences_f64() {
    let mut case = 0;
    for shape in [&[3i64, 2][..], &[2, 3, 4][..], &[2, 2, 3, 2][..]] {
        for mem in [Mem::Contiguous, Mem::ChannelsLast] {
            if mem == Mem::ChannelsLast && shape.len() < 3 {
                continue;
            }
            for opts in all_options() {
                case += 1;
                tch::manual_seed(20_000 + case);
                let mean = random(shape, Kind::Double, mem);
                let target = random(shape, Kind::Double, mem);
                let log_scale = random_log_scale(shape[1], Kind::Double);
                let upstream = random_upstream(shape, Kind::Double, &opts);
                let inputs = [mean, target, log_scale];
                let leaves: Vec<Tensor> = inputs
                    .iter()
                    .map(|t| t.detach().set_requires_grad(true))
                    .collect();
                let loss = f_vid_loss(&leaves[0], &leaves[1], &leaves[2], &opts).unwrap();
                let analytic = Tensor::run_backward(
                    &[(loss * &upstream).sum(Kind::Double)],
                    &leaves,
                    false,
                    false,
                );
                for (which, name) in ["mean", "target", "log_scale"].iter().enumerate() {
                    let numeric = numeric_grad(&inputs, which, &opts, &upstream, 1e-5);
                    assert_close(
                        &format!("{shape:?} {mem:?} {opts:?}: d/d{name} vs finite differences"),
                        &analytic[which],
                        &numeric,
                        1e-7,
                        1e-6,
                    );
                }
            }
        }
    }
}

/// `(loss * 3.7).backward()` on leaves: the `.grad()`s are 3.7 times the unit-upstream
/// gradients (3.7 rounded to the loss's dtype, as autograd multiplies in that dtype).
#[test]
fn upstream_scalar_through_backward() {
    let mut case = 0;
    for kind in [Kind::Float, Kind::Double, Kind::Half, Kind::BFloat16] {
        for reduction in [Reduction::Mean, Reduction::Sum] {
            case += 1;
            tch::manual_seed(21_000 + case);
            let opts = VidOptions::default().reduction(reduction);
            let shape = [3, 5, 4, 6];
            let (mean, target, log_scale, _) =
                leaf_inputs(&shape, kind, Kind::Float, Mem::Contiguous, &opts);
            let loss = vid_loss(&mean, &target, &log_scale, &opts);
            (&loss * 3.7).backward();
            let upstream = Tensor::from(3.7).to_kind(kind);
            let (gm, gt, ga) = reference_grads(&mean, &target, &log_scale, &opts, &upstream);
            let what = format!("{kind:?} {reduction:?} (loss * 3.7).backward()");
            let leaves = [&mean, &target, &log_scale];
            assert_accumulated_grads(&what, leaves, &opts, &upstream, [gm, gt, ga]);
        }
    }
}

/// Reduction::None with a random upstream tensor through `backward()` on a sum of products.
#[test]
fn upstream_tensor_through_backward() {
    for (i, kind) in [Kind::Float, Kind::Half].into_iter().enumerate() {
        for mem in [Mem::Contiguous, Mem::ChannelsLast] {
            tch::manual_seed(22_000 + i as i64);
            let opts = VidOptions::default().reduction(Reduction::None);
            let shape = [2, 7, 3, 5];
            let (mean, target, log_scale, upstream) =
                leaf_inputs(&shape, kind, Kind::Float, mem, &opts);
            let loss = vid_loss(&mean, &target, &log_scale, &opts);
            (&loss * &upstream).sum(kind).backward();
            let (gm, gt, ga) = reference_grads(&mean, &target, &log_scale, &opts, &upstream);
            let what = format!("{kind:?} {mem:?} None, random upstream");
            let leaves = [&mean, &target, &log_scale];
            assert_accumulated_grads(&what, leaves, &opts, &upstream, [gm, gt, ga]);
        }
    }
}

/// Reduction::None under `loss.sum().backward()` and `loss.mean().backward()`: the upstream
/// gradient reaches the op as an expanded (stride 0) tensor.
#[test]
fn expanded_upstream_for_none() {
    for (i, kind) in [Kind::Float, Kind::BFloat16].into_iter().enumerate() {
        for mem in [Mem::Contiguous, Mem::ChannelsLast] {
            for use_mean in [false, true] {
                tch::manual_seed(22_500 + i as i64);
                let opts = VidOptions::default().reduction(Reduction::None);
                let shape = [3, 4, 2, 5];
                let (mean, target, log_scale, _) =
                    leaf_inputs(&shape, kind, Kind::Float, mem, &opts);
                let loss = vid_loss(&mean, &target, &log_scale, &opts);
                let scale = if use_mean {
                    loss.mean(kind).backward();
                    1.0 / loss.numel() as f64
                } else {
                    loss.sum(kind).backward();
                    1.0
                };
                // 1/120 rounded to the dtype, as autograd's MeanBackward divides in it.
                let upstream = Tensor::full(&shape[..], scale, cpu(kind));
                let (gm, gt, ga) = reference_grads(&mean, &target, &log_scale, &opts, &upstream);
                let what = format!("{kind:?} {mem:?} None, mean: {use_mean}");
                let (st, cp) = (storage(kind), compute(kind));
                for (name, g, r) in [("mean", mean.grad(), gm), ("target", target.grad(), gt)] {
                    let allowed = r.abs() * (st.round + cp.elem) + st.atol;
                    assert_within(&format!("{what}: d/d{name}"), &g, &r, &allowed);
                }
                let magnitude =
                    log_scale_grad_magnitude(&mean, &target, &log_scale, &opts, &upstream);
                let allowed = ga.abs() * storage(Kind::Float).round
                    + magnitude * cp.acc
                    + storage(Kind::Float).atol;
                assert_within(
                    &format!("{what}: d/dlog_scale"),
                    &log_scale.grad(),
                    &ga,
                    &allowed,
                );
            }
        }
    }
}

/// Gradient dtypes follow their tensors: bf16/f16 inputs with an f32 log_scale give
/// bf16/f16 mean and target gradients and an f32 log_scale gradient; the loss has the
/// inputs' dtype.
#[test]
fn gradient_dtypes() {
    for (kind, scale_kind) in [
        (Kind::BFloat16, Kind::Float),
        (Kind::BFloat16, Kind::BFloat16),
        (Kind::Half, Kind::Float),
        (Kind::Half, Kind::Half),
        (Kind::Double, Kind::Float),
        (Kind::Double, Kind::Double),
        (Kind::Float, Kind::Float),
    ] {
        for opts in all_options() {
            tch::manual_seed(23_000);
            let (mean, target, log_scale, _) =
                leaf_inputs(&[2, 3, 4], kind, scale_kind, Mem::Contiguous, &opts);
            let loss = vid_loss(&mean, &target, &log_scale, &opts);
            assert_eq!(loss.kind(), kind);
            loss.sum(kind).backward();
            let what = format!("{kind:?}/{scale_kind:?} {opts:?}");
            assert_eq!(mean.grad().kind(), kind, "{what}: mean grad");
            assert_eq!(target.grad().kind(), kind, "{what}: target grad");
            assert_eq!(
                log_scale.grad().kind(),
                scale_kind,
                "{what}: log_scale grad"
            );
            assert_eq!(mean.grad().size(), mean.size());
            assert_eq!(log_scale.grad().size(), vec![3]);
        }
    }
}

/// A target that does not require grad (the usual detached teacher) gets no gradient;
/// mean and log_scale still get theirs, and correct ones.
#[test]
fn target_without_grad() {
    for (i, opts) in all_options().into_iter().enumerate() {
        for mem in [Mem::Contiguous, Mem::ChannelsLast] {
            tch::manual_seed(24_000 + i as i64);
            let shape = [3, 4, 5, 2];
            let mean = random(&shape, Kind::Float, mem).set_requires_grad(true);
            let target = random(&shape, Kind::Float, mem);
            let log_scale = random_log_scale(4, Kind::Float).set_requires_grad(true);
            let upstream = random_upstream(&shape, Kind::Float, &opts);
            let checked = check_op(
                &format!("detached target {mem:?} {opts:?}"),
                &mean,
                &target,
                &log_scale,
                &opts,
                &upstream,
            );
            assert!(checked.grads[1].is_none());
            // Through `backward()` on a fresh graph, with the leaves' `.grad()`.
            let loss = vid_loss(&mean, &target, &log_scale, &opts);
            (&loss * &upstream).sum(Kind::Float).backward();
            assert!(!target.grad().defined(), "target got a gradient");
            assert!(mean.grad().defined() && log_scale.grad().defined());
        }
    }
}

/// Only one input requiring grad: each gets its gradient alone (the op must not need the
/// others' gradients to produce it).
#[test]
fn each_input_alone() {
    for which in 0..3 {
        for opts in all_options() {
            tch::manual_seed(25_000 + which as i64);
            let shape = [2, 5, 3];
            let inputs = [
                random(&shape, Kind::Float, Mem::ChannelsLast),
                random(&shape, Kind::Float, Mem::ChannelsLast),
                random_log_scale(5, Kind::Float),
            ];
            let inputs: Vec<Tensor> = inputs
                .into_iter()
                .enumerate()
                .map(|(i, t)| t.set_requires_grad(i == which))
                .collect();
            let upstream = random_upstream(&shape, Kind::Float, &opts);
            let checked = check_op(
                &format!("only input {which} requires grad, {opts:?}"),
                &inputs[0],
                &inputs[1],
                &inputs[2],
                &opts,
                &upstream,
            );
            for (i, g) in checked.grads.iter().enumerate() {
                assert_eq!(g.is_some(), i == which);
            }
        }
    }
}

/// Checks the `.grad` of the three leaves (f32 log_scale) after a `backward()` against the
/// reference gradients, with the dtype of each.
fn assert_accumulated_grads(
    what: &str,
    [mean, target, log_scale]: [&Tensor; 3],
    opts: &VidOptions,
    upstream: &Tensor,
    [gm, gt, ga]: [Tensor; 3],
) {
    let kind = mean.kind();
    let (st, cp) = (storage(kind), compute(kind));
    for (name, g, r) in [("mean", mean.grad(), gm), ("target", target.grad(), gt)] {
        assert_eq!(g.kind(), kind, "{what}: d/d{name} dtype");
        let allowed = r.abs() * (st.round + cp.elem) + st.atol;
        assert_within(&format!("{what}: d/d{name}"), &g, &r, &allowed);
    }
    let magnitude = log_scale_grad_magnitude(mean, target, log_scale, opts, upstream);
    let ls = storage(log_scale.kind());
    let allowed = ga.abs() * ls.round + magnitude * cp.acc + ls.atol;
    assert_within(
        &format!("{what}: d/dlog_scale"),
        &log_scale.grad(),
        &ga,
        &allowed,
    );
}
