//! Fixed cost per call and the grouped op (criterion).
//!
//! * `host`: forward + backward of a tiny `[64, 10]` f32 input, where the call's fixed cost
//!   (validation, allocations, the autograd node, dispatch) is everything: fused op vs the
//!   same loss in plain tch ops.
//!   `cuda_host` is the CUDA path's own host work for the same call (validation, launch
//!   plan, argument tables, workspace allocation, autograd node) with a launcher that
//!   launches nothing: the fixed cost the GPU path adds per call, measurable without a GPU.
//! * `pairs4`: four layer pairs of `[128, 64, 8, 8]` (f32 and bf16), forward + backward:
//!   one grouped call vs four single calls (summed with their weights) vs plain tch ops;
//!   `cuda_host_grouped` / `cuda_host_single`: the CUDA path's host work for the same.
//!
//! `VIDFUSE_BENCH_QUICK=1` shortens every measurement (a smoke run, not for figures).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use std::ffi::c_void;
use std::sync::Arc;
use std::time::Duration;
use tch::{Device, Kind, Tensor};
use vidfuse::cuda::{KernelLauncher, LaunchConfig};
use vidfuse::{vid_loss, vid_loss_grouped, VidError, VidOptions, VidTerm};

fn quick() -> bool {
    std::env::var_os("VIDFUSE_BENCH_QUICK").is_some()
}

fn configure(group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>) {
    if quick() {
        group
            .warm_up_time(Duration::from_millis(200))
            .measurement_time(Duration::from_millis(500))
            .sample_size(10);
    } else {
        group
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(4));
    }
}

/// The VID loss in plain tch ops (the peers' formulation): softplus variance, mean of the
/// per-element NLL.
fn plain_loss(mean: &Tensor, target: &Tensor, log_scale: &Tensor) -> Tensor {
    let c = log_scale.size()[0];
    let mut view = vec![1i64; mean.dim()];
    view[1] = c;
    let var = (log_scale.softplus() + 1e-5).view(&view[..]);
    let d = (mean - target).to_kind(Kind::Float);
    ((d.square() / &var + var.log()) * 0.5).mean(Kind::Float)
}

struct Pair {
    mean: Tensor,
    target: Tensor,
    log_scale: Tensor,
    weight: f64,
}

fn pair(shape: &[i64], kind: Kind, weight: f64) -> Pair {
    Pair {
        mean: Tensor::randn(shape, (kind, Device::Cpu)).set_requires_grad(true),
        target: Tensor::randn(shape, (kind, Device::Cpu)),
        log_scale: Tensor::full([shape[1]], 1.0, (Kind::Float, Device::Cpu))
            .set_requires_grad(true),
        weight,
    }
}

fn grads_of(loss: Tensor, pairs: &[Pair]) -> Vec<Tensor> {
    let inputs: Vec<&Tensor> = pairs.iter().flat_map(|p| [&p.mean, &p.log_scale]).collect();
    Tensor::run_backward(&[loss], &inputs, false, false)
}

/// Launches nothing: what remains of a CUDA call is its host work.
struct NullLauncher;

impl KernelLauncher for NullLauncher {
    fn launch(&self, _: &str, _: LaunchConfig, _: &mut [*mut c_void]) -> Result<(), VidError> {
        Ok(())
    }
}

fn null_launcher() -> Arc<dyn KernelLauncher + Send + Sync> {
    Arc::new(NullLauncher)
}

fn terms_of(pairs: &[Pair]) -> Vec<VidTerm<'_>> {
    pairs
        .iter()
        .map(|p| VidTerm {
            mean: &p.mean,
            target: &p.target,
            log_scale: &p.log_scale,
            weight: p.weight,
        })
        .collect()
}

fn bench_host(c: &mut Criterion) {
    let mut group = c.benchmark_group("host");
    configure(&mut group);
    let pairs = [pair(&[64, 10], Kind::Float, 1.0)];
    let p = &pairs[0];
    let opts = VidOptions::default();
    group.bench_function(BenchmarkId::new("fused", "64x10_f32"), |b| {
        b.iter(|| grads_of(vid_loss(&p.mean, &p.target, &p.log_scale, &opts), &pairs))
    });
    group.bench_function(BenchmarkId::new("plain", "64x10_f32"), |b| {
        b.iter(|| grads_of(plain_loss(&p.mean, &p.target, &p.log_scale), &pairs))
    });
    group.bench_function(BenchmarkId::new("cuda_host", "64x10_f32"), |b| {
        let launcher = null_launcher();
        b.iter(|| {
            let loss = vidfuse::f_vid_loss_with_launcher(
                launcher.clone(),
                &p.mean,
                &p.target,
                &p.log_scale,
                &opts,
            )
            .unwrap();
            grads_of(loss, &pairs)
        })
    });
    group.finish();
}

fn bench_pairs(c: &mut Criterion) {
    let mut group = c.benchmark_group("pairs4");
    configure(&mut group);
    let opts = VidOptions::default();
    for (kind, name) in [(Kind::Float, "f32"), (Kind::BFloat16, "bf16")] {
        let pairs: Vec<Pair> = [1.0, 0.5, 0.25, 0.125]
            .iter()
            .map(|&w| pair(&[128, 64, 8, 8], kind, w))
            .collect();
        let case = format!("4x128x64x8x8_{name}");
        group.bench_function(BenchmarkId::new("grouped", &case), |b| {
            b.iter(|| grads_of(vid_loss_grouped(&terms_of(&pairs), &opts), &pairs))
        });
        group.bench_function(BenchmarkId::new("cuda_host_grouped", &case), |b| {
            let launcher = null_launcher();
            b.iter(|| {
                let loss = vidfuse::f_vid_loss_grouped_with_launcher(
                    launcher.clone(),
                    &terms_of(&pairs),
                    &opts,
                )
                .unwrap();
                grads_of(loss, &pairs)
            })
        });
        group.bench_function(BenchmarkId::new("cuda_host_single", &case), |b| {
            let launcher = null_launcher();
            b.iter(|| {
                let loss = pairs
                    .iter()
                    .map(|p| {
                        vidfuse::f_vid_loss_with_launcher(
                            launcher.clone(),
                            &p.mean,
                            &p.target,
                            &p.log_scale,
                            &opts,
                        )
                        .unwrap()
                        .to_kind(Kind::Float)
                            * p.weight
                    })
                    .reduce(|a, b| a + b)
                    .unwrap();
                grads_of(loss, &pairs)
            })
        });
        group.bench_function(BenchmarkId::new("single", &case), |b| {
            b.iter(|| {
                let loss = pairs
                    .iter()
                    .map(|p| {
                        vid_loss(&p.mean, &p.target, &p.log_scale, &opts).to_kind(Kind::Float)
                            * p.weight
                    })
                    .reduce(|a, b| a + b)
                    .unwrap();
                grads_of(loss, &pairs)
            })
        });
        group.bench_function(BenchmarkId::new("plain", &case), |b| {
            b.iter(|| {
                let loss = pairs
                    .iter()
                    .map(|p| plain_loss(&p.mean, &p.target, &p.log_scale) * p.weight)
                    .reduce(|a, b| a + b)
                    .unwrap();
                grads_of(loss, &pairs)
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_host, bench_pairs);
criterion_main!(benches);
