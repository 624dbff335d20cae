//! What both MNIST experiments share about the methods: the paper's columns and the
//! transfer losses of the methods VID is compared with, as the reference implementations.

use std::fmt;
use std::str::FromStr;

use tch::nn::{self, OptimizerConfig};
use tch::{Kind, Tensor};

/// The columns of the paper's Table 2.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Method {
    Student,
    Kd,
    FitNet,
    At,
    Nst,
    Vid,
    KdAt,
    KdVid,
}

impl Method {
    pub const ALL: [Method; 8] = [
        Method::Student,
        Method::Kd,
        Method::FitNet,
        Method::At,
        Method::Nst,
        Method::Vid,
        Method::KdAt,
        Method::KdVid,
    ];
    pub fn uses_kd(self) -> bool {
        matches!(self, Method::Kd | Method::KdAt | Method::KdVid)
    }
    pub fn uses_vid(self) -> bool {
        matches!(self, Method::Vid | Method::KdVid)
    }
    pub fn uses_at(self) -> bool {
        matches!(self, Method::At | Method::KdAt)
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Method::Student => "Student",
            Method::Kd => "KD",
            Method::FitNet => "FitNet",
            Method::At => "AT",
            Method::Nst => "NST",
            Method::Vid => "VID-I",
            Method::KdAt => "KD + AT",
            Method::KdVid => "KD + VID-I",
        })
    }
}

impl FromStr for Method {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().replace(' ', "").as_str() {
            "student" => Ok(Method::Student),
            "kd" => Ok(Method::Kd),
            "fitnet" => Ok(Method::FitNet),
            "at" => Ok(Method::At),
            "nst" => Ok(Method::Nst),
            "vid" | "vid-i" => Ok(Method::Vid),
            "kd+at" => Ok(Method::KdAt),
            "kd+vid" | "kd+vid-i" => Ok(Method::KdVid),
            other => Err(format!(
                "unknown method {other:?} (student, kd, fitnet, at, nst, vid, kd+at, kd+vid)"
            )),
        }
    }
}

/// Hinton's KD: T^2 * KL(softmax(t/T) || softmax(s/T)), averaged over the batch.
pub fn kd_loss(student: &Tensor, teacher: &Tensor, t: f64) -> Tensor {
    let log_ps = (student / t).log_softmax(-1, Kind::Float);
    let log_pt = (teacher / t).log_softmax(-1, Kind::Float);
    let n = student.size()[0] as f64;
    (log_pt.exp() * (&log_pt - log_ps)).sum(Kind::Float) * (t * t / n)
}

/// `x / max(||x||_2, 1e-12)` along `dim`, as `torch.nn.functional.normalize`.
fn l2_normalize(x: &Tensor, dim: i64) -> Tensor {
    x / x.norm_scalaropt_dim(2, [dim], true).clamp_min(1e-12)
}

/// Zagoruyko & Komodakis' attention map: the L2-normalised channel mean of squares.
fn attention(f: &Tensor) -> Tensor {
    let n = f.size()[0];
    l2_normalize(
        &f.square()
            .mean_dim(&[1i64][..], false, Kind::Float)
            .view([n, -1]),
        1,
    )
}

/// Attention transfer (p = 2), as the reference implementations.
pub fn at_loss(s: &Tensor, t: &Tensor) -> Tensor {
    (attention(s) - attention(t)).square().mean(Kind::Float)
}

/// Neuron selectivity transfer (Huang & Wang 2017): the squared MMD between the student's
/// and the teacher's channel activation maps (each L2-normalised over space), with the
/// polynomial kernel k(x, y) = (x . y)^2, as its authors define it.
pub fn nst_loss(s: &Tensor, t: &Tensor) -> Tensor {
    let n = s.size()[0];
    let fs = l2_normalize(&s.view([n, s.size()[1], -1]), 2);
    let ft = l2_normalize(&t.view([n, t.size()[1], -1]), 2);
    let kernel = |a: &Tensor, b: &Tensor| a.matmul(&b.transpose(1, 2)).square().mean(Kind::Float);
    kernel(&ft, &ft) + kernel(&fs, &fs) - kernel(&fs, &ft) * 2.0
}

/// Top-1 accuracy of `logits` against `labels`.
pub fn accuracy(logits: &Tensor, labels: &Tensor) -> f64 {
    logits
        .argmax(-1, false)
        .eq_tensor(labels)
        .to_kind(Kind::Float)
        .mean(Kind::Float)
        .double_value(&[])
}

/// SGD with momentum and weight decay over every variable of `vs`, as the reference
/// implementations train (the schedules set the learning rate per step).
pub fn sgd(
    vs: &nn::VarStore,
    lr: f64,
    momentum: f64,
    weight_decay: f64,
) -> anyhow::Result<nn::Optimizer> {
    let config = nn::Sgd {
        momentum,
        wd: weight_decay,
        ..Default::default()
    };
    Ok(config.build(vs, lr)?)
}
