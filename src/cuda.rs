//! CUDA backend (placeholder until the kernels land).
use tch::Tensor;

use crate::backend::{ForwardOutput, Grads, NeedsGrad};
use crate::error::{Result, VidError};
use crate::validate::VidProblem;

pub(crate) fn forward(_ordinal: usize, _problem: &VidProblem) -> Result<ForwardOutput> {
    Err(VidError::CudaUnavailable(
        "the CUDA backend is not built yet".into(),
    ))
}

pub(crate) fn backward(
    _ordinal: usize,
    _problem: &VidProblem,
    _q: Option<&Tensor>,
    _grad: &Tensor,
    _needs: NeedsGrad,
) -> Result<Grads> {
    Err(VidError::CudaUnavailable(
        "the CUDA backend is not built yet".into(),
    ))
}
