//! [`VidLoss`]: one student/teacher layer pair, its mean regressor and variance.

use std::borrow::Borrow;

use tch::{nn, Device, Kind, Tensor};

use super::config::VidConfig;
use super::params::{check_dim, ParamSpec, PendingParams};
use crate::{f_vid_loss, VidError};

#[derive(Debug)]
enum Regressor {
    /// VID-I: three 1x1 convolutions without bias, ReLU between.
    Conv { ws: [Tensor; 3] },
    /// `[N, Ds] -> [N, Dt]`.
    Linear { ws: Tensor, bs: Tensor },
    /// `[N, D] -> [N, C * H * W] -> [N, C, H, W]`.
    VectorToMap {
        ws: Tensor,
        bs: Tensor,
        size: (i64, i64),
    },
}

/// The VID loss between one student layer and one teacher layer, with its trainable mean
/// regressor and per-channel variance.
///
/// `forward(student, teacher)` returns `-E[log q(t | s)]` up to a constant (the value to
/// add, times `lambda`, to the task loss). The teacher is always detached; gradients reach
/// the student, the regressor and `log_scale`.
#[derive(Debug)]
pub struct VidLoss {
    regressor: Regressor,
    log_scale: Tensor,
    student_dim: i64,
    teacher_dim: i64,
    pub(super) cfg: VidConfig,
}

/// What a VidLoss is made of, before its parameters are registered.
pub(super) struct PendingVidLoss {
    params: PendingParams,
    kind: PendingKind,
    student_dim: i64,
    teacher_dim: i64,
    cfg: VidConfig,
}

enum PendingKind {
    Conv,
    Linear,
    VectorToMap { size: (i64, i64) },
}

impl PendingVidLoss {
    /// Registers the parameters (log_scale first, then the regressor's) and builds the module.
    pub(super) fn register(self, vs: &nn::Path) -> VidLoss {
        let mut tensors = self.params.register(vs).into_iter();
        let mut next = || tensors.next().expect("one tensor per spec");
        let log_scale = next();
        let regressor = match self.kind {
            PendingKind::Conv => Regressor::Conv {
                ws: [next(), next(), next()],
            },
            PendingKind::Linear => Regressor::Linear {
                ws: next(),
                bs: next(),
            },
            PendingKind::VectorToMap { size } => Regressor::VectorToMap {
                ws: next(),
                bs: next(),
                size,
            },
        };
        VidLoss {
            regressor,
            log_scale,
            student_dim: self.student_dim,
            teacher_dim: self.teacher_dim,
            cfg: self.cfg,
        }
    }
}

fn log_scale_spec(teacher_dim: i64, cfg: &VidConfig) -> ParamSpec {
    let mut spec = ParamSpec::new(
        &[],
        "log_scale",
        &[teacher_dim],
        nn::Init::Const(cfg.initial_log_scale()),
    );
    spec.group = cfg.log_scale_group;
    spec
}

/// A linear regressor's weight and bias, initialised as PyTorch's `nn.Linear`.
fn linear_specs(in_dim: i64, out_dim: i64) -> [ParamSpec; 2] {
    [
        ParamSpec::pytorch_default(&["regressor"], "weight", &[out_dim, in_dim], in_dim),
        ParamSpec::pytorch_default(&["regressor"], "bias", &[out_dim], in_dim),
    ]
}

impl VidLoss {
    pub(super) fn pending_conv(
        vs: &nn::Path,
        student_channels: i64,
        teacher_channels: i64,
        cfg: VidConfig,
    ) -> Result<PendingVidLoss, VidError> {
        cfg.validate(vs.kind())?;
        check_dim("student_channels", student_channels, "the channel count")?;
        check_dim("teacher_channels", teacher_channels, "the channel count")?;
        let hidden = cfg.hidden_channels.unwrap_or(teacher_channels);
        // 1x1 kernels: fan_in = input channels; PyTorch's `nn.Conv2d` initialisation.
        let conv = |name: &str, i: i64, o: i64| {
            ParamSpec::pytorch_default(&["regressor", name], "weight", &[o, i, 1, 1], i)
        };
        let specs = vec![
            log_scale_spec(teacher_channels, &cfg),
            conv("0", student_channels, hidden),
            conv("2", hidden, hidden),
            conv("4", hidden, teacher_channels),
        ];
        Ok(PendingVidLoss {
            params: PendingParams::create(vs, specs)?,
            kind: PendingKind::Conv,
            student_dim: student_channels,
            teacher_dim: teacher_channels,
            cfg,
        })
    }

    /// VID-I for feature maps: student `[N, student_channels, Hs, Ws]`, teacher
    /// `[N, teacher_channels, Ht, Wt]`. Returns an error on a non-positive channel count,
    /// sizes too large to allocate, or a bad config; then no variable is created.
    pub fn f_new<'a, P: Borrow<nn::Path<'a>>>(
        vs: P,
        student_channels: i64,
        teacher_channels: i64,
        cfg: VidConfig,
    ) -> Result<VidLoss, VidError> {
        let vs = vs.borrow();
        Ok(Self::pending_conv(vs, student_channels, teacher_channels, cfg)?.register(vs))
    }

    /// VID-I for feature maps (panicking form of [`VidLoss::f_new`]).
    ///
    /// The mean regressor is conv1x1 -> ReLU -> conv1x1 -> ReLU -> conv1x1, all without
    /// bias, hidden width `cfg.hidden_channels` (default `teacher_channels`). When the
    /// spatial sizes differ, the larger map is adaptive-average-pooled to the smaller, per
    /// dimension (the student before the regressor, as the reference implementation).
    ///
    /// ```
    /// use tch::{nn, Device, Kind, Tensor};
    /// let vs = nn::VarStore::new(Device::Cpu);
    /// let vid = vidfuse::nn::VidLoss::new(&vs.root() / "vid1", 64, 128, Default::default());
    /// let loss = vid.forward(&Tensor::randn([2, 64, 8, 8], (Kind::Float, Device::Cpu)),
    ///                        &Tensor::randn([2, 128, 8, 8], (Kind::Float, Device::Cpu)));
    /// assert_eq!(loss.dim(), 0);
    /// assert_eq!(vs.len(), 4); // log_scale + three conv weights
    /// ```
    pub fn new<'a, P: Borrow<nn::Path<'a>>>(
        vs: P,
        student_channels: i64,
        teacher_channels: i64,
        cfg: VidConfig,
    ) -> VidLoss {
        Self::f_new(vs, student_channels, teacher_channels, cfg).unwrap_or_else(|e| panic!("{e}"))
    }

    /// VID-LP / vectors: student `[N, student_dim]`, teacher `[N, teacher_dim]`, with a
    /// linear mean regressor (weight and bias). Returns an error on a bad size or config.
    pub fn f_linear<'a, P: Borrow<nn::Path<'a>>>(
        vs: P,
        student_dim: i64,
        teacher_dim: i64,
        cfg: VidConfig,
    ) -> Result<VidLoss, VidError> {
        let vs = vs.borrow();
        cfg.validate(vs.kind())?;
        check_dim("student_dim", student_dim, "the size")?;
        check_dim("teacher_dim", teacher_dim, "the size")?;
        let [ws, bs] = linear_specs(student_dim, teacher_dim);
        let specs = vec![log_scale_spec(teacher_dim, &cfg), ws, bs];
        Ok(PendingVidLoss {
            params: PendingParams::create(vs, specs)?,
            kind: PendingKind::Linear,
            student_dim,
            teacher_dim,
            cfg,
        }
        .register(vs))
    }

    /// VID-LP / vectors (panicking form of [`VidLoss::f_linear`]): e.g. the student's
    /// logits regressed onto the teacher's penultimate layer.
    ///
    /// ```
    /// use tch::{nn, Device, Kind, Tensor};
    /// let vs = nn::VarStore::new(Device::Cpu);
    /// let vid = vidfuse::nn::VidLoss::linear(&vs.root() / "lp", 10, 256, Default::default());
    /// let loss = vid.forward(&Tensor::randn([8, 10], (Kind::Float, Device::Cpu)),
    ///                        &Tensor::randn([8, 256], (Kind::Float, Device::Cpu)));
    /// assert_eq!(loss.dim(), 0);
    /// ```
    pub fn linear<'a, P: Borrow<nn::Path<'a>>>(
        vs: P,
        student_dim: i64,
        teacher_dim: i64,
        cfg: VidConfig,
    ) -> VidLoss {
        Self::f_linear(vs, student_dim, teacher_dim, cfg).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Vector -> feature map, for heterogeneous students: student `[N, student_dim]` (an
    /// MLP's hidden layer), teacher `[N, teacher_channels, H, W]`. The regressor is one
    /// linear layer to `teacher_channels * H * W` outputs, reshaped to
    /// `[N, teacher_channels, H, W]` with `(H, W) = size`. A teacher map of another size is
    /// matched by the same rule as VID-I: the larger is adaptive-average-pooled to the
    /// smaller. Returns an error on a bad size or config.
    pub fn f_vector_to_map<'a, P: Borrow<nn::Path<'a>>>(
        vs: P,
        student_dim: i64,
        teacher_channels: i64,
        size: (i64, i64),
        cfg: VidConfig,
    ) -> Result<VidLoss, VidError> {
        let vs = vs.borrow();
        cfg.validate(vs.kind())?;
        check_dim("student_dim", student_dim, "the size")?;
        check_dim("teacher_channels", teacher_channels, "the channel count")?;
        check_dim("size", size.0, "the height")?;
        check_dim("size", size.1, "the width")?;
        let out = teacher_channels
            .checked_mul(size.0)
            .and_then(|n| n.checked_mul(size.1))
            .ok_or_else(|| {
                VidError::invalid(
                    "size",
                    format!(
                        "{teacher_channels} channels of {}x{} overflow the regressor's output size",
                        size.0, size.1
                    ),
                )
            })?;
        let [ws, bs] = linear_specs(student_dim, out);
        let specs = vec![log_scale_spec(teacher_channels, &cfg), ws, bs];
        Ok(PendingVidLoss {
            params: PendingParams::create(vs, specs)?,
            kind: PendingKind::VectorToMap { size },
            student_dim,
            teacher_dim: teacher_channels,
            cfg,
        }
        .register(vs))
    }

    /// Vector -> feature map (panicking form of [`VidLoss::f_vector_to_map`]).
    ///
    /// ```
    /// use tch::{nn, Device, Kind, Tensor};
    /// let vs = nn::VarStore::new(Device::Cpu);
    /// // an MLP's 128-wide hidden layer against a CNN teacher's [N, 32, 7, 7] map
    /// let vid = vidfuse::nn::VidLoss::vector_to_map(&vs.root() / "v2m", 128, 32, (7, 7), Default::default());
    /// let loss = vid.forward(&Tensor::randn([8, 128], (Kind::Float, Device::Cpu)),
    ///                        &Tensor::randn([8, 32, 7, 7], (Kind::Float, Device::Cpu)));
    /// assert_eq!(loss.dim(), 0);
    /// ```
    pub fn vector_to_map<'a, P: Borrow<nn::Path<'a>>>(
        vs: P,
        student_dim: i64,
        teacher_channels: i64,
        size: (i64, i64),
        cfg: VidConfig,
    ) -> VidLoss {
        Self::f_vector_to_map(vs, student_dim, teacher_channels, size, cfg)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// The per-channel variance `softplus(log_scale) + eps` now, `[teacher channels]`,
    /// detached, in `log_scale`'s dtype (computed in f64).
    pub fn variance(&self) -> Tensor {
        crate::autograd::no_grad(|| {
            (self.log_scale.to_kind(Kind::Double).softplus() + self.cfg.eps)
                .to_kind(self.log_scale.kind())
        })
    }

    /// The trainable `log_scale` parameter (`alpha`), `[teacher channels]`.
    pub fn log_scale(&self) -> &Tensor {
        &self.log_scale
    }

    /// The configuration this module was built with.
    pub fn config(&self) -> &VidConfig {
        &self.cfg
    }

    /// The student's channel count (or vector size) this module expects.
    pub fn student_dim(&self) -> i64 {
        self.student_dim
    }

    /// The teacher's channel count (or vector size) this module expects.
    pub fn teacher_dim(&self) -> i64 {
        self.teacher_dim
    }

    /// Sets the learning rate of this module's variance (`log_scale`) on `opt`, which must
    /// have been built on the VarStore holding the module, with `log_scale` in an optimizer
    /// group of its own (`VidConfig { log_scale_group: Some(g), .. }`). Returns an error,
    /// and changes nothing, when `lr` is negative or not finite, when `log_scale` has no
    /// group of its own, or when `opt` does not optimise it.
    ///
    /// tch's optimizer learns of variables created after it was built only at its next
    /// `zero_grad` / `step`; this calls `opt.zero_grad()` first so that the group exists
    /// (tch's own `set_lr_group` panics inside libtorch otherwise). So call it between steps
    /// (not between a backward and its step). `opt.set_lr(lr)` sets every group, this one
    /// included: call this again after it (a schedule sets the network's rate, then this).
    ///
    /// ```
    /// use tch::{nn, nn::OptimizerConfig, Device};
    /// use vidfuse::nn::{VidConfig, VidLoss};
    /// let vs = nn::VarStore::new(Device::Cpu);
    /// let cfg = VidConfig { log_scale_group: Some(1), ..Default::default() };
    /// let vid = VidLoss::new(&vs.root() / "vid", 16, 32, cfg);
    /// let mut opt = nn::Sgd { momentum: 0.9, ..Default::default() }.build(&vs, 0.05).unwrap();
    /// vid.f_set_log_scale_lr(&mut opt, 5.0).unwrap();
    /// // Without a group of its own, a clear error (not a panic inside libtorch):
    /// let other = VidLoss::new(&vs.root() / "other", 16, 32, Default::default());
    /// assert!(other.f_set_log_scale_lr(&mut opt, 5.0).is_err());
    /// ```
    pub fn f_set_log_scale_lr(&self, opt: &mut nn::Optimizer, lr: f64) -> Result<(), VidError> {
        if !(lr.is_finite() && lr >= 0.0) {
            return Err(VidError::invalid(
                "lr",
                format!("must be finite and >= 0, got {lr}"),
            ));
        }
        let Some(group) = self.cfg.log_scale_group else {
            return Err(VidError::invalid(
                "cfg.log_scale_group",
                "is None: log_scale shares its path's optimizer group, so its learning rate \
                 cannot be set apart; build the module with VidConfig { log_scale_group: \
                 Some(g), .. }",
            ));
        };
        let ours = self.log_scale.data_ptr();
        if !opt
            .trainable_variables()
            .iter()
            .any(|t| t.data_ptr() == ours)
        {
            return Err(VidError::invalid(
                "opt",
                "does not optimise this module's log_scale: build the optimizer on the \
                 VarStore that holds the module",
            ));
        }
        // Registers variables created since the optimizer was built, so the group exists.
        opt.zero_grad();
        opt.set_lr_group(group, lr);
        Ok(())
    }

    /// Sets the learning rate of this module's variance (panicking form of
    /// [`VidLoss::f_set_log_scale_lr`]).
    pub fn set_log_scale_lr(&self, opt: &mut nn::Optimizer, lr: f64) {
        self.f_set_log_scale_lr(opt, lr)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn check_input(
        &self,
        arg: &'static str,
        t: &Tensor,
        dims: usize,
        channels: i64,
    ) -> Result<(), VidError> {
        let size = t.size();
        let shape = if dims == 4 {
            format!("[N, {channels}, H, W]")
        } else {
            format!("[N, {channels}]")
        };
        if size.len() != dims || size[1] != channels {
            return Err(VidError::invalid(
                arg,
                format!("expected shape {shape}, got {size:?}"),
            ));
        }
        if size.contains(&0) {
            return Err(VidError::invalid(
                arg,
                format!("empty tensor of shape {size:?}"),
            ));
        }
        let device: Device = self.log_scale.device();
        if t.device() != device {
            return Err(VidError::invalid(
                arg,
                format!(
                    "on {:?}, the module's parameters are on {device:?}",
                    t.device()
                ),
            ));
        }
        if !t.is_floating_point() {
            return Err(VidError::invalid(
                arg,
                format!("expected a floating-point tensor, got {:?}", t.kind()),
            ));
        }
        Ok(())
    }

    /// The regressor's output for `student` (no pooling): the predicted mean of the
    /// teacher's features. `[N, Ct, Hs, Ws]` for VID-I, `[N, Dt]` for the linear form,
    /// `[N, Ct, H, W]` for vector -> map.
    ///
    /// Computed in `student`'s dtype: the regressor's weights are cast to it on each call
    /// (the cast is part of the autograd graph, so their gradients arrive in the VarStore's
    /// dtype), as under PyTorch's autocast.
    pub fn f_regress(&self, student: &Tensor) -> Result<Tensor, VidError> {
        let kind = student.f_kind()?;
        let cast = |w: &Tensor| -> Result<Tensor, VidError> {
            Ok(if w.kind() == kind {
                w.shallow_clone()
            } else {
                w.f_to_kind(kind)?
            })
        };
        match &self.regressor {
            Regressor::Conv { ws } => {
                self.check_input("student", student, 4, self.student_dim)?;
                let conv = |x: &Tensor, w: &Tensor| -> Result<Tensor, VidError> {
                    Ok(x.f_conv2d(&cast(w)?, None::<&Tensor>, [1, 1], [0, 0], [1, 1], 1)?)
                };
                let x = conv(student, &ws[0])?.f_relu()?;
                let x = conv(&x, &ws[1])?.f_relu()?;
                conv(&x, &ws[2])
            }
            Regressor::Linear { ws, bs } => {
                self.check_input("student", student, 2, self.student_dim)?;
                Ok(student.f_linear(&cast(ws)?, Some(&cast(bs)?))?)
            }
            Regressor::VectorToMap { ws, bs, size } => {
                self.check_input("student", student, 2, self.student_dim)?;
                let y = student.f_linear(&cast(ws)?, Some(&cast(bs)?))?;
                Ok(y.f_view([-1, self.teacher_dim, size.0, size.1])?)
            }
        }
    }

    /// `log_scale` as the op takes it next to inputs of dtype `kind`: as it is when it is
    /// f32 or `kind`, else cast to f32 (through autograd).
    fn op_log_scale(&self, kind: Kind) -> Result<Tensor, VidError> {
        let own = self.log_scale.kind();
        Ok(if own == Kind::Float || own == kind {
            self.log_scale.shallow_clone()
        } else {
            self.log_scale.f_to_kind(Kind::Float)?
        })
    }

    /// [`VidLoss::f_regress`], panicking on bad input.
    pub fn regress(&self, student: &Tensor) -> Tensor {
        self.f_regress(student).unwrap_or_else(|e| panic!("{e}"))
    }

    /// The VID loss of `student` against `teacher` (detached), reduced as
    /// `cfg.reduction`; returns an error on mismatched shapes, devices or dtypes.
    ///
    /// Mixed precision works as under PyTorch's autocast: the module computes in the
    /// student's dtype (the regressor's weights are cast per call, the teacher is cast to
    /// it) and the fused op gets those features with `log_scale` in f32 (or in the
    /// features' dtype when the VarStore has it). The loss has the student's dtype: bf16
    /// features give a bf16 loss (accumulated in f32 inside the op), f64 features an f64
    /// loss, f32 features an f32 loss even after `vs.half()`. The parameters and their
    /// gradients stay in the VarStore's dtype.
    ///
    /// ```
    /// use tch::{nn, Device, Kind, Tensor};
    /// let vs = nn::VarStore::new(Device::Cpu);
    /// let vid = vidfuse::nn::VidLoss::new(&vs.root() / "vid", 8, 16, Default::default());
    /// let s = Tensor::randn([2, 4, 5, 5], (Kind::Float, Device::Cpu)); // 4 channels, not 8
    /// let t = Tensor::randn([2, 16, 5, 5], (Kind::Float, Device::Cpu));
    /// assert!(vid.f_forward(&s, &t).is_err());
    /// ```
    pub fn f_forward(&self, student: &Tensor, teacher: &Tensor) -> Result<Tensor, VidError> {
        let x = self.op_inputs(student, teacher)?;
        f_vid_loss(&x.mean, &x.target, &x.log_scale, &self.cfg.options())
    }

    /// The op's arguments for `student` against `teacher`: the regressed mean, the detached
    /// (pooled, cast) teacher and `log_scale` as the op takes it.
    pub(super) fn op_inputs(
        &self,
        student: &Tensor,
        teacher: &Tensor,
    ) -> Result<OpInputs, VidError> {
        // Checked by check_input below; an integer student is refused there.
        let kind = student.f_kind()?;
        match &self.regressor {
            Regressor::Conv { .. } | Regressor::VectorToMap { .. } => {
                let s_dims = if matches!(self.regressor, Regressor::Conv { .. }) {
                    4
                } else {
                    2
                };
                self.check_input("student", student, s_dims, self.student_dim)?;
                self.check_input("teacher", teacher, 4, self.teacher_dim)?;
                if student.size()[0] != teacher.size()[0] {
                    return Err(VidError::invalid(
                        "teacher",
                        format!(
                            "batch size {} differs from the student's {}",
                            teacher.size()[0],
                            student.size()[0]
                        ),
                    ));
                }
                let t_hw = (teacher.size()[2], teacher.size()[3]);
                let mean = match &self.regressor {
                    Regressor::Conv { .. } => {
                        // Pool the student before the regressor (as the reference does).
                        let s_hw = (student.size()[2], student.size()[3]);
                        let hw = (s_hw.0.min(t_hw.0), s_hw.1.min(t_hw.1));
                        let s = if s_hw != hw {
                            student.f_adaptive_avg_pool2d([hw.0, hw.1])?
                        } else {
                            student.shallow_clone()
                        };
                        self.f_regress(&s)?
                    }
                    _ => {
                        let m = self.f_regress(student)?;
                        let m_hw = (m.size()[2], m.size()[3]);
                        let hw = (m_hw.0.min(t_hw.0), m_hw.1.min(t_hw.1));
                        if m_hw != hw {
                            m.f_adaptive_avg_pool2d([hw.0, hw.1])?
                        } else {
                            m
                        }
                    }
                };
                let hw = (mean.size()[2], mean.size()[3]);
                // Pooled in the teacher's own dtype, then cast.
                let t = teacher.detach();
                let t = if t_hw != hw {
                    t.f_adaptive_avg_pool2d([hw.0, hw.1])?
                } else {
                    t
                };
                let t = t.f_to_kind(kind)?;
                Ok(OpInputs {
                    mean,
                    target: t,
                    log_scale: self.op_log_scale(kind)?,
                })
            }
            Regressor::Linear { .. } => {
                self.check_input("student", student, 2, self.student_dim)?;
                self.check_input("teacher", teacher, 2, self.teacher_dim)?;
                let mean = self.f_regress(student)?;
                if mean.size()[0] != teacher.size()[0] {
                    return Err(VidError::invalid(
                        "teacher",
                        format!(
                            "batch size {} differs from the student's {}",
                            teacher.size()[0],
                            mean.size()[0]
                        ),
                    ));
                }
                let t = teacher.detach().f_to_kind(kind)?;
                Ok(OpInputs {
                    mean,
                    target: t,
                    log_scale: self.op_log_scale(kind)?,
                })
            }
        }
    }

    /// The VID loss of `student` against `teacher` (panicking form of
    /// [`VidLoss::f_forward`]). Use it as `ce + vid.forward(&s_feat, &t_feat) * lambda`.
    pub fn forward(&self, student: &Tensor, teacher: &Tensor) -> Tensor {
        self.f_forward(student, teacher)
            .unwrap_or_else(|e| panic!("{e}"))
    }
}

/// What a [`VidLoss`] hands to the op for one call.
pub(super) struct OpInputs {
    pub(super) mean: Tensor,
    pub(super) target: Tensor,
    pub(super) log_scale: Tensor,
}

/// The regressor as a tch module: `xs.apply(&vid)` is [`VidLoss::regress`] (the predicted
/// mean of the teacher's features, for inspection or a custom loss). The loss itself is
/// the inherent two-argument [`VidLoss::forward`].
///
/// ```
/// use tch::{nn, nn::Module, Device, Kind, Tensor};
/// let vs = nn::VarStore::new(Device::Cpu);
/// let vid = vidfuse::nn::VidLoss::new(&vs.root() / "vid", 8, 16, Default::default());
/// let mean = Tensor::randn([2, 8, 4, 4], (Kind::Float, Device::Cpu)).apply(&vid);
/// assert_eq!(mean.size(), [2, 16, 4, 4]);
/// ```
impl nn::Module for VidLoss {
    fn forward(&self, xs: &Tensor) -> Tensor {
        self.regress(xs)
    }
}
