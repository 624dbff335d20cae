//! Dispatch to the compute backends. Backends know nothing of autograd: they take a checked
//! [`VidProblem`] and return tensors.

use std::sync::Arc;

use tch::{Device, Tensor};

use crate::cuda::KernelLauncher;
use crate::error::{Result, VidError};
use crate::validate::VidProblem;
use crate::{cpu, cuda};

/// What forward produces: the loss, and what backward needs besides the inputs.
pub(crate) struct ForwardOutput {
    /// The loss: a scalar (Mean, Sum) or the per-element tensor (None), in the inputs' dtype.
    pub loss: Tensor,
    /// Per-channel sums of squared differences `Q_c` (Mean and Sum only), in the backend's
    /// accumulation dtype.
    pub channel_sumsq: Option<Tensor>,
}

/// Which input gradients backward must produce.
#[derive(Debug, Clone, Copy)]
pub(crate) struct NeedsGrad {
    pub mean: bool,
    pub target: bool,
    pub log_scale: bool,
}

/// Gradients in the problem's layout (and, for log_scale, any float dtype: the caller casts).
#[derive(Default)]
pub(crate) struct Grads {
    pub mean: Option<Tensor>,
    pub target: Option<Tensor>,
    pub log_scale: Option<Tensor>,
}

/// Where a problem runs.
#[derive(Clone)]
pub(crate) enum Backend {
    Cpu,
    /// The CUDA kernels on device `ordinal`.
    Cuda(usize),
    /// The CUDA kernel plan through a caller-supplied launcher (the host emulation in tests).
    #[cfg_attr(not(feature = "test-hooks"), allow(dead_code))]
    Launcher(Arc<dyn KernelLauncher + Send + Sync>),
}

impl Backend {
    pub fn for_device(device: Device) -> Result<Backend> {
        match device {
            Device::Cpu => Ok(Backend::Cpu),
            Device::Cuda(ordinal) => Ok(Backend::Cuda(ordinal)),
            other => Err(VidError::invalid(
                "mean",
                format!("expected a CPU or CUDA tensor, got device {other:?}"),
            )),
        }
    }

    pub fn forward(&self, problem: &VidProblem) -> Result<ForwardOutput> {
        match self {
            Backend::Cpu => cpu::forward(problem),
            Backend::Cuda(ordinal) => cuda::forward(*ordinal, problem),
            Backend::Launcher(launcher) => cuda::plan::forward(launcher.as_ref(), problem),
        }
    }

    /// `grad` is the upstream gradient: a scalar for Mean/Sum, else in the problem's layout.
    pub fn backward(
        &self,
        problem: &VidProblem,
        channel_sumsq: Option<&Tensor>,
        grad: &Tensor,
        needs: NeedsGrad,
    ) -> Result<Grads> {
        match self {
            Backend::Cpu => cpu::backward(problem, channel_sumsq, grad, needs),
            Backend::Cuda(ordinal) => cuda::backward(*ordinal, problem, channel_sumsq, grad, needs),
            Backend::Launcher(launcher) => {
                cuda::plan::backward(launcher.as_ref(), problem, channel_sumsq, grad, needs)
            }
        }
    }
}
