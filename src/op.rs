//! The op: validation, then the forward on the tensors' backend, then an autograd node
//! whose backward calls the same backend.

use std::panic::{catch_unwind, AssertUnwindSafe};

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
///
/// A panic anywhere below (a bug: every known failure is an `Err`) becomes
/// [`VidError::Internal`] instead of unwinding into the caller's training loop; grad mode is
/// restored by guards on every path.
pub(crate) fn vid_loss_on(
    backend: Option<Backend>,
    mean: &Tensor,
    target: &Tensor,
    log_scale: &Tensor,
    opts: &VidOptions,
) -> Result<Tensor> {
    catch_unwind(AssertUnwindSafe(|| {
        vid_loss_unguarded(backend, mean, target, log_scale, opts)
    }))
    .unwrap_or_else(|panic| Err(VidError::Internal(autograd::panic_text(&panic))))
}

fn vid_loss_unguarded(
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
    let forward = autograd::no_grad(|| backend.forward(&problem))?;
    let loss = forward.loss;
    let channel_sumsq = forward.channel_sumsq;
    let log_scale_kind = log_scale.kind();

    autograd::attach(
        NODE_NAME,
        &[mean, target, log_scale],
        &[&loss],
        // Backward reads all three (through the problem's aliases or copies of them).
        &[mean, target, log_scale],
        move |grads, needs| {
            let Some(Some(grad)) = grads.first() else {
                return Ok(vec![None, None, None]);
            };
            let needs = NeedsGrad {
                mean: needs[0],
                target: needs[1],
                log_scale: needs[2],
            };
            let grads = autograd::no_grad(|| {
                let grad = match problem.options.reduction_mode() {
                    Reduction::None => problem.f_in_layout(grad)?,
                    _ => grad.shallow_clone(),
                };
                backend.backward(&problem, channel_sumsq.as_ref(), &grad, needs)
            })?;
            let log_scale = grads
                .log_scale
                .map(|g| g.f_to_kind(log_scale_kind))
                .transpose()?;
            Ok(vec![grads.mean, grads.target, log_scale])
        },
    )
    .map_err(VidError::Autograd)?;
    Ok(loss)
}
