//! # vidfuse
//!
//! The Variational Information Distillation (VID) loss (Ahn et al., CVPR 2019) for
//! [tch](https://docs.rs/tch) as one fused, autograd-aware operation.
//!
//! Per element, with `var_c = softplus(log_scale_c) + eps`:
//!
//! ```text
//! l = 0.5 * ((mean - target)^2 / var_c + ln var_c)      [+ 0.5 * ln(2 pi) when `full`]
//! ```
//!
//! reduced by mean (default), sum, or not at all. CPU tensors take a fused, multi-threaded,
//! deterministic CPU path; CUDA tensors take NVRTC-compiled CUDA kernels. Gradients flow to
//! `mean`, `target` (when it requires grad) and `log_scale` through a custom autograd node,
//! so `loss.backward()` just works.
//!
//! ```
//! use tch::{Kind, Tensor};
//! use vidfuse::{vid_loss, VidOptions};
//!
//! let mean = Tensor::randn([8, 16, 4, 4], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
//! let target = Tensor::randn([8, 16, 4, 4], (Kind::Float, tch::Device::Cpu));
//! let log_scale = Tensor::zeros([16], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
//! let loss = vid_loss(&mean, &target, &log_scale, &VidOptions::default());
//! loss.backward();
//! assert_eq!(mean.grad().size(), vec![8, 16, 4, 4]);
//! ```
#![warn(missing_docs)]

mod autograd;
mod backend;
mod backend_io;
pub mod cpu;
pub mod cuda;
pub mod dist;
pub mod error;
mod ffi;
mod host_pool;
mod math;
pub mod nn;
mod op;
pub mod options;
mod validate;

use tch::Tensor;

pub use error::VidError;
pub use options::{Reduction, VidOptions};

/// The VID loss of `mean` against `target` with per-channel variance
/// `softplus(log_scale) + eps`, returning a [`VidError`] on bad input.
///
/// * `mean`, `target`: shape `[N, C, *S]` (S may be empty), the same float dtype
///   (f32, f64, f16, bf16); channel = dim 1; NCHW-contiguous, channels-last and `[N, C]`
///   tensors are read in place, other strides are copied first.
/// * `log_scale`: shape `[C]`, f32 or the inputs' dtype.
///
/// The loss has the inputs' dtype (a scalar for `Mean`/`Sum`, the inputs' shape for `None`);
/// accumulation is in f32 (f64 for f64 inputs).
///
/// ```
/// use tch::{Kind, Tensor};
/// use vidfuse::{f_vid_loss, Reduction, VidOptions};
///
/// let (mean, target) = (Tensor::randn([4, 3], (Kind::Float, tch::Device::Cpu)), Tensor::randn([4, 3], (Kind::Float, tch::Device::Cpu)));
/// let bad_scale = Tensor::zeros([5], (Kind::Float, tch::Device::Cpu));
/// assert!(f_vid_loss(&mean, &target, &bad_scale, &VidOptions::default()).is_err());
/// let per_element = f_vid_loss(&mean, &target, &Tensor::zeros([3], (Kind::Float, tch::Device::Cpu)),
///                              &VidOptions::default().reduction(Reduction::None)).unwrap();
/// assert_eq!(per_element.size(), vec![4, 3]);
/// ```
pub fn f_vid_loss(
    mean: &Tensor,
    target: &Tensor,
    log_scale: &Tensor,
    opts: &VidOptions,
) -> Result<Tensor, VidError> {
    op::vid_loss(mean, target, log_scale, opts)
}

/// [`f_vid_loss`], panicking with the error's message on bad input (tch's convention for
/// functions without the `f_` prefix).
pub fn vid_loss(mean: &Tensor, target: &Tensor, log_scale: &Tensor, opts: &VidOptions) -> Tensor {
    match f_vid_loss(mean, target, log_scale, opts) {
        Ok(loss) => loss,
        Err(e) => panic!("{e}"),
    }
}

/// One layer pair of a grouped VID loss ([`f_vid_loss_grouped`]): the arguments of
/// [`f_vid_loss`] for that pair, and the weight (`lambda_k`) of its loss in the sum.
#[derive(Debug, Clone, Copy)]
pub struct VidTerm<'a> {
    /// The regressed mean, `[N, C, *S]`.
    pub mean: &'a Tensor,
    /// The teacher features, the shape and dtype of `mean`.
    pub target: &'a Tensor,
    /// `log_scale`, `[C]`, f32 or the inputs' dtype.
    pub log_scale: &'a Tensor,
    /// The weight of this term's loss in the sum (finite).
    pub weight: f64,
}

/// The weighted sum of several VID losses, `sum_k weight_k * loss_k`, as one op with one
/// autograd node: the multi-layer form of VID (the paper transfers 3-4 layer pairs), with
/// fewer passes, launches and host work than one [`f_vid_loss`] per pair.
///
/// `loss_k` is exactly what [`f_vid_loss`] gives for term k with `opts` (the mean over that
/// term's own elements for [`Reduction::Mean`], or the sum); [`Reduction::None`] is an
/// error. Terms may differ in shape, rank, layout, channel count and dtype, and must be on
/// one device. The result is an f32 scalar, f64 when every term is f64. Gradients reach
/// every input that requires grad, scaled by its term's weight. Errors name the term.
///
/// ```
/// use tch::{Kind, Tensor};
/// use vidfuse::{f_vid_loss_grouped, VidOptions, VidTerm};
///
/// let opts = (Kind::Float, tch::Device::Cpu);
/// let m1 = Tensor::randn([4, 8, 6, 6], opts).set_requires_grad(true);
/// let t1 = Tensor::randn([4, 8, 6, 6], opts);
/// let a1 = Tensor::zeros([8], opts).set_requires_grad(true);
/// let m2 = Tensor::randn([4, 16], opts).set_requires_grad(true);
/// let t2 = Tensor::randn([4, 16], opts);
/// let a2 = Tensor::zeros([16], opts).set_requires_grad(true);
/// let terms = [
///     VidTerm { mean: &m1, target: &t1, log_scale: &a1, weight: 1.0 },
///     VidTerm { mean: &m2, target: &t2, log_scale: &a2, weight: 0.5 },
/// ];
/// let loss = f_vid_loss_grouped(&terms, &VidOptions::default()).unwrap();
/// loss.backward();
/// assert_eq!(m2.grad().size(), vec![4, 16]);
/// ```
pub fn f_vid_loss_grouped(terms: &[VidTerm<'_>], opts: &VidOptions) -> Result<Tensor, VidError> {
    op::vid_loss_grouped_on(None, terms, opts)
}

/// [`f_vid_loss_grouped`], panicking with the error's message on bad input.
pub fn vid_loss_grouped(terms: &[VidTerm<'_>], opts: &VidOptions) -> Tensor {
    match f_vid_loss_grouped(terms, opts) {
        Ok(loss) => loss,
        Err(e) => panic!("{e}"),
    }
}

/// [`f_vid_loss_grouped`] with the CUDA kernel plan run through `launcher` (see
/// [`f_vid_loss_with_launcher`]).
#[cfg(feature = "test-hooks")]
#[doc(hidden)]
pub fn f_vid_loss_grouped_with_launcher(
    launcher: std::sync::Arc<dyn cuda::KernelLauncher + Send + Sync>,
    terms: &[VidTerm<'_>],
    opts: &VidOptions,
) -> Result<Tensor, VidError> {
    op::vid_loss_grouped_on(Some(backend::Backend::Launcher(launcher)), terms, opts)
}

/// [`f_vid_loss`] with the CUDA kernel plan run through `launcher` instead of the tensors'
/// own backend: the same launches, grids, arguments and workspaces as on a GPU.
///
/// This exists so that the CUDA kernels can be tested without a GPU, through a host
/// emulation of the kernel sources (the test suite does this); the tensors must live where
/// the launcher's "device pointers" point (CPU tensors for a host emulation).
///
/// A test hook: only with the non-default `test-hooks` feature, not part of the stable API.
#[cfg(feature = "test-hooks")]
#[doc(hidden)]
pub fn f_vid_loss_with_launcher(
    launcher: std::sync::Arc<dyn cuda::KernelLauncher + Send + Sync>,
    mean: &Tensor,
    target: &Tensor,
    log_scale: &Tensor,
    opts: &VidOptions,
) -> Result<Tensor, VidError> {
    op::vid_loss_on(
        Some(backend::Backend::Launcher(launcher)),
        mean,
        target,
        log_scale,
        opts,
    )
}

/// The README's examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
