//! The launch plan of the VID kernels: which kernels, with which grids, arguments and
//! workspaces, for a checked problem. Generic over [`KernelLauncher`]: the same code drives
//! the GPU and the host emulation of the tests. Every output and workspace is a tch tensor
//! on the problem's device, so PyTorch's caching allocator owns it; nothing here waits for
//! the device.
//!
//! This file plans each pass (forward, backward, grouped or not); below it, one direction:
//! * `traversal`: how one problem is walked (chunks, partial-sum slots) and the grid size;
//! * `launch`: grouped launches of up to MAX_SEGMENTS problems, and the workspace;
//! * `abi`: the kernels' argument structs as the device sees them, and the kernels' names;
//! * `traffic` (tests): the bytes each pass moves, against the floor.

mod abi;
mod launch;
#[cfg(test)]
pub(crate) mod traffic;
mod traversal;

use tch::{Kind, Tensor};

use super::launcher::KernelLauncher;
use crate::backend_io::{ForwardOutput, Grads, GroupForward, NeedsGrad, Precomputed};
use crate::error::Result;
use crate::math::HALF_LN_TWO_PI;
use crate::options::Reduction;
use crate::validate::{Geometry, VidProblem};
pub use abi::kernel_names;
pub(crate) use abi::MAX_SEGMENTS;
use abi::*;
use launch::*;
pub(crate) use traversal::{traversal_grid, Traversal, BLOCK, BLOCKS_PER_SM, MAX_GRID_Y};

fn ptr(t: &Tensor) -> u64 {
    t.data_ptr() as u64
}

fn optional_ptr(t: Option<&Tensor>) -> u64 {
    t.map_or(0, ptr)
}

/// Elements from the 16-byte boundary at or below `t`'s base to the base, if a whole number.
fn phase(t: &Tensor, elt: usize) -> Option<usize> {
    let offset = (ptr(t) % 16) as usize;
    (offset % elt == 0).then_some(offset / elt)
}

/// The accumulation dtype: f64 for f64 inputs, f32 otherwise.
pub(crate) fn acc_kind(kind: Kind) -> Kind {
    if kind == Kind::Double {
        Kind::Double
    } else {
        Kind::Float
    }
}

/// One problem ready for the kernels: its dtype's kernel suffix, accumulation dtype, and
/// `log_scale` in that dtype.
struct Prepared<'a> {
    problem: &'a VidProblem,
    dtype: &'static str,
    acc: Kind,
    log_scale: Tensor,
}

impl<'a> Prepared<'a> {
    /// A traversal of this problem with `args`, ready for a grouped launch.
    fn item(&self, traversal: Traversal, args: TraverseArgs) -> TraverseItem<'a> {
        TraverseItem {
            dtype: self.dtype,
            traversal,
            args,
            _problem: Default::default(),
        }
    }

    fn new(problem: &'a VidProblem) -> Result<Self> {
        let acc = acc_kind(problem.kind());
        Ok(Prepared {
            problem,
            dtype: dtype_suffix(problem.kind())?,
            acc,
            // Validation made log_scale contiguous; convert only when the dtype differs.
            log_scale: if problem.log_scale.kind() == acc {
                problem.log_scale.shallow_clone()
            } else {
                problem.log_scale.f_to_kind(acc)?
            },
        })
    }

    fn geometry(&self) -> &Geometry {
        &self.problem.geometry
    }

    fn empty(&self, size: &[i64], kind: Kind) -> Result<Tensor> {
        Ok(Tensor::f_empty(size, (kind, self.problem.device()))?)
    }

    /// An uninitialised tensor with `mean`'s shape and strides whose base lies as far past a
    /// 16-byte boundary as `mean`'s, so that a misaligned view is still walked in packs.
    fn empty_like_input(&self, needed: bool) -> Result<Option<Tensor>> {
        if !needed {
            return Ok(None);
        }
        let mean = &self.problem.mean;
        let elt = mean.kind().elt_size_in_bytes();
        match phase(mean, elt) {
            Some(offset) if offset > 0 => {
                let buffer = Tensor::f_empty(
                    [(self.geometry().numel() + offset) as i64],
                    (mean.kind(), mean.device()),
                )?;
                let out = Tensor::f_empty([0], (mean.kind(), mean.device()))?
                    .f_set_source_tensor_storage_offset_(
                        &buffer,
                        offset as i64,
                        mean.size(),
                        mean.stride(),
                    )?;
                Ok(Some(out))
            }
            _ => Ok(Some(mean.f_empty_like()?)),
        }
    }

    /// Plans a traversal over mean/target and the given per-element tensors.
    fn traversal(&self, per_element: &[Option<&Tensor>]) -> Result<Traversal> {
        let p = self.problem;
        let elt = p.kind().elt_size_in_bytes();
        let mut phases = [Some(&p.mean), Some(&p.target)]
            .into_iter()
            .chain(per_element.iter().copied())
            .flatten()
            .map(|t| phase(t, elt));
        let first = phases.next().flatten();
        let phase = first.filter(|_| phases.all(|q| q == first));
        Traversal::plan(self.geometry(), 16 / elt, phase)
    }

    /// The arguments of a traversal of this problem (inputs filled in).
    fn traverse_args(&self, traversal: &Traversal) -> TraverseArgs {
        let mut args = traversal.args(self.geometry());
        args.mean = ptr(&self.problem.mean);
        args.target = ptr(&self.problem.target);
        args
    }

    /// The segment that fills this problem's channel table (Acc [2C] at `table`) with the
    /// factors of `kind` (for TABLE_GRADIENT_FACTORS, `w k / var` with `wk`).
    fn table_segment(&self, table: u64, kind: i64, wk: f64) -> TableSegment {
        TableSegment {
            log_scale: ptr(&self.log_scale),
            table,
            acc_f64: self.acc_f64(),
            channels: self.geometry().channels as i64,
            kind,
            block_begin: 0,
            eps: self.problem.options.eps_value(),
            constant: if kind == TABLE_GRADIENT_FACTORS {
                wk
            } else {
                self.constant()
            },
        }
    }

    /// Launches the O(C) kernel that fills this problem's channel table.
    fn channel_table<L: KernelLauncher + ?Sized>(
        &self,
        launcher: &L,
        table: u64,
        kind: i64,
    ) -> Result<()> {
        channel_table_group(launcher, &[self.table_segment(table, kind, 0.0)])
    }

    /// The combine's segment for the partials of `traversal` (`sums` per slot) at `partial`,
    /// summed per channel into `out`.
    fn sum_segment(&self, traversal: &Traversal, partial: u64, out: u64, sums: i64) -> SumSegment {
        let (groups, group_chunks) = traversal.combine_runs();
        SumSegment {
            partial,
            out,
            acc_f64: self.acc_f64(),
            channels: self.geometry().channels as i64,
            outer: traversal.outer as i64,
            inner: traversal.inner as i64,
            sums,
            groups: groups as i64,
            group_chunks: group_chunks as i64,
            ..SumSegment::default()
        }
    }

    /// Bytes of the split combine's run sums for `sums` sums per channel (0 in one launch).
    fn run_sum_bytes(&self, traversal: &Traversal, sums: usize) -> usize {
        traversal.run_slots(self.geometry().channels) * sums * self.acc.elt_size_in_bytes()
    }

    /// Bytes of a channel table.
    fn table_bytes(&self) -> usize {
        2 * self.geometry().channels * self.acc.elt_size_in_bytes()
    }

    /// 1/n for Mean, 1 for Sum.
    fn reduction_factor(&self) -> f64 {
        match self.problem.options.reduction_mode() {
            Reduction::Mean => 1.0 / self.geometry().numel() as f64,
            Reduction::Sum | Reduction::None => 1.0,
        }
    }

    fn constant(&self) -> f64 {
        if self.problem.options.is_full() {
            HALF_LN_TWO_PI
        } else {
            0.0
        }
    }

    fn acc_f64(&self) -> i64 {
        (self.acc == Kind::Double) as i64
    }
}

/// Forward of one problem: the loss, plus the per-channel sums backward needs (Mean/Sum)
/// and the per-element gradients `write` asks for (for an upstream gradient of 1).
pub(crate) fn forward<L: KernelLauncher + ?Sized>(
    launcher: &L,
    problem: &VidProblem,
    write: NeedsGrad,
) -> Result<ForwardOutput> {
    if problem.options.reduction_mode() != Reduction::None {
        let p = Prepared::new(problem)?;
        let loss = p.empty(&[], problem.kind())?;
        let (sums, mut precomputed) =
            sums_and_losses(launcher, &[p], &[ptr(&loss)], &[1.0], None, &[write])?;
        return Ok(ForwardOutput {
            loss,
            channel_sumsq: sums.into_iter().next(),
            precomputed: precomputed.pop().flatten(),
        });
    }
    let p = Prepared::new(problem)?;
    let loss = p.empty_like_input(true)?.expect("needed");
    let (_workspace, tables, _) = Workspace::new(problem.device(), &[p.table_bytes()])?;
    p.channel_table(launcher, tables[0], TABLE_LOSS_FACTORS)?;
    let traversal = p.traversal(&[Some(&loss)])?;
    let mut args = p.traverse_args(&traversal);
    args.out = ptr(&loss);
    args.table = tables[0];
    let item = p.item(traversal, args);
    traverse_group(launcher, "loss", &[item], 0)?;
    Ok(ForwardOutput {
        loss,
        channel_sumsq: None,
        precomputed: None,
    })
}

/// The sum-of-squares pass of every problem (one launch per dtype), then one launch that
/// sums the partials per channel and, in its last block, writes each problem's loss (to
/// `losses[k]` when not 0) and the weighted total (to `total`). Where `write[k]` asks for
/// them, problem k's pass also writes the gradients of mean and/or target for an upstream
/// gradient of `weights[k]` on its loss (1 on the total): the one-pass path. Returns each
/// problem's per-channel sums `Q_c` and the gradients written.
fn sums_and_losses<L: KernelLauncher + ?Sized>(
    launcher: &L,
    prepared: &[Prepared<'_>],
    losses: &[u64],
    weights: &[f64],
    total: Option<(u64, Kind)>,
    write: &[NeedsGrad],
) -> Result<(Vec<Tensor>, Vec<Option<Precomputed>>)> {
    let outputs = prepared
        .iter()
        .zip(write)
        .map(|(p, w)| Ok([p.empty_like_input(w.mean)?, p.empty_like_input(w.target)?]))
        .collect::<Result<Vec<_>>>()?;
    let traversals = prepared
        .iter()
        .zip(&outputs)
        .map(|(p, [m, t])| p.traversal(&[m.as_ref(), t.as_ref()]))
        .collect::<Result<Vec<_>>>()?;
    let writes: Vec<bool> = outputs
        .iter()
        .map(|[m, t]| m.is_some() || t.is_some())
        .collect();
    // Partials of every problem, a gradient-factor table for each one that writes, the split
    // combine's run sums, and the loss terms per channel.
    let mut piece_bytes: Vec<usize> = prepared
        .iter()
        .zip(&traversals)
        .map(|(p, t)| t.slots(p.geometry().channels) * p.acc.elt_size_in_bytes())
        .collect();
    piece_bytes.extend(
        prepared
            .iter()
            .zip(&writes)
            .map(|(p, &w)| if w { p.table_bytes() } else { 0 }),
    );
    piece_bytes.extend(
        prepared
            .iter()
            .zip(&traversals)
            .map(|(p, t)| p.run_sum_bytes(t, 1)),
    );
    piece_bytes.extend(prepared.iter().map(|p| p.geometry().channels * 8));
    let (_workspace, pieces, done) = Workspace::new(prepared[0].problem.device(), &piece_bytes)?;
    let (partials, rest) = pieces.split_at(prepared.len());
    let (tables, rest) = rest.split_at(prepared.len());
    let (run_sums, terms) = rest.split_at(prepared.len());
    let mut plain = Vec::new();
    let mut writing = Vec::new();
    let mut table_segments = Vec::new();
    for (((((p, t), &partial), &table), [m, tg]), (&w, &weight)) in prepared
        .iter()
        .zip(&traversals)
        .zip(partials)
        .zip(tables)
        .zip(&outputs)
        .zip(writes.iter().zip(weights))
    {
        let mut args = TraverseArgs {
            partial,
            ..p.traverse_args(t)
        };
        if w {
            // The factor the backward's table holds for an upstream of 1: w k / var.
            let wk = weight * p.reduction_factor();
            table_segments.push(p.table_segment(table, TABLE_GRADIENT_FACTORS, wk));
            args.table = table;
            args.out = optional_ptr(m.as_ref());
            args.out_negated = optional_ptr(tg.as_ref());
            writing.push(p.item(*t, args));
        } else {
            plain.push(p.item(*t, args));
        }
    }
    channel_table_group(launcher, &table_segments)?;
    if !plain.is_empty() {
        traverse_group(launcher, "sumsq", &plain, done)?;
    }
    if !writing.is_empty() {
        traverse_group(launcher, "sumsq_grad", &writing, done)?;
    }
    let precomputed = outputs
        .into_iter()
        .map(|[mean, target]| {
            (mean.is_some() || target.is_some()).then_some(Precomputed { mean, target })
        })
        .collect();

    let sums = prepared
        .iter()
        .map(|p| p.empty(&[p.geometry().channels as i64], p.acc))
        .collect::<Result<Vec<_>>>()?;
    let segments: Vec<SumSegment> = prepared
        .iter()
        .zip(&traversals)
        .zip(partials.iter().zip(&sums))
        .zip(terms.iter().zip(losses.iter().zip(weights)))
        .map(|(((p, t), (&partial, q)), (&terms, (&loss, &weight)))| {
            let g = p.geometry();
            SumSegment {
                log_scale: ptr(&p.log_scale),
                terms,
                loss,
                loss_code: scalar_code(p.problem.kind()),
                eps: p.problem.options.eps_value(),
                per_channel: g.per_channel() as f64,
                constant_total: g.numel() as f64 * p.constant(),
                scale: p.reduction_factor(),
                weight,
                ..p.sum_segment(t, partial, ptr(q), 1)
            }
        })
        .collect();
    let (total_ptr, total_code) = total.map_or((0, 0), |(t, kind)| (t, scalar_code(kind)));
    let epilogue = Some((done, total_ptr, total_code));
    channel_sum_group(launcher, &segments, run_sums, epilogue)?;
    Ok((sums, precomputed))
}

/// Forward of several Mean/Sum problems and their weighted total: one launch per dtype for
/// the passes, one for the sums, the losses and the total (up to 16 problems).
pub(crate) fn forward_group<L: KernelLauncher + ?Sized>(
    launcher: &L,
    problems: &[&VidProblem],
    weights: &[f64],
    total_kind: Kind,
    write: &[NeedsGrad],
) -> Result<GroupForward> {
    let prepared = problems
        .iter()
        .map(|p| Prepared::new(p))
        .collect::<Result<Vec<_>>>()?;
    let device = problems[0].device();
    let total = Tensor::f_empty([], (total_kind, device))?;
    if problems.len() <= MAX_SEGMENTS {
        let losses = vec![0u64; problems.len()];
        let (channel_sumsq, precomputed) = sums_and_losses(
            launcher,
            &prepared,
            &losses,
            weights,
            Some((ptr(&total), total_kind)),
            write,
        )?;
        return Ok(GroupForward {
            total,
            channel_sumsq,
            precomputed,
        });
    }
    // More terms than one launch holds: each term's loss, then the total with tch ops.
    let losses = prepared
        .iter()
        .map(|p| p.empty(&[], p.problem.kind()))
        .collect::<Result<Vec<_>>>()?;
    let loss_ptrs: Vec<u64> = losses.iter().map(ptr).collect();
    let (channel_sumsq, precomputed) =
        sums_and_losses(launcher, &prepared, &loss_ptrs, weights, None, write)?;
    let weighted = losses
        .iter()
        .zip(weights)
        .map(|(l, w)| Ok(l.f_to_kind(Kind::Double)?.f_mul_scalar(*w)?))
        .collect::<Result<Vec<_>>>()?;
    let total = Tensor::f_stack(&weighted, 0)?
        .f_sum(Kind::Double)?
        .f_to_kind(total_kind)?;
    Ok(GroupForward {
        total,
        channel_sumsq,
        precomputed,
    })
}

/// Backward of one problem for Reduction::None: `grad` is the upstream gradient, a tensor
/// of the inputs' shape.
pub(crate) fn backward_unreduced<L: KernelLauncher + ?Sized>(
    launcher: &L,
    problem: &VidProblem,
    grad: &Tensor,
    needs: NeedsGrad,
) -> Result<Grads> {
    let p = Prepared::new(problem)?;
    let grad_mean = p.empty_like_input(needs.mean)?;
    let grad_target = p.empty_like_input(needs.target)?;
    // The upstream gradient in the inputs' dtype and at their offset from a 16-byte boundary:
    // a copy when either differs (one pass, cheaper than walking every tensor element by
    // element).
    let kind = problem.kind();
    let upstream = if grad.kind() == kind && ptr(grad) % 16 == ptr(&problem.mean) % 16 {
        grad.shallow_clone()
    } else {
        let mut copy = p.empty_like_input(true)?.expect("needed");
        copy.f_copy_(grad)?;
        copy
    };
    let traversal = p.traversal(&[Some(&upstream), grad_mean.as_ref(), grad_target.as_ref()])?;
    let channels = p.geometry().channels;
    let (_workspace, pieces, _) = Workspace::new(
        problem.device(),
        &[
            traversal.slots(channels) * 2 * p.acc.elt_size_in_bytes(),
            p.table_bytes(),
            p.run_sum_bytes(&traversal, 2),
        ],
    )?;
    let (partials, table, run_sums) = (&pieces[..1], pieces[1], &pieces[2..]);
    p.channel_table(launcher, table, TABLE_INVERSE_VARIANCE)?;
    let mut args = p.traverse_args(&traversal);
    args.table = table;
    args.upstream = ptr(&upstream);
    args.out = optional_ptr(grad_mean.as_ref());
    args.out_negated = optional_ptr(grad_target.as_ref());
    args.partial = partials[0];
    let item = p.item(traversal, args);
    traverse_group(launcher, "grad_none", &[item], 0)?;
    let mut grads = Grads::default();
    if needs.log_scale {
        let sums = p.empty(&[(channels * 2) as i64], p.acc)?;
        let segment = p.sum_segment(&traversal, partials[0], ptr(&sums), 2);
        channel_sum_group(launcher, &[segment], run_sums, None)?;
        let out = p.empty(&[channels as i64], p.acc)?;
        let segment = LogScaleSegment {
            sums: ptr(&sums),
            log_scale: ptr(&p.log_scale),
            out: ptr(&out),
            table: 0,
            acc_f64: p.acc_f64(),
            channels: channels as i64,
            sums_per_channel: 2,
            eps: problem.options.eps_value(),
            per_channel: p.geometry().per_channel() as f64,
            scale: 1.0,
            ..LogScaleSegment::default()
        };
        log_scale_grad_group(launcher, &[segment])?;
        grads.log_scale = Some(out);
    }
    grads.mean = grad_mean;
    grads.target = grad_target;
    Ok(grads)
}

/// Backward of several Mean/Sum problems; problem k's loss receives `grad * weights[k]`:
/// one launch per dtype for the gradients of mean/target, one for every log_scale. Where
/// `precomputed[k]` holds what the forward wrote (for an upstream gradient of 1), those
/// tensors are the outputs, and the grad kernel skips their segment when `grad` is 1 on the
/// device (else recomputes them in place): no host synchronisation either way.
pub(crate) fn backward_group<L: KernelLauncher + ?Sized>(
    launcher: &L,
    problems: &[&VidProblem],
    channel_sumsq: &[&Tensor],
    grad: &Tensor,
    weights: &[f64],
    needs: &[NeedsGrad],
    mut precomputed: Vec<Option<Precomputed>>,
) -> Result<Vec<Grads>> {
    let prepared = problems
        .iter()
        .map(|p| Prepared::new(p))
        .collect::<Result<Vec<_>>>()?;
    // The upstream gradient in each accumulation dtype used (converted once per dtype).
    let mut upstream: Vec<(Kind, Tensor)> = Vec::new();
    for p in &prepared {
        if !upstream.iter().any(|(k, _)| *k == p.acc) {
            // A scalar: contiguous; converted only when its dtype differs.
            let converted = if grad.kind() == p.acc {
                grad.shallow_clone()
            } else {
                grad.f_to_kind(p.acc)?
            };
            upstream.push((p.acc, converted));
        }
    }
    let upstream_of = |acc: Kind| -> u64 {
        upstream
            .iter()
            .find(|(k, _)| *k == acc)
            .map_or(0, |(_, t)| ptr(t))
    };
    // One workspace for the tables of the problems whose mean/target need gradients.
    let table_bytes: Vec<usize> = prepared.iter().map(|p| p.table_bytes()).collect();
    let (_workspace, tables, _) = Workspace::new(problems[0].device(), &table_bytes)?;
    let mut grads = Vec::with_capacity(problems.len());
    let mut items = Vec::new();
    let mut scale_segments = Vec::new();
    precomputed.resize_with(problems.len(), || None);
    for ((((p, n), (w, q)), &table), pre) in prepared
        .iter()
        .zip(needs)
        .zip(weights.iter().zip(channel_sumsq))
        .zip(&tables)
        .zip(precomputed)
    {
        let wk = w * p.reduction_factor();
        let pre = pre.filter(|pre| pre.covers(n));
        let from_forward = pre.is_some();
        let (grad_mean, grad_target) = match pre {
            Some(pre) => (pre.mean.filter(|_| n.mean), pre.target.filter(|_| n.target)),
            None => (p.empty_like_input(n.mean)?, p.empty_like_input(n.target)?),
        };
        let wants_elementwise = n.mean || n.target;
        if wants_elementwise {
            let traversal = p.traversal(&[grad_mean.as_ref(), grad_target.as_ref()])?;
            let mut args = p.traverse_args(&traversal);
            args.table = table;
            args.out = optional_ptr(grad_mean.as_ref());
            args.out_negated = optional_ptr(grad_target.as_ref());
            if from_forward {
                // Skipped on the device when the upstream gradient is 1.
                args.upstream_scalar = upstream_of(p.acc);
            }
            items.push(p.item(traversal, args));
        }
        let log_scale = if n.log_scale {
            Some(p.empty(&[p.geometry().channels as i64], p.acc)?)
        } else {
            None
        };
        if n.log_scale || wants_elementwise {
            // One O(C) kernel for both: the log_scale gradient and the grad op's table.
            scale_segments.push(LogScaleSegment {
                sums: ptr(q),
                log_scale: ptr(&p.log_scale),
                upstream_scalar: upstream_of(p.acc),
                out: optional_ptr(log_scale.as_ref()),
                table: if wants_elementwise { table } else { 0 },
                acc_f64: p.acc_f64(),
                channels: p.geometry().channels as i64,
                sums_per_channel: 1,
                block_begin: 0,
                eps: p.problem.options.eps_value(),
                per_channel: p.geometry().per_channel() as f64,
                scale: wk,
            });
        }
        grads.push(Grads {
            mean: grad_mean,
            target: grad_target,
            log_scale,
        });
    }
    if !scale_segments.is_empty() {
        log_scale_grad_group(launcher, &scale_segments)?;
    }
    if !items.is_empty() {
        traverse_group(launcher, "grad", &items, 0)?;
    }
    Ok(grads)
}
