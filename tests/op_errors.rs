//! Every bad input is an error (never a crash) whose message names the argument; the
//! panicking `vid_loss` panics with that message.

mod common;

use common::*;
use tch::{Device, Kind, Tensor};
use vidfuse::{f_vid_loss, vid_loss, VidError, VidOptions};

fn f32s(shape: &[i64]) -> Tensor {
    Tensor::randn(shape, cpu(Kind::Float))
}

/// Asserts that the op rejects its arguments with an InvalidArgument naming `arg`, whose
/// message contains every one of `needles`.
fn expect_invalid(
    what: &str,
    mean: &Tensor,
    target: &Tensor,
    log_scale: &Tensor,
    opts: &VidOptions,
    arg: &str,
    needles: &[&str],
) {
    let err = match f_vid_loss(mean, target, log_scale, opts) {
        Ok(loss) => panic!("{what}: accepted, gave a loss of shape {:?}", loss.size()),
        Err(e) => e,
    };
    let message = err.to_string();
    match &err {
        VidError::InvalidArgument { arg: got, .. } => {
            assert_eq!(*got, arg, "{what}: wrong argument named in {message:?}")
        }
        other => panic!("{what}: expected InvalidArgument, got {other:?}"),
    }
    assert!(
        message.contains(&format!("`{arg}`")),
        "{what}: message {message:?} does not name `{arg}`"
    );
    for needle in needles {
        assert!(
            message.contains(needle),
            "{what}: message {message:?} lacks {needle:?}"
        );
    }
}

#[test]
fn shape_mismatch() {
    let opts = VidOptions::default();
    expect_invalid(
        "target shape",
        &f32s(&[2, 3, 4]),
        &f32s(&[2, 3, 5]),
        &f32s(&[3]),
        &opts,
        "target",
        &["[2, 3, 4]", "[2, 3, 5]"],
    );
    expect_invalid(
        "target rank",
        &f32s(&[2, 3, 4]),
        &f32s(&[2, 3]),
        &f32s(&[3]),
        &opts,
        "target",
        &["[2, 3]"],
    );
    expect_invalid(
        "transposed target",
        &f32s(&[2, 3]),
        &f32s(&[3, 2]),
        &f32s(&[3]),
        &opts,
        "target",
        &[],
    );
}

#[test]
fn log_scale_wrong_length_or_rank() {
    let opts = VidOptions::default();
    let (m, t) = (f32s(&[2, 3, 4]), f32s(&[2, 3, 4]));
    expect_invalid(
        "too long",
        &m,
        &t,
        &f32s(&[4]),
        &opts,
        "log_scale",
        &["[3]", "[4]"],
    );
    expect_invalid(
        "too short",
        &m,
        &t,
        &f32s(&[2]),
        &opts,
        "log_scale",
        &["[2]"],
    );
    expect_invalid(
        "rank 2",
        &m,
        &t,
        &f32s(&[1, 3]),
        &opts,
        "log_scale",
        &["[1, 3]"],
    );
    expect_invalid(
        "rank 0",
        &m,
        &t,
        &Tensor::from(0.5f32),
        &opts,
        "log_scale",
        &["[]"],
    );
    expect_invalid(
        "per-element log_scale",
        &m,
        &t,
        &f32s(&[2, 3, 4]),
        &opts,
        "log_scale",
        &[],
    );
}

#[test]
fn rank_below_two() {
    let opts = VidOptions::default();
    expect_invalid(
        "rank 1",
        &f32s(&[5]),
        &f32s(&[5]),
        &f32s(&[5]),
        &opts,
        "mean",
        &["rank >= 2", "[5]"],
    );
    expect_invalid(
        "rank 0",
        &Tensor::from(1.0f32),
        &Tensor::from(2.0f32),
        &f32s(&[1]),
        &opts,
        "mean",
        &["rank >= 2"],
    );
}

#[test]
fn non_float_dtypes() {
    let opts = VidOptions::default();
    let ints = Tensor::ones([2, 3], (Kind::Int64, Device::Cpu));
    expect_invalid(
        "int64 mean",
        &ints,
        &ints,
        &f32s(&[3]),
        &opts,
        "mean",
        &["Int64"],
    );
    expect_invalid(
        "int64 target",
        &f32s(&[2, 3]),
        &ints,
        &f32s(&[3]),
        &opts,
        "target",
        &["Int64"],
    );
    expect_invalid(
        "int64 log_scale",
        &f32s(&[2, 3]),
        &f32s(&[2, 3]),
        &Tensor::ones([3], (Kind::Int64, Device::Cpu)),
        &opts,
        "log_scale",
        &["Int64"],
    );
    let bools = Tensor::ones([2, 3], (Kind::Bool, Device::Cpu));
    expect_invalid("bool mean", &bools, &bools, &f32s(&[3]), &opts, "mean", &[]);
}

#[test]
fn mismatched_dtypes() {
    let opts = VidOptions::default();
    let (m, t) = (f32s(&[2, 3]), f32s(&[2, 3]));
    expect_invalid(
        "f32 mean, f64 target",
        &m,
        &t.to_kind(Kind::Double),
        &f32s(&[3]),
        &opts,
        "target",
        &["Float", "Double"],
    );
    expect_invalid(
        "f16 mean, f32 target",
        &m.to_kind(Kind::Half),
        &t,
        &f32s(&[3]),
        &opts,
        "target",
        &[],
    );
    expect_invalid(
        "f16 log_scale with f32 inputs",
        &m,
        &t,
        &f32s(&[3]).to_kind(Kind::Half),
        &opts,
        "log_scale",
        &["Half"],
    );
    expect_invalid(
        "f64 log_scale with f32 inputs",
        &m,
        &t,
        &f32s(&[3]).to_kind(Kind::Double),
        &opts,
        "log_scale",
        &["Double"],
    );
    expect_invalid(
        "bf16 log_scale with f16 inputs",
        &m.to_kind(Kind::Half),
        &t.to_kind(Kind::Half),
        &f32s(&[3]).to_kind(Kind::BFloat16),
        &opts,
        "log_scale",
        &[],
    );
}

#[test]
fn empty_tensors() {
    let opts = VidOptions::default();
    for shape in [
        &[0i64, 3, 4][..],
        &[2, 3, 0][..],
        &[2, 3, 4, 0][..],
        &[4, 0][..],
    ] {
        let c = shape[1];
        expect_invalid(
            &format!("empty {shape:?}"),
            &f32s(shape),
            &f32s(shape),
            &f32s(&[c]),
            &opts,
            "mean",
            &["non-empty"],
        );
    }
}

#[test]
fn undefined_tensor() {
    let opts = VidOptions::default();
    let (m, t, a) = (f32s(&[2, 3]), f32s(&[2, 3]), f32s(&[3]));
    let undefined = Tensor::new();
    assert!(!undefined.defined());
    expect_invalid("mean", &undefined, &t, &a, &opts, "mean", &["undefined"]);
    expect_invalid(
        "target",
        &m,
        &undefined,
        &a,
        &opts,
        "target",
        &["undefined"],
    );
    expect_invalid(
        "log_scale",
        &m,
        &t,
        &undefined,
        &opts,
        "log_scale",
        &["undefined"],
    );
}

#[test]
fn bad_eps() {
    let (m, t, a) = (f32s(&[2, 3]), f32s(&[2, 3]), f32s(&[3]));
    for eps in [0.0, -0.0, -1e-5, f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        expect_invalid(
            &format!("eps {eps}"),
            &m,
            &t,
            &a,
            &VidOptions::default().eps(eps),
            "eps",
            &[&format!("{eps:e}")],
        );
    }
    // Tiny but positive is fine.
    assert!(f_vid_loss(&m, &t, &a, &VidOptions::default().eps(1e-30)).is_ok());
}

#[test]
fn different_devices() {
    if !tch::Cuda::is_available() {
        println!("SKIPPED: CUDA is not available, cannot put the inputs on different devices");
        return;
    }
    let opts = VidOptions::default();
    let (m, t, a) = (f32s(&[2, 3]), f32s(&[2, 3]), f32s(&[3]));
    let gpu = Device::Cuda(0);
    expect_invalid(
        "target on cuda",
        &m,
        &t.to_device(gpu),
        &a,
        &opts,
        "target",
        &["cpu", "cuda:0"],
    );
    expect_invalid(
        "log_scale on cuda",
        &m,
        &t,
        &a.to_device(gpu),
        &opts,
        "log_scale",
        &["cpu", "cuda:0"],
    );
    expect_invalid(
        "mean on cuda",
        &m.to_device(gpu),
        &t,
        &a,
        &opts,
        "target",
        &["cuda:0", "cpu"],
    );
}

/// Errors leave nothing behind: a good call right after a bad one works.
#[test]
fn error_then_success() {
    let (m, t, a) = (
        f32s(&[2, 3]).set_requires_grad(true),
        f32s(&[2, 3]),
        f32s(&[3]),
    );
    assert!(f_vid_loss(&m, &t, &f32s(&[2]), &VidOptions::default()).is_err());
    let loss = f_vid_loss(&m, &t, &a, &VidOptions::default()).unwrap();
    loss.backward();
    assert!(m.grad().defined());
}

#[test]
#[should_panic(expected = "invalid argument `log_scale`: expected shape [3]")]
fn vid_loss_panics_with_the_message() {
    let _ = vid_loss(
        &f32s(&[2, 3]),
        &f32s(&[2, 3]),
        &f32s(&[4]),
        &VidOptions::default(),
    );
}

#[test]
#[should_panic(expected = "invalid argument `eps`")]
fn vid_loss_panics_on_bad_eps() {
    let _ = vid_loss(
        &f32s(&[2, 3]),
        &f32s(&[2, 3]),
        &f32s(&[3]),
        &VidOptions::default().eps(f64::NAN),
    );
}
