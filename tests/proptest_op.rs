//! Property-based tests of the op against the f64 reference: random ranks (2-5), sizes (0-9
//! and a few large), memory layouts and views (channels-last, permuted strides, step slices,
//! broadcast dims, lazily negated views), dtypes, options and values (with inf/NaN and
//! extreme `log_scale`). Each case gives the reference's value and gradients (rounded to the
//! output dtype, within the suite's first-principles tolerances, inf/NaN at the same places)
//! or the same class of error as the reference rules say. Some cases swap an input's data
//! with `set_data` between forward and backward (a dtype cast, a re-layout, a one-element
//! tensor: what `VarStore::double()` and friends do, unseen by the version counter); the
//! backward must then give the gradients of the forward-time values. Some `Reduction::None`
//! cases take `loss.sum() * g` as their root, so backward gets a stride-0 upstream gradient.
//!
//! Seeded (a fixed seed per run, `PROPTEST_RNG_SEED` overrides it), a fixed number of cases
//! (`PROPTEST_CASES` overrides it), shrinking to a minimal failing case on failure.

mod common;

use common::{compute, cpu, loss_magnitude, reference_grads, reference_loss, storage};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};
use tch::{Kind, Tensor};
use vidfuse::{f_vid_loss, Reduction, VidError, VidOptions};

const KINDS: [Kind; 4] = [Kind::Float, Kind::Double, Kind::Half, Kind::BFloat16];

/// How a test tensor lies in memory (its values are the same whatever the view).
#[derive(Debug, Clone, Copy)]
enum View {
    Contiguous,
    ChannelsLast,
    /// Dims laid out in a random order (seeded).
    Permuted,
    /// Every other element of a twice-as-long dim.
    Strided(usize),
    /// A size-1 dim broadcast (stride 0); the values repeat along it.
    Expanded(usize),
    /// `_neg_view` of the negated values.
    Negated,
}

/// Special values planted in `mean` or `target`.
#[derive(Debug, Clone, Copy)]
enum Special {
    PosInf,
    NegInf,
    NaN,
}

/// What `set_data` puts in place of an input between forward and backward.
#[derive(Debug, Clone, Copy)]
enum Swap {
    /// The same values in another dtype (index into KINDS, offset from the input's).
    Cast(usize),
    /// The same values, channels-last (NCHW shape, permuted strides), times 10.
    Relayout,
    /// A tensor of one element.
    Scalar,
}

/// A deliberately bad argument, and the argument the error must name.
#[derive(Debug, Clone, Copy)]
enum Invalid {
    ScaleLength,
    Eps(f64),
    TargetDtype,
}

#[derive(Debug, Clone)]
struct Case {
    shape: Vec<i64>,
    kind: usize,
    scale_in_f32: bool,
    views: [View; 2],
    reduction: Reduction,
    full: bool,
    eps: f64,
    value_scale: f64,
    /// None: standard normal log_scale; Some(v): every channel at v (extremes).
    log_scale_at: Option<f64>,
    specials: Vec<(bool, u32, Special)>,
    target_grad: bool,
    scale_grad: bool,
    invalid: Option<Invalid>,
    /// `set_data` on input 0 (mean), 1 (target) or 2 (log_scale) after the forward.
    swap: Option<(usize, Swap)>,
    /// None only: the root is `loss.sum() * g` (a broadcast upstream gradient).
    broadcast_upstream: bool,
    seed: u64,
}

// ---------------------------------------------------------------------------------------
// Strategies

fn shape() -> impl Strategy<Value = Vec<i64>> {
    (
        prop::collection::vec(prop_oneof![9 => 1i64..=9, 1 => Just(0i64)], 2..=5),
        prop::option::weighted(0.15, (any::<prop::sample::Index>(), 30i64..=200)),
    )
        .prop_map(|(mut shape, large)| {
            if let Some((dim, size)) = large {
                let d = dim.index(shape.len());
                let others: i64 = shape
                    .iter()
                    .enumerate()
                    .filter(|&(i, _)| i != d)
                    .map(|(_, &s)| s)
                    .product();
                // Keep a case under ~100k elements.
                shape[d] = size.min((100_000 / others.max(1)).max(1));
            }
            shape
        })
}

fn view() -> impl Strategy<Value = View> {
    prop_oneof![
        3 => Just(View::Contiguous),
        2 => Just(View::ChannelsLast),
        2 => Just(View::Permuted),
        1 => (0usize..5).prop_map(View::Strided),
        1 => (0usize..5).prop_map(View::Expanded),
        1 => Just(View::Negated),
    ]
}

fn special() -> impl Strategy<Value = (bool, u32, Special)> {
    (
        any::<bool>(),
        any::<u32>(),
        prop_oneof![
            Just(Special::PosInf),
            Just(Special::NegInf),
            Just(Special::NaN)
        ],
    )
}

fn case() -> impl Strategy<Value = Case> {
    (
        (shape(), 0usize..4, any::<bool>(), [view(), view()]),
        (
            prop_oneof![
                Just(Reduction::Mean),
                Just(Reduction::Sum),
                Just(Reduction::None)
            ],
            any::<bool>(),
            prop_oneof![Just(1e-5), Just(1e-8), Just(1e-3), Just(1.0)],
            prop_oneof![3 => Just(1.0), 1 => Just(1e3), 1 => Just(1e-3)],
            prop::option::weighted(
                0.25,
                prop_oneof![Just(-1000.0), Just(-80.0), Just(80.0), Just(1000.0)],
            ),
        ),
        (
            prop::collection::vec(special(), 0..=2).prop_map(|v| {
                // Most cases have no special value.
                if v.len() == 2 {
                    v
                } else {
                    Vec::new()
                }
            }),
            any::<bool>(),
            any::<bool>(),
            prop::option::weighted(
                0.1,
                prop_oneof![
                    Just(Invalid::ScaleLength),
                    Just(Invalid::TargetDtype),
                    prop_oneof![Just(0.0), Just(-1.0), Just(f64::NAN), Just(f64::INFINITY)]
                        .prop_map(Invalid::Eps),
                ],
            ),
            any::<u64>(),
        ),
        (
            prop::option::weighted(
                0.2,
                (
                    0usize..3,
                    prop_oneof![
                        (1usize..4).prop_map(Swap::Cast),
                        Just(Swap::Relayout),
                        Just(Swap::Scalar)
                    ],
                ),
            ),
            prop::bool::weighted(0.3),
        ),
    )
        .prop_map(
            |(
                (shape, kind, scale_in_f32, views),
                (reduction, full, eps, value_scale, log_scale_at),
                (specials, target_grad, scale_grad, invalid, seed),
                (swap, broadcast_upstream),
            )| Case {
                shape,
                kind,
                scale_in_f32,
                views,
                reduction,
                full,
                eps,
                value_scale,
                log_scale_at,
                specials,
                target_grad,
                scale_grad,
                invalid,
                swap,
                broadcast_upstream,
                seed,
            },
        )
}

// ---------------------------------------------------------------------------------------
// Building the tensors

/// splitmix64: values from the case's seed, so a case is reproducible and shrinkable.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn uniform(&mut self) -> f64 {
        ((self.next() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f64 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
}

fn normal_values(rng: &mut Rng, shape: &[i64], scale: f64) -> Tensor {
    let n: i64 = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.normal() * scale).collect();
    Tensor::from_slice(&v).view(shape)
}

/// A tensor with the logical values `values` (f64, contiguous), in `kind`, lying in memory
/// as `view` says; a detached leaf.
fn lay_out(values: &Tensor, kind: Kind, view: View, rng: &mut Rng) -> Tensor {
    let shape = values.size();
    let rank = shape.len();
    let t = values.to_kind(kind);
    let laid = match view {
        View::Contiguous => t,
        View::ChannelsLast => common::to_channels_last(&t),
        View::Permuted => {
            let mut order: Vec<i64> = (0..rank as i64).collect();
            for i in (1..rank).rev() {
                order.swap(i, (rng.next() % (i as u64 + 1)) as usize);
            }
            let mut inverse = vec![0i64; rank];
            for (position, &d) in order.iter().enumerate() {
                inverse[d as usize] = position as i64;
            }
            t.permute(&order[..]).contiguous().permute(&inverse[..])
        }
        View::Strided(d) => {
            let d = d % rank;
            // Interleave with junk values that must never be read.
            let junk = Tensor::full(&shape[..], 7.0e3, cpu(kind));
            Tensor::stack(&[&t, &junk], d as i64 + 1)
                .flatten(d as i64, d as i64 + 1)
                .slice(d as i64, 0, None, 2)
        }
        View::Expanded(d) => {
            let d = d % rank;
            // The values along `d` repeat: take the first slice and broadcast it.
            t.narrow(d as i64, 0, 1.min(shape[d]))
                .expand(&shape[..], false)
        }
        View::Negated => (-&t).internal_neg_view(),
    };
    laid.detach()
}

/// The logical values of a laid-out tensor (Expanded repeats the first slice).
/// `t`'s values, in f64, in a tensor of their own (never `t` itself, which a swap changes).
fn logical(t: &Tensor) -> Tensor {
    t.resolve_neg().to_kind(Kind::Double).contiguous().copy()
}

struct Inputs {
    mean: Tensor,
    target: Tensor,
    log_scale: Tensor,
    upstream: Tensor,
    opts: VidOptions,
}

fn build(case: &Case) -> Inputs {
    let kind = KINDS[case.kind];
    let mut rng = Rng(case.seed);
    let shape = &case.shape[..];
    let values = [
        normal_values(&mut rng, shape, case.value_scale),
        normal_values(&mut rng, shape, case.value_scale),
    ];
    let numel: i64 = shape.iter().product();
    if numel > 0 {
        for &(in_target, at, special) in &case.specials {
            let v = match special {
                Special::PosInf => f64::INFINITY,
                Special::NegInf => f64::NEG_INFINITY,
                Special::NaN => f64::NAN,
            };
            let flat = values[in_target as usize].view([-1]);
            let _ = flat.get(at as i64 % numel).fill_(v);
        }
    }
    let [m, t] = values;
    let mut mean = lay_out(&m, kind, case.views[0], &mut rng).set_requires_grad(true);
    let mut target = lay_out(&t, kind, case.views[1], &mut rng);
    if case.target_grad {
        target = target.set_requires_grad(true);
    }
    let channels = shape[1].max(0);
    let scale_kind = if case.scale_in_f32 { Kind::Float } else { kind };
    let scale_len = match case.invalid {
        Some(Invalid::ScaleLength) => channels + 1,
        _ => channels,
    };
    let alpha: Vec<f64> = (0..scale_len)
        .map(|_| case.log_scale_at.unwrap_or_else(|| rng.normal()))
        .collect();
    let mut log_scale = Tensor::from_slice(&alpha).to_kind(scale_kind);
    if case.scale_grad {
        log_scale = log_scale.set_requires_grad(true);
    }
    if let Some(Invalid::TargetDtype) = case.invalid {
        let other = KINDS[(case.kind + 1) % KINDS.len()];
        target = target.detach().to_kind(other);
        mean = mean.set_requires_grad(true);
    }
    let eps = match case.invalid {
        Some(Invalid::Eps(e)) => e,
        _ => case.eps,
    };
    let opts = VidOptions::default()
        .reduction(case.reduction)
        .full(case.full)
        .eps(eps);
    let upstream = match case.reduction {
        Reduction::None if case.broadcast_upstream => {
            Tensor::from(0.5 + 4.0 * rng.uniform()).to_kind(kind)
        }
        Reduction::None => normal_values(&mut rng, shape, 1.0).to_kind(kind),
        _ => {
            let sign = if rng.uniform() < 0.5 { -1.0 } else { 1.0 };
            Tensor::from(sign * (0.5 + 4.0 * rng.uniform())).to_kind(kind)
        }
    };
    Inputs {
        mean,
        target,
        log_scale,
        upstream,
        opts,
    }
}

// ---------------------------------------------------------------------------------------
// The property

/// The argument the op must name, or None when the case is valid.
fn expected_error(case: &Case) -> Option<&'static str> {
    if case.invalid.is_none() && !case.shape.contains(&0) {
        return None;
    }
    // The op's order of checks: eps, dtypes, shapes, emptiness, log_scale length.
    Some(match case.invalid {
        Some(Invalid::Eps(_)) => "eps",
        Some(Invalid::TargetDtype) => "target",
        _ if case.shape.contains(&0) => "mean",
        Some(Invalid::ScaleLength) => "log_scale",
        None => unreachable!(),
    })
}

/// `actual` matches the f64 `expected` rounded to `actual`'s dtype: inf and NaN at the same
/// places, finite values within `allowed` (computed from the unrounded reference).
fn check_matches(
    what: &str,
    actual: &Tensor,
    expected: &Tensor,
    allowed: &Tensor,
) -> Result<(), TestCaseError> {
    prop_assert_eq!(actual.size(), expected.size(), "{}: shape", what);
    let a = actual.to_kind(Kind::Double);
    let rounded = expected.to_kind(actual.kind()).to_kind(Kind::Double);
    let same_class = a
        .isnan()
        .eq_tensor(&rounded.isnan())
        .all()
        .logical_and(&a.isposinf().eq_tensor(&rounded.isposinf()).all())
        .logical_and(&a.isneginf().eq_tensor(&rounded.isneginf()).all());
    prop_assert!(
        bool::try_from(&same_class).unwrap(),
        "{}: inf/NaN at other places: got {}, expected {}",
        what,
        a.flatten(0, -1).narrow(0, 0, a.numel().min(8) as i64),
        rounded.flatten(0, -1).narrow(0, 0, a.numel().min(8) as i64)
    );
    let both_finite = a.isfinite().logical_and(&rounded.isfinite());
    if !bool::try_from(both_finite.any()).unwrap() {
        return Ok(());
    }
    let diff = (&a - expected).abs().masked_select(&both_finite);
    let allowed = allowed
        .to_kind(Kind::Double)
        .expand_as(expected)
        .masked_select(&both_finite);
    let ratio = (diff / allowed).max().double_value(&[]);
    prop_assert!(ratio <= 1.0, "{}: off by {:.3}x the tolerance", what, ratio);
    Ok(())
}

fn check_case(op: &common::LossFn, case: &Case) -> Result<(), TestCaseError> {
    let x = build(case);
    let result = op(&x.mean, &x.target, &x.log_scale, &x.opts);
    if let Some(arg) = expected_error(case) {
        match result {
            Err(VidError::InvalidArgument { arg: got, .. }) => {
                prop_assert_eq!(got, arg);
                return Ok(());
            }
            Err(other) => return Err(TestCaseError::fail(format!("wrong error: {other}"))),
            Ok(_) => return Err(TestCaseError::fail(format!("accepted; `{arg}` is bad"))),
        }
    }
    let loss = result.map_err(|e| TestCaseError::fail(format!("the op failed: {e}")))?;
    let kind = KINDS[case.kind];
    prop_assert_eq!(loss.kind(), kind);

    let (mean, target) = (logical(&x.mean), logical(&x.target));
    let (st, cp) = (storage(kind), compute(kind));
    let expected = reference_loss(&mean, &target, &x.log_scale, &x.opts);
    let compute_rel = match case.reduction {
        Reduction::None => cp.elem,
        _ => cp.acc,
    };
    let magnitude = loss_magnitude(&mean, &target, &x.log_scale, &x.opts);
    let allowed = expected.abs() * st.round + magnitude * compute_rel + st.atol;
    check_matches("loss", &loss, &expected, &allowed)?;

    let broadcast = case.reduction == Reduction::None && case.broadcast_upstream;
    let root = if broadcast {
        // d root / d loss = g expanded with stride 0.
        loss.sum(kind) * &x.upstream
    } else {
        (&loss * &x.upstream).sum(kind)
    };
    let mut inputs = [
        x.mean.shallow_clone(),
        x.target.shallow_clone(),
        x.log_scale.shallow_clone(),
    ];
    let wanted: Vec<usize> = (0..3).filter(|&i| inputs[i].requires_grad()).collect();
    if let Some((i, swap)) = case.swap {
        let replacement = swapped(&inputs[i], swap);
        tch::no_grad(|| inputs[i].set_data(&replacement));
    }
    let got = Tensor::f_run_backward(
        &[root],
        &wanted.iter().map(|&i| &inputs[i]).collect::<Vec<_>>(),
        false,
        false,
    )
    .map_err(|e| TestCaseError::fail(format!("backward failed: {e}")))?;
    let upstream = if broadcast {
        x.upstream.expand(mean.size(), false)
    } else {
        x.upstream.shallow_clone()
    };
    // The forward-time values (`mean`, `target` were read before any swap; `log_scale` is
    // rebuilt from the case, as swaps never change the case's own copy).
    let log_scale = build(case).log_scale;
    let reference = reference_grads(&mean, &target, &log_scale, &x.opts, &upstream);
    let reference = [reference.0, reference.1, reference.2];
    let ls = storage(x.log_scale.kind());
    for (g, &i) in got.iter().zip(&wanted) {
        if !g.defined() {
            // A new dtype resets a leaf's gradient accumulator: autograd routes no gradient
            // to the swapped tensor, as with plain ops. Anything else must have one.
            prop_assert!(
                matches!(case.swap, Some((s, Swap::Cast(_))) if s == i),
                "no gradient of input {}",
                i
            );
            continue;
        }
        let e = &reference[i];
        let allowed = if i < 2 {
            e.abs() * (st.round + cp.elem) + st.atol
        } else {
            let magnitude =
                common::log_scale_grad_magnitude(&mean, &target, &log_scale, &x.opts, &upstream);
            e.abs() * ls.round + magnitude * cp.acc + ls.atol
        };
        // A broadcast (expanded) input's gradient is per element of the view, as for any op.
        check_matches(
            &format!("d/d{}", ["mean", "target", "log_scale"][i]),
            g,
            e,
            &allowed,
        )?;
    }
    Ok(())
}

/// What `swap` puts in place of `t`'s data.
fn swapped(t: &Tensor, swap: Swap) -> Tensor {
    let t = t.detach();
    match swap {
        Swap::Cast(offset) => {
            let at = KINDS.iter().position(|&k| k == t.kind()).unwrap_or(0);
            t.to_kind(KINDS[(at + offset) % KINDS.len()])
        }
        Swap::Relayout if t.dim() > 2 => common::to_channels_last(&(t * 10.0)),
        Swap::Relayout => (t * 10.0).transpose(0, -1).contiguous().transpose(0, -1),
        Swap::Scalar => Tensor::ones([1], (t.kind(), t.device())),
    }
}

fn config(cases: u32) -> Config {
    Config {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(cases),
        rng_seed: match std::env::var("PROPTEST_RNG_SEED") {
            Ok(v) => RngSeed::Fixed(v.parse().expect("PROPTEST_RNG_SEED: a number")),
            Err(_) => RngSeed::Fixed(0x5eed_0d1d),
        },
        failure_persistence: None,
        ..Config::default()
    }
}

/// The CUDA kernels' launch plan on the host emulation of kernels/*.cu; half the cases on a
/// 1-SM device, whose 8 blocks loop over the chunks of larger problems.
fn emulated_cuda(m: &Tensor, t: &Tensor, a: &Tensor, o: &VidOptions) -> Result<Tensor, VidError> {
    let sms = (m.numel() % 2 == 1).then_some(1);
    let launcher =
        std::sync::Arc::new(common::emu_launcher::EmuLauncher::with_multiprocessors(sms));
    common::emu_launcher::emulated(&launcher)(m, t, a, o)
}

proptest! {
    #![proptest_config(config(384))]

    #[test]
    fn cpu_op_matches_the_reference_or_refuses_alike(case in case()) {
        check_case(&f_vid_loss, &case)?;
    }
}

proptest! {
    #![proptest_config(config(96))]

    /// The same property for the CUDA kernels (`cargo test emu` selects it).
    #[test]
    fn emu_cuda_op_matches_the_reference_or_refuses_alike(case in case()) {
        check_case(&emulated_cuda, &case)?;
    }
}
