//! CPU benchmark of the fused VID loss against the same loss written with plain tch ops.
//!
//! Groups (criterion ids `group/function/case`, case = `shape_dtype_layout`):
//!
//! * `vid_fwd`: the forward pass alone (inputs require grad, as in training).
//!   Throughput = the bytes forward must move: read `mean` and `target`.
//! * `vid_fwd_bwd`: forward then backward, the gradients of `mean` and `log_scale` returned
//!   by `run_backward` (nothing accumulated into `.grad`). `fused` is the one-pass path (the
//!   forward writes `d/d mean` while it reads; throughput = 3 tensors: read `mean` and
//!   `target`, write the gradient), `fused_two_pass` the two-pass path
//!   (`gradients_in_forward(false)`; 5 tensors: forward reads 2, backward reads 2 and
//!   writes 1), `plain` the same loss in plain tch ops (bytes counted as for two passes).
//!   `fused_accum` is the fused op driven like PyTorch's `loss.backward()` in a loop, which
//!   adds each new gradient into the existing `mean.grad` (an extra read-read-write pass);
//!   that is how the PyTorch peers (eager, torch.compile) are timed.
//! * `copy`: `dst.copy_(src)` of 2^24 f32 values, the machine's copy bandwidth measured the
//!   way the peers script measures it (bytes = read + write), so the bytes floor comes from a
//!   number measured in the same run.
//!
//! `scripts/bench-cpu.sh` runs this, the PyTorch peers, and writes the combined table.
//! `VIDFUSE_BENCH_QUICK=1` shortens every measurement (a smoke run, not for figures).

use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use std::time::Duration;
use tch::{Device, Kind, Tensor};
use vidfuse::{vid_loss, VidOptions};

/// Shapes: about 1M and 4M elements (the second is the peers' CPU shape), short NCHW rows
/// (64 elements: the shape where the fused op once lost to torch.compile), and `[N, C]`.
const SHAPES: [&[i64]; 4] = [
    &[16, 64, 32, 32],
    &[64, 64, 32, 32],
    &[256, 256, 8, 8],
    &[4096, 1000],
];
const KINDS: [(Kind, &str); 2] = [(Kind::Float, "f32"), (Kind::BFloat16, "bf16")];
const LAYOUTS: [&str; 2] = ["nchw", "nhwc"];

struct Case {
    id: String,
    mean: Tensor,
    target: Tensor,
    log_scale: Tensor,
    bytes_per_tensor: u64,
}

fn cases() -> Vec<Case> {
    let mut out = Vec::new();
    for shape in SHAPES {
        for (kind, kind_name) in KINDS {
            // [N, C] has one layout (rows of C).
            let layouts = if shape.len() == 4 {
                &LAYOUTS[..]
            } else {
                &LAYOUTS[..1]
            };
            for &layout in layouts {
                let make = || {
                    if layout == "nchw" {
                        Tensor::randn(shape, (kind, Device::Cpu))
                    } else {
                        // As a tch user makes channels-last: NHWC, contiguous, permuted back.
                        let (n, c, h, w) = (shape[0], shape[1], shape[2], shape[3]);
                        Tensor::randn([n, h, w, c], (kind, Device::Cpu)).permute([0, 3, 1, 2])
                    }
                };
                let mean = make().set_requires_grad(true);
                let target = make();
                let c = shape[1];
                // The peers' alpha: f32, requiring grad.
                let log_scale =
                    Tensor::full([c], 1.0, (Kind::Float, Device::Cpu)).set_requires_grad(true);
                let numel = mean.numel() as u64;
                let shape_str = shape
                    .iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join("x");
                out.push(Case {
                    id: format!("{shape_str}_{kind_name}_{layout}"),
                    bytes_per_tensor: numel * kind.elt_size_in_bytes() as u64,
                    mean,
                    target,
                    log_scale,
                });
            }
        }
    }
    out
}

/// The same loss in plain tch ops, in the inputs' dtype (the variance is computed from the
/// f32 `log_scale`, then cast to the inputs' dtype).
fn plain_loss(mean: &Tensor, target: &Tensor, log_scale: &Tensor) -> Tensor {
    let eps = 1e-5;
    let c = log_scale.size()[0];
    let mut view = vec![1i64; mean.dim()];
    view[1] = c;
    let var = (log_scale.softplus() + eps)
        .to_kind(mean.kind())
        .view(&view[..]);
    (((mean - target).square() / &var + var.log()) * 0.5).mean(None)
}

fn fused_loss(mean: &Tensor, target: &Tensor, log_scale: &Tensor) -> Tensor {
    vid_loss(mean, target, log_scale, &VidOptions::default())
}

fn fused_two_pass_loss(mean: &Tensor, target: &Tensor, log_scale: &Tensor) -> Tensor {
    let opts = VidOptions::default().gradients_in_forward(false);
    vid_loss(mean, target, log_scale, &opts)
}

fn quick() -> bool {
    std::env::var_os("VIDFUSE_BENCH_QUICK").is_some()
}

fn configure(group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>) {
    group.sampling_mode(SamplingMode::Flat).sample_size(10);
    if quick() {
        group
            .warm_up_time(Duration::from_millis(100))
            .measurement_time(Duration::from_millis(200));
    } else {
        group
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(2));
    }
}

fn bench_copy(c: &mut Criterion) {
    let n = 1i64 << 24;
    let src = Tensor::rand([n], (Kind::Float, Device::Cpu));
    let mut dst = src.empty_like();
    let mut group = c.benchmark_group("copy");
    configure(&mut group);
    group.sample_size(20);
    group.throughput(Throughput::Bytes(2 * 4 * n as u64));
    group.bench_function(BenchmarkId::new("copy_", "16777216_f32"), |b| {
        b.iter(|| dst.copy_(&src))
    });
    group.finish();
}

fn bench_forward(c: &mut Criterion) {
    let mut group = c.benchmark_group("vid_fwd");
    configure(&mut group);
    for case in cases() {
        let (m, t, a) = (&case.mean, &case.target, &case.log_scale);
        group.throughput(Throughput::Bytes(2 * case.bytes_per_tensor));
        group.bench_function(BenchmarkId::new("fused", &case.id), |b| {
            b.iter(|| fused_loss(m, t, a))
        });
        group.bench_function(BenchmarkId::new("plain", &case.id), |b| {
            b.iter(|| plain_loss(m, t, a))
        });
    }
    group.finish();
}

fn bench_forward_backward(c: &mut Criterion) {
    let mut group = c.benchmark_group("vid_fwd_bwd");
    configure(&mut group);
    for case in cases() {
        let (m, t, a) = (&case.mean, &case.target, &case.log_scale);
        group.throughput(Throughput::Bytes(3 * case.bytes_per_tensor));
        group.bench_function(BenchmarkId::new("fused", &case.id), |b| {
            b.iter(|| Tensor::run_backward(&[fused_loss(m, t, a)], &[m, a], false, false))
        });
        group.throughput(Throughput::Bytes(5 * case.bytes_per_tensor));
        group.bench_function(BenchmarkId::new("fused_two_pass", &case.id), |b| {
            b.iter(|| {
                let loss = fused_two_pass_loss(m, t, a);
                Tensor::run_backward(&[loss], &[m, a], false, false)
            })
        });
        group.bench_function(BenchmarkId::new("plain", &case.id), |b| {
            b.iter(|| Tensor::run_backward(&[plain_loss(m, t, a)], &[m, a], false, false))
        });
        // Like the peers' loop: `loss.backward()` adding into an existing `mean.grad`.
        fused_loss(m, t, a).backward();
        group.bench_function(BenchmarkId::new("fused_accum", &case.id), |b| {
            b.iter(|| fused_loss(m, t, a).backward())
        });
    }
    group.finish();
}

criterion_group!(benches, bench_copy, bench_forward, bench_forward_backward);
criterion_main!(benches);
