//! Grouped launches: the segment tables of up to MAX_SEGMENTS problems per launch, their
//! grids, and the one workspace allocation a call's partial sums and tables share.

use std::ffi::c_void;

use tch::{Kind, Tensor};

use super::abi::*;
use super::ptr;
use super::traversal::{traversal_grid, Traversal, BLOCK, MAX_GRID_Y};
use crate::cuda::launcher::{KernelLauncher, LaunchConfig};
use crate::error::{Result, VidError};

pub(super) fn launch_with<L: KernelLauncher + ?Sized, A>(
    launcher: &L,
    kernel: &str,
    config: LaunchConfig,
    args: &mut A,
) -> Result<()> {
    let mut params = [args as *mut A as *mut c_void];
    launcher.launch(kernel, config, &mut params)
}

/// A traversal of one problem inside a grouped launch.
pub(super) struct TraverseItem<'p> {
    pub(super) dtype: &'static str,
    pub(super) traversal: Traversal,
    pub(super) args: TraverseArgs,
    pub(super) _problem: std::marker::PhantomData<&'p ()>,
}

/// A 1-D launch of `blocks` blocks (at least one) of BLOCK threads.
pub(super) fn launch_config(blocks: usize) -> Result<LaunchConfig> {
    let grid = u32::try_from(blocks)
        .ok()
        .filter(|&b| b <= i32::MAX as u32)
        .ok_or_else(|| VidError::invalid("mean", "too many blocks for one launch"))?;
    Ok(LaunchConfig {
        grid: [grid.max(1), 1, 1],
        block: [BLOCK, 1, 1],
        shared_mem_bytes: 0,
    })
}

/// The arguments and grid of one traversal launch over up to MAX_SEGMENTS items.
pub(super) fn group_launch(
    items: &[&TraverseItem<'_>],
    done: u64,
    multiprocessors: Option<u32>,
) -> Result<(TraverseGroupArgs, LaunchConfig)> {
    let args = TraverseGroupArgs::new(items, done);
    let grid = traversal_grid(args.blocks as usize, multiprocessors);
    Ok((args, launch_config(grid)?))
}

/// Launches op `op` over every item: one launch per dtype (and per MAX_SEGMENTS items).
/// Block 0 of the first launch zeroes `done` (for a following last-block epilogue).
pub(super) fn traverse_group<L: KernelLauncher + ?Sized>(
    launcher: &L,
    op: &str,
    items: &[TraverseItem<'_>],
    done: u64,
) -> Result<()> {
    let multiprocessors = launcher.multiprocessor_count()?;
    let mut dtypes: Vec<&str> = items.iter().map(|i| i.dtype).collect();
    dtypes.dedup();
    dtypes.sort_unstable();
    dtypes.dedup();
    for dtype in dtypes {
        let same: Vec<&TraverseItem<'_>> = items.iter().filter(|i| i.dtype == dtype).collect();
        for chunk in same.chunks(MAX_SEGMENTS) {
            let (mut args, config) = group_launch(chunk, done, multiprocessors)?;
            let kernel = format!("vid_{op}_group_{dtype}");
            launch_with(launcher, &kernel, config, &mut args)?;
        }
    }
    Ok(())
}

/// Per-channel sums of the partials of every segment, in one launch per MAX_SEGMENTS; with
/// `epilogue`, the last block also writes each segment's loss and the weighted total. A
/// segment whose chunks the combine splits into runs (`groups` > 1) first has its runs summed
/// in parallel into `run_sums[i]` by a launch of its own, whose sums the second launch adds.
pub(super) fn channel_sum_group<L: KernelLauncher + ?Sized>(
    launcher: &L,
    segments: &[SumSegment],
    run_sums: &[u64],
    epilogue: Option<(u64, u64, i64)>,
) -> Result<()> {
    debug_assert_eq!(
        segments.len(),
        run_sums.len(),
        "a run-sum piece per segment"
    );
    let runs: Vec<SumSegment> = segments
        .iter()
        .zip(run_sums)
        .filter(|(s, _)| s.groups > 1)
        .map(|(s, &out)| SumSegment {
            out,
            terms: 0,
            ..*s
        })
        .collect();
    for chunk in runs.chunks(MAX_SEGMENTS) {
        channel_sum_launch(launcher, chunk, None, false)?;
    }
    let last: Vec<SumSegment> = segments
        .iter()
        .zip(run_sums)
        .map(|(s, &partial)| {
            if s.groups > 1 {
                SumSegment {
                    partial,
                    outer: s.groups,
                    inner: 1,
                    groups: 1,
                    group_chunks: 0,
                    ..*s
                }
            } else {
                *s
            }
        })
        .collect();
    // A total over several launches is summed by the caller.
    let one_launch = segments.len() <= MAX_SEGMENTS;
    for chunk in last.chunks(MAX_SEGMENTS) {
        channel_sum_launch(launcher, chunk, epilogue, one_launch)?;
    }
    Ok(())
}

/// One launch of `vid_channel_sum_group` over up to MAX_SEGMENTS segments.
fn channel_sum_launch<L: KernelLauncher + ?Sized>(
    launcher: &L,
    segments: &[SumSegment],
    epilogue: Option<(u64, u64, i64)>,
    writes_total: bool,
) -> Result<()> {
    let (done, total, total_code) = epilogue.unwrap_or((0, 0, 0));
    let mut args = ChannelSumGroupArgs {
        count: segments.len() as i64,
        epilogue: epilogue.is_some() as i64,
        done,
        total: if writes_total { total } else { 0 },
        total_code,
        seg: [SumSegment::default(); MAX_SEGMENTS],
    };
    let mut blocks = 0usize;
    for (segment, item) in args.seg.iter_mut().zip(segments) {
        *segment = SumSegment {
            block_begin: blocks as i64,
            ..*item
        };
        // kernels/vid.cu: 32 channels per block when each chunk has one partial per
        // channel (inner == 1), else a block per channel; that many per run of chunks.
        let units = if item.inner == 1 {
            (item.channels as usize).div_ceil(32)
        } else {
            item.channels as usize
        };
        blocks += units.clamp(1, MAX_GRID_Y) * item.groups.max(1) as usize;
    }
    launch_with(
        launcher,
        "vid_channel_sum_group",
        launch_config(blocks)?,
        &mut args,
    )
}

/// The channel tables of every segment, one launch per MAX_SEGMENTS.
pub(super) fn channel_table_group<L: KernelLauncher + ?Sized>(
    launcher: &L,
    segments: &[TableSegment],
) -> Result<()> {
    per_channel_group(launcher, "vid_channel_table_group", segments)
}

/// d loss / d log_scale of every segment, one launch per MAX_SEGMENTS.
pub(super) fn log_scale_grad_group<L: KernelLauncher + ?Sized>(
    launcher: &L,
    segments: &[LogScaleSegment],
) -> Result<()> {
    per_channel_group(launcher, "vid_log_scale_grad_group", segments)
}

/// An O(C) kernel over every segment, one launch per MAX_SEGMENTS; each segment gets
/// ceil(C / BLOCK) blocks (at least one), back to back.
pub(super) fn per_channel_group<L: KernelLauncher + ?Sized, S: PerChannelSegment>(
    launcher: &L,
    kernel: &str,
    segments: &[S],
) -> Result<()> {
    for chunk in segments.chunks(MAX_SEGMENTS) {
        let mut args = PerChannelGroupArgs {
            count: chunk.len() as i64,
            seg: [S::default(); MAX_SEGMENTS],
        };
        let mut blocks = 0usize;
        for (segment, item) in args.seg.iter_mut().zip(chunk) {
            *segment = item.at_block(blocks as i64);
            blocks += (item.channels() as usize)
                .div_ceil(BLOCK as usize)
                .clamp(1, MAX_GRID_Y);
        }
        launch_with(launcher, kernel, launch_config(blocks)?, &mut args)?;
    }
    Ok(())
}

/// One device allocation carved into 16-byte aligned pieces (partials of several
/// problems, and the epilogue's block counter): one allocation per call instead of one per
/// piece.
pub(super) struct Workspace {
    /// Kept until every launch using it is queued; PyTorch's stream-ordered caching
    /// allocator then reuses the memory only for work queued after them.
    _buffer: Tensor,
}

impl Workspace {
    /// Room for `bytes[i]` bytes at `offsets[i]`, and 16 bytes for the counter at the end.
    pub(super) fn new(device: tch::Device, bytes: &[usize]) -> Result<(Workspace, Vec<u64>, u64)> {
        let mut offsets = Vec::with_capacity(bytes.len());
        let mut end = 0usize;
        for &b in bytes {
            offsets.push(end);
            end += b.div_ceil(16) * 16;
        }
        let buffer = Tensor::f_empty([(end + 16) as i64], (Kind::Uint8, device))?;
        let base = ptr(&buffer);
        let pointers = offsets.iter().map(|&o| base + o as u64).collect();
        Ok((Workspace { _buffer: buffer }, pointers, base + end as u64))
    }
}
