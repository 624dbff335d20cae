//! Shared test support: random inputs and an independent f64 reference built from plain tch ops.
#![allow(dead_code)]

use tch::{Device, Kind, Tensor};
use vidfuse::{Reduction, VidOptions};

/// The VID loss written with plain tch ops, in f64: the reference everything is checked against.
pub fn reference_loss(mean: &Tensor, target: &Tensor, log_scale: &Tensor, opts: &VidOptions) -> Tensor {
    let (m, t, a) = (mean.to_kind(Kind::Double), target.to_kind(Kind::Double), log_scale.to_kind(Kind::Double));
    let mut view = vec![1i64; mean.dim()];
    view[1] = -1;
    let var = (a.softplus() + opts.eps_value()).view(&view[..]);
    let mut l = ((&m - &t).square() / &var + var.log()) * 0.5;
    if opts.is_full() {
        l = l + 0.5 * (2.0 * std::f64::consts::PI).ln();
    }
    match opts.reduction_mode() {
        Reduction::Mean => l.mean(Kind::Double),
        Reduction::Sum => l.sum(Kind::Double),
        Reduction::None => l,
    }
}

/// Gradients of the reference (f64) wrt mean, target, log_scale, for upstream gradient `upstream`
/// (a scalar for Mean/Sum, a tensor of mean's shape for None).
pub fn reference_grads(
    mean: &Tensor,
    target: &Tensor,
    log_scale: &Tensor,
    opts: &VidOptions,
    upstream: &Tensor,
) -> (Tensor, Tensor, Tensor) {
    let m = mean.detach().to_kind(Kind::Double).set_requires_grad(true);
    let t = target.detach().to_kind(Kind::Double).set_requires_grad(true);
    let a = log_scale.detach().to_kind(Kind::Double).set_requires_grad(true);
    let l = reference_loss(&m, &t, &a, opts);
    let g = Tensor::run_backward(&[l], &[&m, &t, &a], false, false);
    let _ = upstream;
    let mut g = g.into_iter();
    (g.next().unwrap(), g.next().unwrap(), g.next().unwrap())
}

pub fn cpu(kind: Kind) -> (Kind, Device) {
    (kind, Device::Cpu)
}

/// Largest |a - b| relative to `atol + rtol * |b|`: <= 1 means within tolerance.
pub fn tolerance_ratio(actual: &Tensor, expected: &Tensor, atol: f64, rtol: f64) -> f64 {
    let a = actual.to_kind(Kind::Double);
    let e = expected.to_kind(Kind::Double);
    let allowed = e.abs() * rtol + atol;
    ((&a - &e).abs() / allowed).max().double_value(&[])
}

pub fn assert_close(what: &str, actual: &Tensor, expected: &Tensor, atol: f64, rtol: f64) {
    assert_eq!(actual.size(), expected.size(), "{what}: shape");
    let r = tolerance_ratio(actual, expected, atol, rtol);
    assert!(
        r <= 1.0,
        "{what}: off by {r:.3}x the tolerance (atol {atol:e}, rtol {rtol:e}); max |diff| = {:e}",
        (actual.to_kind(Kind::Double) - expected.to_kind(Kind::Double)).abs().max().double_value(&[])
    );
}
