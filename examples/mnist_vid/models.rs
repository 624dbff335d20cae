//! Teacher and students, the distillation losses, and one student's training run.

use std::fmt;
use std::str::FromStr;

use tch::nn::{self, OptimizerConfig};
use tch::{Device, Kind, Tensor};
use vidfuse::nn::{VidConfig, VidLoss};

/// Channels and size of the teacher's intermediate map that FitNet, AT and VID transfer.
pub const T_CHANNELS: i64 = 64;
pub const T_HW: i64 = 7;
/// The CNN student's intermediate map: [N, 16, 7, 7].
pub const S_CHANNELS: i64 = 16;
/// The MLP student's transferred hidden layer width.
pub const MLP_HIDDEN: i64 = 128;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Student,
    Kd,
    FitNet,
    At,
    Vid,
    KdVid,
}

impl Method {
    /// Attention transfer needs a spatial map in the student: not for the MLP.
    pub fn applies_to(self, student: StudentKind) -> bool {
        !(self == Method::At && student == StudentKind::Mlp)
    }
    pub fn uses_kd(self) -> bool {
        matches!(self, Method::Kd | Method::KdVid)
    }
    pub fn uses_vid(self) -> bool {
        matches!(self, Method::Vid | Method::KdVid)
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Method::Student => "Student",
            Method::Kd => "KD",
            Method::FitNet => "FitNet",
            Method::At => "AT",
            Method::Vid => "VID-I",
            Method::KdVid => "KD + VID-I",
        })
    }
}

impl FromStr for Method {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "student" => Ok(Method::Student),
            "kd" => Ok(Method::Kd),
            "fitnet" => Ok(Method::FitNet),
            "at" => Ok(Method::At),
            "vid" | "vid-i" => Ok(Method::Vid),
            "kd+vid" | "kd+vid-i" => Ok(Method::KdVid),
            other => Err(format!(
                "unknown method {other:?} (student, kd, fitnet, at, vid, kd+vid)"
            )),
        }
    }
}

/// The teacher's outputs that the students learn from.
pub struct TeacherOutputs {
    /// `[N, 64, 7, 7]`: after the second conv block (ReLU, max-pool).
    pub feat: Tensor,
    pub logits: Tensor,
}

impl TeacherOutputs {
    pub fn detach(&self) -> TeacherOutputs {
        TeacherOutputs {
            feat: self.feat.detach(),
            logits: self.logits.detach(),
        }
    }
}

/// conv3x3(1->32) ReLU pool, conv3x3(32->64) ReLU pool [the transferred map, 64x7x7],
/// fc(3136->128) ReLU dropout(0.3), fc(128->10). 421k parameters.
pub struct Teacher {
    c1: nn::Conv2D,
    c2: nn::Conv2D,
    fc1: nn::Linear,
    fc2: nn::Linear,
}

fn conv3(vs: nn::Path, i: i64, o: i64) -> nn::Conv2D {
    nn::conv2d(
        vs,
        i,
        o,
        3,
        nn::ConvConfig {
            padding: 1,
            ..Default::default()
        },
    )
}

impl Teacher {
    pub fn new(vs: nn::Path) -> Teacher {
        Teacher {
            c1: conv3(&vs / "c1", 1, 32),
            c2: conv3(&vs / "c2", 32, T_CHANNELS),
            fc1: nn::linear(
                &vs / "fc1",
                T_CHANNELS * T_HW * T_HW,
                128,
                Default::default(),
            ),
            fc2: nn::linear(&vs / "fc2", 128, 10, Default::default()),
        }
    }

    pub fn forward_t(&self, x: &Tensor, train: bool) -> TeacherOutputs {
        use tch::nn::Module;
        let h = self.c1.forward(x).relu().max_pool2d_default(2);
        let feat = self.c2.forward(&h).relu().max_pool2d_default(2);
        let logits = self.fc2.forward(
            &self
                .fc1
                .forward(&feat.flatten(1, -1))
                .relu()
                .dropout(0.3, train),
        );
        TeacherOutputs { feat, logits }
    }
}

/// The students. CNN: conv3x3(1->8) ReLU pool, conv3x3(8->16) ReLU pool [16x7x7],
/// fc(784->64) ReLU, fc(64->10): 52k parameters. MLP: fc(784->128) ReLU, fc(128->128) ReLU
/// [the transferred vector], fc(128->10): 118k parameters.
#[allow(clippy::large_enum_variant)]
pub enum Student {
    Cnn {
        c1: nn::Conv2D,
        c2: nn::Conv2D,
        fc1: nn::Linear,
        fc2: nn::Linear,
    },
    Mlp {
        fc1: nn::Linear,
        fc2: nn::Linear,
        fc3: nn::Linear,
    },
}

impl Student {
    pub fn new(vs: nn::Path, kind: StudentKind) -> Student {
        match kind {
            StudentKind::Cnn => Student::Cnn {
                c1: conv3(&vs / "c1", 1, 8),
                c2: conv3(&vs / "c2", 8, S_CHANNELS),
                fc1: nn::linear(&vs / "fc1", S_CHANNELS * 49, 64, Default::default()),
                fc2: nn::linear(&vs / "fc2", 64, 10, Default::default()),
            },
            StudentKind::Mlp => Student::Mlp {
                fc1: nn::linear(&vs / "fc1", 784, MLP_HIDDEN, Default::default()),
                fc2: nn::linear(&vs / "fc2", MLP_HIDDEN, MLP_HIDDEN, Default::default()),
                fc3: nn::linear(&vs / "fc3", MLP_HIDDEN, 10, Default::default()),
            },
        }
    }

    /// (transferred features, logits)
    pub fn forward(&self, x: &Tensor) -> (Tensor, Tensor) {
        use tch::nn::Module;
        match self {
            Student::Cnn { c1, c2, fc1, fc2 } => {
                let h = c1.forward(x).relu().max_pool2d_default(2);
                let feat = c2.forward(&h).relu().max_pool2d_default(2);
                let logits = fc2.forward(&fc1.forward(&feat.flatten(1, -1)).relu());
                (feat, logits)
            }
            Student::Mlp { fc1, fc2, fc3 } => {
                let h = fc1.forward(&x.flatten(1, -1)).relu();
                let feat = fc2.forward(&h).relu();
                let logits = fc3.forward(&feat);
                (feat, logits)
            }
        }
    }
}

/// The optimizer group of the VID `log_scale` when it has a learning rate of its own.
const VID_GROUP: usize = 1;

#[derive(Debug, Clone, Copy)]
pub struct TrainSettings {
    pub steps: usize,
    pub batch: i64,
    pub lr: f64,
    pub temperature: f64,
    pub vid_lambda: f64,
    pub vid_init_variance: f64,
    /// Adam learning rate of the VID `log_scale` (its own optimizer group); `None`: `lr`.
    pub vid_lr: Option<f64>,
    pub fitnet_weight: f64,
    pub at_weight: f64,
}

/// Hinton's KD: T^2 * KL(softmax(t/T) || softmax(s/T)), averaged over the batch.
pub fn kd_loss(student: &Tensor, teacher: &Tensor, t: f64) -> Tensor {
    let log_ps = (student / t).log_softmax(-1, Kind::Float);
    let log_pt = (teacher / t).log_softmax(-1, Kind::Float);
    let n = student.size()[0] as f64;
    (log_pt.exp() * (&log_pt - log_ps)).sum(Kind::Float) * (t * t / n)
}

/// Zagoruyko & Komodakis' attention map: the L2-normalised channel mean of squares.
fn attention(f: &Tensor) -> Tensor {
    let n = f.size()[0];
    let a = f
        .pow_tensor_scalar(2)
        .mean_dim(&[1i64][..], false, Kind::Float)
        .view([n, -1]);
    let norm = a.norm_scalaropt_dim(2, &[1i64][..], true).clamp_min(1e-12);
    a / norm
}

pub fn at_loss(s: &Tensor, t: &Tensor) -> Tensor {
    (attention(s) - attention(t))
        .pow_tensor_scalar(2)
        .mean(Kind::Float)
}

/// FitNet's hint regressor: conv1x1 (CNN) or linear-and-reshape (MLP) onto the teacher map.
enum Hint {
    Conv(nn::Conv2D),
    Linear(nn::Linear),
}

impl Hint {
    fn forward(&self, f: &Tensor) -> Tensor {
        use tch::nn::Module;
        match self {
            Hint::Conv(c) => c.forward(f),
            Hint::Linear(l) => l.forward(f).view([-1, T_CHANNELS, T_HW, T_HW]),
        }
    }
}

pub struct StudentResult {
    pub test_accuracy: f64,
    /// Mean per-channel VID variance at the end (VID methods only).
    pub vid_variance: Option<f64>,
    /// The smallest and largest per-channel VID variance at the end (VID methods only).
    pub vid_variance_range: Option<(f64, f64)>,
}

pub fn accuracy(logits: &Tensor, labels: &Tensor) -> f64 {
    logits
        .argmax(-1, false)
        .eq_tensor(labels)
        .to_kind(Kind::Float)
        .mean(Kind::Float)
        .double_value(&[])
}

/// Trains one student on the training-pool images `subset` with `method`; returns its
/// test accuracy. The teacher's outputs on the pool are precomputed (`t_out`).
// Losses are summed out of place on purpose (`loss = loss + x`), leaving the autograd
// graph's intermediate tensors untouched.
#[allow(clippy::too_many_arguments, clippy::assign_op_pattern)]
pub fn train_student(
    kind: StudentKind,
    method: Method,
    s: &TrainSettings,
    train_x: &Tensor,
    train_y: &Tensor,
    t_out: &TeacherOutputs,
    subset: &Tensor,
    test_x: &Tensor,
    test_y: &Tensor,
) -> anyhow::Result<StudentResult> {
    let vs = nn::VarStore::new(Device::Cpu);
    let root = vs.root();
    let student = Student::new(&root / "student", kind);
    let hint = (method == Method::FitNet).then(|| match kind {
        StudentKind::Cnn => Hint::Conv(nn::conv2d(
            &root / "hint",
            S_CHANNELS,
            T_CHANNELS,
            1,
            Default::default(),
        )),
        StudentKind::Mlp => Hint::Linear(nn::linear(
            &root / "hint",
            MLP_HIDDEN,
            T_CHANNELS * T_HW * T_HW,
            Default::default(),
        )),
    });
    let vid_cfg = VidConfig {
        init_variance: s.vid_init_variance,
        // The variance gets its own learning rate through an optimizer group of its own.
        log_scale_group: s.vid_lr.map(|_| VID_GROUP),
        ..Default::default()
    };
    let vid = if method.uses_vid() {
        Some(match kind {
            StudentKind::Cnn => VidLoss::f_new(&root / "vid", S_CHANNELS, T_CHANNELS, vid_cfg)?,
            StudentKind::Mlp => VidLoss::f_vector_to_map(
                &root / "vid",
                MLP_HIDDEN,
                T_CHANNELS,
                (T_HW, T_HW),
                vid_cfg,
            )?,
        })
    } else {
        None
    };
    let mut opt = nn::Adam::default().build(&vs, s.lr)?;
    if let (Some(vid_lr), Some(_)) = (s.vid_lr, &vid) {
        opt.set_lr_group(VID_GROUP, vid_lr);
    }

    let n = subset.size()[0];
    let batch = s.batch.min(n);
    let mut perm = subset.index_select(0, &Tensor::randperm(n, (Kind::Int64, Device::Cpu)));
    let mut cursor = 0;
    for _ in 0..s.steps {
        if cursor + batch > n {
            perm = subset.index_select(0, &Tensor::randperm(n, (Kind::Int64, Device::Cpu)));
            cursor = 0;
        }
        let idx = perm.narrow(0, cursor, batch);
        cursor += batch;
        let x = train_x.index_select(0, &idx);
        let y = train_y.index_select(0, &idx);
        let (feat, logits) = student.forward(&x);
        let ce = logits.cross_entropy_for_logits(&y);
        let t_feat = || t_out.feat.index_select(0, &idx);
        let mut loss = if method.uses_kd() {
            // Hinton's mix, as the reference implementations: 0.1 CE + 0.9 KD.
            let kd = kd_loss(&logits, &t_out.logits.index_select(0, &idx), s.temperature);
            ce * 0.1 + kd * 0.9
        } else {
            ce
        };
        match method {
            Method::FitNet => {
                let h = hint.as_ref().expect("hint").forward(&feat);
                loss = loss + h.mse_loss(&t_feat(), tch::Reduction::Mean) * s.fitnet_weight;
            }
            Method::At => loss = loss + at_loss(&feat, &t_feat()) * s.at_weight,
            _ => {}
        }
        if let Some(vid) = &vid {
            loss = loss + vid.f_forward(&feat, &t_feat())? * s.vid_lambda;
        }
        opt.backward_step(&loss);
    }
    let test_accuracy = tch::no_grad(|| accuracy(&student.forward(test_x).1, test_y));
    Ok(StudentResult {
        test_accuracy,
        vid_variance: vid
            .as_ref()
            .map(|v| v.variance().mean(Kind::Double).double_value(&[])),
        vid_variance_range: vid.as_ref().map(|v| {
            let var = v.variance();
            (var.min().double_value(&[]), var.max().double_value(&[]))
        }),
    })
}
