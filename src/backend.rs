//! Dispatch to the compute backends. Backends know nothing of autograd: they take a checked
//! [`VidProblem`] and return tensors.

use std::sync::Arc;

use tch::{Device, Tensor};

pub(crate) use crate::backend_io::{ForwardOutput, Grads, NeedsGrad};
use crate::cuda::KernelLauncher;
use crate::error::{Result, VidError};
use crate::validate::VidProblem;
use crate::{cpu, cuda};

/// Where a problem runs.
#[derive(Clone)]
pub(crate) enum Backend {
    Cpu,
    /// The CUDA kernels on device `ordinal`.
    Cuda(usize),
    /// The CUDA kernel plan through a caller-supplied launcher (the host emulation in tests).
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
