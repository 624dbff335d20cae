//! The grouped op `f_vid_loss_grouped`: values and gradients against the f64 reference for
//! terms of different shapes, ranks, layouts, channel counts and dtypes; bitwise agreement
//! with one `f_vid_loss` per term; errors that name the term; autograd behaviour.

mod common;

use common::*;
use tch::{Kind, Tensor};
use vidfuse::{f_vid_loss, f_vid_loss_grouped, Reduction, VidError, VidOptions, VidTerm};

/// A term's tensors: mean (requires grad), target, log_scale (requires grad).
struct Pair {
    mean: Tensor,
    target: Tensor,
    log_scale: Tensor,
    weight: f64,
}

impl Pair {
    fn new(shape: &[i64], kind: Kind, scale_kind: Kind, mem: Mem, weight: f64) -> Pair {
        Pair {
            mean: random(shape, kind, mem).set_requires_grad(true),
            target: random(shape, kind, mem),
            log_scale: random_log_scale(shape[1], scale_kind).set_requires_grad(true),
            weight,
        }
    }

    fn term(&self) -> VidTerm<'_> {
        VidTerm {
            mean: &self.mean,
            target: &self.target,
            log_scale: &self.log_scale,
            weight: self.weight,
        }
    }
}

fn mixed_pairs() -> Vec<Pair> {
    vec![
        Pair::new(
            &[4, 6, 5, 5],
            Kind::Float,
            Kind::Float,
            Mem::Contiguous,
            1.0,
        ),
        Pair::new(
            &[4, 3, 8, 8],
            Kind::BFloat16,
            Kind::Float,
            Mem::ChannelsLast,
            0.5,
        ),
        Pair::new(&[4, 17], Kind::Float, Kind::Float, Mem::Contiguous, 2.0),
        Pair::new(
            &[4, 5, 3, 2, 7],
            Kind::Half,
            Kind::Half,
            Mem::Contiguous,
            0.25,
        ),
        Pair::new(
            &[4, 9, 600],
            Kind::Double,
            Kind::Double,
            Mem::Contiguous,
            4.0,
        ),
    ]
}

fn terms(pairs: &[Pair]) -> Vec<VidTerm<'_>> {
    pairs.iter().map(Pair::term).collect()
}

#[test]
fn matches_the_weighted_sum_of_references() {
    for opts in [
        VidOptions::default(),
        VidOptions::default().reduction(Reduction::Sum).full(true),
    ] {
        let pairs = mixed_pairs();
        let loss = f_vid_loss_grouped(&terms(&pairs), &opts).unwrap();
        assert_eq!(loss.kind(), Kind::Float);
        assert_eq!(loss.dim(), 0);
        let mut expected = 0.0;
        let mut magnitude = 0.0;
        for p in &pairs {
            let e = reference_loss(&p.mean, &p.target, &p.log_scale, &opts).double_value(&[]);
            let m = loss_magnitude(&p.mean, &p.target, &p.log_scale, &opts).double_value(&[]);
            // Each term's loss is rounded to its own dtype before the sum.
            let round = storage(p.mean.kind()).round;
            expected += p.weight * e;
            magnitude += p.weight.abs() * (m * (round + compute(p.mean.kind()).acc));
        }
        let got = loss.double_value(&[]);
        let allowed = magnitude + expected.abs() * storage(Kind::Float).round;
        assert!(
            (got - expected).abs() <= allowed,
            "{opts:?}: grouped {got} vs reference {expected} (allowed {allowed:e})"
        );

        let g = 1.5;
        let inputs: Vec<&Tensor> = pairs.iter().flat_map(|p| [&p.mean, &p.log_scale]).collect();
        let grads = Tensor::run_backward(&[&loss * g], &inputs, false, false);
        for (k, p) in pairs.iter().enumerate() {
            let kind = p.mean.kind();
            let upstream = Tensor::from(g * p.weight);
            let (gm, _, ga) = reference_grads(&p.mean, &p.target, &p.log_scale, &opts, &upstream);
            let (st, cp) = (storage(kind), compute(kind));
            let allowed = gm.abs() * (st.round + cp.elem) + st.atol;
            assert_within(&format!("term {k} d/dmean"), &grads[2 * k], &gm, &allowed);
            let ls = storage(p.log_scale.kind());
            let magnitude =
                log_scale_grad_magnitude(&p.mean, &p.target, &p.log_scale, &opts, &upstream);
            let allowed = ga.abs() * ls.round + magnitude * cp.acc + ls.atol;
            assert_within(
                &format!("term {k} d/dlog_scale"),
                &grads[2 * k + 1],
                &ga,
                &allowed,
            );
            assert_eq!(grads[2 * k].kind(), kind);
            assert_eq!(grads[2 * k + 1].kind(), p.log_scale.kind());
        }
    }
}

/// The same numbers as one op per term: each term's loss bit for bit (the total is their
/// weighted sum in f64, rounded once), and each gradient bit for bit when the single op
/// receives the same upstream gradient (weights and upstream exact in every dtype here).
#[test]
fn bitwise_equal_to_one_op_per_term() {
    for opts in [
        VidOptions::default(),
        VidOptions::default().reduction(Reduction::Sum),
    ] {
        let pairs = mixed_pairs();
        let mut targets_grad = Vec::new();
        for p in &pairs {
            targets_grad.push(p.target.detach().set_requires_grad(true));
        }
        let grouped_terms: Vec<VidTerm<'_>> = pairs
            .iter()
            .zip(&targets_grad)
            .map(|(p, t)| VidTerm {
                target: t,
                ..p.term()
            })
            .collect();
        let loss = f_vid_loss_grouped(&grouped_terms, &opts).unwrap();
        let mut total = 0.0;
        let g = 2.0;
        let inputs: Vec<&Tensor> = grouped_terms
            .iter()
            .flat_map(|t| [t.mean, t.target, t.log_scale])
            .collect();
        let grads = Tensor::run_backward(&[&loss * g], &inputs, false, false);
        for (k, p) in pairs.iter().enumerate() {
            let target = &targets_grad[k];
            let single = f_vid_loss(&p.mean, target, &p.log_scale, &opts).unwrap();
            total += p.weight * single.double_value(&[]);
            let upstream = Tensor::from(g * p.weight).to_kind(single.kind());
            let expected = Tensor::run_backward(
                &[(&single * upstream).sum(single.kind())],
                &[&p.mean, target, &p.log_scale],
                false,
                false,
            );
            for (i, name) in ["mean", "target", "log_scale"].iter().enumerate() {
                assert!(
                    grads[3 * k + i].equal(&expected[i]),
                    "{opts:?} term {k}: d/d{name} differs from the single op's"
                );
            }
        }
        assert_eq!(
            loss.double_value(&[]),
            total as f32 as f64,
            "{opts:?}: total differs from the weighted sum of single losses"
        );
    }
}

#[test]
fn all_f64_terms_give_an_f64_loss() {
    let pairs = vec![
        Pair::new(&[3, 4, 5], Kind::Double, Kind::Double, Mem::Contiguous, 1.0),
        Pair::new(&[3, 2], Kind::Double, Kind::Double, Mem::Contiguous, 3.0),
    ];
    let loss = f_vid_loss_grouped(&terms(&pairs), &VidOptions::default()).unwrap();
    assert_eq!(loss.kind(), Kind::Double);
}

#[test]
fn only_inputs_that_require_grad_get_gradients() {
    let a = Pair::new(&[2, 3, 4], Kind::Float, Kind::Float, Mem::Contiguous, 1.0);
    let frozen = Pair {
        mean: random(&[2, 5], Kind::Float, Mem::Contiguous),
        target: random(&[2, 5], Kind::Float, Mem::Contiguous),
        log_scale: random_log_scale(5, Kind::Float),
        weight: 1.0,
    };
    let loss = f_vid_loss_grouped(&[a.term(), frozen.term()], &VidOptions::default()).unwrap();
    loss.backward();
    assert!(a.mean.grad().defined() && a.log_scale.grad().defined());
    assert!(!frozen.mean.grad().defined());
    // No input requires grad: no graph.
    let loss = f_vid_loss_grouped(&[frozen.term()], &VidOptions::default()).unwrap();
    assert!(!loss.requires_grad());
}

#[test]
fn errors_name_the_term() {
    let good = Pair::new(&[2, 3, 4], Kind::Float, Kind::Float, Mem::Contiguous, 1.0);
    let opts = VidOptions::default();
    let err = |r: Result<Tensor, VidError>| -> String {
        match r {
            Err(VidError::InvalidArgument { arg, message }) => format!("{arg}: {message}"),
            Err(other) => panic!("wrong error class: {other}"),
            Ok(_) => panic!("accepted"),
        }
    };
    assert!(err(f_vid_loss_grouped(&[], &opts)).starts_with("terms"));
    let none = VidOptions::default().reduction(Reduction::None);
    assert!(err(f_vid_loss_grouped(&[good.term()], &none)).starts_with("opts"));
    let nan = VidTerm {
        weight: f64::NAN,
        ..good.term()
    };
    let message = err(f_vid_loss_grouped(&[good.term(), nan], &opts));
    assert!(
        message.contains("term 1") && message.contains("weight"),
        "{message}"
    );
    let bad_scale = Tensor::zeros([7], cpu(Kind::Float));
    let bad = VidTerm {
        log_scale: &bad_scale,
        ..good.term()
    };
    let message = err(f_vid_loss_grouped(&[good.term(), good.term(), bad], &opts));
    assert!(
        message.contains("term 2") && message.contains("log_scale"),
        "{message}"
    );
}

#[test]
fn in_place_change_of_any_term_is_an_error() {
    let a = Pair::new(&[2, 3, 4], Kind::Float, Kind::Float, Mem::Contiguous, 1.0);
    let mut b = Pair::new(&[2, 5], Kind::Float, Kind::Float, Mem::Contiguous, 1.0);
    let loss = f_vid_loss_grouped(&[a.term(), b.term()], &VidOptions::default()).unwrap();
    let _ = b.target.f_add_scalar_(1.0).unwrap();
    let err = Tensor::f_run_backward(&[loss], &[&a.mean], false, false).unwrap_err();
    assert!(err.to_string().contains("modified by an inplace operation"));
}

// ---------------------------------------------------------------------------------------
// The CUDA kernels on the host emulation: launches per pass, and the same numbers as one
// op per term.

use common::emu_launcher::{emulated, emulated_grouped, EmuLauncher};
use std::sync::Arc;

/// Four layer pairs of one dtype: forward takes 2 launches (all passes; sums, losses and
/// total), 3 on the one-pass path (all gradient factors first), backward 2 (all gradients
/// of mean, skipped on the device when the upstream is 1; all of log_scale), with the values
/// and gradients of the single-term op, bit for bit.
#[test]
fn emu_grouped_launches_and_bitwise_agreement() {
    for (kind, one_pass) in [
        (Kind::Float, true),
        (Kind::BFloat16, true),
        (Kind::Float, false),
    ] {
        let launcher = Arc::new(EmuLauncher::default());
        let pairs = vec![
            Pair::new(&[2, 8, 8, 8], kind, Kind::Float, Mem::Contiguous, 1.0),
            Pair::new(&[2, 16, 4, 4], kind, Kind::Float, Mem::ChannelsLast, 0.5),
            Pair::new(&[2, 4, 600], kind, Kind::Float, Mem::Contiguous, 2.0),
            Pair::new(&[2, 32], kind, Kind::Float, Mem::Contiguous, 0.25),
        ];
        let opts = VidOptions::default().gradients_in_forward(one_pass);
        let loss = emulated_grouped(&launcher, &terms(&pairs), &opts).unwrap();
        let forward = launcher.take_launched();
        let most = if one_pass { 3 } else { 2 };
        assert!(
            forward.len() <= most,
            "{kind:?}: forward launches {forward:?}"
        );
        let inputs: Vec<&Tensor> = pairs.iter().flat_map(|p| [&p.mean, &p.log_scale]).collect();
        let grads = Tensor::run_backward(&[&loss * 2.0], &inputs, false, false);
        let backward = launcher.take_launched();
        assert!(
            backward.len() <= 2,
            "{kind:?}: backward launches {backward:?}"
        );

        let single = emulated(&launcher);
        let mut total = 0.0;
        for (k, p) in pairs.iter().enumerate() {
            let l = single(&p.mean, &p.target, &p.log_scale, &opts).unwrap();
            total += p.weight * l.double_value(&[]);
            let upstream = Tensor::from(2.0 * p.weight).to_kind(l.kind());
            let expected = Tensor::run_backward(
                &[(&l * upstream).sum(l.kind())],
                &[&p.mean, &p.log_scale],
                false,
                false,
            );
            assert!(
                grads[2 * k].equal(&expected[0]),
                "{kind:?} term {k}: d/dmean"
            );
            assert!(
                grads[2 * k + 1].equal(&expected[1]),
                "{kind:?} term {k}: d/dlog_scale"
            );
        }
        assert_eq!(
            loss.double_value(&[]),
            total as f32 as f64,
            "{kind:?}: total"
        );
    }
}

/// Mixed dtypes, layouts and more terms than one launch's segment table holds (16): the
/// emulated kernels agree with the CPU op.
#[test]
fn emu_grouped_mixed_and_many_terms_match_the_cpu() {
    let launcher = Arc::new(EmuLauncher::default());
    let mut pairs = mixed_pairs();
    for k in 0..14 {
        pairs.push(Pair::new(
            &[2, 3 + k, 5],
            Kind::Float,
            Kind::Float,
            Mem::Contiguous,
            0.5,
        ));
    }
    for opts in [
        VidOptions::default(),
        VidOptions::default().reduction(Reduction::Sum).full(true),
    ] {
        let cpu_loss = f_vid_loss_grouped(&terms(&pairs), &opts).unwrap();
        let emu_loss = emulated_grouped(&launcher, &terms(&pairs), &opts).unwrap();
        assert_close("total", &emu_loss, &cpu_loss, 0.0, 1e-5);
        let inputs: Vec<&Tensor> = pairs.iter().flat_map(|p| [&p.mean, &p.log_scale]).collect();
        let cpu_grads = Tensor::run_backward(&[&cpu_loss], &inputs, false, false);
        let emu_grads = Tensor::run_backward(&[&emu_loss], &inputs, false, false);
        for (i, (c, e)) in cpu_grads.iter().zip(&emu_grads).enumerate() {
            let kind = c.kind();
            let rel = storage(kind).round * 2.0 + compute(kind).acc;
            let allowed = c.to_kind(Kind::Double).abs() * rel
                + c.to_kind(Kind::Double).abs().max() * compute(kind).acc
                + storage(kind).atol;
            assert_within(&format!("input {i}"), e, c, &allowed);
        }
    }
}

/// With 1 or 2 SMs (8 or 16 blocks) a block loops over chunks of several segments, warp and
/// tile, of one grouped launch: the loss and gradients have the same bits on every grid.
#[test]
fn emu_grouped_bitwise_identical_whatever_the_grid() {
    let mut pairs = mixed_pairs();
    pairs.push(Pair::new(
        &[4, 32, 600],
        Kind::Float,
        Kind::Float,
        Mem::Contiguous,
        0.5,
    ));
    pairs.push(Pair::new(
        &[64, 8, 16, 16],
        Kind::Float,
        Kind::Float,
        Mem::ChannelsLast,
        1.5,
    ));
    let opts = VidOptions::default();
    let inputs: Vec<&Tensor> = pairs.iter().flat_map(|p| [&p.mean, &p.log_scale]).collect();
    let cpu_loss = f_vid_loss_grouped(&terms(&pairs), &opts).unwrap();
    let mut first: Option<(Tensor, Vec<Tensor>)> = None;
    for sms in [None, Some(1), Some(2), Some(46), Some(170)] {
        let launcher = Arc::new(EmuLauncher::with_multiprocessors(sms));
        let loss = emulated_grouped(&launcher, &terms(&pairs), &opts).unwrap();
        let grads = Tensor::run_backward(&[&loss], &inputs, false, false);
        let looped = launcher
            .take_grids()
            .iter()
            .any(|g| (g.blocks as i64) < g.virtual_blocks);
        assert_eq!(looped, sms == Some(1) || sms == Some(2), "{sms:?} SMs");
        let Some((first_loss, first_grads)) = &first else {
            assert_close("total", &loss, &cpu_loss, 0.0, 1e-5);
            first = Some((loss, grads));
            continue;
        };
        assert!(loss.equal(first_loss), "{sms:?} SMs: total bits");
        for (i, (g, f)) in grads.iter().zip(first_grads).enumerate() {
            assert!(g.equal(f), "{sms:?} SMs: input {i} gradient bits");
        }
    }
}
