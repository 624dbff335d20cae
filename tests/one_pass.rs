//! One pass over the data per training step: a Mean/Sum forward with grad mode on writes the
//! gradients of `mean` (and `target`) while it reads the inputs, and a backward receiving
//! exactly 1 returns them without reading the data again. Every result must be bitwise
//! identical to the two-pass path (`gradients_in_forward(false)`), for any upstream
//! gradient, dtype, layout, reduction and grouping; a second backward recomputes; no-grad
//! calls write nothing. The CPU backend's pass counter shows the data is read once.

mod common;

use common::{random, random_log_scale, Mem};
use tch::{Kind, Tensor};
use vidfuse::{f_vid_loss, f_vid_loss_grouped, Reduction, VidOptions, VidTerm};

const KINDS: [Kind; 4] = [Kind::Float, Kind::Double, Kind::Half, Kind::BFloat16];

struct Inputs {
    mean: Tensor,
    target: Tensor,
    log_scale: Tensor,
}

fn inputs(shape: &[i64], kind: Kind, mem: Mem, target_grad: bool) -> Inputs {
    Inputs {
        mean: random(shape, kind, mem).set_requires_grad(true),
        target: random(shape, kind, mem).set_requires_grad(target_grad),
        log_scale: random_log_scale(shape[1], Kind::Float).set_requires_grad(true),
    }
}

/// The gradients of `scale * loss` with respect to every input that requires grad, and the
/// CPU passes the forward and backward started.
fn grads(x: &Inputs, opts: &VidOptions, scale: f64) -> (Vec<Tensor>, usize) {
    let before = vidfuse::cpu::passes_started();
    let loss = f_vid_loss(&x.mean, &x.target, &x.log_scale, opts).unwrap();
    let root = if scale == 1.0 { loss } else { loss * scale };
    let wanted: Vec<&Tensor> = [&x.mean, &x.target, &x.log_scale]
        .into_iter()
        .filter(|t| t.requires_grad())
        .collect();
    let g = Tensor::run_backward(&[root], &wanted, false, false);
    (g, vidfuse::cpu::passes_started() - before)
}

fn assert_bitwise(what: &str, a: &[Tensor], b: &[Tensor]) {
    assert_eq!(a.len(), b.len(), "{what}");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert_eq!(x.kind(), y.kind(), "{what}: gradient {i} dtype");
        assert!(
            x.equal(y),
            "{what}: gradient {i} differs from the two-pass path"
        );
    }
}

#[test]
fn one_pass_gradients_are_the_two_pass_bits() {
    for kind in KINDS {
        for mem in [Mem::Contiguous, Mem::ChannelsLast] {
            for shape in [vec![4i64, 6, 5, 7], vec![33, 9]] {
                for reduction in [Reduction::Mean, Reduction::Sum] {
                    for target_grad in [false, true] {
                        for scale in [1.0, 2.5] {
                            let what = format!(
                                "{kind:?} {mem:?} {shape:?} {reduction:?} target grad \
                                 {target_grad} upstream {scale}"
                            );
                            let x = inputs(&shape, kind, mem, target_grad);
                            let opts = VidOptions::default().reduction(reduction);
                            let (one, one_passes) = grads(&x, &opts, scale);
                            let (two, two_passes) =
                                grads(&x, &opts.gradients_in_forward(false), scale);
                            assert_bitwise(&what, &one, &two);
                            assert_eq!(two_passes, 2, "{what}: the two-pass path");
                            let expected = if scale == 1.0 { 1 } else { 2 };
                            assert_eq!(one_passes, expected, "{what}: passes over the data");
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn one_pass_grouped_gradients_are_the_two_pass_bits() {
    let a = inputs(&[8, 16, 4, 4], Kind::Float, Mem::Contiguous, false);
    let b = inputs(&[8, 32, 2, 2], Kind::BFloat16, Mem::ChannelsLast, true);
    let c = inputs(&[8, 10], Kind::Double, Mem::Contiguous, false);
    let run = |opts: &VidOptions, scale: f64| -> (Vec<Tensor>, usize) {
        let before = vidfuse::cpu::passes_started();
        let terms: Vec<VidTerm<'_>> = [(&a, 1.0), (&b, 0.5), (&c, 3.0)]
            .into_iter()
            .map(|(x, weight)| VidTerm {
                mean: &x.mean,
                target: &x.target,
                log_scale: &x.log_scale,
                weight,
            })
            .collect();
        let total = f_vid_loss_grouped(&terms, opts).unwrap();
        let root = if scale == 1.0 { total } else { total * scale };
        let wanted = [
            &a.mean,
            &a.log_scale,
            &b.mean,
            &b.target,
            &b.log_scale,
            &c.mean,
        ];
        let g = Tensor::run_backward(&[root], &wanted, false, false);
        (g, vidfuse::cpu::passes_started() - before)
    };
    for scale in [1.0, 0.25] {
        let opts = VidOptions::default();
        let (one, one_passes) = run(&opts, scale);
        let (two, two_passes) = run(&opts.gradients_in_forward(false), scale);
        assert_bitwise(&format!("grouped, upstream {scale}"), &one, &two);
        assert_eq!(two_passes, 6, "three terms, two passes each");
        assert_eq!(one_passes, if scale == 1.0 { 3 } else { 6 });
    }
}

#[test]
fn a_second_backward_recomputes_and_leaves_the_first_gradient_alone() {
    let x = inputs(&[5, 4, 3, 3], Kind::Float, Mem::Contiguous, true);
    let loss = f_vid_loss(&x.mean, &x.target, &x.log_scale, &VidOptions::default()).unwrap();
    let first = Tensor::run_backward(&[&loss], &[&x.mean, &x.target], true, false);
    let kept = first[0].copy();
    let second = Tensor::run_backward(&[&loss], &[&x.mean, &x.target], false, false);
    assert!(
        first[0].equal(&kept),
        "the first gradient changed under the second backward"
    );
    assert_bitwise("second backward", &first, &second);
    // And it is not the same memory: the first belongs to whoever received it.
    assert_ne!(first[0].data_ptr(), second[0].data_ptr());
}

#[test]
fn accumulated_grads_over_steps_match_the_two_pass_path() {
    // `.backward()` accumulates into `.grad` (AccumulateGrad may keep the returned tensor):
    // two steps in a row, then compare with the two-pass path.
    let mut x = inputs(&[6, 5, 4, 4], Kind::Float, Mem::Contiguous, false);
    let mut seen = Vec::new();
    for opts in [
        VidOptions::default(),
        VidOptions::default().gradients_in_forward(false),
    ] {
        x.mean.zero_grad();
        for _ in 0..2 {
            f_vid_loss(&x.mean, &x.target, &x.log_scale, &opts)
                .unwrap()
                .backward();
        }
        seen.push(x.mean.grad().copy());
    }
    assert!(seen[0].equal(&seen[1]));
}

#[test]
fn no_grad_and_none_reduction_keep_the_plain_forward() {
    let x = inputs(&[4, 3, 5, 5], Kind::Float, Mem::Contiguous, true);
    let before = vidfuse::cpu::passes_started();
    let loss =
        tch::no_grad(|| f_vid_loss(&x.mean, &x.target, &x.log_scale, &VidOptions::default()))
            .unwrap();
    assert!(!loss.requires_grad());
    assert_eq!(vidfuse::cpu::passes_started() - before, 1);
    // None: the per-element loss forward, then a backward pass that reads the upstream.
    let opts = VidOptions::default().reduction(Reduction::None);
    let (_, passes) = grads(&x, &opts, 1.0);
    assert_eq!(passes, 2);
}

/// The CUDA launch plan on the host emulation: the forward's `sumsq_grad` pass writes the
/// gradients, the backward's grad kernel skips them on the device when the upstream is 1
/// (and recomputes them in place otherwise); bits as the two-pass path's.
#[test]
fn emu_one_pass_gradients_are_the_two_pass_bits() {
    use common::emu_launcher::{emulated, EmuLauncher};
    use std::sync::Arc;
    let launcher = Arc::new(EmuLauncher::default());
    let op = emulated(&launcher);
    for kind in KINDS {
        for (shape, mem) in [
            (vec![3i64, 5, 4, 6], Mem::Contiguous),
            (vec![3, 5, 4, 6], Mem::ChannelsLast),
            (vec![3, 2, 700], Mem::Contiguous),
            (vec![17, 9], Mem::Contiguous),
        ] {
            for target_grad in [false, true] {
                for scale in [1.0, 2.5] {
                    let what =
                        format!("emu {kind:?} {shape:?} {mem:?} target {target_grad} x{scale}");
                    let x = inputs(&shape, kind, mem, target_grad);
                    let mut results = Vec::new();
                    let mut launched = Vec::new();
                    for opts in [
                        VidOptions::default(),
                        VidOptions::default().gradients_in_forward(false),
                    ] {
                        let _ = launcher.take_launched();
                        let loss = op(&x.mean, &x.target, &x.log_scale, &opts).unwrap();
                        let root = if scale == 1.0 { loss } else { loss * scale };
                        let mut wanted = vec![&x.mean, &x.log_scale];
                        if target_grad {
                            wanted.push(&x.target);
                        }
                        results.push(Tensor::run_backward(&[root], &wanted, false, false));
                        launched.push(launcher.take_launched());
                    }
                    assert_bitwise(&what, &results[0], &results[1]);
                    let has = |list: &[String], name: &str| list.iter().any(|l| l.contains(name));
                    assert!(
                        has(&launched[0], "vid_sumsq_grad_group"),
                        "{what}: {:?}",
                        launched[0]
                    );
                    assert!(
                        !has(&launched[1], "vid_sumsq_grad_group"),
                        "{what}: {:?}",
                        launched[1]
                    );
                }
            }
        }
    }
}
