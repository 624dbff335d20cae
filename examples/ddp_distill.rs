//! Data-parallel VID distillation on the bundled MNIST subset, on PyTorch's own c10d
//! (vidfuse::dist): run it alone, or under torchrun with any number of processes:
//!
//! ```text
//! cargo build --release --example ddp_distill
//! target/release/examples/ddp_distill --steps 20 --batch-per-rank 64
//! torchrun --standalone --nproc-per-node 2 --no-python \
//!     target/release/examples/ddp_distill --steps 20 --batch-per-rank 32
//! ```
//!
//! A teacher MLP (784-256-128-10) is trained briefly, identically on every rank (then
//! broadcast from rank 0); a student MLP (784-64-32-10) learns from the labels and from the
//! teacher's two hidden layers through two VID-LP pairs (one `VidDistiller`). Step `k` uses
//! the same global batch of `world * batch-per-rank` samples at any world size (a fixed
//! shuffle of the training pool), rank `r` taking its slice, so the two commands above
//! train the same student. No dropout or batch norm: the local batches never interact.
//!
//! Each rank ends with one line:
//! `final: rank=<r> world=<w> step=<n> loss=<global mean loss> param_norm=<L2 norm of the
//! trainable parameters> param_sha256=<hash of their bytes>`.
//!
//! Options: `--steps N` (20), `--batch-per-rank B` (32), `--lr` (0.05), `--teacher-steps`
//! (50), `--timeout-secs` (300), `--device cpu|cuda` (CUDA device LOCAL_RANK when available),
//! `--data PATH` (data/mnist_5k.csv.gz), `--find-unused` (DDP's find_unused_parameters),
//! `--width W` (the student's hidden layers W times wider), `--bench N` (after training, N
//! timed backward passes with and without the gradient reduction, and of the all-reduce
//! alone: one `bench:` line per rank), `--bucket-kb K` (gradient buckets of K KiB instead
//! of 1 MiB first, then 25 MiB).
#[allow(dead_code)]
#[path = "mnist_vid/data.rs"]
mod data;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use sha2::{Digest, Sha256};
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, Tensor};
use vidfuse::dist::{Dist, DistOptions, LaunchEnv, ReduceOp};
use vidfuse::nn::{VidDistiller, VidLoss};

use data::{Dataset, Rng};

struct Args {
    steps: usize,
    batch_per_rank: usize,
    lr: f64,
    teacher_steps: usize,
    timeout: Duration,
    device: Option<String>,
    data: PathBuf,
    find_unused: bool,
    width: i64,
    bench: usize,
    bucket_kb: Option<usize>,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        steps: 20,
        batch_per_rank: 32,
        lr: 0.05,
        teacher_steps: 50,
        timeout: Duration::from_secs(300),
        device: None,
        data: PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/data/mnist_5k.csv.gz")),
        find_unused: false,
        width: 1,
        bench: 0,
        bucket_kb: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--find-unused" {
            args.find_unused = true;
            continue;
        }
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        let num = |v: &str| v.parse::<usize>().with_context(|| format!("{flag} {v:?}"));
        match flag.as_str() {
            "--steps" => args.steps = num(&value)?,
            "--batch-per-rank" => args.batch_per_rank = num(&value)?,
            "--teacher-steps" => args.teacher_steps = num(&value)?,
            "--timeout-secs" => args.timeout = Duration::from_secs(num(&value)? as u64),
            "--lr" => args.lr = value.parse().with_context(|| format!("--lr {value:?}"))?,
            "--device" => args.device = Some(value),
            "--width" => args.width = num(&value)?.max(1) as i64,
            "--bench" => args.bench = num(&value)?,
            "--bucket-kb" => args.bucket_kb = Some(num(&value)?.max(1)),
            "--data" => args.data = PathBuf::from(value),
            _ => bail!("unknown argument {flag}"),
        }
    }
    if args.batch_per_rank == 0 {
        bail!("--batch-per-rank must be positive");
    }
    Ok(args)
}

/// Linear layers with ReLU between; `forward` gives the hidden activations and the logits.
struct Mlp {
    layers: Vec<nn::Linear>,
}

impl Mlp {
    fn new(vs: nn::Path, dims: &[i64]) -> Mlp {
        let layers = dims
            .windows(2)
            .enumerate()
            .map(|(i, d)| nn::linear(&vs / format!("fc{i}"), d[0], d[1], Default::default()))
            .collect();
        Mlp { layers }
    }

    fn forward(&self, x: &Tensor) -> (Vec<Tensor>, Tensor) {
        let mut h = x.flatten(1, -1);
        let mut hidden = Vec::new();
        let last = self.layers.len() - 1;
        for (i, layer) in self.layers.iter().enumerate() {
            h = layer.forward(&h);
            if i < last {
                h = h.relu();
                hidden.push(h.shallow_clone());
            }
        }
        (hidden, h)
    }
}

/// The training pool's sample indices of global step `k`: `global` consecutive entries of a
/// fixed per-epoch shuffle (the same on every rank and at every world size).
fn global_batch(pool: usize, global: usize, step: usize) -> Vec<i64> {
    let per_epoch = pool / global;
    let (epoch, k) = (step / per_epoch.max(1), step % per_epoch.max(1));
    let mut order: Vec<i64> = (0..pool as i64).collect();
    Rng::new(1000 + epoch as u64).shuffle(&mut order);
    order[k * global..(k + 1) * global].to_vec()
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let launch = LaunchEnv::from_env()?;
    let device = match args.device.as_deref() {
        Some("cpu") => Device::Cpu,
        Some("cuda") | None if tch::Cuda::is_available() => {
            Device::Cuda(launch.as_ref().map_or(0, |l| l.local_rank))
        }
        Some("cuda") => bail!("--device cuda: CUDA is not available"),
        None => Device::Cpu,
        Some(other) => bail!("--device {other:?}: expected cpu or cuda"),
    };
    let mut options = DistOptions::default()
        .timeout(args.timeout)
        .find_unused_parameters(args.find_unused);
    if let Some(kb) = args.bucket_kb {
        options = options.buckets(kb << 10, kb << 10);
    }
    let dist = Dist::with_env(launch, device, &options)?;
    let (rank, world) = (dist.rank(), dist.world_size());

    let data = Dataset::load(&args.data)?;
    let (images, labels) = data.train_pool();
    let (images, labels) = (images.to_device(device), labels.to_device(device));
    let pool = data.train_pool_len();
    let global = world * args.batch_per_rank;
    if global > pool {
        bail!("a global batch of {global} exceeds the {pool} training images");
    }

    // The teacher: the same seed and data on every rank, then rank 0's copy everywhere.
    tch::manual_seed(0);
    let mut teacher_vs = nn::VarStore::new(device);
    let teacher = Mlp::new(teacher_vs.root(), &[784, 256, 128, 10]);
    let mut teacher_opt = nn::Sgd::default().build(&teacher_vs, 0.1)?;
    for step in 0..args.teacher_steps {
        let idx = Tensor::from_slice(&global_batch(pool, 128, step)).to_device(device);
        let (_, logits) = teacher.forward(&images.index_select(0, &idx));
        let loss = logits.cross_entropy_for_logits(&labels.index_select(0, &idx));
        teacher_opt.backward_step(&loss);
    }
    teacher_vs.freeze();
    dist.broadcast_var_store(&teacher_vs, 0)?;

    // The student and the VID pairs (regressors and variances): all data-parallel.
    tch::manual_seed(1);
    let vs = nn::VarStore::new(device);
    let hidden = [64 * args.width, 32 * args.width];
    let student = Mlp::new(&vs.root() / "student", &[784, hidden[0], hidden[1], 10]);
    let mut vid = VidDistiller::empty();
    let cfg = Default::default();
    vid.f_push(
        VidLoss::f_linear(&vs.root() / "vid0", hidden[0], 256, cfg)?,
        1.0,
    )?;
    vid.f_push(
        VidLoss::f_linear(&vs.root() / "vid1", hidden[1], 128, cfg)?,
        1.0,
    )?;
    let ddp = dist.data_parallel(&vs)?;
    let mut opt = nn::Sgd::default().build(&vs, args.lr)?;

    let mut last_loss = Tensor::zeros([], (Kind::Float, device));
    let start = Instant::now();
    for step in 0..args.steps {
        let batch = global_batch(pool, global, step);
        let idx = Tensor::from_slice(dist.shard(&batch)).to_device(device);
        let (x, y) = (images.index_select(0, &idx), labels.index_select(0, &idx));
        let (teacher_hidden, _) = tch::no_grad(|| teacher.forward(&x));
        let (hidden, logits) = student.forward(&x);
        let loss = logits.cross_entropy_for_logits(&y) + vid.f_forward(&hidden, &teacher_hidden)?;
        opt.zero_grad();
        ddp.backward(&loss)
            .with_context(|| format!("rank {rank}: step {step}"))?;
        opt.step();
        last_loss = loss.detach();
        println!(
            "step {step} rank={rank} local_loss={:.6}",
            last_loss.double_value(&[])
        );
    }
    let elapsed = start.elapsed();

    let loss = dist.all_reduce_mean(&last_loss)?.double_value(&[]);
    let params = vs.trainable_variables();
    let mut norm2 = 0.0f64;
    let mut hash = Sha256::new();
    for p in &params {
        let p = p.to_device(Device::Cpu).contiguous();
        norm2 += p
            .to_kind(Kind::Double)
            .square()
            .sum(Kind::Double)
            .double_value(&[]);
        let n = p.numel();
        let mut bytes = vec![0f32; n];
        p.f_copy_data(&mut bytes, n)?;
        for v in bytes {
            hash.update(v.to_le_bytes());
        }
    }
    if args.bench > 0 {
        // The same step's backward with the reduction (ddp), without it (plain autograd; the
        // ranks' gradients then differ, which timing does not mind), and the all-reduce of
        // all gradients alone: the reduction's cost that backward did not hide is
        // ddp - plain, out of allreduce.
        let batch = global_batch(pool, global, 0);
        let idx = Tensor::from_slice(dist.shard(&batch)).to_device(device);
        let (x, y) = (images.index_select(0, &idx), labels.index_select(0, &idx));
        let (teacher_hidden, _) = tch::no_grad(|| teacher.forward(&x));
        let step_loss = || -> anyhow::Result<Tensor> {
            let (hidden, logits) = student.forward(&x);
            Ok(logits.cross_entropy_for_logits(&y) + vid.f_forward(&hidden, &teacher_hidden)?)
        };
        let flat = Tensor::cat(
            &params
                .iter()
                .map(|p| p.grad().flatten(0, -1))
                .collect::<Vec<_>>(),
            0,
        );
        // Seconds in: backward with the reduction, plain backward, the all-reduce alone.
        let mut spent = [0.0f64; 3];
        for _ in 0..args.bench {
            for (which, seconds) in spent.iter_mut().enumerate() {
                let loss = step_loss()?;
                opt.zero_grad();
                dist.barrier()?;
                let t = Instant::now();
                match which {
                    0 => ddp.backward(&loss)?,
                    1 => loss.f_backward()?,
                    _ => dist.all_reduce(&mut flat.shallow_clone(), ReduceOp::Sum)?,
                }
                *seconds += t.elapsed().as_secs_f64();
            }
        }
        let n = args.bench as f64 / 1e3;
        let [ddp_ms, plain_ms, reduce_ms] = spent.map(|s| s / n);
        let hidden = if dist.is_distributed() {
            format!("{:.2}", 1.0 - (ddp_ms - plain_ms) / reduce_ms)
        } else {
            "n/a".into()
        };
        println!(
            "bench: rank={rank} world={world} grad_bytes={} buckets={} backward_plain_ms={plain_ms:.3} backward_ddp_ms={ddp_ms:.3} allreduce_ms={reduce_ms:.3} hidden_share={hidden}",
            flat.numel() * 4,
            ddp.buckets()?.1,
        );
    }
    dist.barrier()?;
    println!(
        "timing: rank={rank} world={world} steps={} mean_step_ms={:.3}",
        args.steps,
        elapsed.as_secs_f64() * 1e3 / args.steps.max(1) as f64
    );
    println!(
        "final: rank={rank} world={world} step={} loss={loss:.8e} param_norm={:.8e} param_sha256={:x}",
        args.steps,
        norm2.sqrt(),
        hash.finalize()
    );
    Ok(())
}
