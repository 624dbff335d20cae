//! A whole distillation step in one CUDA graph: teacher forward (no grad), student forward,
//! the grouped VID loss over two layer pairs plus cross-entropy, backward and an SGD update,
//! captured once and replayed every step, so that a step costs one graph launch instead of
//! a few hundred kernel launches and their host work.
//!
//!     cargo run --release --example cuda_graph_step
//!
//! Needs a CUDA GPU; on a machine without one it says so and exits.

use std::time::Instant;

use anyhow::Result;
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};
use vidfuse::cuda::graph::{self, CudaGraph};
use vidfuse::nn::{VidConfig, VidLoss};
use vidfuse::{f_vid_loss_grouped, VidOptions, VidTerm};

const BATCH: i64 = 256;
const STEPS: usize = 50;

/// A small CNN that also returns its two block outputs (the features VID transfers).
struct Net {
    conv1: nn::Conv2D,
    conv2: nn::Conv2D,
    head: nn::Linear,
}

impl Net {
    fn new(p: &nn::Path, c1: i64, c2: i64) -> Net {
        let conv = |name: &str, i, o, stride| {
            nn::conv2d(
                p / name,
                i,
                o,
                3,
                nn::ConvConfig {
                    stride,
                    padding: 1,
                    ..Default::default()
                },
            )
        };
        Net {
            conv1: conv("conv1", 1, c1, 1),
            conv2: conv("conv2", c1, c2, 2),
            head: nn::linear(p / "head", c2, 10, Default::default()),
        }
    }

    /// (block 1 output, block 2 output, logits).
    fn forward(&self, x: &Tensor) -> (Tensor, Tensor, Tensor) {
        let f1 = self.conv1.forward(x).relu();
        let f2 = self.conv2.forward(&f1).relu();
        let logits = self
            .head
            .forward(&f2.mean_dim(&[2i64, 3][..], false, Kind::Float));
        (f1, f2, logits)
    }
}

/// Everything one training step reads and writes, at fixed addresses (a graph replays on the
/// same memory): the input batch, the labels, and the parameters.
struct Step {
    teacher: Net,
    student: Net,
    vid: [VidLoss; 2],
    params: Vec<Tensor>,
    x: Tensor,
    y: Tensor,
}

impl Step {
    /// Queues one step: losses, gradients and the SGD update; returns the total loss.
    fn run(&self, lr: f64) -> Result<Tensor> {
        let (t1, t2, _) = tch::no_grad(|| self.teacher.forward(&self.x));
        let (s1, s2, logits) = self.student.forward(&self.x);
        let means = [self.vid[0].f_regress(&s1)?, self.vid[1].f_regress(&s2)?];
        let terms = [
            VidTerm {
                mean: &means[0],
                target: &t1,
                log_scale: self.vid[0].log_scale(),
                weight: 1.0,
            },
            VidTerm {
                mean: &means[1],
                target: &t2,
                log_scale: self.vid[1].log_scale(),
                weight: 1.0,
            },
        ];
        let vid = f_vid_loss_grouped(&terms, &VidOptions::default())?;
        let loss = logits.cross_entropy_for_logits(&self.y) + vid;
        let params: Vec<&Tensor> = self.params.iter().collect();
        let grads = Tensor::f_run_backward(&[&loss], &params, false, false)?;
        tch::no_grad(|| -> Result<()> {
            for (p, g) in self.params.iter().zip(&grads) {
                let _ = p.detach().f_sub_(&(g * lr))?;
            }
            Ok(())
        })?;
        Ok(loss)
    }
}

fn main() -> Result<()> {
    if !tch::Cuda::is_available() {
        println!("cuda_graph_step needs a CUDA GPU (tch reports none): nothing to do here.");
        return Ok(());
    }
    let device = Device::Cuda(0);
    vidfuse::cuda::warm_up(device)?;
    let teacher_vs = nn::VarStore::new(device);
    let student_vs = nn::VarStore::new(device);
    let root = student_vs.root();
    let step = Step {
        teacher: Net::new(&teacher_vs.root(), 32, 64),
        student: Net::new(&(&root / "student"), 8, 16),
        vid: [
            VidLoss::new(&root / "vid1", 8, 32, VidConfig::default()),
            VidLoss::new(&root / "vid2", 16, 64, VidConfig::default()),
        ],
        params: student_vs.trainable_variables(),
        x: Tensor::zeros([BATCH, 1, 28, 28], (Kind::Float, device)),
        y: Tensor::zeros([BATCH], (Kind::Int64, device)),
    };
    let batch = |k: i64| {
        tch::manual_seed(k);
        (
            Tensor::randn([BATCH, 1, 28, 28], (Kind::Float, device)),
            Tensor::randint(10, [BATCH], (Kind::Int64, device)),
        )
    };
    let lr = 0.05;

    graph::with_new_stream(0, || -> Result<()> {
        // Eager steps first: kernels loaded, the autograd engine's threads started and the
        // allocator warm, none of which may happen during a capture.
        let eager_start = Instant::now();
        for k in 0..STEPS as i64 {
            let (x, y) = batch(k);
            tch::no_grad(|| {
                step.x.detach().copy_(&x);
                step.y.detach().copy_(&y);
            });
            let _ = step.run(lr)?;
        }
        graph::synchronize(0)?;
        let eager = eager_start.elapsed();

        let mut g = CudaGraph::new()?;
        let loss = g.capture(|| {
            step.run(lr)
                .map_err(|e| vidfuse::VidError::Torch(e.to_string()))
        })?;
        let replay_start = Instant::now();
        for k in 0..STEPS as i64 {
            let (x, y) = batch(1000 + k);
            tch::no_grad(|| {
                step.x.detach().copy_(&x);
                step.y.detach().copy_(&y);
            });
            g.replay()?;
        }
        graph::synchronize(0)?;
        let replayed = replay_start.elapsed();
        println!(
            "{STEPS} steps: eager {:.1} ms/step, graph replay {:.1} ms/step; last loss {:.4}",
            eager.as_secs_f64() * 1e3 / STEPS as f64,
            replayed.as_secs_f64() * 1e3 / STEPS as f64,
            loss.double_value(&[])
        );
        Ok(())
    })??;
    Ok(())
}
