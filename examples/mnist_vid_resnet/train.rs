//! The translated training data with the teacher's outputs, one student's run, the
//! ceiling's head, the teacher's training, and the linear probe of what transferred.

use std::sync::Mutex;

use tch::nn::{self, Module, ModuleT};
use tch::{Device, Kind, Tensor};
use vidfuse::nn::{VidConfig, VidDistiller};

use crate::data::{Rng, PIXEL_MEAN, PIXEL_STD};
use crate::net::{Features, ResNet, STUDENT_WIDTHS, TEACHER_WIDTHS};
use crate::transfer::{accuracy, at_loss, kd_loss, nst_loss, sgd, Method};

/// Translations of up to this many pixels in each direction...
const MAX_SHIFT: i64 = 2;
/// ...so this many per image, row-major over (dy, dx).
pub const SHIFTS: i64 = (2 * MAX_SHIFT + 1) * (2 * MAX_SHIFT + 1);
/// The shift index of the untranslated image.
const CENTRE: i64 = SHIFTS / 2;
/// FitNet's hint stage: the middle one (the reference implementations' single hint layer).
const HINT_STAGE: usize = 1;
/// The optimizer group of the VID `log_scale`: its own learning rate, no weight decay.
const VARIANCE_GROUP: usize = 1;
/// Test-accuracy checkpoints per run (the curves, and the best-checkpoint accuracy).
const CHECKPOINTS: usize = 10;

/// Every translation of the normalised images `x` ([N, 1, 28, 28]) by up to `MAX_SHIFT`
/// pixels, the uncovered border filled with the background (a 0 pixel): [N * SHIFTS, 1, 28,
/// 28], image-major.
pub fn translations(x: &Tensor) -> Tensor {
    let size = x.size();
    let (n, h, w) = (size[0], size[2], size[3]);
    let background = f64::from(-PIXEL_MEAN / PIXEL_STD);
    let m = MAX_SHIFT;
    let padded = x.pad([m, m, m, m], "constant", background);
    let mut shifted = Vec::with_capacity(SHIFTS as usize);
    for dy in 0..=2 * m {
        for dx in 0..=2 * m {
            shifted.push(padded.narrow(2, dy, h).narrow(3, dx, w));
        }
    }
    Tensor::stack(&shifted, 1).view([n * SHIFTS, 1, h, w])
}

/// SGD with momentum and weight decay (not on the VID variance), a cosine learning rate,
/// and the same number of steps whatever the training set's size.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    pub batch: i64,
    pub steps: usize,
}

impl Schedule {
    /// The learning-rate multiplier at `step`: half a cosine from 1 to 0.
    pub fn factor(&self, step: usize) -> f64 {
        0.5 * (1.0 + (std::f64::consts::PI * step as f64 / self.steps as f64).cos())
    }

    fn optimizer(&self, vs: &nn::VarStore) -> anyhow::Result<nn::Optimizer> {
        sgd(vs, self.lr, self.momentum, self.weight_decay)
    }
}

/// Batch indices: a shuffled pass over `0..n`, reshuffled when it runs out.
struct Batches {
    rng: Rng,
    order: Vec<i64>,
    cursor: usize,
    batch: usize,
}

impl Batches {
    fn new(n: i64, batch: i64, seed: u64) -> Batches {
        Batches {
            rng: Rng::new(seed),
            order: (0..n).collect(),
            cursor: usize::MAX,
            batch: batch.min(n) as usize,
        }
    }

    fn next(&mut self, device: Device) -> Tensor {
        if self.cursor.saturating_add(self.batch) > self.order.len() {
            self.rng.shuffle(&mut self.order);
            self.cursor = 0;
        }
        let idx = &self.order[self.cursor..self.cursor + self.batch];
        self.cursor += self.batch;
        Tensor::from_slice(idx).to_device(device)
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
}

/// VID-I's variance: where it starts and how fast it learns.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VidSetting {
    pub init_variance: f64,
    pub variance_lr: f64,
}

/// A cell's training set: every translation of its images, with the (eval-mode) teacher's
/// outputs on each, computed once. Looking them up is identical to running the teacher on
/// every augmented batch, at a fraction of the cost.
pub struct CellData {
    /// [images * SHIFTS, 1, 28, 28], image-major.
    pub x: Tensor,
    pub y: Tensor,
    pub teacher: Features,
    /// The teacher's pooled last stage, its head's input (for the ceiling).
    pub teacher_pooled: Tensor,
}

impl CellData {
    pub fn new(teacher: &ResNet, x: &Tensor, y: &Tensor) -> CellData {
        tch::no_grad(|| {
            let x = translations(x);
            let parts: Vec<Features> = x
                .split(2048, 0)
                .iter()
                .map(|chunk| teacher.forward_t(chunk, false))
                .collect();
            let teacher_out = Features::cat(&parts);
            CellData {
                teacher_pooled: teacher.pooled(teacher_out.last_stage(), false),
                teacher: teacher_out,
                y: y.repeat_interleave_self_int(SHIFTS, 0, None),
                x,
            }
        })
    }

    /// New handles to the same tensors, for another thread.
    pub fn share(&self) -> CellData {
        CellData {
            x: self.x.shallow_clone(),
            y: self.y.shallow_clone(),
            teacher: self.teacher.share(),
            teacher_pooled: self.teacher_pooled.shallow_clone(),
        }
    }

    /// The untranslated images and their labels.
    fn centred(&self) -> (Tensor, Tensor) {
        let idx = Tensor::arange_start_step(
            CENTRE,
            self.x.size()[0],
            SHIFTS,
            (Kind::Int64, self.x.device()),
        );
        (self.x.index_select(0, &idx), self.y.index_select(0, &idx))
    }
}

/// Images that are evaluated on (not translated), with the teacher's outputs on them.
pub struct EvalData {
    pub x: Tensor,
    pub y: Tensor,
    pub teacher: Features,
    pub teacher_pooled: Tensor,
}

impl EvalData {
    pub fn new(teacher: &ResNet, x: Tensor, y: Tensor) -> EvalData {
        tch::no_grad(|| {
            let out = teacher.forward_t(&x, false);
            EvalData {
                teacher_pooled: teacher.pooled(out.last_stage(), false),
                teacher: out,
                x,
                y,
            }
        })
    }

    pub fn share(&self) -> EvalData {
        EvalData {
            x: self.x.shallow_clone(),
            y: self.y.shallow_clone(),
            teacher: self.teacher.share(),
            teacher_pooled: self.teacher_pooled.shallow_clone(),
        }
    }
}

/// One checkpoint of a run.
#[derive(Debug, Clone, Copy)]
pub struct CurvePoint {
    pub step: usize,
    /// Mean training loss (all terms) since the previous checkpoint.
    pub train_loss: f64,
    /// On the cell's untranslated images, and on the evaluation images.
    pub train_accuracy: f64,
    pub eval_accuracy: f64,
}

pub struct RunOutcome {
    /// Evaluation accuracy at the end of training...
    pub accuracy: f64,
    /// ...and at its best checkpoint.
    pub best_accuracy: f64,
    pub curve: Vec<CurvePoint>,
    /// Per stage: the test R^2 of the linear probe (empty when not asked for).
    pub probe_r2: Vec<f64>,
    /// Mean per-channel VID variance at the end, per stage (VID methods).
    pub final_variance: Vec<f64>,
}

/// Parameters are drawn from libtorch's global generator: workers build their models one
/// at a time, each after seeding it, so a run's initial weights do not depend on the others.
static INIT_LOCK: Mutex<()> = Mutex::new(());

/// FitNet's regressor: conv1x1 and batch norm, as the reference implementations' `ConvReg`
/// without its final ReLU, which could not fit the residual stream's negative values.
struct Hint {
    conv: nn::Conv2D,
    bn: nn::BatchNorm,
}

impl Hint {
    fn new(vs: nn::Path) -> Hint {
        let (from, to) = (STUDENT_WIDTHS[HINT_STAGE], TEACHER_WIDTHS[HINT_STAGE]);
        Hint {
            conv: nn::conv2d(&vs / "conv", from, to, 1, Default::default()),
            bn: nn::batch_norm2d(&vs / "bn", to, Default::default()),
        }
    }
    fn forward_t(&self, f: &Tensor, train: bool) -> Tensor {
        self.bn.forward_t(&self.conv.forward(f), train)
    }
}

/// Trains one student on `cell` with `method` (VID-I's variance as `vid` says) and
/// evaluates it on `eval`; with `probe`, fits the linear probe on it (the validation
/// digits) and scores it on `eval`. Deterministic in `seed` (initial weights and batches).
// Losses are summed out of place on purpose (`loss = loss + x`), leaving the autograd
// graph's intermediate tensors untouched.
#[allow(clippy::assign_op_pattern, clippy::too_many_arguments)]
pub fn train_student(
    method: Method,
    vid_setting: VidSetting,
    sched: &Schedule,
    w: &Weights,
    cell: &CellData,
    eval: &EvalData,
    probe: Option<&EvalData>,
    seed: u64,
) -> anyhow::Result<RunOutcome> {
    let device = cell.x.device();
    let vs = nn::VarStore::new(device);
    let (student, hint, vid) = {
        let _guard = INIT_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        tch::manual_seed(10_000 + seed as i64);
        let root = vs.root();
        let student = ResNet::new(&(&root / "student"), STUDENT_WIDTHS);
        let hint = (method == Method::FitNet).then(|| Hint::new(&root / "hint"));
        let vid = if method.uses_vid() {
            let cfg = VidConfig {
                init_variance: vid_setting.init_variance,
                log_scale_group: Some(VARIANCE_GROUP),
                ..Default::default()
            };
            let pairs: Vec<(i64, i64, f64)> = STUDENT_WIDTHS
                .iter()
                .zip(TEACHER_WIDTHS)
                .map(|(&s, t)| (s, t, w.vid_lambda))
                .collect();
            Some(VidDistiller::f_new(&root / "vid", &pairs, cfg)?)
        } else {
            None
        };
        (student, hint, vid)
    };
    let mut opt = sched.optimizer(&vs)?;
    if vid.is_some() {
        opt.set_weight_decay_group(VARIANCE_GROUP, 0.0);
    }

    let uses_stages = !matches!(method, Method::Student | Method::Kd);
    let mut batches = Batches::new(cell.x.size()[0], sched.batch, 2000 + seed);
    let every = (sched.steps / CHECKPOINTS).max(1);
    let (train_x, train_y) = cell.centred();
    let mut curve = Vec::new();
    let mut loss_sum = Tensor::zeros([], (Kind::Double, device));
    let mut since = 0usize;
    for step in 0..sched.steps {
        let factor = sched.factor(step);
        opt.set_lr_group(0, sched.lr * factor);
        if vid.is_some() {
            opt.set_lr_group(VARIANCE_GROUP, vid_setting.variance_lr * factor);
        }
        let idx = batches.next(device);
        let (x, y) = (cell.x.index_select(0, &idx), cell.y.index_select(0, &idx));
        // Only what the method reads is gathered: a batch of stage outputs is 11 MB.
        let teacher_stages = if uses_stages {
            cell.teacher.stage_rows(&idx)
        } else {
            Vec::new()
        };
        let out = student.forward_t(&x, true);
        let ce = out.logits.cross_entropy_for_logits(&y);
        let mut loss = if method.uses_kd() {
            let teacher_logits = cell.teacher.logits.index_select(0, &idx);
            // Hinton's mix, as the reference implementations: 0.1 CE + 0.9 KD.
            ce * 0.1 + kd_loss(&out.logits, &teacher_logits, w.temperature) * 0.9
        } else {
            ce
        };
        if let Some(hint) = &hint {
            let h = hint.forward_t(&out.stages[HINT_STAGE], true);
            let target = &teacher_stages[HINT_STAGE];
            loss = loss + h.mse_loss(target, tch::Reduction::Mean) * w.fitnet;
        }
        // AT and NST on every stage output, as the reference implementations.
        for (s, t) in out.stages.iter().zip(&teacher_stages) {
            if method.uses_at() {
                loss = loss + at_loss(s, t) * w.at;
            } else if method == Method::Nst {
                loss = loss + nst_loss(s, t) * w.nst;
            }
        }
        if let Some(vid) = &vid {
            loss = loss + vid.f_forward(&out.stages, &teacher_stages)?;
        }
        opt.backward_step(&loss);
        loss_sum += loss.detach().to_kind(Kind::Double);
        since += 1;
        if (step + 1) % every == 0 || step + 1 == sched.steps {
            let (train_accuracy, eval_accuracy) = tch::no_grad(|| {
                let train = student.forward_t(&train_x, false);
                let test = student.forward_t(&eval.x, false);
                (
                    accuracy(&train.logits, &train_y),
                    accuracy(&test.logits, &eval.y),
                )
            });
            curve.push(CurvePoint {
                step: step + 1,
                train_loss: loss_sum.double_value(&[]) / since as f64,
                train_accuracy,
                eval_accuracy,
            });
            let _ = loss_sum.zero_();
            since = 0;
        }
    }

    tch::no_grad(|| -> anyhow::Result<RunOutcome> {
        let last = curve.last().map_or(f64::NAN, |p| p.eval_accuracy);
        let best = curve
            .iter()
            .map(|p| p.eval_accuracy)
            .fold(f64::NAN, f64::max);
        let probe_r2 = match probe {
            Some(fit) => {
                let s_fit = student.forward_t(&fit.x, false).stages;
                let s_eval = student.forward_t(&eval.x, false).stages;
                (0..s_fit.len())
                    .map(|l| {
                        linear_probe_r2(
                            &s_fit[l],
                            &fit.teacher.stages[l],
                            &s_eval[l],
                            &eval.teacher.stages[l],
                        )
                    })
                    .collect::<anyhow::Result<_>>()?
            }
            None => Vec::new(),
        };
        let final_variance = vid.as_ref().map_or_else(Vec::new, |vid| {
            vid.pairs()
                .iter()
                .map(|(loss, _)| loss.variance().mean(Kind::Double).double_value(&[]))
                .collect()
        });
        Ok(RunOutcome {
            accuracy: last,
            best_accuracy: best,
            curve,
            probe_r2,
            final_variance,
        })
    })
}

/// One row per position: [N, C, H, W] -> [N * H * W, C], in f64.
fn positions(f: &Tensor) -> Tensor {
    let c = f.size()[1];
    f.permute([0, 2, 3, 1])
        .reshape([-1, c])
        .to_kind(Kind::Double)
}

/// How much of the teacher's stage output a linear map of the student's explains: the
/// least-squares 1x1 map (with bias) from `s_fit` to `t_fit`, scored by its R^2 on
/// (`s_eval`, `t_eval`), over every position and teacher channel.
pub fn linear_probe_r2(
    s_fit: &Tensor,
    t_fit: &Tensor,
    s_eval: &Tensor,
    t_eval: &Tensor,
) -> anyhow::Result<f64> {
    let with_bias = |x: Tensor| {
        let ones = Tensor::ones([x.size()[0], 1], (Kind::Double, x.device()));
        Tensor::cat(&[x, ones], 1)
    };
    let x = with_bias(positions(s_fit));
    let y = positions(t_fit);
    let gram = x.tr().mm(&x);
    let d = gram.size()[0];
    // A tiny ridge keeps the solve defined when a channel is constant.
    let ridge = 1e-9 * gram.trace().double_value(&[]) / d as f64 + 1e-12;
    let eye = Tensor::eye(d, (Kind::Double, x.device()));
    let map = Tensor::f_linalg_solve(&(gram + eye * ridge), &x.tr().mm(&y), true)?;
    let xe = with_bias(positions(s_eval));
    let ye = positions(t_eval);
    let sse = (&ye - xe.mm(&map))
        .square()
        .sum(Kind::Double)
        .double_value(&[]);
    let sst = (&ye - ye.mean_dim(&[0i64][..], true, Kind::Double))
        .square()
        .sum(Kind::Double)
        .double_value(&[]);
    Ok(1.0 - sse / sst)
}

/// The ceiling: the teacher's frozen trunk with a new linear head trained on the cell's
/// images (the students' schedule); its accuracy on `eval`.
pub fn train_ceiling(
    sched: &Schedule,
    cell: &CellData,
    eval: &EvalData,
    seed: u64,
) -> anyhow::Result<f64> {
    let device = cell.x.device();
    let vs = nn::VarStore::new(device);
    let width = TEACHER_WIDTHS[TEACHER_WIDTHS.len() - 1];
    let head = {
        let _guard = INIT_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        tch::manual_seed(10_000 + seed as i64);
        nn::linear(vs.root() / "head", width, 10, Default::default())
    };
    let mut opt = sched.optimizer(&vs)?;
    let mut batches = Batches::new(cell.x.size()[0], sched.batch, 2000 + seed);
    for step in 0..sched.steps {
        opt.set_lr(sched.lr * sched.factor(step));
        let idx = batches.next(device);
        let logits = head.forward(&cell.teacher_pooled.index_select(0, &idx));
        opt.backward_step(&logits.cross_entropy_for_logits(&cell.y.index_select(0, &idx)));
    }
    Ok(tch::no_grad(|| {
        accuracy(&head.forward(&eval.teacher_pooled), &eval.y)
    }))
}

/// Trains the teacher on the whole training pool, each image translated at random, with
/// the students' schedule for `sched.steps` steps.
pub fn train_teacher(
    teacher: &ResNet,
    vs: &nn::VarStore,
    sched: &Schedule,
    x: &Tensor,
    y: &Tensor,
    mut on_step: impl FnMut(),
) -> anyhow::Result<()> {
    let mut opt = sched.optimizer(vs)?;
    let device = x.device();
    let mut batches = Batches::new(x.size()[0], sched.batch, 1);
    let mut shifts = Rng::new(3);
    for step in 0..sched.steps {
        opt.set_lr(sched.lr * sched.factor(step));
        let idx = batches.next(device);
        let b = idx.size()[0];
        let pick: Vec<i64> = (0..b)
            .map(|i| i * SHIFTS + (shifts.next_u64() % SHIFTS as u64) as i64)
            .collect();
        let xb = translations(&x.index_select(0, &idx))
            .index_select(0, &Tensor::from_slice(&pick).to_device(device));
        let logits = teacher.forward_t(&xb, true).logits;
        opt.backward_step(&logits.cross_entropy_for_logits(&y.index_select(0, &idx)));
        on_step();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn background() -> f64 {
        f64::from(-PIXEL_MEAN / PIXEL_STD)
    }

    #[test]
    fn translations_move_the_image_and_fill_the_background() {
        tch::manual_seed(1);
        let x = Tensor::rand([2, 1, 28, 28], (Kind::Float, Device::Cpu));
        let out = translations(&x);
        assert_eq!(out.size(), [2 * SHIFTS, 1, 28, 28]);
        let side = 2 * MAX_SHIFT + 1;
        for i in 0..2 {
            for k in 0..SHIFTS {
                let (dy, dx) = (k / side - MAX_SHIFT, k % side - MAX_SHIFT);
                let got = out.get(i * SHIFTS + k);
                for (r, c) in [(0, 0), (1, 27), (13, 14), (27, 0), (26, 26), (2, 25)] {
                    let (sr, sc) = (r + dy, c + dx);
                    let want = if (0..28).contains(&sr) && (0..28).contains(&sc) {
                        x.double_value(&[i, 0, sr, sc])
                    } else {
                        background()
                    };
                    let v = got.double_value(&[0, r, c]);
                    assert!(
                        (v - want).abs() < 1e-6,
                        "image {i} shift {k} at ({r},{c}): {v} vs {want}"
                    );
                }
            }
            let centre = out.get(i * SHIFTS + CENTRE);
            assert!(
                centre.equal(&x.get(i)),
                "the centre shift is the image itself"
            );
        }
    }

    #[test]
    fn cell_data_holds_the_teacher_on_every_translation() {
        tch::manual_seed(2);
        let vs = nn::VarStore::new(Device::Cpu);
        let teacher = ResNet::new(&vs.root(), [4, 8, 8]);
        let x = Tensor::randn([3, 1, 28, 28], (Kind::Float, Device::Cpu));
        let y = Tensor::from_slice(&[4i64, 1, 7]);
        let cell = CellData::new(&teacher, &x, &y);
        assert_eq!(cell.x.size()[0], 3 * SHIFTS);
        let idx = Tensor::from_slice(&[0i64, 12, 30, 74]);
        let want =
            tch::no_grad(|| teacher.forward_t(&translations(&x).index_select(0, &idx), false));
        for (g, w) in cell.teacher.stage_rows(&idx).iter().zip(&want.stages) {
            assert!(g.allclose(w, 1e-5, 1e-5, false));
        }
        let got_logits = cell.teacher.logits.index_select(0, &idx);
        assert!(got_logits.allclose(&want.logits, 1e-5, 1e-5, false));
        assert_eq!(
            Vec::<i64>::try_from(cell.y.index_select(0, &idx)).unwrap(),
            [4, 4, 1, 7]
        );
        let (centred_x, centred_y) = cell.centred();
        assert!(centred_x.equal(&x));
        assert!(centred_y.equal(&y));
    }

    #[test]
    fn the_probe_scores_a_linear_map_one_and_noise_near_zero() {
        tch::manual_seed(3);
        let opts = (Kind::Float, Device::Cpu);
        let (s_fit, s_eval) = (
            Tensor::randn([64, 4, 5, 5], opts),
            Tensor::randn([64, 4, 5, 5], opts),
        );
        let map = Tensor::randn([3, 4, 1, 1], opts);
        let bias = Tensor::randn([3], opts);
        let linear = |s: &Tensor| s.conv2d(&map, Some(&bias), [1, 1], [0, 0], [1, 1], 1);
        let r2 = linear_probe_r2(&s_fit, &linear(&s_fit), &s_eval, &linear(&s_eval)).unwrap();
        assert!(r2 > 1.0 - 1e-6, "{r2}");
        let noise = |_: &Tensor| Tensor::randn([64, 3, 5, 5], opts);
        let r2 = linear_probe_r2(&s_fit, &noise(&s_fit), &s_eval, &noise(&s_eval)).unwrap();
        assert!(r2.abs() < 0.02, "{r2}");
    }

    #[test]
    fn the_learning_rate_follows_half_a_cosine() {
        let sched = Schedule {
            lr: 0.05,
            momentum: 0.9,
            weight_decay: 0.0,
            batch: 8,
            steps: 400,
        };
        assert_eq!(sched.factor(0), 1.0);
        assert!((sched.factor(200) - 0.5).abs() < 1e-12);
        assert!((sched.factor(100) - (0.5 + 0.5 * std::f64::consts::FRAC_1_SQRT_2)).abs() < 1e-12);
        assert!(sched.factor(399) > 0.0 && sched.factor(399) < 1e-4);
    }
}
