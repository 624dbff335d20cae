//! VID as a trainable tch module: the mean regressor and the per-channel variance live in a
//! [`tch::nn::VarStore`], the loss itself is the fused [`crate::f_vid_loss`].
//!
//! * [`VidLoss::new`] — VID-I on feature maps: `[N, Cs, Hs, Ws]` student, `[N, Ct, Ht, Wt]`
//!   teacher, a 1x1-convolution regressor (conv -> ReLU -> conv -> ReLU -> conv, no bias).
//! * [`VidLoss::linear`] — VID-LP / vectors: `[N, Ds]` student, `[N, Dt]` teacher, a linear
//!   regressor (e.g. student logits -> the teacher's penultimate layer).
//! * [`VidLoss::vector_to_map`] — heterogeneous students: a `[N, D]` vector (an MLP's hidden
//!   layer) regressed onto a teacher's `[N, C, H, W]` map.
//! * [`VidDistiller`] — several pairs with weights `lambda_k`, summed.
//!
//! The parameters of a `VidLoss` built under the path `p` are
//!
//! | name | shape | what |
//! | --- | --- | --- |
//! | `p.log_scale` | `[Ct]` | `alpha`, with `var_c = softplus(alpha_c) + eps` |
//! | `p.regressor.0.weight`, `p.regressor.2.weight`, `p.regressor.4.weight` | `[H, Cs, 1, 1]`, `[H, H, 1, 1]`, `[Ct, H, 1, 1]` | VID-I regressor |
//! | `p.regressor.weight`, `p.regressor.bias` | `[Dt, Ds]`, `[Dt]` (or `[Ct*H*W, D]`, `[Ct*H*W]`) | linear forms |
//!
//! (the VID-I names match the PyTorch reference implementation's `state_dict`), so saving
//! and loading the `VarStore` and any tch optimizer work as for any other module.
//!
//! ```
//! use tch::{nn, nn::OptimizerConfig, Device, Kind, Tensor};
//! use vidfuse::nn::VidLoss;
//!
//! let vs = nn::VarStore::new(Device::Cpu);
//! let vid = VidLoss::new(&vs.root() / "vid1", 16, 32, Default::default());
//! let mut opt = nn::Adam::default().build(&vs, 1e-3).unwrap();
//!
//! let s_feat = Tensor::randn([4, 16, 8, 8], (Kind::Float, Device::Cpu)); // student features
//! let t_feat = Tensor::randn([4, 32, 4, 4], (Kind::Float, Device::Cpu)); // teacher features
//! let lambda = 1.0;
//! let loss = vid.forward(&s_feat, &t_feat) * lambda; // student map pooled to 4x4
//! opt.backward_step(&loss);
//! assert_eq!(vid.variance().size(), vec![32]);
//! ```
//!
//! # Mixed precision
//!
//! The modules compute in the student features' dtype, as PyTorch's autocast would: the
//! regressor's weights are cast on each call (a cast inside the autograd graph), the teacher
//! is cast to that dtype, and the fused op gets `log_scale` in f32. So bf16 activations with
//! the usual f32 master weights give a bf16 loss whose gradients reach the f32 parameters in
//! f32; f64 features give an f64 loss; after `vs.half()`, f32 features still give an f32
//! loss. Parameters and their gradients always stay in the VarStore's dtype.
//!
//! # Initialisation
//!
//! The regressors start as PyTorch's `nn.Conv2d` and `nn.Linear` do (and so as the reference
//! implementation, which uses them): weights, and biases where there are any, uniform in
//! `+-1/sqrt(fan_in)`, `fan_in` being the input channels of a 1x1 convolution or the input
//! size of a linear layer. (tch's own default, Kaiming-uniform with the ReLU gain, has 6
//! times that variance.) `log_scale` starts where the variance is `init_variance`.
//!
//! # Learning rate of the variance
//!
//! Adam moves every parameter by about its learning rate per step, whatever the size of its
//! gradient, and at the initial variance 5 `softplus` is nearly the identity: the variance
//! moves by about the learning rate per step. At a network's usual 1e-3 it hardly leaves 5
//! in a short run, and the VID term stays a weak regression loss. Measured with an earlier
//! version of `examples/mnist_vid.rs` (CNN teacher, CNN and MLP students, 400 images per
//! class, 300 Adam steps of batch 64, network learning rate 1e-3, one seed), the mean
//! per-channel variance after 300 steps went from 5 to:
//!
//! | learning rate of `log_scale` | CNN student | MLP student |
//! | --- | --- | --- |
//! | 1e-3 (the network's) | 4.69 (channels 4.64-4.70) | 4.69 (4.65-4.70) |
//! | 5e-3 | 3.36 (3.14-3.42) | 3.36 (3.21-3.40) |
//! | 2e-2 | 0.24 (0.04-0.55) | 0.27 (0.04-0.88) |
//!
//! Under SGD with momentum (the reference implementations' optimizer) the gradient of the
//! mean-reduced loss reaches each `log_scale` divided by the channel count, and at the
//! network's learning rate (0.05) the variance again stays near 5 for hundreds of steps. In
//! the example's current protocol, 1,100 SGD steps with `log_scale` at 5 (CNN student) or 0.5
//! (MLP student) bring each channel's variance to the mean squared residual of its regressed
//! map, the variance's maximum-likelihood value (median ratio 1.01-1.09 over channels; see
//! `results/EXPERIMENT.md`, which also finds that this did not make VID-I help on MNIST).
//!
//! So give `log_scale` an optimizer group of its own and a larger learning rate:
//!
//! ```
//! use tch::{nn, nn::OptimizerConfig, Device};
//! use vidfuse::nn::{VidConfig, VidLoss};
//!
//! let vs = nn::VarStore::new(Device::Cpu);
//! let cfg = VidConfig { log_scale_group: Some(1), ..Default::default() };
//! let vid = VidLoss::new(&vs.root() / "vid", 16, 32, cfg);
//! let mut opt = nn::Adam::default().build(&vs, 1e-3).unwrap(); // every group at 1e-3
//! opt.set_lr_group(1, 0.02); // then log_scale at 2e-2
//! ```
//!
//! tch's `opt.set_lr(lr)` sets every group: a schedule calls `opt.set_lr_group(1, ...)` after
//! it. The whole module can also go into a group, through the path:
//! `VidLoss::new(vs.root().set_group(1) / "vid", ...)`.

use std::borrow::Borrow;

use tch::{nn, Device, Kind, Tensor};

use crate::{f_vid_loss, f_vid_loss_grouped, Reduction, VidError, VidOptions, VidTerm};

/// Configuration of a [`VidLoss`]; build it with `Default` and struct-update syntax, as
/// tch's own configs (`nn::ConvConfig`, `nn::LinearConfig`). The op's own [`VidOptions`] is
/// a builder with getters instead (its fields stay private so that options can be added);
/// [`VidConfig::options`] gives the op options of a config.
///
/// ```
/// use vidfuse::{nn::VidConfig, Reduction};
/// let cfg = VidConfig { init_variance: 1.0, hidden_channels: Some(64), ..Default::default() };
/// assert_eq!(cfg.eps, 1e-5);
/// assert_eq!(cfg.reduction, Reduction::Mean);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VidConfig {
    /// The per-channel variance at initialisation: `log_scale` starts at
    /// `ln(exp(init_variance - eps) - 1)` so that `softplus(log_scale) + eps == init_variance`.
    /// Default `5.0` (the reference implementations' value). Must be finite and `> eps`.
    pub init_variance: f64,
    /// The variance floor: `var_c = softplus(log_scale_c) + eps`. Default `1e-5`; finite, `> 0`.
    pub eps: f64,
    /// Width of the two hidden 1x1 convolutions of the VID-I regressor; `None` (the
    /// default) uses the teacher's channel count, as the paper. Ignored by the linear forms.
    pub hidden_channels: Option<i64>,
    /// How the per-element losses are reduced. Default [`Reduction::Mean`] (the mean over
    /// all `N * C * H * W` elements, as the reference implementations). With
    /// [`Reduction::None`] `forward` returns the per-element loss map.
    pub reduction: Reduction,
    /// Add `0.5 * ln(2 pi)` per element (the full Gaussian negative log-likelihood). It
    /// changes the value, not the gradients. Default `false`.
    pub full: bool,
    /// The tch optimizer parameter group `log_scale` is created in; `None` (the default)
    /// keeps the group of the path the module is built under. With `Some(g)`, give the
    /// variance its own learning rate with `opt.set_lr_group(g, lr)`: see
    /// [the module docs](crate::nn#learning-rate-of-the-variance) for why it matters.
    pub log_scale_group: Option<usize>,
}

impl Default for VidConfig {
    /// `init_variance = 5.0`, `eps = 1e-5`, hidden width = teacher's channels,
    /// `Reduction::Mean`, `full = false`, `log_scale` in the path's optimizer group.
    fn default() -> Self {
        VidConfig {
            init_variance: 5.0,
            eps: 1e-5,
            hidden_channels: None,
            reduction: Reduction::Mean,
            full: false,
            log_scale_group: None,
        }
    }
}

impl VidConfig {
    /// The op options these settings give.
    pub fn options(&self) -> VidOptions {
        VidOptions::default()
            .eps(self.eps)
            .reduction(self.reduction)
            .full(self.full)
    }

    /// The `log_scale` value whose variance is `init_variance`:
    /// `ln(exp(init_variance - eps) - 1)`, computed without overflow.
    ///
    /// ```
    /// let a = vidfuse::nn::VidConfig::default().initial_log_scale();
    /// assert!(((1.0 + a.exp()).ln() + 1e-5 - 5.0).abs() < 1e-12);
    /// ```
    pub fn initial_log_scale(&self) -> f64 {
        let x = self.init_variance - self.eps;
        // softplus^-1(x) = ln(e^x - 1) = x + ln(1 - e^-x)
        x + (-(-x).exp_m1()).ln()
    }

    /// Checks the settings on their own and against the dtype of the VarStore that will
    /// hold `log_scale` (`store_kind`): a config that every forward would refuse, or whose
    /// initial `log_scale` the store cannot hold, is refused here, before any variable exists.
    fn validate(&self, store_kind: Kind) -> Result<(), VidError> {
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return Err(VidError::invalid(
                "cfg.eps",
                format!("must be finite and > 0, got {:e}", self.eps),
            ));
        }
        // The op refuses an eps below the smallest normal number of its accumulation type:
        // f64 only for f64 features, which an f64 store implies (the modules compute in the
        // features' dtype; f32 otherwise).
        let (floor, acc_name) = if store_kind == Kind::Double {
            (f64::MIN_POSITIVE, "f64")
        } else {
            (f32::MIN_POSITIVE as f64, "f32")
        };
        if self.eps < floor {
            return Err(VidError::invalid(
                "cfg.eps",
                format!(
                    "{:e} is below {floor:e}, the smallest normal {acc_name} (the accumulation \
                     type of a VarStore of {store_kind:?}); every forward would refuse it",
                    self.eps
                ),
            ));
        }
        if !(self.init_variance.is_finite() && self.init_variance > self.eps) {
            return Err(VidError::invalid(
                "cfg.init_variance",
                format!(
                    "must be finite and > eps ({:e}), got {:e}",
                    self.eps, self.init_variance
                ),
            ));
        }
        let largest = largest_finite(store_kind);
        if self.initial_log_scale().abs() > largest {
            return Err(VidError::invalid(
                "cfg.init_variance",
                format!(
                    "{:e} needs a log_scale of {:e}, beyond the largest finite {store_kind:?} \
                     ({largest:e}) of the VarStore",
                    self.init_variance,
                    self.initial_log_scale()
                ),
            ));
        }
        if let Some(h) = self.hidden_channels {
            if h <= 0 {
                return Err(VidError::invalid(
                    "cfg.hidden_channels",
                    format!("must be > 0, got {h}"),
                ));
            }
        }
        Ok(())
    }
}

/// The largest finite value of a float dtype (f64's for any other).
fn largest_finite(kind: Kind) -> f64 {
    match kind {
        Kind::Float => f32::MAX as f64,
        Kind::Half => half::f16::MAX.to_f64(),
        Kind::BFloat16 => half::bf16::MAX.to_f64(),
        _ => f64::MAX,
    }
}

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
    cfg: VidConfig,
}

fn check_lambda(lambda: f64) -> Result<(), VidError> {
    if !lambda.is_finite() {
        return Err(VidError::invalid(
            "lambda",
            format!("must be finite, got {lambda}"),
        ));
    }
    Ok(())
}

/// `e` with the pair's index in its message.
fn in_pair(k: usize, e: VidError) -> VidError {
    match e {
        VidError::InvalidArgument { arg, message } => VidError::InvalidArgument {
            arg,
            message: format!("pair {k}: {message}"),
        },
        other => other,
    }
}

/// A VarStore on a CUDA device that libtorch does not see is one clear line, not the
/// C++ trace of a failed allocation.
fn check_device(device: Device) -> Result<(), VidError> {
    if let Device::Cuda(ordinal) = device {
        let visible = tch::Cuda::device_count();
        if ordinal as i64 >= visible {
            return Err(VidError::CudaUnavailable(format!(
                "the VarStore is on cuda:{ordinal}, but libtorch sees {visible} CUDA device(s) \
                 (no GPU, no driver, or a CPU-only libtorch)"
            )));
        }
    }
    Ok(())
}

fn check_dim(arg: &'static str, n: i64, what: &str) -> Result<(), VidError> {
    if n <= 0 {
        return Err(VidError::invalid(
            arg,
            format!("{what} must be > 0, got {n}"),
        ));
    }
    Ok(())
}

/// A parameter a constructor is about to create: where under the module's path, its shape
/// and its initialisation.
struct ParamSpec {
    /// Sub-path under the module's path, e.g. `["regressor", "0"]`.
    path: Vec<String>,
    name: &'static str,
    dims: Vec<i64>,
    init: nn::Init,
    /// The optimizer group, when not the module path's.
    group: Option<usize>,
}

impl ParamSpec {
    fn new(path: &[&str], name: &'static str, dims: &[i64], init: nn::Init) -> Self {
        ParamSpec {
            path: path.iter().map(|s| s.to_string()).collect(),
            name,
            dims: dims.to_vec(),
            init,
            group: None,
        }
    }

    /// Uniform in `+-1/sqrt(fan_in)`: PyTorch's default for the weights of `nn.Linear` and
    /// `nn.Conv2d` (`kaiming_uniform_(a = sqrt(5))`) and for their biases.
    fn pytorch_default(path: &[&str], name: &'static str, dims: &[i64], fan_in: i64) -> Self {
        let bound = 1.0 / (fan_in as f64).sqrt();
        Self::new(
            path,
            name,
            dims,
            nn::Init::Uniform {
                lo: -bound,
                up: bound,
            },
        )
    }

    fn display_name(&self) -> String {
        let mut parts = self.path.clone();
        parts.push(self.name.to_string());
        parts.join(".")
    }
}

/// The tensors of a module, created but not yet in the VarStore. Constructors create every
/// tensor first and register them only once all exist, so a refused or failed constructor
/// leaves nothing behind (no orphan parameter gets optimised or saved).
struct PendingParams {
    params: Vec<(ParamSpec, Tensor)>,
}

impl PendingParams {
    /// Checks every size (no overflow, allocatable), then creates every tensor.
    fn create(vs: &nn::Path, specs: Vec<ParamSpec>) -> Result<PendingParams, VidError> {
        let bytes_per_element = vs.kind().elt_size_in_bytes() as i64;
        for spec in &specs {
            let numel = spec
                .dims
                .iter()
                .try_fold(1i64, |acc, &d| acc.checked_mul(d))
                .filter(|n| n.checked_mul(bytes_per_element).is_some());
            if numel.is_none() {
                return Err(VidError::invalid(
                    "size",
                    format!(
                        "the parameter `{}` would have shape {:?}: more elements than can be addressed",
                        spec.display_name(),
                        spec.dims
                    ),
                ));
            }
        }
        check_device(vs.device())?;
        let mut params = Vec::with_capacity(specs.len());
        for spec in specs {
            let tensor =
                nn::f_init(spec.init, &spec.dims, vs.device(), vs.kind()).map_err(|e| {
                    // libtorch's first line says what failed; the rest are C++ stack frames.
                    let message = e.to_string();
                    let first = message.lines().next().unwrap_or_default();
                    VidError::Torch(format!("creating `{}`: {first}", spec.display_name()))
                })?;
            params.push((spec, tensor));
        }
        Ok(PendingParams { params })
    }

    /// Adds every tensor to the VarStore under `vs` as a trainable variable, in order.
    fn register(self, vs: &nn::Path) -> Vec<Tensor> {
        self.params
            .into_iter()
            .map(|(spec, tensor)| {
                let base = match spec.group {
                    Some(group) => vs.set_group(group),
                    None => vs.clone(),
                };
                let path = spec.path.iter().fold(base, |p, part| p / part.as_str());
                path.add(spec.name, tensor, true)
            })
            .collect()
    }
}

/// What a VidLoss is made of, before its parameters are registered.
struct PendingVidLoss {
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
    fn register(self, vs: &nn::Path) -> VidLoss {
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
    fn pending_conv(
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
    fn op_inputs(&self, student: &Tensor, teacher: &Tensor) -> Result<OpInputs, VidError> {
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
struct OpInputs {
    mean: Tensor,
    target: Tensor,
    log_scale: Tensor,
}

/// One VID-I layer pair of a [`VidDistiller`]: the student's and the teacher's channel
/// counts and the pair's weight `lambda`.
///
/// ```
/// use vidfuse::nn::VidPair;
/// let p = VidPair::new(64, 128, 0.5);
/// assert_eq!(p, VidPair { student_channels: 64, teacher_channels: 128, lambda: 0.5 });
/// assert_eq!(p, VidPair::from((64, 128, 0.5)));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VidPair {
    /// Channels of the student's feature map.
    pub student_channels: i64,
    /// Channels of the teacher's feature map.
    pub teacher_channels: i64,
    /// The pair's weight in the sum (finite).
    pub lambda: f64,
}

impl VidPair {
    /// A pair of `student_channels` -> `teacher_channels` with weight `lambda`.
    pub fn new(student_channels: i64, teacher_channels: i64, lambda: f64) -> VidPair {
        VidPair {
            student_channels,
            teacher_channels,
            lambda,
        }
    }
}

impl From<(i64, i64, f64)> for VidPair {
    /// `(student_channels, teacher_channels, lambda)`.
    fn from((student_channels, teacher_channels, lambda): (i64, i64, f64)) -> VidPair {
        VidPair::new(student_channels, teacher_channels, lambda)
    }
}

/// Several student/teacher layer pairs, each a [`VidLoss`] with a weight `lambda_k`;
/// `forward` gives `sum_k lambda_k * L_k`.
///
/// ```
/// use tch::{nn, Device, Kind, Tensor};
/// use vidfuse::nn::VidDistiller;
///
/// let vs = nn::VarStore::new(Device::Cpu);
/// // (student channels, teacher channels, lambda) per pair, under vid.0, vid.1
/// let vid = VidDistiller::new(&vs.root() / "vid", &[(8, 16, 1.0), (16, 32, 0.5)], Default::default());
/// let opts = (Kind::Float, Device::Cpu);
/// let s = [Tensor::randn([2, 8, 8, 8], opts), Tensor::randn([2, 16, 4, 4], opts)];
/// let t = [Tensor::randn([2, 16, 8, 8], opts), Tensor::randn([2, 32, 4, 4], opts)];
/// let loss = vid.forward(&s, &t);
/// assert_eq!(loss.dim(), 0);
/// assert!(vid.f_forward(&s[..1], &t).is_err()); // counts differ
/// ```
#[derive(Debug, Default)]
pub struct VidDistiller {
    pairs: Vec<(VidLoss, f64)>,
}

impl VidDistiller {
    /// VID-I pairs from `(student_channels, teacher_channels, lambda)`, the k-th under
    /// `vs / k`. Returns an error on a bad channel count or config. The same as
    /// [`VidDistiller::f_with_pairs`] with positional tuples.
    pub fn f_new<'a, P: Borrow<nn::Path<'a>>>(
        vs: P,
        pairs: &[(i64, i64, f64)],
        cfg: VidConfig,
    ) -> Result<VidDistiller, VidError> {
        let pairs: Vec<VidPair> = pairs.iter().map(|&p| p.into()).collect();
        Self::f_with_pairs(vs, &pairs, cfg)
    }

    /// VID-I pairs (panicking form of [`VidDistiller::f_new`]).
    pub fn new<'a, P: Borrow<nn::Path<'a>>>(
        vs: P,
        pairs: &[(i64, i64, f64)],
        cfg: VidConfig,
    ) -> VidDistiller {
        Self::f_new(vs, pairs, cfg).unwrap_or_else(|e| panic!("{e}"))
    }

    /// VID-I pairs, the k-th under `vs / k`. Returns an error on a bad channel count,
    /// weight or config; then no variable is created.
    pub fn f_with_pairs<'a, P: Borrow<nn::Path<'a>>>(
        vs: P,
        pairs: &[VidPair],
        cfg: VidConfig,
    ) -> Result<VidDistiller, VidError> {
        let vs = vs.borrow();
        // Everything is checked and every tensor created before any is registered: a refused
        // pair leaves the VarStore as it was.
        for (k, pair) in pairs.iter().enumerate() {
            check_lambda(pair.lambda).map_err(|e| in_pair(k, e))?;
        }
        let pending = pairs
            .iter()
            .enumerate()
            .map(|(k, pair)| {
                VidLoss::pending_conv(&(vs / k), pair.student_channels, pair.teacher_channels, cfg)
                    .map_err(|e| in_pair(k, e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut d = VidDistiller::empty();
        for (k, (loss, pair)) in pending.into_iter().zip(pairs).enumerate() {
            d.pairs.push((loss.register(&(vs / k)), pair.lambda));
        }
        Ok(d)
    }

    /// VID-I pairs (panicking form of [`VidDistiller::f_with_pairs`]).
    ///
    /// ```
    /// use tch::{nn, Device};
    /// use vidfuse::nn::{VidDistiller, VidPair};
    /// let vs = nn::VarStore::new(Device::Cpu);
    /// let pairs = [VidPair::new(8, 16, 1.0), VidPair::new(16, 32, 0.5)];
    /// let vid = VidDistiller::with_pairs(&vs.root() / "vid", &pairs, Default::default());
    /// assert_eq!(vid.lambdas(), vec![1.0, 0.5]);
    /// ```
    pub fn with_pairs<'a, P: Borrow<nn::Path<'a>>>(
        vs: P,
        pairs: &[VidPair],
        cfg: VidConfig,
    ) -> VidDistiller {
        Self::f_with_pairs(vs, pairs, cfg).unwrap_or_else(|e| panic!("{e}"))
    }

    /// A distiller with no pairs; add them with [`VidDistiller::push`] (any mix of
    /// VID-I, linear and vector -> map losses).
    pub fn empty() -> VidDistiller {
        VidDistiller { pairs: Vec::new() }
    }

    /// Adds a pair with weight `lambda` (finite); returns an error otherwise.
    pub fn f_push(&mut self, loss: VidLoss, lambda: f64) -> Result<&mut Self, VidError> {
        check_lambda(lambda)?;
        self.pairs.push((loss, lambda));
        Ok(self)
    }

    /// Adds a pair with weight `lambda` (panicking form of [`VidDistiller::f_push`]).
    pub fn push(&mut self, loss: VidLoss, lambda: f64) -> &mut Self {
        self.f_push(loss, lambda).unwrap_or_else(|e| panic!("{e}"))
    }

    /// The number of pairs.
    pub fn len(&self) -> usize {
        self.pairs.len()
    }

    /// Whether there is no pair.
    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }

    /// The pairs and their weights.
    pub fn pairs(&self) -> &[(VidLoss, f64)] {
        &self.pairs
    }

    /// The pairs' weights, in order.
    pub fn lambdas(&self) -> Vec<f64> {
        self.pairs.iter().map(|(_, lambda)| *lambda).collect()
    }

    /// Sets the weight of pair `k` (for a schedule: warm-up, decay). Returns an error when
    /// there is no pair `k` or `lambda` is not finite; then nothing changes.
    pub fn f_set_lambda(&mut self, k: usize, lambda: f64) -> Result<(), VidError> {
        check_lambda(lambda).map_err(|e| in_pair(k, e))?;
        let n = self.pairs.len();
        let pair = self.pairs.get_mut(k).ok_or_else(|| {
            VidError::invalid("k", format!("no pair {k}: the distiller has {n} pairs"))
        })?;
        pair.1 = lambda;
        Ok(())
    }

    /// Sets the weight of pair `k` (panicking form of [`VidDistiller::f_set_lambda`]).
    ///
    /// ```
    /// use tch::{nn, Device};
    /// let vs = nn::VarStore::new(Device::Cpu);
    /// let mut vid = vidfuse::nn::VidDistiller::new(vs.root(), &[(4, 8, 1.0)], Default::default());
    /// for step in 0..100 {
    ///     vid.set_lambda(0, (step as f64 / 50.0).min(1.0)); // linear warm-up
    /// }
    /// assert_eq!(vid.lambdas(), vec![1.0]);
    /// ```
    pub fn set_lambda(&mut self, k: usize, lambda: f64) {
        self.f_set_lambda(k, lambda)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Checks the counts, then each pair's op inputs (errors name the pair).
    fn op_inputs(
        &self,
        students: &[Tensor],
        teachers: &[Tensor],
    ) -> Result<Vec<OpInputs>, VidError> {
        if students.len() != self.pairs.len() {
            return Err(VidError::invalid(
                "students",
                format!(
                    "{} student tensors for {} VID pairs",
                    students.len(),
                    self.pairs.len()
                ),
            ));
        }
        if teachers.len() != self.pairs.len() {
            return Err(VidError::invalid(
                "teachers",
                format!(
                    "{} teacher tensors for {} VID pairs",
                    teachers.len(),
                    self.pairs.len()
                ),
            ));
        }
        self.pairs
            .iter()
            .zip(students.iter().zip(teachers))
            .enumerate()
            .map(|(k, ((vid, _), (s, t)))| {
                if vid.cfg.reduction == Reduction::None {
                    return Err(VidError::invalid(
                        "students",
                        format!("pair {k}: its loss is not reduced (Reduction::None); a distiller needs scalar losses"),
                    ));
                }
                vid.op_inputs(s, t).map_err(|e| match e {
                    VidError::InvalidArgument { arg, message } => VidError::InvalidArgument {
                        arg: if arg == "teacher" { "teachers" } else { "students" },
                        message: format!("pair {k}: `{arg}`: {message}"),
                    },
                    other => other,
                })
            })
            .collect()
    }

    /// Each pair's unweighted loss (for logging); errors as [`VidDistiller::f_forward`].
    pub fn f_forward_each(
        &self,
        students: &[Tensor],
        teachers: &[Tensor],
    ) -> Result<Vec<Tensor>, VidError> {
        let inputs = self.op_inputs(students, teachers)?;
        inputs
            .iter()
            .zip(&self.pairs)
            .map(|(x, (vid, _))| f_vid_loss(&x.mean, &x.target, &x.log_scale, &vid.cfg.options()))
            .collect()
    }

    /// Each pair's unweighted loss (panicking form of [`VidDistiller::f_forward_each`]).
    pub fn forward_each(&self, students: &[Tensor], teachers: &[Tensor]) -> Vec<Tensor> {
        self.f_forward_each(students, teachers)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// The weighted sum `sum_k lambda_k * L_k` of the pairs' losses, as one grouped op
    /// ([`crate::f_vid_loss_grouped`]: one pass over all pairs, one autograd node);
    /// `students[k]` and `teachers[k]` go to pair `k`. The loss has the features' dtype when
    /// every pair's is the same, else f32. Returns an error when the counts differ from the
    /// number of pairs (or there is none), or a pair's shapes do not match (the message
    /// names the pair).
    pub fn f_forward(&self, students: &[Tensor], teachers: &[Tensor]) -> Result<Tensor, VidError> {
        if self.pairs.is_empty() {
            return Err(VidError::invalid("self", "the distiller has no VID pair"));
        }
        let inputs = self.op_inputs(students, teachers)?;
        // One grouped op for all pairs (one per distinct set of options, when pairs were
        // pushed with different configs).
        let mut groups: Vec<(VidOptions, Vec<VidTerm<'_>>)> = Vec::new();
        for (x, (vid, lambda)) in inputs.iter().zip(&self.pairs) {
            let term = VidTerm {
                mean: &x.mean,
                target: &x.target,
                log_scale: &x.log_scale,
                weight: *lambda,
            };
            let opts = vid.cfg.options();
            match groups.iter_mut().find(|(o, _)| *o == opts) {
                Some((_, terms)) => terms.push(term),
                None => groups.push((opts, vec![term])),
            }
        }
        let mut total: Option<Tensor> = None;
        for (opts, terms) in &groups {
            let sum = f_vid_loss_grouped(terms, opts)?;
            total = Some(match total {
                None => sum,
                Some(acc) => acc.f_add(&sum)?,
            });
        }
        let total = total.ok_or_else(|| VidError::Internal("no pair".into()))?;
        // The features' dtype when every pair has the same one, as for a single pair.
        let kind = inputs[0].mean.kind();
        if inputs.iter().all(|x| x.mean.kind() == kind) && total.kind() != kind {
            Ok(total.f_to_kind(kind)?)
        } else {
            Ok(total)
        }
    }

    /// The weighted sum of the pairs' losses (panicking form of [`VidDistiller::f_forward`]).
    pub fn forward(&self, students: &[Tensor], teachers: &[Tensor]) -> Tensor {
        self.f_forward(students, teachers)
            .unwrap_or_else(|e| panic!("{e}"))
    }
}
