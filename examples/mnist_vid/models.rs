//! Teacher and students, the transfer losses, and one student's training run.

use std::fmt;
use std::str::FromStr;
use std::sync::Mutex;

use tch::nn::{self, Module, ModuleT};
use tch::{Device, Kind, Tensor};
use vidfuse::nn::{VidConfig, VidDistiller, VidLoss};

use crate::data::Rng;
use crate::transfer::{accuracy, at_loss, kd_loss, nst_loss, sgd, Method};

/// Channels of the teacher's two block outputs (after ReLU and max-pool), and their sizes.
pub const T_CHANNELS: [i64; 2] = [32, 64];
pub const BLOCK_HW: [i64; 2] = [14, 7];
/// Channels of the CNN student's two block outputs at width 1.
const S_CHANNELS: [i64; 2] = [8, 16];
/// Width of the MLP student's two hidden layers at width 1.
const MLP_HIDDEN: i64 = 128;
/// The layer pair FitNet's hint uses: the last block (the reference's single hint layer).
const HINT_LAYER: usize = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StudentKind {
    Cnn,
    Mlp,
}

impl fmt::Display for StudentKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            StudentKind::Cnn => "cnn",
            StudentKind::Mlp => "mlp",
        })
    }
}

impl FromStr for StudentKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "cnn" => Ok(StudentKind::Cnn),
            "mlp" => Ok(StudentKind::Mlp),
            other => Err(format!("unknown student {other:?} (cnn, mlp)")),
        }
    }
}

/// AT and NST compare spatial maps: not for the MLP.
impl Method {
    pub fn applies_to(self, student: StudentKind) -> bool {
        student == StudentKind::Cnn || !matches!(self, Method::At | Method::Nst | Method::KdAt)
    }
}

/// A network's transfer points (one per block) and its logits.
pub struct Features {
    pub blocks: Vec<Tensor>,
    pub logits: Tensor,
}

impl Features {
    /// The same tensors, detached (the teacher's outputs, computed once).
    pub fn detach(&self) -> Features {
        Features {
            blocks: self.blocks.iter().map(Tensor::detach).collect(),
            logits: self.logits.detach(),
        }
    }
    /// New handles to the same tensors, for another thread.
    pub fn share(&self) -> Features {
        Features {
            blocks: self.blocks.iter().map(Tensor::shallow_clone).collect(),
            logits: self.logits.shallow_clone(),
        }
    }
    fn select(&self, layer: usize, idx: &Tensor) -> Tensor {
        self.blocks[layer].index_select(0, idx)
    }
}

/// conv3x3(1->32) BN ReLU pool [block 1: 32x14x14], conv3x3(32->64) BN ReLU pool [block 2:
/// 64x7x7], fc(3136->128) BN ReLU dropout(0.3), fc(128->10). 421k parameters. Batch norm
/// after every layer but the last, as in the reference networks, keeps SGD at their learning
/// rate stable (without it, KD + AT's large early gradients killed every ReLU of the head).
pub struct Teacher {
    blocks: Vec<ConvBlock>,
    fc1: DenseBlock,
    fc2: nn::Linear,
}

/// conv3x3 (no bias: batch norm follows), batch norm, ReLU, 2x2 max-pool.
pub struct ConvBlock {
    conv: nn::Conv2D,
    bn: nn::BatchNorm,
}

impl ConvBlock {
    fn new(vs: nn::Path, i: i64, o: i64) -> ConvBlock {
        let cfg = nn::ConvConfig {
            padding: 1,
            bias: false,
            ..Default::default()
        };
        ConvBlock {
            conv: nn::conv2d(&vs / "conv", i, o, 3, cfg),
            bn: nn::batch_norm2d(&vs / "bn", o, Default::default()),
        }
    }
    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        self.bn
            .forward_t(&self.conv.forward(x), train)
            .relu()
            .max_pool2d_default(2)
    }
}

/// Linear (no bias: batch norm follows), batch norm, ReLU.
pub struct DenseBlock {
    linear: nn::Linear,
    bn: nn::BatchNorm,
}

impl DenseBlock {
    fn new(vs: nn::Path, i: i64, o: i64) -> DenseBlock {
        let cfg = nn::LinearConfig {
            bias: false,
            ..Default::default()
        };
        DenseBlock {
            linear: nn::linear(&vs / "linear", i, o, cfg),
            bn: nn::batch_norm1d(&vs / "bn", o, Default::default()),
        }
    }
    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        self.bn.forward_t(&self.linear.forward(x), train).relu()
    }
}

impl Teacher {
    pub fn new(vs: nn::Path) -> Teacher {
        let flat = T_CHANNELS[1] * BLOCK_HW[1] * BLOCK_HW[1];
        Teacher {
            blocks: vec![
                ConvBlock::new(&vs / "b1", 1, T_CHANNELS[0]),
                ConvBlock::new(&vs / "b2", T_CHANNELS[0], T_CHANNELS[1]),
            ],
            fc1: DenseBlock::new(&vs / "fc1", flat, 128),
            fc2: nn::linear(&vs / "fc2", 128, 10, Default::default()),
        }
    }

    pub fn forward_t(&self, x: &Tensor, train: bool) -> Features {
        let mut h = x.shallow_clone();
        let mut blocks = Vec::with_capacity(2);
        for b in &self.blocks {
            h = b.forward_t(&h, train);
            blocks.push(h.shallow_clone());
        }
        let h = self.fc1.forward_t(&h.flatten(1, -1), train);
        let logits = self.fc2.forward(&h.dropout(0.3, train));
        Features { blocks, logits }
    }
}

/// The students, `width` times wider on a GPU. CNN (width 1): conv3x3(1->8) BN ReLU pool
/// [block 1: 8x14x14], conv3x3(8->16) BN ReLU pool [block 2: 16x7x7], fc(784->64) BN ReLU,
/// fc(64->10): 52k parameters. MLP (width 1): fc(784->128) BN ReLU [block 1], fc(128->128)
/// BN ReLU [block 2], fc(128->10): 118k parameters.
pub enum Student {
    Cnn(Vec<ConvBlock>, DenseBlock, nn::Linear),
    Mlp(Vec<DenseBlock>, nn::Linear),
}

impl Student {
    pub fn new(vs: nn::Path, kind: StudentKind, width: i64) -> Student {
        let dims = block_dims(kind, width);
        match kind {
            StudentKind::Cnn => Student::Cnn(
                vec![
                    ConvBlock::new(&vs / "b1", 1, dims[0]),
                    ConvBlock::new(&vs / "b2", dims[0], dims[1]),
                ],
                DenseBlock::new(&vs / "fc1", dims[1] * 49, 64 * width),
                nn::linear(&vs / "fc2", 64 * width, 10, Default::default()),
            ),
            StudentKind::Mlp => Student::Mlp(
                vec![
                    DenseBlock::new(&vs / "b1", 784, dims[0]),
                    DenseBlock::new(&vs / "b2", dims[0], dims[1]),
                ],
                nn::linear(&vs / "fc3", dims[1], 10, Default::default()),
            ),
        }
    }

    pub fn forward_t(&self, x: &Tensor, train: bool) -> Features {
        let mut blocks = Vec::with_capacity(2);
        let logits = match self {
            Student::Cnn(convs, fc1, fc2) => {
                let mut h = x.shallow_clone();
                for c in convs {
                    h = c.forward_t(&h, train);
                    blocks.push(h.shallow_clone());
                }
                fc2.forward(&fc1.forward_t(&h.flatten(1, -1), train))
            }
            Student::Mlp(hidden, out) => {
                let mut h = x.flatten(1, -1);
                for l in hidden {
                    h = l.forward_t(&h, train);
                    blocks.push(h.shallow_clone());
                }
                out.forward(&h)
            }
        };
        Features { blocks, logits }
    }
}

/// Channels (CNN) or widths (MLP) of the student's two transfer points.
pub fn block_dims(kind: StudentKind, width: i64) -> [i64; 2] {
    match kind {
        StudentKind::Cnn => S_CHANNELS.map(|c| c * width),
        StudentKind::Mlp => [MLP_HIDDEN * width; 2],
    }
}

/// The SGD schedule of the reference implementations (momentum 0.9, weight decay on every
/// weight but the variance, learning rate x0.1 at 5/8, 6/8 and 7/8 of training: their
/// epochs 150, 180, 210 of 240), with the length scaled to the training set.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    pub batch: i64,
    /// Epochs over the training subset...
    pub epochs: usize,
    /// ...but never fewer optimiser steps than this: small subsets are not under-trained.
    pub min_steps: usize,
}

impl Schedule {
    /// Optimiser steps for a training set of `n` images.
    pub fn steps(&self, n: i64) -> usize {
        let per_epoch = (n + self.batch - 1) / self.batch;
        (self.epochs * per_epoch as usize).max(self.min_steps)
    }

    /// The learning-rate multiplier at `step` of `steps`.
    pub fn factor(step: usize, steps: usize) -> f64 {
        let passed = [5, 6, 7].iter().filter(|&&k| 8 * step >= k * steps).count();
        0.1f64.powi(passed as i32)
    }

    fn optimizer(&self, vs: &nn::VarStore) -> anyhow::Result<nn::Optimizer> {
        sgd(vs, self.lr, self.momentum, self.weight_decay)
    }
}

/// The loss weights, the reference implementations' defaults.
#[derive(Debug, Clone, Copy)]
pub struct Weights {
    pub temperature: f64,
    pub fitnet: f64,
    pub at: f64,
    pub nst: f64,
    pub vid_lambda: f64,
    pub vid_init_variance: f64,
}

/// Which layer pairs VID uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Layers {
    /// Every block output (the protocol).
    All,
    /// The last block only (the earlier version of this experiment).
    Last,
}

/// How the VID regressor's weights start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum VidInit {
    /// As PyTorch's Conv2d / Linear (the crate's default, as the reference implementations).
    Reference,
    /// tch's default Kaiming-uniform: sqrt(6) = 2.45x wider (the earlier version).
    TchDefault,
}

/// One training run.
#[derive(Debug, Clone, Copy)]
pub struct RunSpec {
    pub kind: StudentKind,
    pub method: Method,
    pub layers: Layers,
    pub vid_init: VidInit,
    /// Learning rate of the VID variance (`log_scale`, an optimizer group of its own);
    /// `None`: the network's.
    pub variance_lr: Option<f64>,
    /// Record the VID variance during training and its fit at the end.
    pub trace_variance: bool,
}

/// What a run trains on and is evaluated on.
pub struct RunData {
    pub device: Device,
    pub width: i64,
    pub pool_x: Tensor,
    pub pool_y: Tensor,
    pub teacher_pool: Features,
    pub eval_x: Tensor,
    pub eval_y: Tensor,
    pub teacher_eval: Features,
}

impl RunData {
    /// New handles to the same tensors, for another thread.
    pub fn share(&self) -> RunData {
        RunData {
            device: self.device,
            width: self.width,
            pool_x: self.pool_x.shallow_clone(),
            pool_y: self.pool_y.shallow_clone(),
            teacher_pool: self.teacher_pool.share(),
            eval_x: self.eval_x.shallow_clone(),
            eval_y: self.eval_y.shallow_clone(),
            teacher_eval: self.teacher_eval.share(),
        }
    }
}

/// The VID variance of one layer pair over and after training.
pub struct VarianceTrace {
    /// (step, mean per-channel variance) during training.
    pub mean_over_steps: Vec<(usize, f64)>,
    /// Per channel at the end: the variance, and the mean squared residual of the regressed
    /// map on the training subset and on the evaluation images.
    pub variance: Vec<f64>,
    pub residual_train: Vec<f64>,
    pub residual_eval: Vec<f64>,
}

pub struct RunOutcome {
    pub accuracy: f64,
    pub steps: usize,
    /// Mean per-channel VID variance at the end, per layer pair (VID methods).
    pub final_variance: Vec<f64>,
    /// Per layer pair (when `trace_variance`).
    pub traces: Vec<VarianceTrace>,
}

/// Parameters are drawn from libtorch's global generator: workers build their models one
/// at a time, each after seeding it, so a run's initial weights do not depend on the others.
static INIT_LOCK: Mutex<()> = Mutex::new(());

/// FitNet's hint regressor, as the reference implementations' `ConvReg`: a projection onto
/// the teacher map (conv1x1 for the CNN, linear-and-reshape for the MLP), batch norm, ReLU.
struct Hint {
    project: Projection,
    bn: nn::BatchNorm,
}

enum Projection {
    Conv(nn::Conv2D),
    Linear(nn::Linear),
}

impl Hint {
    fn new(vs: nn::Path, kind: StudentKind, from: i64) -> Hint {
        let (c, hw) = (T_CHANNELS[HINT_LAYER], BLOCK_HW[HINT_LAYER]);
        let project = match kind {
            StudentKind::Cnn => {
                Projection::Conv(nn::conv2d(&vs / "conv", from, c, 1, Default::default()))
            }
            StudentKind::Mlp => Projection::Linear(nn::linear(
                &vs / "linear",
                from,
                c * hw * hw,
                Default::default(),
            )),
        };
        Hint {
            project,
            bn: nn::batch_norm2d(&vs / "bn", c, Default::default()),
        }
    }
    fn forward_t(&self, f: &Tensor, train: bool) -> Tensor {
        let (c, hw) = (T_CHANNELS[HINT_LAYER], BLOCK_HW[HINT_LAYER]);
        let x = match &self.project {
            Projection::Conv(conv) => conv.forward(f),
            Projection::Linear(l) => l.forward(f).view([-1, c, hw, hw]),
        };
        self.bn.forward_t(&x, train).relu()
    }
}

/// The optimizer group of the VID `log_scale`: its own learning rate, no weight decay.
const VARIANCE_GROUP: usize = 1;

/// VID-I on the chosen layer pairs, through the crate's `VidDistiller` (one fused call).
fn vid_distiller(
    vs: &nn::Path,
    kind: StudentKind,
    width: i64,
    layers: &[usize],
    w: &Weights,
) -> anyhow::Result<VidDistiller> {
    let cfg = VidConfig {
        init_variance: w.vid_init_variance,
        log_scale_group: Some(VARIANCE_GROUP),
        ..Default::default()
    };
    let dims = block_dims(kind, width);
    Ok(match kind {
        StudentKind::Cnn => {
            let pairs: Vec<(i64, i64, f64)> = layers
                .iter()
                .map(|&l| (dims[l], T_CHANNELS[l], w.vid_lambda))
                .collect();
            VidDistiller::f_new(vs, &pairs, cfg)?
        }
        StudentKind::Mlp => {
            let mut d = VidDistiller::empty();
            for (k, &l) in layers.iter().enumerate() {
                let hw = (BLOCK_HW[l], BLOCK_HW[l]);
                let loss = VidLoss::f_vector_to_map(vs / k, dims[l], T_CHANNELS[l], hw, cfg)?;
                d.f_push(loss, w.vid_lambda)?;
            }
            d
        }
    })
}

/// Trains one student on the training-pool images `subset` and evaluates it on
/// `data.eval_*`. Deterministic in `seed` (initial weights and batch order).
// Losses are summed out of place on purpose (`loss = loss + x`), leaving the autograd
// graph's intermediate tensors untouched.
#[allow(clippy::assign_op_pattern)]
pub fn train_student(
    spec: &RunSpec,
    sched: &Schedule,
    w: &Weights,
    data: &RunData,
    subset: &[i64],
    seed: u64,
) -> anyhow::Result<RunOutcome> {
    let layers: Vec<usize> = match spec.layers {
        Layers::All => vec![0, 1],
        Layers::Last => vec![1],
    };
    let dims = block_dims(spec.kind, data.width);
    let vs = nn::VarStore::new(data.device);
    let (student, hint, vid) = {
        let _guard = INIT_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        tch::manual_seed(10_000 + seed as i64);
        let root = vs.root();
        let student = Student::new(&root / "student", spec.kind, data.width);
        let hint = (spec.method == Method::FitNet)
            .then(|| Hint::new(&root / "hint", spec.kind, dims[HINT_LAYER]));
        let vid = if spec.method.uses_vid() {
            Some(vid_distiller(
                &(&root / "vid"),
                spec.kind,
                data.width,
                &layers,
                w,
            )?)
        } else {
            None
        };
        (student, hint, vid)
    };
    if spec.vid_init == VidInit::TchDefault {
        // The regressor weights as tch's default init draws them: the same uniform shape,
        // sqrt(6/fan_in) wide instead of PyTorch's sqrt(1/fan_in).
        tch::no_grad(|| {
            for (name, mut t) in vs.variables() {
                if name.starts_with("vid.")
                    && name.contains("regressor")
                    && name.ends_with("weight")
                {
                    let _ = t.f_mul_scalar_(6f64.sqrt());
                }
            }
        });
    }
    let mut opt = sched.optimizer(&vs)?;
    let variance_lr = spec.variance_lr.unwrap_or(sched.lr);
    if vid.is_some() {
        opt.set_weight_decay_group(VARIANCE_GROUP, 0.0);
    }
    let set_lr = |opt: &mut nn::Optimizer, factor: f64| {
        opt.set_lr_group(0, sched.lr * factor);
        if vid.is_some() {
            opt.set_lr_group(VARIANCE_GROUP, variance_lr * factor);
        }
    };

    let n = subset.len() as i64;
    let batch = sched.batch.min(n) as usize;
    let steps = sched.steps(n);
    let mut rng = Rng::new(2000 + seed);
    let mut order = subset.to_vec();
    rng.shuffle(&mut order);
    let mut cursor = 0;
    let trace_every = (steps / 100).max(1);
    let mut traces: Vec<Vec<(usize, f64)>> = vec![Vec::new(); layers.len()];
    let mut factor = f64::NAN;
    for step in 0..steps {
        if Schedule::factor(step, steps) != factor {
            factor = Schedule::factor(step, steps);
            set_lr(&mut opt, factor);
        }
        if spec.trace_variance && step % trace_every == 0 {
            record_variance(vid.as_ref(), step, &mut traces);
        }
        if cursor + batch > order.len() {
            rng.shuffle(&mut order);
            cursor = 0;
        }
        let idx = Tensor::from_slice(&order[cursor..cursor + batch]).to_device(data.device);
        cursor += batch;
        let x = data.pool_x.index_select(0, &idx);
        let y = data.pool_y.index_select(0, &idx);
        let out = student.forward_t(&x, true);
        let ce = out.logits.cross_entropy_for_logits(&y);
        let mut loss = if spec.method.uses_kd() {
            let t_logits = data.teacher_pool.logits.index_select(0, &idx);
            // Hinton's mix, as the reference implementations: 0.1 CE + 0.9 KD.
            ce * 0.1 + kd_loss(&out.logits, &t_logits, w.temperature) * 0.9
        } else {
            ce
        };
        let teacher = |l: usize| data.teacher_pool.select(l, &idx);
        if let Some(hint) = &hint {
            let h = hint.forward_t(&out.blocks[HINT_LAYER], true);
            loss = loss + h.mse_loss(&teacher(HINT_LAYER), tch::Reduction::Mean) * w.fitnet;
        }
        // AT and NST on every block output, as the reference implementations.
        for l in 0..out.blocks.len() {
            if spec.method.uses_at() {
                loss = loss + at_loss(&out.blocks[l], &teacher(l)) * w.at;
            } else if spec.method == Method::Nst {
                loss = loss + nst_loss(&out.blocks[l], &teacher(l)) * w.nst;
            }
        }
        if let Some(vid) = &vid {
            let s: Vec<Tensor> = layers
                .iter()
                .map(|&l| out.blocks[l].shallow_clone())
                .collect();
            let t: Vec<Tensor> = layers.iter().map(|&l| teacher(l)).collect();
            loss = loss + vid.f_forward(&s, &t)?;
        }
        opt.backward_step(&loss);
    }
    if spec.trace_variance {
        record_variance(vid.as_ref(), steps, &mut traces);
    }

    tch::no_grad(|| -> anyhow::Result<RunOutcome> {
        let eval = student.forward_t(&data.eval_x, false);
        let accuracy = accuracy(&eval.logits, &data.eval_y);
        let Some(vid) = &vid else {
            return Ok(RunOutcome {
                accuracy,
                steps,
                final_variance: Vec::new(),
                traces: Vec::new(),
            });
        };
        let final_variance = vid
            .pairs()
            .iter()
            .map(|(loss, _)| loss.variance().mean(Kind::Double).double_value(&[]))
            .collect();
        let mut out_traces = Vec::new();
        if spec.trace_variance {
            let idx = Tensor::from_slice(subset).to_device(data.device);
            let train = student.forward_t(&data.pool_x.index_select(0, &idx), false);
            for (k, ((loss, _), &l)) in vid.pairs().iter().zip(&layers).enumerate() {
                let residual = |s: &Tensor, t: &Tensor| -> anyhow::Result<Vec<f64>> {
                    let r = (loss.f_regress(s)? - t).square();
                    Ok(Vec::<f64>::try_from(r.mean_dim(
                        &[0i64, 2, 3][..],
                        false,
                        Kind::Double,
                    ))?)
                };
                out_traces.push(VarianceTrace {
                    mean_over_steps: std::mem::take(&mut traces[k]),
                    variance: Vec::<f64>::try_from(loss.variance().to_kind(Kind::Double))?,
                    residual_train: residual(&train.blocks[l], &data.teacher_pool.select(l, &idx))?,
                    residual_eval: residual(&eval.blocks[l], &data.teacher_eval.blocks[l])?,
                });
            }
        }
        Ok(RunOutcome {
            accuracy,
            steps,
            final_variance,
            traces: out_traces,
        })
    })
}

fn record_variance(vid: Option<&VidDistiller>, step: usize, traces: &mut [Vec<(usize, f64)>]) {
    if let Some(vid) = vid {
        for ((loss, _), trace) in vid.pairs().iter().zip(traces.iter_mut()) {
            let v = tch::no_grad(|| loss.variance().mean(Kind::Double).double_value(&[]));
            trace.push((step, v));
        }
    }
}

/// Trains the teacher on the whole training pool with the students' SGD schedule.
pub fn train_teacher(
    teacher: &Teacher,
    vs: &nn::VarStore,
    sched: &Schedule,
    x: &Tensor,
    y: &Tensor,
    mut on_step: impl FnMut(),
) -> anyhow::Result<()> {
    let mut opt = sched.optimizer(vs)?;
    let n = x.size()[0];
    let steps = sched.steps(n);
    let mut rng = Rng::new(1);
    let mut order: Vec<i64> = (0..n).collect();
    let mut cursor = order.len();
    let batch = sched.batch.min(n) as usize;
    for step in 0..steps {
        opt.set_lr(sched.lr * Schedule::factor(step, steps));
        if cursor + batch > order.len() {
            rng.shuffle(&mut order);
            cursor = 0;
        }
        let idx = Tensor::from_slice(&order[cursor..cursor + batch]).to_device(x.device());
        cursor += batch;
        let logits = teacher.forward_t(&x.index_select(0, &idx), true).logits;
        opt.backward_step(&logits.cross_entropy_for_logits(&y.index_select(0, &idx)));
        on_step();
    }
    Ok(())
}
