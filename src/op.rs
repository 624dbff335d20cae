//! The op: validation, then the forward on the tensors' backend, then an autograd node
//! whose backward calls the same backend.

use std::panic::{catch_unwind, AssertUnwindSafe};

use tch::Tensor;

use crate::autograd;
use crate::backend::{Backend, NeedsGrad};
use crate::error::{Result, VidError};
use crate::options::{Reduction, VidOptions};
use crate::validate::validate;
use crate::validate::VidProblem;
use crate::VidTerm;

/// Name of the autograd node, as `grad_fn` shows it.
const NODE_NAME: &str = "VidLossBackward";
/// Name of the grouped op's autograd node.
const GROUP_NODE_NAME: &str = "VidLossGroupedBackward";

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
    no_panic(|| vid_loss_unguarded(backend, mean, target, log_scale, opts))
}

/// `t` in dtype `kind` (no tch call when it already is).
fn in_kind(t: Tensor, kind: tch::Kind) -> Result<Tensor> {
    if t.kind() == kind {
        Ok(t)
    } else {
        Ok(t.f_to_kind(kind)?)
    }
}

/// `f()`, with a panic (a bug) turned into [`VidError::Internal`].
fn no_panic<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    catch_unwind(AssertUnwindSafe(f))
        .unwrap_or_else(|panic| Err(VidError::Internal(autograd::panic_text(&panic))))
}

/// The grouped op: `sum_k w_k * loss_k` with one autograd node, on the terms' backend (or
/// on `backend` when given).
pub(crate) fn vid_loss_grouped_on(
    backend: Option<Backend>,
    terms: &[VidTerm<'_>],
    opts: &VidOptions,
) -> Result<Tensor> {
    no_panic(|| grouped_unguarded(backend, terms, opts))
}

/// Which per-element gradients a Mean/Sum forward writes in its pass (the one-pass path):
/// those of `mean` and `target` that require grad, when the options ask for it and grad
/// mode is on (a no-grad or inference call writes none).
fn gradients_to_write(mean: &Tensor, target: &Tensor, opts: &VidOptions) -> Result<NeedsGrad> {
    let on = opts.writes_gradients_in_forward()
        && opts.reduction_mode() != Reduction::None
        && autograd::grad_mode_enabled().map_err(VidError::Autograd)?;
    Ok(NeedsGrad {
        mean: on && mean.requires_grad(),
        target: on && target.requires_grad(),
        log_scale: false,
    })
}

/// `e` with the term's index in its message, under the argument `terms`.
fn in_term(k: usize, e: VidError) -> VidError {
    match e {
        VidError::InvalidArgument { arg, message } => VidError::InvalidArgument {
            arg: "terms",
            message: format!("term {k}: `{arg}`: {message}"),
        },
        other => other,
    }
}

fn grouped_unguarded(
    backend: Option<Backend>,
    terms: &[VidTerm<'_>],
    opts: &VidOptions,
) -> Result<Tensor> {
    if terms.is_empty() {
        return Err(VidError::invalid("terms", "expected at least one term"));
    }
    if opts.reduction_mode() == Reduction::None {
        return Err(VidError::invalid(
            "opts",
            "Reduction::None is not supported by the grouped loss (it returns one scalar); \
             call f_vid_loss per term for per-element losses",
        ));
    }
    let mut problems: Vec<VidProblem> = Vec::with_capacity(terms.len());
    for (k, term) in terms.iter().enumerate() {
        if !term.weight.is_finite() {
            return Err(in_term(
                k,
                VidError::invalid("weight", format!("must be finite, got {}", term.weight)),
            ));
        }
        let problem =
            validate(term.mean, term.target, term.log_scale, opts).map_err(|e| in_term(k, e))?;
        if let Some(first) = problems.first() {
            if problem.device() != first.device() {
                return Err(in_term(
                    k,
                    VidError::invalid(
                        "mean",
                        format!(
                            "on {:?}, term 0 is on {:?}: every term must be on one device",
                            problem.device(),
                            first.device()
                        ),
                    ),
                ));
            }
        }
        problems.push(problem);
    }
    let backend = match backend {
        Some(backend) => backend,
        None => Backend::for_device(problems[0].device())?,
    };
    let weights: Vec<f64> = terms.iter().map(|t| t.weight).collect();
    let all_f64 = problems.iter().all(|p| p.kind() == tch::Kind::Double);
    let total_kind = if all_f64 {
        tch::Kind::Double
    } else {
        tch::Kind::Float
    };
    let write = terms
        .iter()
        .map(|t| gradients_to_write(t.mean, t.target, opts))
        .collect::<Result<Vec<_>>>()?;
    let group = autograd::no_grad(|| {
        let refs: Vec<&VidProblem> = problems.iter().collect();
        backend.forward_group(&refs, &weights, total_kind, &write)
    })?;
    let (total, channel_sumsq) = (group.total, group.channel_sumsq);
    // Handed to the first backward only: autograd owns what it returns (AccumulateGrad may
    // keep it as `.grad`), so a second backward recomputes.
    let mut precomputed = group.precomputed;
    let scale_kinds: Vec<tch::Kind> = terms.iter().map(|t| t.log_scale.kind()).collect();
    let inputs: Vec<&Tensor> = terms
        .iter()
        .flat_map(|t| [t.mean, t.target, t.log_scale])
        .collect();

    autograd::attach(
        GROUP_NODE_NAME,
        &inputs,
        &[&total],
        // Backward reads every input (through the problems' aliases or copies of them).
        &inputs,
        move |grads, needs| {
            let Some(Some(grad)) = grads.first() else {
                return Ok((0..needs.len()).map(|_| None).collect());
            };
            let needs: Vec<NeedsGrad> = needs
                .chunks_exact(3)
                .map(|n| NeedsGrad {
                    mean: n[0],
                    target: n[1],
                    log_scale: n[2],
                })
                .collect();
            let grads = autograd::no_grad(|| {
                let refs: Vec<&VidProblem> = problems.iter().collect();
                let sums: Vec<&Tensor> = channel_sumsq.iter().collect();
                let precomputed = std::mem::take(&mut precomputed);
                backend.backward_group(&refs, &sums, grad, &weights, &needs, precomputed)
            })?;
            let mut flat = Vec::with_capacity(3 * grads.len());
            for (g, kind) in grads.into_iter().zip(&scale_kinds) {
                flat.push(g.mean);
                flat.push(g.target);
                flat.push(g.log_scale.map(|t| in_kind(t, *kind)).transpose()?);
            }
            Ok(flat)
        },
    )
    .map_err(VidError::Autograd)?;
    Ok(total)
}

fn vid_loss_unguarded(
    backend: Option<Backend>,
    mean: &Tensor,
    target: &Tensor,
    log_scale: &Tensor,
    opts: &VidOptions,
) -> Result<Tensor> {
    let problem = autograd::no_grad(|| validate(mean, target, log_scale, opts))?;
    let backend = match backend {
        Some(backend) => backend,
        None => Backend::for_device(problem.device())?,
    };
    let write = gradients_to_write(mean, target, opts)?;
    let forward = autograd::no_grad(|| backend.forward(&problem, write))?;
    let loss = forward.loss;
    let channel_sumsq = forward.channel_sumsq;
    // Handed to the first backward only (see the grouped op).
    let mut precomputed = forward.precomputed;
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
                let precomputed = precomputed.take();
                backend.backward(&problem, channel_sumsq.as_ref(), grad, needs, precomputed)
            })?;
            let log_scale = grads
                .log_scale
                .map(|g| in_kind(g, log_scale_kind))
                .transpose()?;
            Ok(vec![grads.mean, grads.target, log_scale])
        },
    )
    .map_err(VidError::Autograd)?;
    Ok(loss)
}
