//! The op: validation, then the forward on the tensors' backend, then an autograd node
//! whose backward calls the same backend.

use tch::Tensor;

use crate::autograd;
use crate::backend::{Backend, NeedsGrad};
use crate::error::{Result, VidError};
use crate::options::{Reduction, VidOptions};
use crate::validate::validate;

/// Name of the autograd node, as `grad_fn` shows it.
const NODE_NAME: &str = "VidLossBackward";

pub(crate) fn vid_loss(
    mean: &Tensor,
    target: &Tensor,
    log_scale: &Tensor,
    opts: &VidOptions,
) -> Result<Tensor> {
    vid_loss_on(None, mean, target, log_scale, opts)
}

/// The op on the tensors' own backend, or on `backend` when given.
pub(crate) fn vid_loss_on(
    backend: Option<Backend>,
    mean: &Tensor,
    target: &Tensor,
    log_scale: &Tensor,
    opts: &VidOptions,
) -> Result<Tensor> {
    let problem = validate(mean, target, log_scale, opts)?;
    let backend = match backend {
        Some(backend) => backend,
        None => Backend::for_device(problem.device())?,
    };
    let forward = tch::no_grad(|| backend.forward(&problem))?;
    let loss = forward.loss;
    let channel_sumsq = forward.channel_sumsq;
    let log_scale_kind = log_scale.kind();

    autograd::attach(
        NODE_NAME,
        &[mean, target, log_scale],
        &[&loss],
        move |grads, needs| {
            let Some(Some(grad)) = grads.first() else {
                return Ok(vec![None, None, None]);
            };
            let needs = NeedsGrad {
                mean: needs[0],
                target: needs[1],
                log_scale: needs[2],
            };
            let grad = match problem.options.reduction_mode() {
                Reduction::None => problem.in_layout(grad),
                _ => grad.shallow_clone(),
            };
            let grads =
                tch::no_grad(|| backend.backward(&problem, channel_sumsq.as_ref(), &grad, needs))?;
            let log_scale = grads.log_scale.map(|g| g.to_kind(log_scale_kind));
            Ok(vec![grads.mean, grads.target, log_scale])
        },
    )
    .map_err(VidError::Autograd)?;
    Ok(loss)
}
