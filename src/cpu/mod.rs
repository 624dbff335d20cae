//! The fused CPU backend.
//!
//! Forward makes one pass over `mean` and `target` producing the per-channel sums of
//! squared differences `Q_c`; the loss is an O(C) epilogue. Backward is one elementwise pass.
//!
//! Every pass is an `Op` applied to each element by one walk over the tensors. Work is cut
//! into fixed units that depend only on the shape (never on the thread count or on timing);
//! each unit writes its partial sums to its own slots and slots are combined in index order,
//! so results are bitwise identical run to run and on any number of threads. Sums are kept in
//! the accumulation type (f32, or f64 for f64 inputs) in several independent lanes, so the
//! loops vectorise, and flushed into f64 at least every `FLUSH` elements per lane. f32 and
//! f64 are read and written in place; f16 and bf16 go through small conversion buffers.
//! Where the CPU has AVX2, the same code is compiled a second time for it and chosen at run
//! time (no fused multiply-add is introduced, so both give the same bits).
//!
//! Per-element outputs of 1 MiB or more come from a small cache of host buffers
//! ([`empty_cache`] releases it): fresh memory costs page faults and zeroing that, for a
//! 16 MB gradient, exceed the pass itself.

mod element;
mod ops;
mod plan;
mod walk;

use half::{bf16, f16};
use tch::{Kind, Tensor};

/// Test hook (`test-hooks` feature): passes over the elements the CPU backend started on
/// the calling thread since it began (each reads the inputs once).
#[cfg(feature = "test-hooks")]
pub fn passes_started() -> usize {
    plan::passes_started()
}

pub use crate::host_pool::{
    cache_limit, cached_bytes, empty_cache, set_cache_limit, CACHE_LIMIT_ENV, MAX_CACHED_BYTES,
};

use crate::backend_io::{ForwardOutput, Grads, GroupForward, NeedsGrad, Precomputed};
use crate::error::{Result, VidError};
use crate::host_pool;
use crate::math::ChannelParams;
use crate::options::Reduction;
use crate::validate::VidProblem;
use element::{Acc, Element};
use ops::{ChannelValues, ElementLoss, NoneBackward, ScaledDifference, SumSq, SumSqAndGradient};
use plan::run_units;
use plan::Plan;
use walk::{run_pass, SummingWork, Walk};

// Entry points

/// Borrows a CPU tensor's elements. The tensor must be dense in the problem's layout.
fn elements<E: Element>(t: &Tensor) -> &[E] {
    // SAFETY: validation made `t` a dense CPU tensor of dtype E with numel elements starting
    // at data_ptr; it outlives the borrow.
    unsafe { std::slice::from_raw_parts(t.data_ptr() as *const E, t.numel()) }
}

fn elements_mut<E: Element>(t: &mut Tensor) -> &mut [E] {
    // SAFETY: as above; `t` was freshly allocated by us and is not aliased.
    unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut E, t.numel()) }
}

/// Calls `$body` with `$E` bound to the storage type of `$kind`.
macro_rules! dispatch_dtype {
    ($kind:expr, $E:ident => $body:expr) => {
        match $kind {
            Kind::Float => {
                type $E = f32;
                $body
            }
            Kind::Double => {
                type $E = f64;
                $body
            }
            Kind::Half => {
                type $E = f16;
                $body
            }
            Kind::BFloat16 => {
                type $E = bf16;
                $body
            }
            other => Err(VidError::invalid(
                "mean",
                format!("unsupported dtype {other:?}"),
            )),
        }
    };
}

/// The per-channel parameters, read straight from `log_scale`'s memory (no tch op: on small
/// inputs the fixed cost of a call is what matters).
fn channel_params(problem: &VidProblem) -> Result<ChannelParams> {
    let alpha: Vec<f64> = dispatch_dtype!(problem.log_scale.kind(), E => {
        Ok::<_, VidError>(widen::<E>(elements::<E>(&problem.log_scale)))
    })?;
    Ok(ChannelParams::new(&alpha, problem.options.eps_value()))
}

/// Values of any storage dtype as f64.
fn widen<E: Element>(values: &[E]) -> Vec<f64> {
    values.iter().map(|&v| E::to_f64(v)).collect()
}

/// Parameters of the per-element loss: `0.5 / var` and `0.5 ln var + constant`.
fn loss_params<A: Acc>(params: &ChannelParams, constant: f64) -> ChannelValues<A> {
    ChannelValues::new(
        params.var.iter().map(|v| 0.5 / v),
        params.ln_var.iter().map(|l| 0.5 * l + constant),
    )
}

/// SumSq uses no parameters.
fn unused_params<A: Acc>(channels: usize) -> ChannelValues<A> {
    ChannelValues::single(std::iter::repeat(0.0).take(channels))
}

/// A CPU scalar of `kind` holding `value` rounded as a cast does: a value beyond the dtype's
/// range becomes +-inf, as plain tch ops give (`scalar_tensor` refuses it instead).
fn scalar_of_kind(value: f64, kind: Kind) -> Result<Tensor> {
    Ok(match kind {
        Kind::Double => Tensor::from(value),
        Kind::Float => Tensor::from(value as f32),
        _ => Tensor::from(value as f32).f_to_kind(kind)?,
    })
}

/// A fresh per-element output shaped like `problem`'s inputs, when `needed`.
fn new_output(problem: &VidProblem, needed: bool) -> Result<Option<Tensor>> {
    needed
        .then(|| host_pool::empty_like(&problem.mean))
        .transpose()
}

/// Fused CPU forward; for Mean/Sum it also writes the per-element gradients `write` asks
/// for (for an upstream gradient of 1).
pub(crate) fn forward(problem: &VidProblem, write: NeedsGrad) -> Result<ForwardOutput> {
    if problem.options.reduction_mode() != Reduction::None {
        let mut outputs = forward_each(&[problem], &[1.0], &[write])?;
        return outputs
            .pop()
            .ok_or_else(|| VidError::Internal("no forward output".into()));
    }
    let params = channel_params(problem)?;
    let mut loss = host_pool::empty_like(&problem.mean)?;
    dispatch_dtype!(problem.kind(), E => {
        let inputs = [elements::<E>(&problem.mean), elements::<E>(&problem.target), &[][..]];
        let values = loss_params(&params, params.constant(&problem.options));
        let plan = Plan::new(problem.geometry);
        run_pass::<E, ElementLoss>(plan, values, inputs, Some(elements_mut(&mut loss)), None);
        Ok::<(), VidError>(())
    })?;
    Ok(ForwardOutput {
        loss,
        channel_sumsq: None,
        precomputed: None,
    })
}

/// Fused CPU forward of several Mean/Sum problems in one parallel region: for each, the loss
/// (a scalar of its dtype, exactly as [`forward`] gives it), its per-channel sums and the
/// per-element gradients `write[k]` asks for (for an upstream gradient of 1 on the total);
/// and the weighted total of the losses (in f64, then rounded to `total_kind`).
pub(crate) fn forward_group(
    problems: &[&VidProblem],
    weights: &[f64],
    total_kind: Kind,
    write: &[NeedsGrad],
) -> Result<GroupForward> {
    let outputs = forward_each(problems, weights, write)?;
    let mut total = 0.0;
    let mut channel_sumsq = Vec::with_capacity(outputs.len());
    let mut precomputed = Vec::with_capacity(outputs.len());
    for (output, w) in outputs.into_iter().zip(weights) {
        total += w * output.loss.f_double_value(&[])?;
        channel_sumsq.extend(output.channel_sumsq);
        precomputed.push(output.precomputed);
    }
    Ok(GroupForward {
        total: scalar_of_kind(total, total_kind)?,
        channel_sumsq,
        precomputed,
    })
}

/// The factor of `d / var` in the gradient of mean: the upstream gradient reaching the
/// problem's loss (`g * w`) times the reduction factor. The one-pass forward and the
/// backward compute it with this one expression, so their results agree to the bit.
fn gradient_factor(problem: &VidProblem, params: &ChannelParams, upstream: f64) -> f64 {
    upstream * params.reduction_factor(&problem.geometry, problem.options.reduction_mode())
}

/// The per-channel factors `k / var_c` of the gradient of mean.
fn gradient_scale<A: Acc>(params: &ChannelParams, k: f64) -> ChannelValues<A> {
    ChannelValues::single(params.var.iter().map(|v| k / v))
}

/// The Mean/Sum forward of each problem, all in one parallel region. Where `write[k]` asks
/// for them, the same pass also writes the gradients of mean and/or target for an upstream
/// gradient of `weights[k]` on the loss (1 on the total).
fn forward_each(
    problems: &[&VidProblem],
    weights: &[f64],
    write: &[NeedsGrad],
) -> Result<Vec<ForwardOutput>> {
    let params = problems
        .iter()
        .map(|p| channel_params(p))
        .collect::<Result<Vec<_>>>()?;
    let mut outputs = problems
        .iter()
        .zip(write)
        .map(|(p, w)| Ok([new_output(p, w.mean)?, new_output(p, w.target)?]))
        .collect::<Result<Vec<_>>>()?;
    let walks = problems
        .iter()
        .zip(&params)
        .zip(weights)
        .zip(outputs.iter_mut())
        .map(|(((p, par), &w), [grad_mean, grad_target])| {
            dispatch_dtype!(p.kind(), E => {
                let inputs = [elements::<E>(&p.mean), elements::<E>(&p.target), &[][..]];
                let plan = Plan::new(p.geometry);
                if grad_mean.is_none() && grad_target.is_none() {
                    let unused = unused_params(p.geometry.channels);
                    let walk = Walk::<E, SumSq>::new(plan, unused, inputs, None, None);
                    return Ok(Box::new(walk) as Box<dyn SummingWork + '_>);
                }
                let scale = gradient_scale(par, gradient_factor(p, par, w));
                let walk = Walk::<E, SumSqAndGradient>::new(
                    plan,
                    scale,
                    inputs,
                    grad_mean.as_mut().map(elements_mut::<E>),
                    grad_target.as_mut().map(elements_mut::<E>),
                );
                Ok(Box::new(walk) as Box<dyn SummingWork + '_>)
            })
        })
        .collect::<Result<Vec<_>>>()?;
    run_units(&walks.iter().map(|w| w.as_unit_work()).collect::<Vec<_>>());
    let sums: Vec<Vec<f64>> = walks.iter().map(|w| w.sums().swap_remove(0)).collect();
    drop(walks);
    problems
        .iter()
        .zip(params)
        .zip(sums)
        .zip(outputs)
        .map(|(((p, params), q), [mean, target])| {
            let reduction = p.options.reduction_mode();
            let value = params.reduced_loss(&q, &p.geometry, &p.options, reduction);
            Ok(ForwardOutput {
                loss: scalar_of_kind(value, p.kind())?,
                channel_sumsq: Some(Tensor::from_slice(&q)),
                precomputed: (mean.is_some() || target.is_some())
                    .then_some(Precomputed { mean, target }),
            })
        })
        .collect()
}

/// Fused CPU backward for Reduction::None: `grad` has the inputs' shape.
pub(crate) fn backward_unreduced(
    problem: &VidProblem,
    grad: &Tensor,
    needs: NeedsGrad,
) -> Result<Grads> {
    let params = channel_params(problem)?;
    let mut grads = Grads::default();
    let (mut grad_mean, mut grad_target) = (
        new_output(problem, needs.mean)?,
        new_output(problem, needs.target)?,
    );
    dispatch_dtype!(problem.kind(), E => {
        let upstream = problem.f_in_layout(&grad.f_to_kind(problem.kind())?)?;
        let inputs = [
            elements::<E>(&problem.mean),
            elements::<E>(&problem.target),
            elements::<E>(&upstream),
        ];
        let out = grad_mean.as_mut().map(elements_mut::<E>);
        let out_negated = grad_target.as_mut().map(elements_mut::<E>);
        let inv_var = ChannelValues::single(params.var.iter().map(|v| 1.0 / v));
        let plan = Plan::new(problem.geometry);
        let r = run_pass::<E, NoneBackward>(plan, inv_var, inputs, out, out_negated);
        if needs.log_scale {
            grads.log_scale = Some(Tensor::from_slice(&params.log_scale_grad_none(&r[0], &r[1])));
        }
        Ok::<(), VidError>(())
    })?;
    grads.mean = grad_mean;
    grads.target = grad_target;
    Ok(grads)
}

/// Fused CPU backward of several Mean/Sum problems in one parallel region: `upstream[k]` is
/// the gradient reaching problem k's loss, `channel_sumsq[k]` its saved sums. Where
/// `precomputed[k]` holds what the forward wrote and `unit_upstream` says the total received
/// exactly 1, those gradients are returned as they are (the one-pass path); every other
/// problem's are computed here.
pub(crate) fn backward_group(
    problems: &[&VidProblem],
    channel_sumsq: &[&Tensor],
    upstream: &[f64],
    needs: &[NeedsGrad],
    unit_upstream: bool,
    mut precomputed: Vec<Option<Precomputed>>,
) -> Result<Vec<Grads>> {
    let params = problems
        .iter()
        .map(|p| channel_params(p))
        .collect::<Result<Vec<_>>>()?;
    // k = upstream times the reduction factor, per problem.
    let factors: Vec<f64> = problems
        .iter()
        .zip(&params)
        .zip(upstream)
        .map(|((p, par), &g)| gradient_factor(p, par, g))
        .collect();
    precomputed.resize_with(problems.len(), || None);
    // Per problem: its outputs, and whether the forward already wrote them (exactly what the
    // pass below would write: the forward used the same factors for an upstream of 1).
    let mut outputs = Vec::with_capacity(problems.len());
    let mut written = Vec::with_capacity(problems.len());
    for ((p, n), pre) in problems.iter().zip(needs).zip(precomputed) {
        match pre.filter(|pre| unit_upstream && pre.covers(n)) {
            Some(pre) => {
                outputs.push([pre.mean.filter(|_| n.mean), pre.target.filter(|_| n.target)]);
                written.push(true);
            }
            None => {
                outputs.push([new_output(p, n.mean)?, new_output(p, n.target)?]);
                written.push(false);
            }
        }
    }
    {
        let mut walks: Vec<Box<dyn SummingWork + '_>> = Vec::new();
        for ((((p, par), k), [grad_mean, grad_target]), &done) in problems
            .iter()
            .zip(&params)
            .zip(&factors)
            .zip(outputs.iter_mut())
            .zip(&written)
        {
            if done || (grad_mean.is_none() && grad_target.is_none()) {
                continue;
            }
            walks.push(dispatch_dtype!(p.kind(), E => {
                let inputs = [elements::<E>(&p.mean), elements::<E>(&p.target), &[][..]];
                let scale = gradient_scale(par, *k);
                let walk = Walk::<E, ScaledDifference>::new(
                    Plan::new(p.geometry),
                    scale,
                    inputs,
                    grad_mean.as_mut().map(elements_mut::<E>),
                    grad_target.as_mut().map(elements_mut::<E>),
                );
                Ok(Box::new(walk) as Box<dyn SummingWork + '_>)
            })?);
        }
        run_units(&walks.iter().map(|w| w.as_unit_work()).collect::<Vec<_>>());
    }
    let mut grads = Vec::with_capacity(problems.len());
    for ((((p, par), k), q), ([grad_mean, grad_target], n)) in problems
        .iter()
        .zip(&params)
        .zip(&factors)
        .zip(channel_sumsq)
        .zip(outputs.into_iter().zip(needs))
    {
        let log_scale = if n.log_scale {
            let q = elements::<f64>(q);
            let m = p.geometry.per_channel() as f64;
            Some(Tensor::from_slice(&par.log_scale_grad(q, m, *k)))
        } else {
            None
        };
        grads.push(Grads {
            mean: grad_mean,
            target: grad_target,
            log_scale,
        });
    }
    Ok(grads)
}
