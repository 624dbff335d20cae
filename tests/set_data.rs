//! `Tensor::set_data` between forward and backward. It swaps a tensor's storage, dtype or
//! strides without bumping its version counter (tch's `VarStore::double()`, `half()`, ...
//! use it), so autograd's in-place check does not fire. Backward must then give the
//! gradients of the forward-time values (what it does: it reads its own aliases of them),
//! or a clear error; never read the swapped tensor through forward-time geometry (which
//! read out of bounds, crashed, or gave permuted gradients before the fix). Run on the CPU
//! and on the CUDA launch plan under the host emulation; `scripts/sanitize.sh` runs these
//! under AddressSanitizer.

mod common;

use std::sync::Arc;

use common::emu_launcher::{emulated, EmuLauncher};
use common::{assert_close, cpu, random, random_log_scale, reference_grads, LossFn, Mem};
use tch::{nn, Device, Kind, Tensor};
use vidfuse::{f_vid_loss, Reduction, VidOptions};

/// The ways a test swaps a tensor's data after the forward.
#[derive(Debug, Clone, Copy)]
enum Swap {
    /// Same values in f16 (the storage shrinks to half the bytes).
    ToHalf,
    /// Same values in f64 (the dtype the backward would read changes).
    ToDouble,
    /// A one-element storage expanded to the shape (stride 0).
    ExpandedZero,
    /// Ten times the values, channels-last (strides permuted; rank 1: a new storage).
    ChannelsLastTimesTen,
    /// A tensor of one element: every later read past it is out of bounds.
    Scalar,
}

fn swapped(t: &Tensor, swap: Swap) -> Tensor {
    let t = t.detach();
    match swap {
        Swap::ToHalf => t.to_kind(Kind::Half),
        Swap::ToDouble => t.to_kind(Kind::Double),
        Swap::ExpandedZero => {
            let ones = vec![1i64; t.dim()];
            Tensor::zeros(&ones[..], (t.kind(), t.device())).expand(t.size(), false)
        }
        Swap::ChannelsLastTimesTen => {
            let ten = &t * 10.0;
            match t.dim() {
                1 => ten,
                2 => ten.transpose(0, 1).contiguous().transpose(0, 1),
                _ => common::to_channels_last(&ten),
            }
        }
        Swap::Scalar => Tensor::ones([1], (t.kind(), t.device())),
    }
}

const SWAPS: [Swap; 5] = [
    Swap::ToHalf,
    Swap::ToDouble,
    Swap::ExpandedZero,
    Swap::ChannelsLastTimesTen,
    Swap::Scalar,
];

/// Which input gets its data swapped.
#[derive(Debug, Clone, Copy)]
enum Victim {
    Mean = 0,
    Target = 1,
    LogScale = 2,
}

/// Fresh f32 inputs of `shape`, all requiring grad (fixed by `seed`).
fn fresh_inputs(shape: &[i64], seed: i64) -> [Tensor; 3] {
    tch::manual_seed(seed);
    [
        random(shape, Kind::Float, Mem::Contiguous).set_requires_grad(true),
        random(shape, Kind::Float, Mem::Contiguous).set_requires_grad(true),
        random_log_scale(shape[1], Kind::Float).set_requires_grad(true),
    ]
}

/// Forward with `op`, `set_data` on `victim`, backward of `sum(upstream * loss)`: the
/// gradients reaching the three inputs (None: undefined, when autograd no longer routes
/// one to the swapped tensor), or backward's error.
fn run_swapped(
    op: &LossFn,
    inputs: &mut [Tensor; 3],
    opts: &VidOptions,
    upstream: &Tensor,
    victim: Victim,
    swap: Swap,
) -> Result<Vec<Option<Tensor>>, String> {
    let [mean, target, log_scale] = &*inputs;
    let loss = op(mean, target, log_scale, opts).map_err(|e| format!("forward: {e}"))?;
    let root = (&loss * upstream).sum(Kind::Double);
    let i = victim as usize;
    let replacement = swapped(&inputs[i], swap);
    tch::no_grad(|| inputs[i].set_data(&replacement));
    let refs: Vec<&Tensor> = inputs.iter().collect();
    let grads = Tensor::f_run_backward(&[root], &refs, false, false).map_err(|e| e.to_string())?;
    Ok(grads
        .into_iter()
        .map(|g| g.defined().then_some(g))
        .collect())
}

/// The loss written with plain tch ops (the f64 reference, from the op's dtype): what the
/// engine does with a swapped tensor when no vidfuse code is involved.
fn plain_ops(
    m: &Tensor,
    t: &Tensor,
    a: &Tensor,
    o: &VidOptions,
) -> Result<Tensor, vidfuse::VidError> {
    Ok(common::reference_loss(m, t, a, o))
}

/// Runs forward, swaps `victim`'s data, runs backward, and checks: where plain tch ops give
/// a gradient, the op gives the f64 reference's gradient at the forward-time values; where
/// autograd routes none to the swapped tensor (a new dtype resets its gradient accumulator),
/// neither does the op's. An error from backward is accepted if it is a message.
fn check_swap(op: &LossFn, shape: &[i64], opts: &VidOptions, victim: Victim, swap: Swap) {
    let what = format!("{shape:?} {opts:?} {victim:?} {swap:?}");
    let upstream = match opts.reduction_mode() {
        Reduction::None => random(shape, Kind::Double, Mem::Contiguous),
        _ => Tensor::from(1.75f64),
    };
    let seed = 7 + shape.iter().sum::<i64>();
    let mut plain = fresh_inputs(shape, seed);
    let routed: Vec<bool> = run_swapped(&plain_ops, &mut plain, opts, &upstream, victim, swap)
        .unwrap_or_else(|e| panic!("{what}: plain tch ops failed: {e}"))
        .iter()
        .map(Option::is_some)
        .collect();
    let mut inputs = fresh_inputs(shape, seed);
    // The forward-time values, kept apart for the reference.
    let (m0, t0, a0) = (inputs[0].copy(), inputs[1].copy(), inputs[2].copy());
    let grads = match run_swapped(op, &mut inputs, opts, &upstream, victim, swap) {
        Ok(grads) => grads,
        Err(message) => {
            assert!(!message.is_empty(), "{what}: empty error");
            return;
        }
    };
    let (gm, gt, ga) = reference_grads(&m0, &t0, &a0, opts, &upstream);
    for (i, (name, expected)) in [("mean", gm), ("target", gt), ("log_scale", ga)]
        .into_iter()
        .enumerate()
    {
        match &grads[i] {
            None => assert!(
                !routed[i],
                "{what}: no gradient of {name}; plain ops give one"
            ),
            Some(got) => {
                assert!(
                    routed[i],
                    "{what}: a gradient of {name}; plain ops give none"
                );
                assert_eq!(got.size(), expected.size(), "{what}: d/d{name} shape");
                let got = got.to_kind(Kind::Double);
                assert_close(&format!("{what}: d/d{name}"), &got, &expected, 1e-6, 1e-4);
            }
        }
    }
}

fn all_reductions() -> [VidOptions; 3] {
    [
        VidOptions::default(),
        VidOptions::default().reduction(Reduction::Sum),
        VidOptions::default().reduction(Reduction::None),
    ]
}

fn check_every_swap(op: &LossFn, shapes: &[&[i64]]) {
    for shape in shapes {
        for opts in all_reductions() {
            for victim in [Victim::Mean, Victim::Target, Victim::LogScale] {
                for swap in SWAPS {
                    check_swap(op, shape, &opts, victim, swap);
                }
            }
        }
    }
}

#[test]
fn set_data_between_forward_and_backward_gives_the_forward_time_gradients() {
    check_every_swap(&f_vid_loss, &[&[2, 3, 4], &[3, 5, 2, 3], &[7, 6]]);
}

#[test]
fn set_data_on_large_inputs_does_not_read_out_of_bounds() {
    // Large enough that a read past a 2-byte-per-element storage leaves the allocation
    // (a SIGSEGV before the fix).
    for swap in [Swap::ToHalf, Swap::Scalar] {
        check_swap(
            &f_vid_loss,
            &[64, 64, 32, 32],
            &VidOptions::default(),
            Victim::Target,
            swap,
        );
    }
}

#[test]
fn set_data_on_the_cuda_plan_gives_the_forward_time_gradients() {
    let launcher = Arc::new(EmuLauncher::default());
    check_every_swap(&emulated(&launcher), &[&[2, 3, 4], &[3, 5, 2, 3]]);
}

#[test]
fn var_store_cast_between_forward_and_backward_is_not_a_crash() {
    // `mean` and `log_scale` are variables of a VarStore cast to f64 (or f16) between forward
    // and backward: tch casts with set_data. Autograd then routes no gradient to them (their
    // gradient accumulators are reset, as with plain ops); the gradient of `target`, which
    // requires grad too, must still be the reference's at the forward-time values.
    for cast in [Kind::Double, Kind::Half] {
        let mut vs = nn::VarStore::new(Device::Cpu);
        let root = vs.root();
        let mean = root.randn("mean", &[8, 16, 4, 4], 0.0, 1.0);
        let log_scale = root.randn("log_scale", &[16], 0.0, 1.0);
        let target = Tensor::randn([8, 16, 4, 4], cpu(Kind::Float)).set_requires_grad(true);
        let (m0, a0) = (mean.detach().copy(), log_scale.detach().copy());
        let loss = f_vid_loss(&mean, &target, &log_scale, &VidOptions::default()).unwrap();
        match cast {
            Kind::Double => vs.double(),
            _ => vs.half(),
        }
        assert_eq!(mean.kind(), cast, "the store's cast took effect");
        let grads = Tensor::f_run_backward(&[&loss], &[&mean, &target, &log_scale], false, false)
            .unwrap_or_else(|e| panic!("{cast:?}: {e}"));
        assert!(
            !grads[0].defined() && !grads[2].defined(),
            "{cast:?}: routed as plain ops do not"
        );
        let one = Tensor::from(1.0f64);
        let (_, gt, _) = reference_grads(&m0, &target, &a0, &VidOptions::default(), &one);
        let got = grads[1].to_kind(Kind::Double);
        assert_close(&format!("{cast:?}: d/dtarget"), &got, &gt, 1e-6, 1e-4);
    }
}

#[test]
fn in_place_changes_are_still_detected_through_the_op_s_own_aliases() {
    // The aliases backward reads share the caller's version counter: an optimizer-style
    // in-place update is still the engine's error, on every input.
    for victim in [Victim::Mean, Victim::Target, Victim::LogScale] {
        let mut mean = random(&[3, 4, 5], Kind::Float, Mem::Contiguous).set_requires_grad(true);
        let mut target = random(&[3, 4, 5], Kind::Float, Mem::Contiguous);
        let mut log_scale = random_log_scale(4, Kind::Float).set_requires_grad(true);
        let loss = f_vid_loss(&mean, &target, &log_scale, &VidOptions::default()).unwrap();
        tch::no_grad(|| {
            let _ = match victim {
                Victim::Mean => mean.f_add_scalar_(1.0),
                Victim::Target => target.f_add_scalar_(1.0),
                Victim::LogScale => log_scale.f_add_scalar_(1.0),
            }
            .unwrap();
        });
        let err = Tensor::f_run_backward(&[&loss], &[&mean, &log_scale], false, false)
            .expect_err("an in-place change between forward and backward must be an error");
        assert!(
            err.to_string().contains("modified by an inplace operation"),
            "{victim:?}: {err}"
        );
    }
}
