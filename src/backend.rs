//! Dispatch to the compute backends. Backends know nothing of autograd: they take a checked
//! [`VidProblem`] and return tensors.

use std::sync::Arc;

use tch::{Device, Tensor};

pub(crate) use crate::backend_io::{ForwardOutput, Grads, GroupForward, NeedsGrad};
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

    /// Forward of several Mean/Sum problems with as few passes as the backend allows: each
    /// problem's output exactly as [`Backend::forward`] gives it, and the weighted total
    /// `sum_k weights[k] * loss_k` as a scalar of `total_kind`.
    pub fn forward_group(
        &self,
        problems: &[&VidProblem],
        weights: &[f64],
        total_kind: tch::Kind,
    ) -> Result<GroupForward> {
        match self {
            Backend::Cpu => cpu::forward_group(problems, weights, total_kind),
            Backend::Cuda(ordinal) => cuda::forward_group(*ordinal, problems, weights, total_kind),
            Backend::Launcher(launcher) => {
                cuda::plan::forward_group(launcher.as_ref(), problems, weights, total_kind)
            }
        }
    }

    /// Backward of several Mean/Sum problems: problem k's loss receives `grad * weights[k]`
    /// (`grad` a scalar tensor, f32 or f64, on the problems' device).
    pub fn backward_group(
        &self,
        problems: &[&VidProblem],
        channel_sumsq: &[&Tensor],
        grad: &Tensor,
        weights: &[f64],
        needs: &[NeedsGrad],
    ) -> Result<Vec<Grads>> {
        match self {
            Backend::Cpu => {
                let g = grad.f_double_value(&[])?;
                let upstream: Vec<f64> = weights.iter().map(|w| g * w).collect();
                cpu::backward_group(problems, channel_sumsq, &upstream, needs)
            }
            Backend::Cuda(ordinal) => {
                cuda::backward_group(*ordinal, problems, channel_sumsq, grad, weights, needs)
            }
            Backend::Launcher(launcher) => cuda::plan::backward_group(
                launcher.as_ref(),
                problems,
                channel_sumsq,
                grad,
                weights,
                needs,
            ),
        }
    }

    /// `grad` is the upstream gradient: a scalar for Mean/Sum (which take the grouped path,
    /// as a group of one), else in the problem's layout.
    pub fn backward(
        &self,
        problem: &VidProblem,
        channel_sumsq: Option<&Tensor>,
        grad: &Tensor,
        needs: NeedsGrad,
    ) -> Result<Grads> {
        if problem.options.reduction_mode() != crate::options::Reduction::None {
            let q = channel_sumsq
                .ok_or_else(|| VidError::Internal("missing saved channel sums".into()))?;
            let mut grads = self.backward_group(&[problem], &[q], grad, &[1.0], &[needs])?;
            return grads
                .pop()
                .ok_or_else(|| VidError::Internal("no backward output".into()));
        }
        match self {
            Backend::Cpu => cpu::backward_unreduced(problem, grad, needs),
            Backend::Cuda(ordinal) => cuda::backward_unreduced(*ordinal, problem, grad, needs),
            Backend::Launcher(launcher) => {
                cuda::plan::backward_unreduced(launcher.as_ref(), problem, grad, needs)
            }
        }
    }
}
