//! Tests on a real CUDA device; each skips with a printed reason when there is none.
//! `scripts/gpu-run.sh` runs them (with compute-sanitizer for the small case) on a lent GPU.

mod common;

use common::*;
use tch::{Device, Kind, Tensor};
use vidfuse::cuda::graph::{self, CudaGraph};
use vidfuse::{f_vid_loss, f_vid_loss_grouped, Reduction, VidError, VidOptions, VidTerm};

/// The CUDA device to test on, or None (with the reason printed).
fn gpu() -> Option<Device> {
    if !tch::Cuda::is_available() {
        println!("SKIPPED: no CUDA device (tch::Cuda::is_available() is false)");
        return None;
    }
    if let Err(e) = vidfuse::cuda::warm_up(Device::Cuda(0)) {
        panic!("a CUDA device is present but the kernels cannot be loaded: {e}");
    }
    Some(Device::Cuda(0))
}

/// Fills the caching allocator's free blocks with NaN, so that an output the kernels fail to
/// write shows up as NaN instead of as a stale correct value.
fn poison_allocator(device: Device) {
    let _ = Tensor::full([64 << 20], f64::NAN, (Kind::Float, device));
}

/// Leaf inputs like `leaf_inputs`, on `device`.
fn device_inputs(
    shape: &[i64],
    kind: Kind,
    scale_kind: Kind,
    mem: Mem,
    opts: &VidOptions,
    device: Device,
) -> [Tensor; 4] {
    let (m, t, a, up) = leaf_inputs(shape, kind, scale_kind, mem, opts);
    let on = |x: &Tensor, grad: bool| x.detach().to_device(device).set_requires_grad(grad);
    [
        on(&m, true),
        on(&t, true),
        on(&a, true),
        up.to_device(device),
    ]
}

fn check_cases(device: Device, shapes: &[Vec<i64>], kinds: &[Kind]) {
    for shape in shapes {
        for &kind in kinds {
            for mem in [Mem::Contiguous, Mem::ChannelsLast] {
                for opts in all_options() {
                    let numel: i64 = shape.iter().product();
                    if kind == Kind::Half && opts.reduction_mode() == Reduction::Sum && numel > 8192
                    {
                        continue; // the f16 sum overflows to inf, correctly; not comparable
                    }
                    let scale_kind = if kind == Kind::Double {
                        kind
                    } else {
                        Kind::Float
                    };
                    let [m, t, a, up] = device_inputs(shape, kind, scale_kind, mem, &opts, device);
                    poison_allocator(device);
                    let what = format!("cuda {shape:?} {kind:?} {mem:?} {opts:?}");
                    check_op(&what, &m, &t, &a, &opts, &up);
                }
            }
        }
    }
}

#[test]
fn gpu_matches_reference_every_dtype_layout_reduction() {
    let Some(device) = gpu() else { return };
    let shapes = [
        vec![3i64, 5, 7, 9], // tile, odd sizes
        vec![2, 3, 4500],    // warp, two segments per row
        vec![4, 70, 4, 5],   // tile on the [N][C*S] view
        vec![33, 1000],      // [N, C]
        vec![2, 1, 3, 600],  // C = 1, warp
        vec![2, 3, 2, 3, 5], // 5-D
    ];
    check_cases(
        device,
        &shapes,
        &[Kind::Float, Kind::Double, Kind::Half, Kind::BFloat16],
    );
}

/// Shapes whose combine splits its chunks into runs (two launches; tests/emu.rs checks the
/// split on the CPU): channels-last [1040, 64, 8, 8] (520 f32 chunks of one partial per
/// channel) and NCHW [4224, 2, 240] (66 chunks of 240 partials per channel); each in both
/// layouts, so the other layout's single-launch combine is compared on the same data sizes.
#[test]
fn gpu_split_combine_matches_reference() {
    let Some(device) = gpu() else { return };
    check_cases(
        device,
        &[vec![1040, 64, 8, 8], vec![4224, 2, 240]],
        &[Kind::Float, Kind::BFloat16],
    );
}

/// A small case for compute-sanitizer (memcheck, racecheck): both traversals, every reduction.
#[test]
fn gpu_sanitizer_small_case() {
    let Some(device) = gpu() else { return };
    check_cases(
        device,
        &[vec![2, 3, 600], vec![3, 5, 7, 9]],
        &[Kind::Float, Kind::BFloat16],
    );
}

#[test]
fn gpu_misaligned_views() {
    let Some(device) = gpu() else { return };
    // Long rows (warp traversal) and short rows (tile traversal).
    for (kind, shape) in [
        (Kind::Float, [2i64, 3, 600]),
        (Kind::BFloat16, [2, 3, 600]),
        (Kind::Float, [3, 5, 63]),
        (Kind::BFloat16, [3, 5, 63]),
    ] {
        let numel: i64 = shape.iter().product();
        let view = |x: Tensor| x.to_device(device).narrow(0, 1, numel).view(shape);
        let opts = VidOptions::default();
        let m = view(random(&[numel + 1], kind, Mem::Contiguous)).set_requires_grad(true);
        let t = view(random(&[numel + 1], kind, Mem::Contiguous));
        let a = random_log_scale(shape[1], Kind::Float)
            .to_device(device)
            .set_requires_grad(true);
        let up = random_upstream(&shape, kind, &opts).to_device(device);
        check_op(&format!("cuda misaligned {kind:?}"), &m, &t, &a, &opts, &up);
    }
}

#[test]
fn gpu_results_are_bitwise_deterministic() {
    let Some(device) = gpu() else { return };
    let opts = VidOptions::default();
    for mem in [Mem::Contiguous, Mem::ChannelsLast] {
        let [m, t, a, up] = device_inputs(
            &[16, 64, 32, 32],
            Kind::Float,
            Kind::Float,
            mem,
            &opts,
            device,
        );
        let what = format!("cuda {mem:?}");
        assert_deterministic(&f_vid_loss, &what, [&m, &t, &a], &opts, &up);
    }
}

#[test]
fn gpu_mixed_devices_are_an_error() {
    let Some(device) = gpu() else { return };
    let m = Tensor::randn([2, 3, 4], (Kind::Float, device));
    let t = Tensor::randn([2, 3, 4], cpu(Kind::Float));
    let a = Tensor::randn([3], (Kind::Float, device));
    match f_vid_loss(&m, &t, &a, &VidOptions::default()) {
        Err(VidError::InvalidArgument { arg: "target", .. }) => {}
        other => panic!("expected an error naming `target`, got {other:?}"),
    }
}

#[test]
fn gpu_non_default_stream() {
    let Some(device) = gpu() else { return };
    graph::with_new_stream(0, || {
        let opts = VidOptions::default().reduction(Reduction::Sum);
        let [m, t, a, up] = device_inputs(
            &[8, 16, 30, 30],
            Kind::Float,
            Kind::Float,
            Mem::ChannelsLast,
            &opts,
            device,
        );
        check_op("cuda side stream", &m, &t, &a, &opts, &up);
    })
    .unwrap();
}

#[test]
fn gpu_cuda_graph_capture_and_replay() {
    let Some(device) = gpu() else { return };
    graph::with_new_stream(0, || {
        let opts = VidOptions::default();
        let [m, t, a, _] = device_inputs(
            &[8, 32, 16, 16],
            Kind::Float,
            Kind::Float,
            Mem::Contiguous,
            &opts,
            device,
        );
        // Warm up forward and backward on this stream: the kernels are loaded, the autograd
        // engine's threads exist and the allocator has blocks before the capture.
        let loss = f_vid_loss(&m, &t, &a, &opts).unwrap();
        let _ = Tensor::run_backward(&[&loss], &[&m, &a], false, false);
        let mut g = CudaGraph::new().unwrap();
        let (loss, grads) = g
            .capture(|| {
                let loss = f_vid_loss(&m, &t, &a, &opts)?;
                let grads = Tensor::f_run_backward(&[&loss], &[&m, &a], false, false)?;
                Ok((loss, grads))
            })
            .unwrap();
        for step in 0..3 {
            // New values in the captured inputs' memory, then replay.
            tch::no_grad(|| {
                m.detach()
                    .copy_(&Tensor::randn(m.size(), (Kind::Float, device)));
                a.detach()
                    .copy_(&Tensor::randn(a.size(), (Kind::Float, device)));
            });
            g.replay().unwrap();
            graph::synchronize(0).unwrap();
            let expected = reference_loss(&m, &t, &a, &opts);
            assert_close(
                &format!("replay {step}: loss"),
                &loss,
                &expected,
                1e-6,
                1e-5,
            );
            let (gm, _, ga) =
                reference_grads(&m, &t, &a, &opts, &Tensor::from(1.0).to_device(device));
            assert_close(
                &format!("replay {step}: d/dmean"),
                &grads[0],
                &gm,
                1e-9,
                1e-5,
            );
            assert_close(
                &format!("replay {step}: d/dlog_scale"),
                &grads[1],
                &ga,
                1e-7,
                1e-4,
            );
        }
    })
    .unwrap();
}

/// The grouped op on the device: same numbers as the CPU (f32 terms of different layouts
/// and a bf16 term), and captured in a CUDA graph with its backward, then replayed on new
/// values (the README's CUDA-graph recipe, without the networks).
#[test]
fn gpu_grouped_matches_the_cpu_and_replays_in_a_graph() {
    let Some(device) = gpu() else { return };
    graph::with_new_stream(0, || {
        let opts = VidOptions::default();
        let shapes: [(&[i64], Kind, Mem); 3] = [
            (&[8, 32, 8, 8], Kind::Float, Mem::Contiguous),
            (&[8, 16, 16, 16], Kind::Float, Mem::ChannelsLast),
            (&[8, 64, 4, 4], Kind::BFloat16, Mem::Contiguous),
        ];
        let inputs: Vec<[Tensor; 4]> = shapes
            .iter()
            .map(|(shape, kind, mem)| device_inputs(shape, *kind, Kind::Float, *mem, &opts, device))
            .collect();
        let terms: Vec<VidTerm<'_>> = inputs
            .iter()
            .enumerate()
            .map(|(k, [m, t, a, _])| VidTerm {
                mean: m,
                target: t,
                log_scale: a,
                weight: 1.0 + k as f64,
            })
            .collect();
        let params: Vec<&Tensor> = inputs.iter().flat_map(|[m, _, a, _]| [m, a]).collect();
        let cpu_check = |loss: &Tensor, grads: &[Tensor], what: &str| {
            let on_cpu: Vec<[Tensor; 3]> = inputs
                .iter()
                .map(|[m, t, a, _]| {
                    let c = |x: &Tensor| x.detach().to_device(Device::Cpu).set_requires_grad(true);
                    [c(m), c(t).set_requires_grad(false), c(a)]
                })
                .collect();
            let cpu_terms: Vec<VidTerm<'_>> = on_cpu
                .iter()
                .enumerate()
                .map(|(k, [m, t, a])| VidTerm {
                    mean: m,
                    target: t,
                    log_scale: a,
                    weight: 1.0 + k as f64,
                })
                .collect();
            let expected = f_vid_loss_grouped(&cpu_terms, &opts).unwrap();
            assert_close(&format!("{what}: loss"), loss, &expected, 1e-6, 1e-5);
            let cpu_params: Vec<&Tensor> = on_cpu.iter().flat_map(|[m, _, a]| [m, a]).collect();
            let cpu_grads = Tensor::run_backward(&[&expected], &cpu_params, false, false);
            for (i, (g, e)) in grads.iter().zip(&cpu_grads).enumerate() {
                let scale = e.to_kind(Kind::Double).abs().max().double_value(&[]);
                assert_close(
                    &format!("{what}: grad {i}"),
                    g,
                    e,
                    1e-3 * scale + 1e-12,
                    1e-2,
                );
            }
        };
        let loss = f_vid_loss_grouped(&terms, &opts).unwrap();
        let grads = Tensor::run_backward(&[&loss], &params, false, false);
        cpu_check(&loss, &grads, "eager");

        let mut g = CudaGraph::new().unwrap();
        let (loss, grads) = g
            .capture(|| {
                let loss = f_vid_loss_grouped(&terms, &opts)?;
                let grads = Tensor::f_run_backward(&[&loss], &params, false, false)?;
                Ok((loss, grads))
            })
            .unwrap();
        for step in 0..3 {
            tch::no_grad(|| {
                for [m, _, a, _] in &inputs {
                    m.detach()
                        .copy_(&Tensor::randn(m.size(), (m.kind(), device)));
                    a.detach()
                        .copy_(&Tensor::randn(a.size(), (Kind::Float, device)));
                }
            });
            g.replay().unwrap();
            graph::synchronize(0).unwrap();
            cpu_check(&loss, &grads, &format!("replay {step}"));
        }
    })
    .unwrap();
}

#[test]
fn gpu_over_two_billion_elements() {
    let Some(device) = gpu() else { return };
    // bf16 [1, 2, 2^30 + 8]: 2^31 + 16 elements, 4 GiB per tensor; needs 64-bit indexing, and
    // rows a multiple of the 8-element pack, so the 16-byte path runs past 2^31.
    let s = (1i64 << 30) + 8;
    let shape = [1i64, 2, s];
    let m = Tensor::randn(shape, (Kind::BFloat16, device)).set_requires_grad(true);
    let t = Tensor::randn(shape, (Kind::BFloat16, device));
    let a = Tensor::from_slice(&[0.3f32, -0.7])
        .to_device(device)
        .set_requires_grad(true);
    let opts = VidOptions::default().reduction(Reduction::Sum);
    let loss = f_vid_loss(&m, &t, &a, &opts).unwrap();
    // Reference: per-channel sums of squared differences in f64, chunk by chunk.
    let chunk = 1i64 << 27;
    let var: Vec<f64> =
        Vec::<f64>::try_from((a.to_kind(Kind::Double).softplus() + 1e-5).to_device(Device::Cpu))
            .unwrap();
    let mut expected = 0.0;
    for c in 0..2 {
        let mut q = 0.0;
        let mut start = 0;
        while start < s {
            let len = chunk.min(s - start);
            let d = m
                .detach()
                .select(1, c)
                .narrow(1, start, len)
                .to_kind(Kind::Double)
                - t.select(1, c).narrow(1, start, len).to_kind(Kind::Double);
            q += d.square().sum(Kind::Double).double_value(&[]);
            start += len;
        }
        expected += 0.5 * (q / var[c as usize] + s as f64 * var[c as usize].ln());
    }
    let got = loss.to_kind(Kind::Double).double_value(&[]);
    assert!(
        ((got - expected) / expected).abs() < 2.0 * 2f64.powi(-8),
        "loss {got} vs {expected}"
    );
    // Gradient at the far end of the second channel (element index > 2^31).
    let grads = Tensor::run_backward(&[&loss], &[&m], false, false);
    let last = |x: &Tensor| {
        x.select(1, 1)
            .narrow(1, s - 1, 1)
            .to_kind(Kind::Double)
            .double_value(&[0, 0])
    };
    let expected_grad = (last(&m) - last(&t)) / var[1];
    let got_grad = last(&grads[0]);
    assert!(
        (got_grad - expected_grad).abs() <= 1e-2 * expected_grad.abs() + 1e-6,
        "grad {got_grad} vs {expected_grad}"
    );
}

#[test]
fn gpu_second_device_when_present() {
    let Some(_) = gpu() else { return };
    if tch::Cuda::device_count() < 2 {
        println!("SKIPPED: only one CUDA device");
        return;
    }
    let device = Device::Cuda(1);
    let opts = VidOptions::default();
    let [m, t, a, up] = device_inputs(
        &[4, 8, 20, 20],
        Kind::Float,
        Kind::Float,
        Mem::Contiguous,
        &opts,
        device,
    );
    check_op("cuda:1", &m, &t, &a, &opts, &up);
}
