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

pub use crate::host_pool::{
    cache_limit, cached_bytes, empty_cache, set_cache_limit, CACHE_LIMIT_ENV, MAX_CACHED_BYTES,
};

use crate::backend_io::{ForwardOutput, Grads, GroupForward, NeedsGrad};
use crate::error::{Result, VidError};
use crate::host_pool;
use crate::math::ChannelParams;
use crate::options::Reduction;
use crate::validate::VidProblem;
use element::{Acc, Element};
use ops::{ChannelValues, ElementLoss, NoneBackward, ScaledDifference, SumSq};
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

/// Fused CPU forward.
pub(crate) fn forward(problem: &VidProblem) -> Result<ForwardOutput> {
    if problem.options.reduction_mode() != Reduction::None {
        let mut outputs = forward_each(&[problem])?;
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
    })
}

/// Fused CPU forward of several Mean/Sum problems in one parallel region: for each, the loss
/// (a scalar of its dtype, exactly as [`forward`] gives it) and its per-channel sums; and the
/// weighted total of the losses (in f64, then rounded to `total_kind`).
pub(crate) fn forward_group(
    problems: &[&VidProblem],
    weights: &[f64],
    total_kind: Kind,
) -> Result<GroupForward> {
    let outputs = forward_each(problems)?;
    let mut total = 0.0;
    let mut channel_sumsq = Vec::with_capacity(outputs.len());
    for (output, w) in outputs.into_iter().zip(weights) {
        total += w * output.loss.f_double_value(&[])?;
        channel_sumsq.extend(output.channel_sumsq);
    }
    Ok(GroupForward {
        total: scalar_of_kind(total, total_kind)?,
        channel_sumsq,
    })
}

/// The Mean/Sum forward of each problem, all in one parallel region.
fn forward_each(problems: &[&VidProblem]) -> Result<Vec<ForwardOutput>> {
    let walks = problems
        .iter()
        .map(|p| {
            dispatch_dtype!(p.kind(), E => {
                let inputs = [elements::<E>(&p.mean), elements::<E>(&p.target), &[][..]];
                let unused = unused_params(p.geometry.channels);
                let walk = Walk::<E, SumSq>::new(Plan::new(p.geometry), unused, inputs, None, None);
                Ok(Box::new(walk) as Box<dyn SummingWork + '_>)
            })
        })
        .collect::<Result<Vec<_>>>()?;
    run_units(&walks.iter().map(|w| w.as_unit_work()).collect::<Vec<_>>());
    problems
        .iter()
        .zip(&walks)
        .map(|(p, walk)| {
            let q = walk.sums().swap_remove(0);
            let params = channel_params(p)?;
            let reduction = p.options.reduction_mode();
            let value = params.reduced_loss(&q, &p.geometry, &p.options, reduction);
            Ok(ForwardOutput {
                loss: scalar_of_kind(value, p.kind())?,
                channel_sumsq: Some(Tensor::from_slice(&q)),
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
/// the gradient reaching problem k's loss, `channel_sumsq[k]` its saved sums.
pub(crate) fn backward_group(
    problems: &[&VidProblem],
    channel_sumsq: &[&Tensor],
    upstream: &[f64],
    needs: &[NeedsGrad],
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
        .map(|((p, par), g)| g * par.reduction_factor(&p.geometry, p.options.reduction_mode()))
        .collect();
    let mut outputs = problems
        .iter()
        .zip(needs)
        .map(|(p, n)| Ok([new_output(p, n.mean)?, new_output(p, n.target)?]))
        .collect::<Result<Vec<_>>>()?;
    {
        let mut walks: Vec<Box<dyn SummingWork + '_>> = Vec::new();
        for (((p, par), k), [grad_mean, grad_target]) in problems
            .iter()
            .zip(&params)
            .zip(&factors)
            .zip(outputs.iter_mut())
        {
            if grad_mean.is_none() && grad_target.is_none() {
                continue;
            }
            walks.push(dispatch_dtype!(p.kind(), E => {
                let inputs = [elements::<E>(&p.mean), elements::<E>(&p.target), &[][..]];
                let scale = ChannelValues::single(par.var.iter().map(|v| k / v));
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
