//! Dispatch to the compute backends. Backends know nothing of autograd: they take a checked
//! [`VidProblem`] and return tensors.

use std::sync::Arc;

use tch::{Device, Tensor};

pub(crate) use crate::backend_io::{ForwardOutput, Grads, GroupForward, NeedsGrad, Precomputed};
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

    /// The loss (and for Mean/Sum the channel sums); with `write`, the per-element gradients
    /// for an upstream gradient of 1 too, written in the same pass.
    pub fn forward(&self, problem: &VidProblem, write: NeedsGrad) -> Result<ForwardOutput> {
        match self {
            Backend::Cpu => cpu::forward(problem, write),
            Backend::Cuda(ordinal) => cuda::forward(*ordinal, problem, write),
            Backend::Launcher(launcher) => cuda::plan::forward(launcher.as_ref(), problem, write),
        }
    }

    /// Forward of several Mean/Sum problems with as few passes as the backend allows: each
    /// problem's output exactly as [`Backend::forward`] gives it, and the weighted total
    /// `sum_k weights[k] * loss_k` as a scalar of `total_kind`; with `write[k]`, problem k's
    /// per-element gradients for an upstream gradient of 1 on the total, where the backend
    /// writes them in the same pass.
    pub fn forward_group(
        &self,
        problems: &[&VidProblem],
        weights: &[f64],
        total_kind: tch::Kind,
        write: &[NeedsGrad],
    ) -> Result<GroupForward> {
        match self {
            Backend::Cpu => cpu::forward_group(problems, weights, total_kind, write),
            Backend::Cuda(ordinal) => {
                cuda::forward_group(*ordinal, problems, weights, total_kind, write)
            }
            Backend::Launcher(launcher) => {
                cuda::plan::forward_group(launcher.as_ref(), problems, weights, total_kind, write)
            }
        }
    }

    /// Backward of several Mean/Sum problems: problem k's loss receives `grad * weights[k]`
    /// (`grad` a scalar tensor, f32 or f64, on the problems' device). `precomputed[k]`: what
    /// the forward wrote for problem k (for `grad == 1`), which the backend may return
    /// instead of computing (it is taken: a second backward recomputes).
    pub fn backward_group(
        &self,
        problems: &[&VidProblem],
        channel_sumsq: &[&Tensor],
        grad: &Tensor,
        weights: &[f64],
        needs: &[NeedsGrad],
        precomputed: Vec<Option<Precomputed>>,
    ) -> Result<Vec<Grads>> {
        match self {
            Backend::Cpu => {
                let g = grad.f_double_value(&[])?;
                let upstream: Vec<f64> = weights.iter().map(|w| g * w).collect();
                let unit = g == 1.0;
                cpu::backward_group(problems, channel_sumsq, &upstream, needs, unit, precomputed)
            }
            Backend::Cuda(ordinal) => cuda::backward_group(
                *ordinal,
                problems,
                channel_sumsq,
                grad,
                weights,
                needs,
                precomputed,
            ),
            Backend::Launcher(launcher) => cuda::plan::backward_group(
                launcher.as_ref(),
                problems,
                channel_sumsq,
                grad,
                weights,
                needs,
                precomputed,
            ),
        }
    }

    /// `grad` is the upstream gradient as autograd hands it: a scalar for Mean/Sum (which
    /// take the grouped path, as a group of one); for None a tensor of the inputs' shape, in
    /// any layout.
    pub fn backward(
        &self,
        problem: &VidProblem,
        channel_sumsq: Option<&Tensor>,
        grad: &Tensor,
        needs: NeedsGrad,
        precomputed: Option<Precomputed>,
    ) -> Result<Grads> {
        if problem.options.reduction_mode() != crate::options::Reduction::None {
            let q = channel_sumsq
                .ok_or_else(|| VidError::Internal("missing saved channel sums".into()))?;
            return self.backward_one(problem, q, grad, needs, precomputed);
        }
        if let Some(scalar) = problem.f_broadcast_scalar(grad)? {
            return self.backward_unreduced_scalar(problem, &scalar, needs);
        }
        let grad = problem.f_in_layout(grad)?;
        match self {
            Backend::Cpu => cpu::backward_unreduced(problem, &grad, needs),
            Backend::Cuda(ordinal) => cuda::backward_unreduced(*ordinal, problem, &grad, needs),
            Backend::Launcher(launcher) => {
                cuda::plan::backward_unreduced(launcher.as_ref(), problem, &grad, needs)
            }
        }
    }

    /// The grouped backward of one problem whose loss receives the scalar `grad`.
    fn backward_one(
        &self,
        problem: &VidProblem,
        channel_sumsq: &Tensor,
        grad: &Tensor,
        needs: NeedsGrad,
        precomputed: Option<Precomputed>,
    ) -> Result<Grads> {
        let mut grads = self.backward_group(
            &[problem],
            &[channel_sumsq],
            grad,
            &[1.0],
            &[needs],
            vec![precomputed],
        )?;
        grads
            .pop()
            .ok_or_else(|| VidError::Internal("no backward output".into()))
    }

    /// None backward when every element's upstream gradient is the same scalar `g` (what
    /// `loss.sum().backward()` hands over: a stride-0 expansion). Then the per-element
    /// gradients are Sum's with upstream `g`, read in place instead of copying a full-size
    /// upstream tensor; the log_scale gradient needs the per-channel sums of squares, one
    /// extra read pass only when it is wanted.
    fn backward_unreduced_scalar(
        &self,
        problem: &VidProblem,
        grad: &Tensor,
        needs: NeedsGrad,
    ) -> Result<Grads> {
        let channel_sumsq = if needs.log_scale {
            let none = NeedsGrad::NONE;
            let mut forward = self.forward_group(&[problem], &[1.0], tch::Kind::Float, &[none])?;
            forward
                .channel_sumsq
                .pop()
                .ok_or_else(|| VidError::Internal("no channel sums".into()))?
        } else {
            // Its values enter only the log_scale gradient, not wanted here; it only has to
            // be the dtype each backend keeps the sums in (f64 on the CPU).
            let kind = match self {
                Backend::Cpu => tch::Kind::Double,
                _ if problem.kind() == tch::Kind::Double => tch::Kind::Double,
                _ => tch::Kind::Float,
            };
            Tensor::f_zeros([problem.geometry.channels as i64], (kind, problem.device()))?
        };
        self.backward_one(problem, &channel_sumsq, grad, needs, None)
    }
}
