//! Regression tests for inputs that once gave silent wrong gradients, panics or unbounded
//! memory: in-place changes between forward and backward, values whose loss overflows the
//! dtype, tiny eps, tensors that are not plain strided memory, oversized or refused module
//! constructors. Each fails on the code before the fix.

mod common;

use common::{check_op, cpu, random, random_log_scale, reference_loss, Mem};
use tch::{nn, Device, Kind, Tensor};
use vidfuse::nn::{VidConfig, VidDistiller, VidLoss};
use vidfuse::{f_vid_loss, Reduction, VidError, VidOptions};

fn grad_mode_on() -> bool {
    let x = Tensor::ones([1], cpu(Kind::Float)).set_requires_grad(true);
    (&x * 2.0).requires_grad()
}

fn inplace_error(result: Result<Vec<Tensor>, tch::TchError>) -> String {
    let err = result.expect_err("backward after an in-place change must fail");
    let message = err.to_string();
    assert!(
        message.contains("modified by an inplace operation"),
        "not the engine's in-place error: {message}"
    );
    message
}

fn inputs(shape: &[i64]) -> (Tensor, Tensor, Tensor) {
    let mean = random(shape, Kind::Float, Mem::Contiguous).set_requires_grad(true);
    let target = random(shape, Kind::Float, Mem::Contiguous);
    let log_scale = random_log_scale(shape[1], Kind::Float).set_requires_grad(true);
    (mean, target, log_scale)
}

// ---------------------------------------------------------------------------------------
// 1. In-place changes between forward and backward

#[test]
fn target_changed_in_place_after_forward_is_an_error() {
    for opts in [
        VidOptions::default(),
        VidOptions::default().reduction(Reduction::None),
    ] {
        let (mean, mut target, log_scale) = inputs(&[3, 4, 5]);
        let loss = f_vid_loss(&mean, &target, &log_scale, &opts).unwrap();
        let _ = target.f_add_scalar_(1.0).unwrap();
        let root = loss.sum(Kind::Float);
        inplace_error(Tensor::f_run_backward(&[root], &[&mean], false, false));
    }
}

#[test]
fn copied_view_of_target_changed_in_place_is_an_error() {
    // A transposed view is copied into a kernel layout: the copy is unchanged, but the user's
    // tensor changed, so the engine's rule still applies.
    let (mean, _, log_scale) = inputs(&[3, 4, 5]);
    let base = random(&[3, 5, 4], Kind::Float, Mem::Contiguous);
    let mut target = base.transpose(1, 2);
    let loss = f_vid_loss(&mean, &target, &log_scale, &VidOptions::default()).unwrap();
    let _ = target.f_mul_scalar_(2.0).unwrap();
    inplace_error(Tensor::f_run_backward(&[loss], &[&mean], false, false));
}

#[test]
fn log_scale_optimizer_step_before_backward_is_an_error() {
    let (mean, target, mut log_scale) = inputs(&[4, 3, 2, 2]);
    let loss = f_vid_loss(&mean, &target, &log_scale, &VidOptions::default()).unwrap();
    tch::no_grad(|| {
        let _ = log_scale.f_sub_scalar_(0.1).unwrap();
    });
    inplace_error(Tensor::f_run_backward(&[loss], &[&log_scale], false, false));
}

#[test]
fn non_leaf_mean_changed_in_place_is_an_error() {
    let (x, target, log_scale) = inputs(&[4, 3, 6]);
    let mut mean = &x * 3.0;
    let loss = f_vid_loss(&mean, &target, &log_scale, &VidOptions::default()).unwrap();
    let _ = mean.f_add_scalar_(1.0).unwrap();
    inplace_error(Tensor::f_run_backward(&[loss], &[&x], false, false));
}

#[test]
fn unchanged_inputs_still_give_the_reference_gradients_after_other_in_place_work() {
    let (mean, target, log_scale) = inputs(&[4, 3, 6]);
    let upstream = Tensor::from(1.5f32);
    let checked = check_op(
        "before",
        &mean,
        &target,
        &log_scale,
        &VidOptions::default(),
        &upstream,
    );
    // A clone of the target changed in place does not concern the op.
    let mut other = target.copy();
    let _ = other.f_add_scalar_(1.0).unwrap();
    let loss = f_vid_loss(&mean, &target, &log_scale, &VidOptions::default()).unwrap();
    let g = Tensor::run_backward(&[&loss * 1.5], &[&mean], false, false);
    assert!(g[0].equal(checked.grads[0].as_ref().unwrap()));
}

#[test]
fn second_backward_on_a_freed_graph_is_an_error() {
    let (mean, target, log_scale) = inputs(&[2, 3, 4]);
    let loss = f_vid_loss(&mean, &target, &log_scale, &VidOptions::default()).unwrap();
    Tensor::f_run_backward(&[&loss], &[&mean], false, false).unwrap();
    let err = Tensor::f_run_backward(&[&loss], &[&mean], false, false).unwrap_err();
    assert!(
        err.to_string().contains("second time"),
        "unexpected message: {err}"
    );
}

// ---------------------------------------------------------------------------------------
// 2. Values whose loss overflows the dtype, tiny eps, grad mode

#[test]
fn loss_beyond_the_dtype_range_is_inf_not_a_panic() {
    for kind in [Kind::Float, Kind::BFloat16, Kind::Half] {
        for reduction in [Reduction::Mean, Reduction::Sum] {
            // Every element's loss is beyond the dtype's range (not just on average): |d| is
            // 1e17 (6e4 for f16, which cannot hold more), var = eps = 1e-5.
            let magnitude = if kind == Kind::Half { 6e4 } else { 1e17 };
            let signs = random(&[4, 3, 5], Kind::Double, Mem::Contiguous).sign();
            let mean = (signs * magnitude).to_kind(kind);
            let target = Tensor::zeros([4, 3, 5], cpu(kind));
            let log_scale = Tensor::full([3], -100.0, cpu(Kind::Float));
            let opts = VidOptions::default().reduction(reduction);
            let expected = reference_loss(&mean, &target, &log_scale, &opts);
            let loss = f_vid_loss(&mean, &target, &log_scale, &opts)
                .unwrap_or_else(|e| panic!("{kind:?} {reduction:?}: {e}"));
            let value = loss.double_value(&[]);
            assert!(
                value.is_infinite() && value > 0.0,
                "{kind:?} {reduction:?}: expected +inf (the f64 value {} is beyond the dtype), got {value}",
                expected.double_value(&[])
            );
            assert!(grad_mode_on(), "grad mode left off");
        }
    }
}

#[test]
fn eps_below_the_smallest_normal_of_the_accumulation_type_is_refused() {
    for (kind, eps) in [
        (Kind::Float, 1e-40),
        (Kind::BFloat16, 1e-39),
        (Kind::Half, 1e-310),
        (Kind::Double, 1e-310),
    ] {
        let mean = random(&[2, 3], kind, Mem::Contiguous);
        let log_scale = Tensor::full([3], -1000.0, cpu(Kind::Float));
        let err = f_vid_loss(&mean, &mean, &log_scale, &VidOptions::default().eps(eps))
            .expect_err("tiny eps accepted");
        assert!(
            matches!(err, VidError::InvalidArgument { arg: "eps", .. }),
            "{kind:?}: {err}"
        );
        assert!(grad_mode_on());
    }
}

#[test]
fn smallest_accepted_eps_gives_finite_values_where_mean_equals_target() {
    for (kind, eps) in [
        (Kind::Float, f32::MIN_POSITIVE as f64),
        (Kind::Double, 1e-300),
    ] {
        let mean = random(&[2, 3, 4], kind, Mem::Contiguous).set_requires_grad(true);
        let target = mean.detach();
        let log_scale = Tensor::full([3], -1000.0, cpu(kind)).set_requires_grad(true);
        for reduction in [Reduction::Mean, Reduction::Sum, Reduction::None] {
            let opts = VidOptions::default().eps(eps).reduction(reduction);
            let loss = f_vid_loss(&mean, &target, &log_scale, &opts).unwrap();
            let expected = reference_loss(&mean, &target, &log_scale, &opts);
            assert!(
                bool::try_from(loss.isfinite().all()).unwrap(),
                "{kind:?} {reduction:?}: non-finite loss"
            );
            common::assert_close("loss", &loss, &expected, 0.0, 1e-6);
            let g = Tensor::run_backward(&[loss.sum(kind)], &[&mean, &log_scale], false, false);
            for (name, grad) in ["mean", "log_scale"].iter().zip(g) {
                assert!(
                    bool::try_from(grad.isfinite().all()).unwrap(),
                    "{kind:?} {reduction:?}: non-finite gradient of {name}: {grad}"
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// 3. Tensors that are not plain strided memory

fn assert_refused(what: &str, result: Result<Tensor, VidError>, arg: &str) {
    match result {
        Err(VidError::InvalidArgument { arg: a, message }) => {
            assert_eq!(a, arg, "{what}: {message}");
        }
        Err(other) => panic!("{what}: wrong error class: {other}"),
        Ok(_) => panic!("{what}: accepted"),
    }
    assert!(grad_mode_on(), "{what}: grad mode left off");
}

#[test]
fn sparse_mkldnn_quantized_and_nested_inputs_are_clear_errors() {
    let dense = random(&[2, 3, 4, 4], Kind::Float, Mem::Contiguous);
    let log_scale = random_log_scale(3, Kind::Float);
    let opts = VidOptions::default();
    let sparse = dense.f_to_sparse(None, None::<&[i64]>, None).unwrap();
    let mkldnn = dense.f_to_mkldnn(None).unwrap();
    let exotic = [("sparse COO", &sparse), ("mkldnn", &mkldnn)];
    for (what, t) in exotic {
        assert_refused(what, f_vid_loss(t, &dense, &log_scale, &opts), "mean");
        assert_refused(what, f_vid_loss(&dense, t, &log_scale, &opts), "target");
    }
    let csr = dense
        .view([6, 16])
        .f_to_sparse_csr(None)
        .unwrap()
        .set_requires_grad(false);
    let plain = random(&[6, 16], Kind::Float, Mem::Contiguous);
    assert_refused(
        "sparse CSR",
        f_vid_loss(&csr, &plain, &random_log_scale(16, Kind::Float), &opts),
        "mean",
    );
    let sparse_scale = log_scale.f_to_sparse(None, None::<&[i64]>, None).unwrap();
    assert_refused(
        "sparse log_scale",
        f_vid_loss(&dense, &dense, &sparse_scale, &opts),
        "log_scale",
    );
    let quantized = dense.f_quantize_per_tensor(0.1, 0, Kind::QInt8).unwrap();
    assert_refused(
        "quantized",
        f_vid_loss(&quantized, &dense, &log_scale, &opts),
        "mean",
    );
    let padded = random(&[2, 3, 4], Kind::Float, Mem::Contiguous);
    let shapes = Tensor::from_slice2(&[[3i64, 4], [2, 4]]);
    let nested = Tensor::f_internal_nested_from_padded(&padded, &shapes, false).unwrap();
    assert_refused(
        "nested",
        f_vid_loss(&nested, &nested, &random_log_scale(3, Kind::Float), &opts),
        "mean",
    );
}

#[test]
fn negated_views_are_read_as_their_values() {
    for reduction in [Reduction::Mean, Reduction::None] {
        let opts = VidOptions::default().reduction(reduction);
        let base = random(&[3, 4, 5], Kind::Float, Mem::Contiguous);
        let mean = base.f_internal_neg_view().unwrap();
        let target = random(&[3, 4, 5], Kind::Float, Mem::Contiguous);
        let log_scale = random_log_scale(4, Kind::Float);
        let neg_scale = log_scale.f_internal_neg_view().unwrap();
        let loss = f_vid_loss(&mean, &target, &neg_scale, &opts).unwrap();
        let expected = reference_loss(&(-&base), &target, &(-&log_scale), &opts);
        common::assert_close("neg view", &loss, &expected, 1e-6, 1e-5);
    }
}

// ---------------------------------------------------------------------------------------
// 4, 5. Module constructors: overflow, refusal leaves nothing behind

fn assert_ctor_refused<T: std::fmt::Debug>(what: &str, vs: &nn::VarStore, r: Result<T, VidError>) {
    let err = r.expect_err(what);
    assert!(
        matches!(err, VidError::InvalidArgument { .. } | VidError::Torch(_)),
        "{what}: {err}"
    );
    assert_eq!(vs.len(), 0, "{what}: parameters left in the VarStore");
    assert!(
        vs.trainable_variables().is_empty(),
        "{what}: trainable left"
    );
}

#[test]
fn oversized_modules_are_errors_and_create_nothing() {
    let vs = nn::VarStore::new(Device::Cpu);
    let cfg = VidConfig::default();
    assert_ctor_refused(
        "vector_to_map 2^40 x 2^40",
        &vs,
        VidLoss::f_vector_to_map(vs.root() / "a", 8, 4, (1 << 40, 1 << 40), cfg),
    );
    assert_ctor_refused(
        "2^62 channels",
        &vs,
        VidLoss::f_new(vs.root() / "b", 4, 1 << 62, cfg),
    );
    assert_ctor_refused(
        "2^62 student channels",
        &vs,
        VidLoss::f_new(vs.root() / "c", 1 << 62, 4, cfg),
    );
    assert_ctor_refused(
        "linear 2^40 x 2^40",
        &vs,
        VidLoss::f_linear(vs.root() / "d", 1 << 40, 1 << 40, cfg),
    );
    // Addressable but not allocatable (16 TiB): the allocator's error, nothing registered.
    assert_ctor_refused(
        "16 TiB of parameters",
        &vs,
        VidLoss::f_linear(vs.root() / "e", 1 << 21, 1 << 21, cfg),
    );
}

#[test]
fn refused_distiller_leaves_the_var_store_untouched() {
    let cfg = VidConfig::default();
    for pairs in [
        vec![(4, 8, 1.0), (4, 8, f64::NAN)],
        vec![(4, 8, 1.0), (0, 8, 1.0)],
        vec![(4, 8, 1.0), (4, 1 << 62, 1.0)],
    ] {
        let vs = nn::VarStore::new(Device::Cpu);
        let r = VidDistiller::f_new(vs.root() / "vid", &pairs, cfg);
        let err = r.expect_err("refused pairs accepted");
        assert!(err.to_string().contains("pair 1"), "{err}");
        assert_eq!(vs.len(), 0, "{pairs:?}: parameters left behind");
    }
    // A good one registers every pair, under the same names as before.
    let vs = nn::VarStore::new(Device::Cpu);
    VidDistiller::f_new(vs.root() / "vid", &[(4, 8, 1.0), (8, 16, 0.5)], cfg).unwrap();
    let mut names: Vec<String> = vs.variables().into_keys().collect();
    names.sort();
    assert_eq!(
        names,
        [
            "vid.0.log_scale",
            "vid.0.regressor.0.weight",
            "vid.0.regressor.2.weight",
            "vid.0.regressor.4.weight",
            "vid.1.log_scale",
            "vid.1.regressor.0.weight",
            "vid.1.regressor.2.weight",
            "vid.1.regressor.4.weight",
        ]
    );
}

// ---------------------------------------------------------------------------------------
// 6. Near the eps floor in f64: no intermediate overflow in the log_scale gradient

/// The log_scale gradient of the op (CPU, and the CUDA plan under the host emulation) and of
/// the f64 reference, for `mean`, `target` in f64 and one `log_scale` value per channel.
fn log_scale_grads_near_the_floor(
    mean: &Tensor,
    target: &Tensor,
    alpha: f64,
    opts: &VidOptions,
) -> Vec<(String, Tensor, Tensor)> {
    let channels = mean.size()[1];
    let launcher = std::sync::Arc::new(common::emu_launcher::EmuLauncher::default());
    let emulated = common::emu_launcher::emulated(&launcher);
    let ops: [(&str, &common::LossFn); 2] = [("cpu", &f_vid_loss), ("cuda plan", &emulated)];
    let mut out = Vec::new();
    for (name, op) in ops {
        let log_scale = Tensor::full([channels], alpha, cpu(Kind::Double)).set_requires_grad(true);
        let loss = op(mean, target, &log_scale, opts).unwrap();
        let g = Tensor::run_backward(&[loss.sum(Kind::Double)], &[&log_scale], false, false);
        let upstream = match opts.reduction_mode() {
            Reduction::None => Tensor::ones_like(mean),
            _ => Tensor::from(1.0f64),
        };
        let (_, _, expected) = common::reference_grads(mean, target, &log_scale, opts, &upstream);
        out.push((name.to_string(), g[0].shallow_clone(), expected));
    }
    out
}

#[test]
fn f64_log_scale_gradient_near_the_eps_floor_does_not_overflow() {
    // var = softplus(ln 1e-307) + eps ~ 1.2e-307: M / var alone overflows f64.
    let zeros = Tensor::zeros([32, 1], cpu(Kind::Double));
    for reduction in [Reduction::Mean, Reduction::Sum, Reduction::None] {
        let opts = VidOptions::default()
            .eps(f64::MIN_POSITIVE)
            .reduction(reduction);
        for (name, got, expected) in
            log_scale_grads_near_the_floor(&zeros, &zeros, 1e-307f64.ln(), &opts)
        {
            let want = expected.double_value(&[0]);
            assert!(want.is_finite(), "the reference is finite: {want}");
            common::assert_close(
                &format!("{name} {reduction:?}"),
                &got,
                &expected,
                0.0,
                1e-12,
            );
        }
    }
}

#[test]
fn f64_log_scale_gradient_of_a_vanishing_sigmoid_is_zero_not_nan() {
    // sigmoid(-1e4) = 0 in f64 and var = eps: (M / var) * sigmoid was inf * 0.
    let denormal = |shape: &[i64]| random(shape, Kind::Double, Mem::Contiguous) * 1e-310;
    let (mean, target) = (denormal(&[16, 3, 2]), denormal(&[16, 3, 2]));
    for reduction in [Reduction::Mean, Reduction::Sum, Reduction::None] {
        let opts = VidOptions::default()
            .eps(f64::MIN_POSITIVE)
            .reduction(reduction);
        // The exact value, sigmoid(-1e4) / eps times O(1), is ~1e-4035: 0 in f64 (plain tch
        // ops give NaN here, so the reference is that 0, not their value).
        for (name, got, _) in log_scale_grads_near_the_floor(&mean, &target, -1e4, &opts) {
            let zeros = Tensor::zeros_like(&got);
            assert!(
                got.equal(&zeros),
                "{name} {reduction:?}: expected 0, got {got}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// 7. Reduction::None with a broadcast upstream gradient (`loss.sum().backward()`)

#[test]
fn none_backward_of_a_summed_loss_gives_the_reference_gradients() {
    let launcher = std::sync::Arc::new(common::emu_launcher::EmuLauncher::default());
    let emulated = common::emu_launcher::emulated(&launcher);
    let ops: [(&str, &common::LossFn); 2] = [("cpu", &f_vid_loss), ("cuda plan", &emulated)];
    for (name, op) in ops {
        for kind in [Kind::Float, Kind::Double, Kind::BFloat16] {
            for mem in [Mem::Contiguous, Mem::ChannelsLast] {
                for wants_log_scale in [true, false] {
                    let what = format!("{name} {kind:?} {mem:?} log_scale grad {wants_log_scale}");
                    let mean = random(&[3, 5, 4, 6], kind, mem).set_requires_grad(true);
                    let target = random(&[3, 5, 4, 6], kind, mem).set_requires_grad(true);
                    let scale_kind = if kind == Kind::Double {
                        kind
                    } else {
                        Kind::Float
                    };
                    let log_scale =
                        random_log_scale(5, scale_kind).set_requires_grad(wants_log_scale);
                    let opts = VidOptions::default().reduction(Reduction::None);
                    let loss = op(&mean, &target, &log_scale, &opts).unwrap();
                    // d(sum * g)/d loss: g expanded with stride 0, read in place.
                    let g = 2.5;
                    let root = loss.sum(kind) * g;
                    let mut inputs = vec![&mean, &target];
                    if wants_log_scale {
                        inputs.push(&log_scale);
                    }
                    let got = Tensor::run_backward(&[root], &inputs, false, false);
                    let upstream = Tensor::full(mean.size(), g, cpu(Kind::Double));
                    let (gm, gt, ga) =
                        common::reference_grads(&mean, &target, &log_scale, &opts, &upstream);
                    let (atol, rtol) = match kind {
                        Kind::Double => (1e-12, 1e-10),
                        Kind::Float => (1e-6, 1e-5),
                        _ => (1e-2, 1e-2),
                    };
                    let d = |t: &Tensor| t.to_kind(Kind::Double);
                    common::assert_close(&format!("{what}: d/dmean"), &d(&got[0]), &gm, atol, rtol);
                    common::assert_close(
                        &format!("{what}: d/dtarget"),
                        &d(&got[1]),
                        &gt,
                        atol,
                        rtol,
                    );
                    if wants_log_scale {
                        // A sum over the channel: judged against its magnitude.
                        let scale = ga.abs().max().double_value(&[]);
                        common::assert_close(
                            &format!("{what}: d/dlog_scale"),
                            &d(&got[2]),
                            &ga,
                            scale * rtol * 10.0,
                            rtol,
                        );
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// 8. Module configs checked against the VarStore, one-line errors

#[test]
fn configs_the_var_store_cannot_use_are_refused_at_construction() {
    for (what, kind, cfg) in [
        (
            "eps 1e-300, f32 store",
            Kind::Float,
            VidConfig {
                eps: 1e-300,
                ..Default::default()
            },
        ),
        (
            "eps 1e-40, f16 store",
            Kind::Half,
            VidConfig {
                eps: 1e-40,
                ..Default::default()
            },
        ),
        (
            "init_variance 1e300, f32 store",
            Kind::Float,
            VidConfig {
                init_variance: 1e300,
                ..Default::default()
            },
        ),
        (
            "init_variance 1e5, f16 store",
            Kind::Half,
            VidConfig {
                init_variance: 1e5,
                ..Default::default()
            },
        ),
    ] {
        let mut vs = nn::VarStore::new(Device::Cpu);
        vs.set_kind(kind);
        let err = VidLoss::f_new(vs.root() / "vid", 4, 8, cfg).expect_err(what);
        let message = err.to_string();
        assert!(
            matches!(&err, VidError::InvalidArgument { arg, .. } if arg.starts_with("cfg.")),
            "{what}: {message}"
        );
        assert!(
            message.len() < 300 && !message.contains('\n'),
            "{what}: {message}"
        );
        assert_eq!(vs.len(), 0, "{what}: parameters left behind");
    }
    // The same settings where the store can hold them: accepted, and every forward works.
    let mut vs = nn::VarStore::new(Device::Cpu);
    vs.set_kind(Kind::Double);
    for (name, cfg) in [
        (
            "a",
            VidConfig {
                eps: 1e-300,
                ..Default::default()
            },
        ),
        (
            "b",
            VidConfig {
                init_variance: 1e300,
                ..Default::default()
            },
        ),
    ] {
        let vid = VidLoss::f_new(vs.root() / name, 4, 8, cfg).unwrap();
        assert!(bool::try_from(vid.log_scale().isfinite().all()).unwrap());
        let s = Tensor::randn([2, 4, 3, 3], cpu(Kind::Double));
        let t = Tensor::randn([2, 8, 3, 3], cpu(Kind::Double));
        let loss = vid.f_forward(&s, &t).unwrap();
        assert!(loss.double_value(&[]).is_finite(), "{name}: {loss}");
    }
}

#[test]
fn eps_in_messages_is_in_scientific_notation() {
    let mean = random(&[2, 3], Kind::Float, Mem::Contiguous);
    let log_scale = Tensor::zeros([3], cpu(Kind::Float));
    let err = f_vid_loss(&mean, &mean, &log_scale, &VidOptions::default().eps(1e-300))
        .expect_err("eps below the f32 floor");
    let message = err.to_string();
    assert!(message.contains("1e-300"), "{message}");
    assert!(message.len() < 300, "{message}");
}

#[test]
fn module_on_a_cuda_device_without_a_gpu_is_a_one_line_error() {
    if tch::Cuda::device_count() > 0 {
        return; // A GPU: the module is created (tests/gpu.rs covers it).
    }
    let vs = nn::VarStore::new(Device::Cuda(0));
    let err = VidLoss::f_new(vs.root() / "vid", 4, 8, VidConfig::default())
        .expect_err("no GPU, yet a CUDA module was created");
    let message = err.to_string();
    assert!(matches!(err, VidError::CudaUnavailable(_)), "{message}");
    assert!(!message.contains('\n'), "more than one line: {message}");
    assert_eq!(vs.len(), 0);
}
