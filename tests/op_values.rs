//! The op's value and its three gradients against the independent f64 reference
//! (tests/common): random shapes, every reduction, `full`, every dtype, both layouts,
//! non-contiguous views, extreme log_scale, shapes big enough to split units, f32
//! accuracy at millions of elements, and run-to-run determinism.

mod common;

use common::*;
use tch::{Kind, Tensor};
use vidfuse::{f_vid_loss, Reduction, VidOptions};

/// Small shapes: odd sizes, C = 1, `[N, C]`, 3-D and 5-D, sizes that are not multiples of
/// the 256-element chunk, channels-last with C > 256, and all-ones spatial extents.
const SHAPES: &[&[i64]] = &[
    &[5, 1],
    &[7, 3],
    &[1, 1],
    &[4, 13],
    &[3, 300],
    &[3, 1, 17],
    &[1, 2, 257],
    &[2, 3, 511],
    &[2, 3, 5, 7],
    &[3, 5, 1, 1],
    &[3, 7, 9, 11],
    &[2, 258, 3, 1],
    &[2, 4, 3, 5, 6],
    &[1, 3, 1, 2, 1],
];

/// Every small shape x layout x reduction x `full`, for one dtype; log_scale dtypes rotate
/// through `scale_kinds`. Each case has its own seed, printed on failure.
fn sweep(kind: Kind, scale_kinds: &[Kind], seed_base: i64) {
    let mut case = 0;
    for shape in SHAPES {
        for mem in [Mem::Contiguous, Mem::ChannelsLast] {
            if mem == Mem::ChannelsLast && shape.len() < 3 {
                continue;
            }
            for opts in all_options() {
                let scale_kind = scale_kinds[case % scale_kinds.len()];
                let seed = seed_base + case as i64;
                tch::manual_seed(seed);
                let (mean, target, log_scale, upstream) =
                    leaf_inputs(shape, kind, scale_kind, mem, &opts);
                let what = format!(
                    "{kind:?} {shape:?} {mem:?} {opts:?} log_scale {scale_kind:?} (seed {seed})"
                );
                let checked = check_op(&what, &mean, &target, &log_scale, &opts, &upstream);
                assert!(checked.grads.iter().all(Option::is_some), "{what}: grads");
                case += 1;
            }
        }
    }
}

#[test]
fn sweep_f32() {
    sweep(Kind::Float, &[Kind::Float], 1_000);
}

#[test]
fn sweep_f64() {
    // log_scale f32 with f64 inputs is allowed ("f32 or the inputs' dtype").
    sweep(Kind::Double, &[Kind::Double, Kind::Float], 2_000);
}

#[test]
fn sweep_f16() {
    sweep(Kind::Half, &[Kind::Float, Kind::Half], 3_000);
}

#[test]
fn sweep_bf16() {
    sweep(Kind::BFloat16, &[Kind::Float, Kind::BFloat16], 4_000);
}

/// Shapes that split into several units and run on several threads (> 65536 elements):
/// one row longer than a unit (32768), channels-first rows split in three, channels-last
/// with C > 256 (one unit, and several units).
const BIG: &[(&[i64], Mem)] = &[
    (&[1, 1, 70001], Mem::Contiguous),
    (&[2, 3, 40000], Mem::Contiguous),
    (&[3, 300, 5, 7], Mem::ChannelsLast),
    (&[8, 300, 9, 7], Mem::ChannelsLast),
    (&[4, 17, 33, 37], Mem::Contiguous),
    (&[4, 17, 33, 37], Mem::ChannelsLast),
    (&[70001, 3], Mem::Contiguous),
];

fn big_shapes(kind: Kind, scale_kind: Kind, reductions: &[Reduction], seed_base: i64) {
    for (i, &(shape, mem)) in BIG.iter().enumerate() {
        for (j, &reduction) in reductions.iter().enumerate() {
            let opts = VidOptions::default()
                .reduction(reduction)
                .full((i + j) % 2 == 1);
            let seed = seed_base + (i * 10 + j) as i64;
            tch::manual_seed(seed);
            let (mean, target, log_scale, upstream) =
                leaf_inputs(shape, kind, scale_kind, mem, &opts);
            let what = format!("{kind:?} {shape:?} {mem:?} {opts:?} (seed {seed})");
            check_op(&what, &mean, &target, &log_scale, &opts, &upstream);
        }
    }
}

#[test]
fn big_shapes_f32() {
    big_shapes(
        Kind::Float,
        Kind::Float,
        &[Reduction::Mean, Reduction::Sum, Reduction::None],
        5_000,
    );
}

#[test]
fn big_shapes_f16_bf16() {
    // f16 Sum over 10^5 elements overflows f16 (max 65504) by design: Mean and None only.
    big_shapes(
        Kind::Half,
        Kind::Half,
        &[Reduction::Mean, Reduction::None],
        6_000,
    );
    big_shapes(Kind::BFloat16, Kind::Float, &[Reduction::Sum], 7_000);
}

/// Non-contiguous inputs: stepped slices, transposes, expanded tensors, storage offsets,
/// mixed layouts, a strided or expanded log_scale. Gradients are taken wrt the views.
fn views(kind: Kind, seed: i64) {
    tch::manual_seed(seed);
    let leaf = |shape: &[i64], mem: Mem| random(shape, kind, mem).set_requires_grad(true);
    type Case = (&'static str, Tensor, Tensor, Tensor);
    let cases: Vec<Case> = vec![
        (
            "stepped slices",
            leaf(&[4, 6, 10, 9], Mem::Contiguous)
                .slice(2, 1, None, 3)
                .slice(0, 0, None, 2),
            leaf(&[2, 6, 7, 9], Mem::Contiguous).slice(2, 2, 5, 1),
            leaf(&[12], Mem::Contiguous)
                .slice(0, 1, None, 2)
                .to_kind(Kind::Float),
        ),
        (
            "transposed spatial dims",
            leaf(&[3, 4, 6, 5], Mem::Contiguous).transpose(2, 3),
            leaf(&[3, 4, 5, 6], Mem::Contiguous),
            leaf(&[4], Mem::Contiguous),
        ),
        (
            "transposed [N, C]",
            leaf(&[5, 7], Mem::Contiguous).transpose(0, 1),
            leaf(&[7, 5], Mem::Contiguous),
            leaf(&[5], Mem::Contiguous),
        ),
        (
            "transposed N and C",
            leaf(&[4, 3, 5], Mem::Contiguous).transpose(0, 1),
            leaf(&[3, 4, 5], Mem::ChannelsLast),
            leaf(&[4], Mem::Contiguous),
        ),
        (
            "expanded mean and log_scale",
            leaf(&[1, 5, 1, 7], Mem::Contiguous).expand([3, 5, 4, 7], false),
            leaf(&[3, 5, 4, 7], Mem::Contiguous),
            leaf(&[1], Mem::Contiguous).expand([5], false),
        ),
        (
            "expanded target",
            leaf(&[3, 5, 4, 7], Mem::ChannelsLast),
            leaf(&[5, 1, 1], Mem::Contiguous).expand([3, 5, 4, 7], false),
            leaf(&[5], Mem::Contiguous),
        ),
        (
            "storage offset, NCHW",
            leaf(&[5, 4, 6], Mem::Contiguous).narrow(0, 1, 3),
            leaf(&[3, 4, 8], Mem::Contiguous).narrow(2, 2, 6),
            leaf(&[4], Mem::Contiguous),
        ),
        (
            "storage offset, channels-last",
            leaf(&[4, 6, 3, 5], Mem::ChannelsLast).narrow(0, 1, 2),
            leaf(&[2, 6, 3, 5], Mem::ChannelsLast),
            leaf(&[6], Mem::Contiguous),
        ),
        (
            "channels-last mean, NCHW target",
            leaf(&[2, 5, 3, 2, 3], Mem::ChannelsLast),
            leaf(&[2, 5, 3, 2, 3], Mem::Contiguous),
            leaf(&[5], Mem::Contiguous),
        ),
        (
            "NCHW mean, channels-last target",
            leaf(&[2, 300, 3, 2], Mem::Contiguous),
            leaf(&[2, 300, 3, 2], Mem::ChannelsLast),
            leaf(&[300], Mem::Contiguous),
        ),
        (
            "channels-last with C sliced",
            leaf(&[2, 8, 3, 4], Mem::ChannelsLast).slice(1, 1, 7, 2),
            leaf(&[2, 3, 3, 4], Mem::ChannelsLast),
            leaf(&[3], Mem::Contiguous),
        ),
    ];
    for (i, (name, mean, target, log_scale)) in cases.into_iter().enumerate() {
        for (j, opts) in all_options().into_iter().enumerate() {
            tch::manual_seed(seed + 100 * i as i64 + j as i64);
            let upstream = random_upstream(&mean.size(), kind, &opts);
            let what = format!("{kind:?} {name} {:?} {opts:?}", mean.size());
            check_op(&what, &mean, &target, &log_scale, &opts, &upstream);
        }
    }
}

#[test]
fn views_f32() {
    views(Kind::Float, 8_000);
}

#[test]
fn views_f64() {
    views(Kind::Double, 8_500);
}

#[test]
fn views_f16() {
    views(Kind::Half, 9_000);
}

#[test]
fn views_bf16() {
    views(Kind::BFloat16, 9_500);
}

/// log_scale at +80 (variance 80 + eps) and -80 (variance eps + e^-80: the eps floor;
/// sigmoid ~ 1.8e-35), plus +-1000, where a naive softplus `ln(1 + e^x)` or sigmoid
/// `e^x / (1 + e^x)` overflows even in f64: values and gradients finite and matching.
#[test]
fn extreme_log_scale() {
    let alpha = [80.0, -80.0, 0.0, 80.0, -80.0, 3.0, 1000.0, -1000.0];
    let mut case = 0;
    for (kind, scale_kind) in [
        (Kind::Float, Kind::Float),
        (Kind::Double, Kind::Double),
        (Kind::Half, Kind::Half),
        (Kind::Half, Kind::Float),
        (Kind::BFloat16, Kind::BFloat16),
        (Kind::BFloat16, Kind::Float),
    ] {
        for mem in [Mem::Contiguous, Mem::ChannelsLast] {
            for opts in all_options() {
                case += 1;
                tch::manual_seed(10_000 + case);
                let shape = [3, 8, 5, 4];
                let mean = random(&shape, kind, mem).set_requires_grad(true);
                // Close to `mean`, so that d^2 / eps stays inside f16's range.
                let noise = random(&shape, Kind::Double, mem) * 0.01;
                let target = (mean.detach().to_kind(Kind::Double) + noise)
                    .to_kind(kind)
                    .set_requires_grad(true);
                let log_scale = Tensor::from_slice(&alpha)
                    .to_kind(scale_kind)
                    .set_requires_grad(true);
                let upstream = random_upstream(&shape, kind, &opts);
                let what = format!("extreme log_scale {kind:?}/{scale_kind:?} {mem:?} {opts:?}");
                let checked = check_op(&what, &mean, &target, &log_scale, &opts, &upstream);
                for g in checked.grads.iter().flatten() {
                    assert!(
                        bool::try_from(g.isfinite().all()).unwrap(),
                        "{what}: non-finite grad"
                    );
                }
            }
        }
    }
    // f32 with far-apart mean and target: d^2 / eps ~ 1e5 per element.
    for opts in all_options() {
        tch::manual_seed(10_500);
        let (mean, target, _, upstream) =
            leaf_inputs(&[2, 8, 7], Kind::Float, Kind::Float, Mem::Contiguous, &opts);
        let log_scale = Tensor::from_slice(&alpha)
            .to_kind(Kind::Float)
            .set_requires_grad(true);
        check_op(
            &format!("extreme log_scale, far target, {opts:?}"),
            &mean,
            &target,
            &log_scale,
            &opts,
            &upstream,
        );
    }
}

/// f32 at 4.2M elements: the Mean loss within 1e-5 relative of the f64 reference. The
/// per-slot f32 accumulation is flushed into f64 every 64 terms, so the error stays at a few
/// f32 ulps; a plain running f32 sum would not (printed for comparison, not asserted).
#[test]
fn f32_accuracy_at_millions_of_elements() {
    tch::manual_seed(11_000);
    let opts = VidOptions::default();
    // 4.2M elements each: NCHW, channels-last, and two channels of 2^21-element rows (many
    // chunks per slot and several units per row).
    for (shape, mem) in [
        (&[16i64, 64, 64, 64][..], Mem::Contiguous),
        (&[16, 64, 64, 64][..], Mem::ChannelsLast),
        (&[1, 2, 1 << 21][..], Mem::Contiguous),
    ] {
        let mean = random(shape, Kind::Float, mem);
        let target = random(shape, Kind::Float, mem);
        let log_scale = random_log_scale(shape[1], Kind::Float) * 0.5;
        let loss = f_vid_loss(&mean, &target, &log_scale, &opts).unwrap();
        let expected = reference_loss(&mean, &target, &log_scale, &opts).double_value(&[]);
        let got = loss.double_value(&[]);
        let rel = (got - expected).abs() / expected.abs();
        println!("{shape:?} {mem:?}: fused f32 Mean loss relative error {rel:e}");
        assert!(
            rel < 1e-5,
            "{shape:?} {mem:?}: relative error {rel:e} (got {got}, expected {expected})"
        );

        if shape[1] == 64 && mem == Mem::Contiguous {
            let per_element =
                f_vid_loss(&mean, &target, &log_scale, &opts.reduction(Reduction::None)).unwrap();
            let values = Vec::<f32>::try_from(per_element.flatten(0, -1)).unwrap();
            let naive = values.iter().fold(0f32, |s, &v| s + v) / values.len() as f32;
            println!(
                "for comparison, a running f32 sum: relative error {:e}",
                (naive as f64 - expected).abs() / expected.abs()
            );
        }
    }
}

/// Two runs give bitwise identical losses and gradients, on problems large enough
/// (> 65536 elements) to run on several threads. The CPU path cuts work by shape only, so
/// thread timing cannot change the result.
#[test]
fn deterministic() {
    for (i, &(shape, mem, kind)) in [
        (&[4i64, 17, 33, 37][..], Mem::Contiguous, Kind::Float),
        (&[4, 17, 33, 37][..], Mem::ChannelsLast, Kind::Float),
        (&[1, 1, 70001][..], Mem::Contiguous, Kind::Half),
        (&[8, 300, 9, 7][..], Mem::ChannelsLast, Kind::BFloat16),
    ]
    .iter()
    .enumerate()
    {
        for reduction in [Reduction::Mean, Reduction::None] {
            let opts = VidOptions::default().reduction(reduction);
            tch::manual_seed(12_000 + i as i64);
            let (mean, target, log_scale, upstream) =
                leaf_inputs(shape, kind, Kind::Float, mem, &opts);
            let what = format!("{kind:?} {shape:?} {mem:?} {reduction:?}");
            let inputs = [&mean, &target, &log_scale];
            assert_deterministic(&f_vid_loss, &what, inputs, &opts, &upstream);
        }
    }
}
