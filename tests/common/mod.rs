//! Shared test support: random inputs, an independent f64 reference built from plain tch
//! ops, per-dtype tolerances derived from first principles, and one checker that compares
//! the op's value and its three gradients against the reference.
#![allow(dead_code)]

pub mod emu_launcher;

use tch::{Device, Kind, Tensor};
use vidfuse::{f_vid_loss, Reduction, VidOptions};

pub fn cpu(kind: Kind) -> (Kind, Device) {
    (kind, Device::Cpu)
}

// ---------------------------------------------------------------------------------------
// The reference

/// `var_c = softplus(alpha_c) + eps` in f64, viewed to broadcast along dim 1 of a rank-`rank` tensor.
fn reference_var(log_scale: &Tensor, rank: usize, opts: &VidOptions) -> Tensor {
    let mut view = vec![1i64; rank];
    view[1] = -1;
    (log_scale.to_kind(Kind::Double).softplus() + opts.eps_value()).view(&view[..])
}

/// The per-element constant: `0.5 * ln(2 pi)` when `full`, else 0.
fn constant(opts: &VidOptions) -> f64 {
    if opts.is_full() {
        0.5 * (2.0 * std::f64::consts::PI).ln()
    } else {
        0.0
    }
}

fn reduce(l: Tensor, reduction: Reduction) -> Tensor {
    match reduction {
        Reduction::Mean => l.mean(Kind::Double),
        Reduction::Sum => l.sum(Kind::Double),
        Reduction::None => l,
    }
}

/// The VID loss written with plain tch ops, in f64: the reference everything is checked against.
pub fn reference_loss(
    mean: &Tensor,
    target: &Tensor,
    log_scale: &Tensor,
    opts: &VidOptions,
) -> Tensor {
    reference_terms(mean, target, log_scale, opts, false)
}

/// Gradients of the reference (f64) wrt mean, target, log_scale, for upstream gradient
/// `upstream` (a scalar for Mean/Sum, a tensor of mean's shape for None): the gradients of
/// `sum(upstream * loss)`.
pub fn reference_grads(
    mean: &Tensor,
    target: &Tensor,
    log_scale: &Tensor,
    opts: &VidOptions,
    upstream: &Tensor,
) -> (Tensor, Tensor, Tensor) {
    let m = mean.detach().to_kind(Kind::Double).set_requires_grad(true);
    let t = target
        .detach()
        .to_kind(Kind::Double)
        .set_requires_grad(true);
    let a = log_scale
        .detach()
        .to_kind(Kind::Double)
        .set_requires_grad(true);
    let l = reference_loss(&m, &t, &a, opts);
    let root = (l * upstream.detach().to_kind(Kind::Double)).sum(Kind::Double);
    let g = Tensor::run_backward(&[root], &[&m, &t, &a], false, false);
    let mut g = g.into_iter();
    (g.next().unwrap(), g.next().unwrap(), g.next().unwrap())
}

/// The loss with every term made non-negative (`|ln var|` instead of `ln var`), reduced as
/// `opts` says: the scale against which cancellation-prone results are judged.
pub fn loss_magnitude(
    mean: &Tensor,
    target: &Tensor,
    log_scale: &Tensor,
    opts: &VidOptions,
) -> Tensor {
    reference_terms(mean, target, log_scale, opts, true)
}

/// The per-element terms in f64 (with `|ln var|` when `abs_log`), reduced as `opts` says.
fn reference_terms(
    mean: &Tensor,
    target: &Tensor,
    log_scale: &Tensor,
    opts: &VidOptions,
    abs_log: bool,
) -> Tensor {
    let (m, t) = (mean.to_kind(Kind::Double), target.to_kind(Kind::Double));
    let var = reference_var(log_scale, mean.dim(), opts);
    let log_var = if abs_log { var.log().abs() } else { var.log() };
    let l = ((&m - &t).square() / &var + log_var) * 0.5 + constant(opts);
    reduce(l, opts.reduction_mode())
}

/// Per-channel sum of a tensor of rank >= 2 over every dim but dim 1.
pub fn channel_sum(x: &Tensor) -> Tensor {
    let c = x.size()[1];
    x.transpose(0, 1)
        .reshape([c, -1])
        .sum_dim_intlist(1, false, Kind::Double)
}

/// The log_scale gradient with both of its terms made non-negative:
/// `0.5 * sigmoid(alpha_c) * sum_c |w| * (1/var_c + d^2/var_c^2)`, `w` the upstream gradient
/// per element (times 1/n for Mean). The two terms cancel when `var_c` is near the mean
/// `d^2`, so its error is bounded relative to this, not to the gradient itself.
pub fn log_scale_grad_magnitude(
    mean: &Tensor,
    target: &Tensor,
    log_scale: &Tensor,
    opts: &VidOptions,
    upstream: &Tensor,
) -> Tensor {
    let (m, t) = (mean.to_kind(Kind::Double), target.to_kind(Kind::Double));
    let var = reference_var(log_scale, mean.dim(), opts);
    let d2 = (&m - &t).square();
    let k = match opts.reduction_mode() {
        Reduction::Mean => 1.0 / mean.numel() as f64,
        _ => 1.0,
    };
    let w = upstream.to_kind(Kind::Double).abs() * d2.ones_like() * k;
    let per_element = w * (var.reciprocal() + d2 / var.square());
    channel_sum(&per_element) * log_scale.to_kind(Kind::Double).sigmoid() * 0.5
}

// ---------------------------------------------------------------------------------------
// Tolerances
//
// Every comparison allows `|actual - expected| <= rel * |expected| + mag_rel * magnitude + atol`
// where each term has a first-principles source:
//
// * Storage rounding (`Storage::round`): a result stored in a dtype is off by at most half
//   an ulp, i.e. the unit roundoff u: 2^-53 (f64), 2^-24 (f32), 2^-11 (f16: 11 significant
//   bits), 2^-8 (bf16: 8 significant bits). f16/bf16 inputs are exact in f64, so for them
//   this rounding of the output dominates.
// * Storage underflow (`Storage::atol`): below the smallest normal number the spacing is
//   fixed, so rounding is bounded in absolute terms by half the smallest subnormal:
//   2^-25 (f16), 2^-134 (bf16), 2^-150 (f32). For f64 a 1e-300 floor only keeps exact
//   zeros comparable.
// * Compute precision (`Compute`): f16/bf16/f32 are computed in f32, f64 in f64.
//   - `elem`: an elementwise chain of a handful (<= 5) of roundings, e.g.
//     `g * (m - t) * (1/var)`: <= 5 * 2^-24 = 3e-7 for f32; allowed 1e-6.
//   - `acc`: a sum. The CPU path accumulates each slot over at most 64 terms (FLUSH_CHUNKS)
//     in the working precision before flushing into f64, so the worst-case error relative
//     to the sum of |terms| is about (64 + 3) * u = 4e-6 for f32; allowed 1e-5. This is
//     what a plain running f32 sum over millions of elements would violate.
//   - f64: both the op and the (torch-computed) reference make errors of a few ulps times
//     log(n); 1e-12 (about 4500 ulps) leaves room for the reference's own sums.

/// Rounding bounds of a storage dtype.
#[derive(Debug, Clone, Copy)]
pub struct Storage {
    pub round: f64,
    pub atol: f64,
}

pub fn storage(kind: Kind) -> Storage {
    match kind {
        Kind::Double => Storage {
            round: 2f64.powi(-53),
            atol: 1e-300,
        },
        Kind::Float => Storage {
            round: 2f64.powi(-24),
            atol: 2f64.powi(-150),
        },
        Kind::Half => Storage {
            round: 2f64.powi(-11),
            atol: 2f64.powi(-25),
        },
        Kind::BFloat16 => Storage {
            round: 2f64.powi(-8),
            atol: 2f64.powi(-134),
        },
        other => panic!("no tolerance for {other:?}"),
    }
}

/// Error bounds of the precision a dtype is computed in.
#[derive(Debug, Clone, Copy)]
pub struct Compute {
    pub elem: f64,
    pub acc: f64,
}

pub fn compute(kind: Kind) -> Compute {
    match kind {
        Kind::Double => Compute {
            elem: 1e-12,
            acc: 1e-12,
        },
        Kind::Float | Kind::Half | Kind::BFloat16 => Compute {
            elem: 1e-6,
            acc: 1e-5,
        },
        other => panic!("no tolerance for {other:?}"),
    }
}

/// Asserts `|actual - expected| <= allowed` elementwise (and that `actual` is finite where
/// `expected` is), reporting the worst element.
pub fn assert_within(what: &str, actual: &Tensor, expected: &Tensor, allowed: &Tensor) {
    assert_eq!(actual.size(), expected.size(), "{what}: shape");
    let a = actual.to_kind(Kind::Double);
    let e = expected.to_kind(Kind::Double);
    assert!(
        bool::try_from(e.isfinite().all()).unwrap(),
        "{what}: the reference is not finite (test bug)"
    );
    assert!(
        bool::try_from(a.isfinite().all()).unwrap(),
        "{what}: non-finite values in the result"
    );
    let ratio = (&a - &e).abs() / allowed.to_kind(Kind::Double);
    let worst = ratio.argmax(None, false).int64_value(&[]);
    let r = ratio.flatten(0, -1).double_value(&[worst]);
    if r > 1.0 {
        let flat = |t: &Tensor| t.flatten(0, -1).double_value(&[worst]);
        panic!(
            "{what}: off by {r:.3}x the tolerance at flat index {worst}: got {:e}, expected {:e}, allowed |diff| {:e}",
            flat(&a),
            flat(&e),
            flat(&allowed.to_kind(Kind::Double).expand_as(&e)),
        );
    }
}

/// Largest |a - b| relative to `atol + rtol * |b|`: <= 1 means within tolerance.
pub fn tolerance_ratio(actual: &Tensor, expected: &Tensor, atol: f64, rtol: f64) -> f64 {
    let a = actual.to_kind(Kind::Double);
    let e = expected.to_kind(Kind::Double);
    let allowed = e.abs() * rtol + atol;
    ((&a - &e).abs() / allowed).max().double_value(&[])
}

pub fn assert_close(what: &str, actual: &Tensor, expected: &Tensor, atol: f64, rtol: f64) {
    let allowed = expected.to_kind(Kind::Double).abs() * rtol + atol;
    assert_within(what, actual, expected, &allowed);
}

// ---------------------------------------------------------------------------------------
// Inputs

/// How a test tensor lies in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mem {
    /// NCHW-contiguous.
    Contiguous,
    /// Channels-last, made as a tch user makes it: an NHWC tensor permuted back.
    ChannelsLast,
}

/// Dim order N, spatial..., C of a rank-`rank` tensor, and its inverse.
pub fn channels_last_perms(rank: usize) -> (Vec<i64>, Vec<i64>) {
    let mut order = vec![0i64];
    order.extend(2..rank as i64);
    order.push(1);
    let mut inverse = vec![0i64; rank];
    for (position, &d) in order.iter().enumerate() {
        inverse[d as usize] = position as i64;
    }
    (order, inverse)
}

/// `t` with channels-last memory: `t.permute(NHWC).contiguous().permute(back)`.
pub fn to_channels_last(t: &Tensor) -> Tensor {
    let (order, inverse) = channels_last_perms(t.dim());
    t.permute(&order[..]).contiguous().permute(&inverse[..])
}

/// A fresh random (standard normal, drawn in f64 then rounded) tensor of `shape`, `kind`, `mem`.
pub fn random(shape: &[i64], kind: Kind, mem: Mem) -> Tensor {
    match mem {
        Mem::Contiguous => Tensor::randn(shape, cpu(Kind::Double)).to_kind(kind),
        Mem::ChannelsLast => {
            let (order, inverse) = channels_last_perms(shape.len());
            let nhwc: Vec<i64> = order.iter().map(|&d| shape[d as usize]).collect();
            Tensor::randn(&nhwc[..], cpu(Kind::Double))
                .to_kind(kind)
                .permute(&inverse[..])
        }
    }
}

/// Random log_scale values, standard normal (variances about 0.1 to 3).
pub fn random_log_scale(channels: i64, kind: Kind) -> Tensor {
    Tensor::randn([channels], cpu(Kind::Double)).to_kind(kind)
}

/// A random upstream gradient for `opts`: a scalar of `kind` for Mean/Sum (in [0.5, 4.5),
/// sign random), a random tensor of `shape` for None.
pub fn random_upstream(shape: &[i64], kind: Kind, opts: &VidOptions) -> Tensor {
    match opts.reduction_mode() {
        Reduction::None => random(shape, kind, Mem::Contiguous),
        _ => {
            let r = Vec::<f64>::try_from(Tensor::rand([2], cpu(Kind::Double))).unwrap();
            let sign = if r[1] < 0.5 { -1.0 } else { 1.0 };
            Tensor::from(sign * (0.5 + 4.0 * r[0])).to_kind(kind)
        }
    }
}

/// All six option combinations.
pub fn all_options() -> Vec<VidOptions> {
    let mut v = Vec::new();
    for reduction in [Reduction::Mean, Reduction::Sum, Reduction::None] {
        for full in [false, true] {
            v.push(VidOptions::default().reduction(reduction).full(full));
        }
    }
    v
}

// ---------------------------------------------------------------------------------------
// The checker

/// The op's loss and gradients from one check.
pub struct Checked {
    pub loss: Tensor,
    /// Gradients of `sum(upstream * loss)` wrt mean, target, log_scale (None where that
    /// tensor does not require grad).
    pub grads: [Option<Tensor>; 3],
}

/// Runs the op on `mean`, `target`, `log_scale` (any views; those that require grad get
/// their gradient checked) with upstream gradient `upstream`, and checks the loss's dtype,
/// shape and value and every gradient's dtype, shape and value against the f64 reference.
pub fn check_op(
    what: &str,
    mean: &Tensor,
    target: &Tensor,
    log_scale: &Tensor,
    opts: &VidOptions,
    upstream: &Tensor,
) -> Checked {
    check_op_with(&f_vid_loss, what, mean, target, log_scale, opts, upstream)
}

/// The op under test: `f_vid_loss`, or the same op run through another launcher.
pub type LossFn =
    dyn Fn(&Tensor, &Tensor, &Tensor, &VidOptions) -> Result<Tensor, vidfuse::VidError>;

/// [`check_op`] for any implementation of the op.
pub fn check_op_with(
    op: &LossFn,
    what: &str,
    mean: &Tensor,
    target: &Tensor,
    log_scale: &Tensor,
    opts: &VidOptions,
    upstream: &Tensor,
) -> Checked {
    let kind = mean.kind();
    let (st, cp) = (storage(kind), compute(kind));
    let ls = storage(log_scale.kind());

    let loss =
        op(mean, target, log_scale, opts).unwrap_or_else(|e| panic!("{what}: the op failed: {e}"));
    assert_eq!(loss.kind(), kind, "{what}: loss dtype");
    let expected_shape = match opts.reduction_mode() {
        Reduction::None => mean.size(),
        _ => vec![],
    };
    assert_eq!(loss.size(), expected_shape, "{what}: loss shape");

    let expected = reference_loss(mean, target, log_scale, opts);
    let magnitude = loss_magnitude(mean, target, log_scale, opts);
    // The value: an accumulation for Mean/Sum, an elementwise chain for None; then stored.
    let compute_rel = match opts.reduction_mode() {
        Reduction::None => cp.elem,
        _ => cp.acc,
    };
    let allowed = expected.abs() * st.round + &magnitude * compute_rel + st.atol;
    assert_within(&format!("{what}: loss"), &loss, &expected, &allowed);

    let inputs = [mean, target, log_scale];
    let wanted: Vec<usize> = (0..3).filter(|&i| inputs[i].requires_grad()).collect();
    let mut grads: [Option<Tensor>; 3] = [None, None, None];
    if wanted.is_empty() {
        assert!(!loss.requires_grad(), "{what}: loss requires grad");
        return Checked { loss, grads };
    }
    assert!(loss.requires_grad(), "{what}: loss does not require grad");
    let root = (&loss * upstream).sum(kind);
    let got = Tensor::f_run_backward(
        &[root],
        &wanted.iter().map(|&i| inputs[i]).collect::<Vec<_>>(),
        false,
        false,
    )
    .unwrap_or_else(|e| panic!("{what}: backward failed: {e}"));
    for (g, &i) in got.into_iter().zip(&wanted) {
        grads[i] = Some(g);
    }

    let (gm, gt, ga) = reference_grads(mean, target, log_scale, opts, upstream);
    for (i, (name, reference)) in [("mean", &gm), ("target", &gt)].into_iter().enumerate() {
        if let Some(g) = &grads[i] {
            assert_eq!(g.kind(), kind, "{what}: d/d{name} dtype");
            let allowed = reference.abs() * (st.round + cp.elem) + st.atol;
            assert_within(&format!("{what}: d/d{name}"), g, reference, &allowed);
        }
    }
    if let Some(g) = &grads[2] {
        assert_eq!(g.kind(), log_scale.kind(), "{what}: d/dlog_scale dtype");
        let magnitude = log_scale_grad_magnitude(mean, target, log_scale, opts, upstream);
        let allowed = ga.abs() * ls.round + magnitude * cp.acc + ls.atol;
        assert_within(&format!("{what}: d/dlog_scale"), g, &ga, &allowed);
    }
    Checked { loss, grads }
}

/// Fresh leaf inputs of `shape` (mean and target in `kind` and `mem`, log_scale in
/// `scale_kind`), all requiring grad, and a matching random upstream gradient.
pub fn leaf_inputs(
    shape: &[i64],
    kind: Kind,
    scale_kind: Kind,
    mem: Mem,
    opts: &VidOptions,
) -> (Tensor, Tensor, Tensor, Tensor) {
    let mean = random(shape, kind, mem).set_requires_grad(true);
    let target = random(shape, kind, mem).set_requires_grad(true);
    let log_scale = random_log_scale(shape[1], scale_kind).set_requires_grad(true);
    let upstream = random_upstream(shape, kind, opts);
    (mean, target, log_scale, upstream)
}

/// The kernels the CUDA launch plan may ask for.
pub fn expected_kernels() -> Vec<String> {
    vidfuse::cuda::kernel_names()
}

/// Runs `op` forward and backward twice on the same leaf inputs and asserts that the loss
/// and every gradient are bitwise identical.
pub fn assert_deterministic(
    op: &LossFn,
    what: &str,
    inputs: [&Tensor; 3],
    opts: &VidOptions,
    upstream: &Tensor,
) {
    let run = || {
        let loss = op(inputs[0], inputs[1], inputs[2], opts).unwrap();
        let root = (&loss * upstream).sum(loss.kind());
        let grads = Tensor::run_backward(&[root], &inputs, false, false);
        (loss, grads)
    };
    let (l1, g1) = run();
    let (l2, g2) = run();
    assert!(l1.equal(&l2), "{what}: loss differs between runs");
    for (name, (a, b)) in ["mean", "target", "log_scale"]
        .iter()
        .zip(g1.iter().zip(&g2))
    {
        assert!(a.equal(b), "{what}: d/d{name} differs between runs");
    }
}
