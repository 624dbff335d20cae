//! The launch plan of the VID kernels: which kernels, with which grids, arguments and
//! workspaces, for a checked problem. Generic over [`KernelLauncher`]: the same code drives
//! the GPU and the host emulation of the tests. Every output and workspace is a tch tensor
//! on the problem's device, so PyTorch's caching allocator owns it; nothing here waits for
//! the device.

use std::ffi::c_void;

use tch::{Kind, Tensor};

use super::launcher::{KernelLauncher, LaunchConfig};
use crate::backend_io::{ForwardOutput, Grads, GroupForward, NeedsGrad, Precomputed};
use crate::error::{Result, VidError};
use crate::math::HALF_LN_TWO_PI;
use crate::options::Reduction;
use crate::validate::{Geometry, Layout, VidProblem};

/// Threads per block of every kernel (kernels/vid.cu: kBlock and __launch_bounds__).
pub(crate) const BLOCK: u32 = 256;
/// Warps per block in the warp traversal.
const WARPS_PER_BLOCK: u64 = BLOCK as u64 / 32;
/// NCHW rows at least this long use the warp traversal; shorter ones the tile traversal.
const WARP_MIN_ROW: usize = 512;
/// Elements per warp segment (a multiple of every pack width).
const WARP_SEGMENT: usize = 4096;
/// Elements a tile chunk (a virtual block) aims to cover: 8M elements make 1024 chunks, two
/// waves of two blocks per SM on a 170-SM GPU.
const TILE_BLOCK_ELEMENTS: usize = 8 * 1024;
/// Rows of a tile chunk for 4-byte elements: each partial sum covers at least this many rows
/// of its column, so an f32 partial is written and read once per 64 elements of each input
/// (1.6% of the op's bytes).
const CHUNK_ROWS_F32: usize = 64;
/// Resident blocks per SM of the traversal kernels (kernels/vid.cu: __launch_bounds__(256, 2)).
pub(crate) const BLOCKS_PER_SM: usize = 2;
/// Waves of resident blocks a traversal grid covers at most (and at least 2 when it loops).
const MAX_WAVES: usize = 4;
/// The largest grid.y.
pub(crate) const MAX_GRID_Y: usize = 65_535;

/// Arguments of the traversal kernels; mirrors `vf::TraverseArgs` (all fields 8 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct TraverseArgs {
    mean: u64,
    target: u64,
    upstream: u64,
    upstream_scalar: u64,
    /// The op's channel table (Acc [2C]).
    table: u64,
    out: u64,
    out_negated: u64,
    partial: u64,
    rows: i64,
    row_len: i64,
    seg_len: i64,
    channels: i64,
    channel_div: i64,
    tile_x: i64,
    vectorized: i64,
    phase: i64,
    elements: i64,
    cols: i64,
}

/// Segments per grouped launch (kernels/vid.cu: kMaxSegments); larger groups take several.
pub(crate) const MAX_SEGMENTS: usize = 16;

/// Mirrors `vf::TraverseSegment`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct TraverseSegment {
    args: TraverseArgs,
    tile: i64,
    block_begin: i64,
    grid_x: i64,
}

/// Mirrors `vf::TraverseGroupArgs`.
#[repr(C)]
#[derive(Debug, PartialEq)]
struct TraverseGroupArgs {
    count: i64,
    done: u64,
    /// Virtual blocks (the plan's fixed chunks) of all segments.
    blocks: i64,
    seg: [TraverseSegment; MAX_SEGMENTS],
}

impl TraverseGroupArgs {
    /// Up to MAX_SEGMENTS items, their virtual blocks back to back.
    fn new(items: &[&TraverseItem<'_>], done: u64) -> TraverseGroupArgs {
        let mut args = TraverseGroupArgs {
            count: items.len() as i64,
            done,
            blocks: 0,
            seg: [TraverseSegment::default(); MAX_SEGMENTS],
        };
        for (segment, item) in args.seg.iter_mut().zip(items) {
            *segment = TraverseSegment {
                args: item.args,
                tile: item.traversal.tile as i64,
                block_begin: args.blocks,
                grid_x: item.traversal.grid_x as i64,
            };
            args.blocks += item.traversal.blocks as i64;
        }
        args
    }
}

/// Blocks of a traversal launch over `blocks` virtual blocks: all of them up to MAX_WAVES
/// waves of resident blocks, else 2 to MAX_WAVES waves, each block looping over an equal
/// share (within one). Sizes the grid only: what each virtual block writes is fixed.
pub(crate) fn traversal_grid(blocks: usize, multiprocessors: Option<u32>) -> usize {
    let Some(sms) = multiprocessors.filter(|&n| n > 0) else {
        return blocks;
    };
    let most = MAX_WAVES * BLOCKS_PER_SM * sms as usize;
    if blocks <= most {
        return blocks;
    }
    // ceil(blocks / per_block) <= most, and > most / 2 since blocks > most.
    blocks.div_ceil(blocks.div_ceil(most))
}

/// Mirrors `vf::SumSegment`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct SumSegment {
    partial: u64,
    out: u64,
    acc_f64: i64,
    channels: i64,
    outer: i64,
    inner: i64,
    sums: i64,
    block_begin: i64,
    log_scale: u64,
    loss: u64,
    loss_code: i64,
    eps: f64,
    per_channel: f64,
    constant_total: f64,
    scale: f64,
    weight: f64,
}

/// Mirrors `vf::ChannelSumGroupArgs`.
#[repr(C)]
struct ChannelSumGroupArgs {
    count: i64,
    epilogue: i64,
    done: u64,
    total: u64,
    total_code: i64,
    seg: [SumSegment; MAX_SEGMENTS],
}

/// Mirrors `vf::LogScaleSegment`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct LogScaleSegment {
    sums: u64,
    log_scale: u64,
    upstream_scalar: u64,
    out: u64,
    table: u64,
    acc_f64: i64,
    channels: i64,
    sums_per_channel: i64,
    block_begin: i64,
    eps: f64,
    per_channel: f64,
    scale: f64,
}

/// The argument of an O(C) kernel's grouped launch: mirrors `vf::LogScaleGroupArgs` and
/// `vf::TableGroupArgs` (a count, then the segment table).
#[repr(C)]
struct PerChannelGroupArgs<S> {
    count: i64,
    seg: [S; MAX_SEGMENTS],
}

/// A segment of an O(C) kernel: its channel count sizes its share of the grid.
trait PerChannelSegment: Copy + Default {
    fn channels(&self) -> i64;
    /// The segment, starting at block `block_begin` of the launch.
    fn at_block(self, block_begin: i64) -> Self;
}

impl PerChannelSegment for LogScaleSegment {
    fn channels(&self) -> i64 {
        self.channels
    }
    fn at_block(self, block_begin: i64) -> Self {
        LogScaleSegment {
            block_begin,
            ..self
        }
    }
}

impl PerChannelSegment for TableSegment {
    fn channels(&self) -> i64 {
        self.channels
    }
    fn at_block(self, block_begin: i64) -> Self {
        TableSegment {
            block_begin,
            ..self
        }
    }
}

/// Mirrors `vf::TableSegment`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct TableSegment {
    log_scale: u64,
    table: u64,
    acc_f64: i64,
    channels: i64,
    kind: i64,
    block_begin: i64,
    eps: f64,
    constant: f64,
}

/// `vf::TableKind`: what a channel table holds.
const TABLE_LOSS_FACTORS: i64 = 0;
const TABLE_INVERSE_VARIANCE: i64 = 1;
const TABLE_GRADIENT_FACTORS: i64 = 2;

/// Ops of the traversal kernels and storage dtypes: the kernels are named
/// `vid_<op>_group_<dtype>`, plus `vid_channel_sum_group` and `vid_log_scale_grad_group`
/// (kernels/vid.cu).
const OPS: [&str; 5] = ["sumsq", "sumsq_grad", "loss", "grad", "grad_none"];
const DTYPES: [&str; 4] = ["f32", "f64", "f16", "bf16"];

/// Every kernel the plan may launch, sorted.
pub fn kernel_names() -> Vec<String> {
    let mut names = vec![
        "vid_channel_sum_group".to_string(),
        "vid_channel_table_group".to_string(),
        "vid_log_scale_grad_group".to_string(),
    ];
    for dtype in DTYPES {
        for op in OPS {
            names.push(format!("vid_{op}_group_{dtype}"));
        }
    }
    names.sort();
    names
}

fn launch_with<L: KernelLauncher + ?Sized, A>(
    launcher: &L,
    kernel: &str,
    config: LaunchConfig,
    args: &mut A,
) -> Result<()> {
    let mut params = [args as *mut A as *mut c_void];
    launcher.launch(kernel, config, &mut params)
}

fn ptr(t: &Tensor) -> u64 {
    t.data_ptr() as u64
}

fn optional_ptr(t: Option<&Tensor>) -> u64 {
    t.map_or(0, ptr)
}

/// Kernel name suffix of a storage dtype.
fn dtype_suffix(kind: Kind) -> Result<&'static str> {
    match kind {
        Kind::Float => Ok("f32"),
        Kind::Double => Ok("f64"),
        Kind::Half => Ok("f16"),
        Kind::BFloat16 => Ok("bf16"),
        other => Err(VidError::invalid(
            "mean",
            format!("unsupported dtype {other:?}"),
        )),
    }
}

/// `vf::ScalarCode` of a dtype the epilogue writes.
fn scalar_code(kind: Kind) -> i64 {
    match kind {
        Kind::Double => 1,
        Kind::Half => 2,
        Kind::BFloat16 => 3,
        _ => 0,
    }
}

/// The accumulation dtype: f64 for f64 inputs, f32 otherwise.
pub(crate) fn acc_kind(kind: Kind) -> Kind {
    if kind == Kind::Double {
        Kind::Double
    } else {
        Kind::Float
    }
}

/// Elements from the 16-byte boundary at or below `t`'s base to the base, if a whole number.
fn phase(t: &Tensor, elt: usize) -> Option<usize> {
    let offset = (ptr(t) % 16) as usize;
    (offset % elt == 0).then_some(offset / elt)
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// How a traversal walks the problem, and where its partial sums go.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Traversal {
    /// The tile traversal (else the warp traversal).
    pub(crate) tile: bool,
    /// Virtual blocks (fixed chunks) of the problem's own grid; tile: `grid_x` row chunks
    /// times the column tiles.
    pub(crate) blocks: usize,
    grid_x: usize,
    rows: usize,
    row_len: usize,
    seg_len: usize,
    channel_div: usize,
    tile_x: usize,
    vectorized: bool,
    /// Elements from the 16-byte boundary below every tensor's base to the base.
    phase: usize,
    /// Tile: elements and columns of the `[rows][cols]` view (`rows` and `row_len` above
    /// describe its super-rows).
    elements: usize,
    cols: usize,
    /// Partial slots per (outer, channel): partial[((o * C + c) * inner + j) * K + k].
    pub(crate) outer: usize,
    pub(crate) inner: usize,
}

impl Traversal {
    /// `phase`: where every tensor's base lies past a 16-byte boundary, in elements, when all
    /// agree (packs then start at the same elements of each), else `None` (no packs).
    pub(crate) fn plan(
        geometry: &Geometry,
        pack: usize,
        phase: Option<usize>,
    ) -> Result<Traversal> {
        let (n, c, s) = (geometry.batch, geometry.channels, geometry.inner);
        match geometry.layout {
            Layout::ChannelsFirst if s >= WARP_MIN_ROW => {
                // Rows that start or end between pack boundaries are walked in packs too,
                // with scalar heads and tails (kernels/vid.cu: warp_traverse).
                let segments = s.div_ceil(WARP_SEGMENT);
                let items = (n * c * segments) as u64;
                let blocks = items.div_ceil(WARPS_PER_BLOCK) as usize;
                Ok(Traversal {
                    tile: false,
                    blocks,
                    grid_x: blocks,
                    rows: n * c,
                    row_len: s,
                    seg_len: WARP_SEGMENT,
                    channel_div: 1,
                    tile_x: 0,
                    vectorized: phase.is_some(),
                    phase: phase.unwrap_or(0),
                    elements: 0,
                    cols: 0,
                    outer: n,
                    inner: segments,
                })
            }
            // Short NCHW rows: the [N][C * S] view, channel = column / S.
            Layout::ChannelsFirst => Self::tile(n, c * s, s, pack, phase),
            Layout::ChannelsLast => Self::tile(n * s, c, 1, pack, phase),
        }
    }

    /// The tile traversal of a `[rows][cols]` view, walked as super-rows of the k rows
    /// that make a multiple of the pack (kernels/vid.cu: tile_traverse). Every choice follows
    /// from the shape, dtype and `phase` alone (never from the GPU), so the partial sums, and
    /// the result's bits, are the same on every GPU model.
    fn tile(
        rows: usize,
        cols: usize,
        channel_div: usize,
        pack: usize,
        phase: Option<usize>,
    ) -> Result<Traversal> {
        // The kernel adds a column and a row's width in 32 bits: widths below 2^31.
        let fits = |width: usize| width < 1 << 31;
        if !fits(cols) {
            return Err(VidError::invalid(
                "mean",
                format!("{cols} columns exceed the kernels' 31-bit column index"),
            ));
        }
        let super_row = pack / gcd(cols, pack) * cols;
        let (width, phase) = match phase {
            Some(phase) if fits(super_row) => (pack, phase),
            _ => (1, 0),
        };
        let row_len = if width == 1 { cols } else { super_row };
        let elements = rows * cols;
        let super_rows = (elements + phase).div_ceil(row_len);
        let pack_cols = row_len / width;
        // 16-byte packs hold `pack` elements: 16-bit inputs take twice the rows per chunk,
        // so partials stay the same fraction of the bytes.
        let chunk_rows = CHUNK_ROWS_F32 * (pack / 4).max(1);
        // Threads across the columns: about TILE_BLOCK_ELEMENTS per block over chunk_rows rows.
        let wanted = (TILE_BLOCK_ELEMENTS / (chunk_rows * width))
            .clamp(1, BLOCK as usize)
            .next_power_of_two();
        let tile_x = pack_cols.min(wanted);
        let tile_y = BLOCK as usize / tile_x;
        // Narrow views (a few packs per super-row) take more rows per chunk, so that a block
        // still covers about TILE_BLOCK_ELEMENTS.
        let rows_wanted = chunk_rows.max(TILE_BLOCK_ELEMENTS / row_len).max(tile_y);
        let seg_len = rows_wanted.div_ceil(tile_y) * tile_y;
        let chunks = super_rows.div_ceil(seg_len);
        let col_tiles = pack_cols.div_ceil(tile_x);
        Ok(Traversal {
            tile: true,
            blocks: chunks * col_tiles,
            grid_x: chunks,
            rows: super_rows,
            row_len,
            seg_len,
            channel_div,
            tile_x,
            vectorized: width > 1,
            phase,
            elements,
            cols,
            outer: chunks,
            // Each chunk has a partial per column of a super-row: k per column of the view.
            inner: row_len / cols * channel_div,
        })
    }

    /// Partial slots per sum.
    pub(crate) fn slots(&self, channels: usize) -> usize {
        self.outer * channels * self.inner
    }

    fn args(&self, geometry: &Geometry) -> TraverseArgs {
        TraverseArgs {
            rows: self.rows as i64,
            row_len: self.row_len as i64,
            seg_len: self.seg_len as i64,
            channels: geometry.channels as i64,
            channel_div: self.channel_div as i64,
            tile_x: self.tile_x as i64,
            vectorized: self.vectorized as i64,
            phase: self.phase as i64,
            elements: self.elements as i64,
            cols: self.cols as i64,
            ..TraverseArgs::default()
        }
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

/// A traversal of one problem inside a grouped launch.
struct TraverseItem<'p> {
    dtype: &'static str,
    traversal: Traversal,
    args: TraverseArgs,
    _problem: std::marker::PhantomData<&'p ()>,
}

/// A 1-D launch of `blocks` blocks (at least one) of BLOCK threads.
fn launch_config(blocks: usize) -> Result<LaunchConfig> {
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
fn group_launch(
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
fn traverse_group<L: KernelLauncher + ?Sized>(
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
/// `epilogue`, the last block also writes each segment's loss and the weighted total.
fn channel_sum_group<L: KernelLauncher + ?Sized>(
    launcher: &L,
    segments: &[SumSegment],
    epilogue: Option<(u64, u64, i64)>,
) -> Result<()> {
    for chunk in segments.chunks(MAX_SEGMENTS) {
        let (done, total, total_code) = epilogue.unwrap_or((0, 0, 0));
        let mut args = ChannelSumGroupArgs {
            count: chunk.len() as i64,
            epilogue: epilogue.is_some() as i64,
            done,
            // A total over several launches is summed by the caller.
            total: if segments.len() <= MAX_SEGMENTS {
                total
            } else {
                0
            },
            total_code,
            seg: [SumSegment::default(); MAX_SEGMENTS],
        };
        let mut blocks = 0usize;
        for (segment, item) in args.seg.iter_mut().zip(chunk) {
            *segment = SumSegment {
                block_begin: blocks as i64,
                ..*item
            };
            // kernels/vid.cu: 32 channels per block when each chunk has one partial per
            // channel (inner == 1), else a block per channel.
            let units = if item.inner == 1 {
                (item.channels as usize).div_ceil(32)
            } else {
                item.channels as usize
            };
            blocks += units.clamp(1, MAX_GRID_Y);
        }
        launch_with(
            launcher,
            "vid_channel_sum_group",
            launch_config(blocks)?,
            &mut args,
        )?;
    }
    Ok(())
}

/// The channel tables of every segment, one launch per MAX_SEGMENTS.
fn channel_table_group<L: KernelLauncher + ?Sized>(
    launcher: &L,
    segments: &[TableSegment],
) -> Result<()> {
    per_channel_group(launcher, "vid_channel_table_group", segments)
}

/// d loss / d log_scale of every segment, one launch per MAX_SEGMENTS.
fn log_scale_grad_group<L: KernelLauncher + ?Sized>(
    launcher: &L,
    segments: &[LogScaleSegment],
) -> Result<()> {
    per_channel_group(launcher, "vid_log_scale_grad_group", segments)
}

/// An O(C) kernel over every segment, one launch per MAX_SEGMENTS; each segment gets
/// ceil(C / BLOCK) blocks (at least one), back to back.
fn per_channel_group<L: KernelLauncher + ?Sized, S: PerChannelSegment>(
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
struct Workspace {
    /// Kept until every launch using it is queued; PyTorch's stream-ordered caching
    /// allocator then reuses the memory only for work queued after them.
    _buffer: Tensor,
}

impl Workspace {
    /// Room for `bytes[i]` bytes at `offsets[i]`, and 16 bytes for the counter at the end.
    fn new(device: tch::Device, bytes: &[usize]) -> Result<(Workspace, Vec<u64>, u64)> {
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
    // Partials of every problem, then a gradient-factor table for each one that writes.
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
    let (_workspace, pieces, done) = Workspace::new(prepared[0].problem.device(), &piece_bytes)?;
    let (partials, tables) = pieces.split_at(prepared.len());
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
        .zip(losses.iter().zip(weights))
        .map(|(((p, t), (&partial, q)), (&loss, &weight))| {
            let g = p.geometry();
            SumSegment {
                partial,
                out: ptr(q),
                acc_f64: p.acc_f64(),
                channels: g.channels as i64,
                outer: t.outer as i64,
                inner: t.inner as i64,
                sums: 1,
                block_begin: 0,
                log_scale: ptr(&p.log_scale),
                loss,
                loss_code: scalar_code(p.problem.kind()),
                eps: p.problem.options.eps_value(),
                per_channel: g.per_channel() as f64,
                constant_total: g.numel() as f64 * p.constant(),
                scale: p.reduction_factor(),
                weight,
            }
        })
        .collect();
    let (total_ptr, total_code) = total.map_or((0, 0), |(t, kind)| (t, scalar_code(kind)));
    channel_sum_group(launcher, &segments, Some((done, total_ptr, total_code)))?;
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
        ],
    )?;
    let (partials, table) = (&pieces[..1], pieces[1]);
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
        let segment = SumSegment {
            partial: partials[0],
            out: ptr(&sums),
            acc_f64: p.acc_f64(),
            channels: channels as i64,
            outer: traversal.outer as i64,
            inner: traversal.inner as i64,
            sums: 2,
            ..SumSegment::default()
        };
        channel_sum_group(launcher, &[segment], None)?;
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Bytes a Mean/Sum forward and backward move, from the plan: inputs and outputs once,
    /// partial sums written and read once, per-channel arrays (sums, log_scale, channel
    /// table, log_scale gradient) once each.
    pub(crate) fn traffic(g: &Geometry, kind: Kind) -> (f64, f64, Traversal) {
        let elt = kind.elt_size_in_bytes() as f64;
        let acc = acc_kind(kind).elt_size_in_bytes() as f64;
        let t = Traversal::plan(g, 16 / kind.elt_size_in_bytes(), Some(0)).unwrap();
        let (n, c) = (g.numel() as f64, g.channels as f64);
        let partials = t.slots(g.channels) as f64 * acc;
        let forward = 2.0 * n * elt + 2.0 * partials + 2.0 * c * acc;
        let backward = 3.0 * n * elt + 2.0 * c * acc + 2.0 * 2.0 * c * acc + c * acc;
        (forward, backward, t)
    }

    /// Every grid is all the chunks (up to 4 waves) or 2-4 waves; no SM count (unknown, or
    /// a driver's 0) is one block per chunk.
    #[test]
    fn traversal_grids_cover_two_to_four_waves() {
        for blocks in 0..20_000 {
            assert_eq!(traversal_grid(blocks, None), blocks);
            assert_eq!(traversal_grid(blocks, Some(0)), blocks);
            for sms in [1u32, 2, 3, 46, 84, 108, 132, 170] {
                let (grid, wave) = (traversal_grid(blocks, Some(sms)), 2 * sms as usize);
                let ok = if blocks <= 4 * wave {
                    grid == blocks
                } else {
                    (2 * wave..=4 * wave).contains(&grid)
                };
                assert!(ok, "{blocks} chunks, {sms} SMs: {grid} blocks");
            }
        }
    }

    /// SM counts of the modelled GPUs (T4's 40 aside: 46 to 170).
    const DEVICES: [u32; 5] = [46, 84, 108, 132, 170];

    /// The plan's bytes are within 3% of the floor (reading the inputs; backward also
    /// writing the gradient) from 16M elements on (10% for [4096, 1000]), every case has
    /// chunks for two waves of two blocks per SM on a 170-SM GPU, every modelled GPU gets a
    /// grid of 2-4 waves (all chunks when fewer), and only the grid depends on the GPU: the
    /// kernels' arguments, hence the partials, the bytes and the result's bits, do not.
    #[test]
    fn traffic_is_near_the_bytes_floor_with_enough_blocks() {
        let maps: [[usize; 4]; 4] = [
            [64, 256, 32, 32],
            [256, 256, 16, 16],
            [256, 512, 8, 8],
            [1024, 256, 56, 56],
        ];
        let mut cases = Vec::new();
        for [n, c, h, w] in maps {
            for layout in [Layout::ChannelsFirst, Layout::ChannelsLast] {
                cases.push(Geometry {
                    batch: n,
                    channels: c,
                    inner: h * w,
                    layout,
                });
            }
        }
        for (n, c) in [(4096, 1000), (8192, 32000), (16384, 1001)] {
            cases.push(Geometry {
                batch: n,
                channels: c,
                inner: 1,
                layout: Layout::ChannelsLast,
            });
        }
        // Column counts that are multiples of no pack: RGB images channels-last, and short
        // NCHW rows with an odd C * S.
        for (n, c, s, layout) in [
            (256, 3, 224 * 224, Layout::ChannelsLast),
            (64, 255, 52 * 52, Layout::ChannelsLast),
            (65536, 85, 3 * 3, Layout::ChannelsFirst),
        ] {
            cases.push(Geometry {
                batch: n,
                channels: c,
                inner: s,
                layout,
            });
        }
        let mut report = String::new();
        for g in &cases {
            for kind in [Kind::Float, Kind::BFloat16] {
                let (forward, backward, t) = traffic(g, kind);
                let floor = g.numel() as f64 * kind.elt_size_in_bytes() as f64;
                let (f, b) = (forward / (2.0 * floor), backward / (3.0 * floor));
                report += &format!(
                    "{g:?} {kind:?}: forward {f:.4}x, backward {b:.4}x the floor, {} chunks ({})\n",
                    t.blocks,
                    if t.tile { "tile" } else { "warp" }
                );
                let allowed = if g.numel() >= 1 << 24 {
                    1.03
                } else if (g.batch, g.channels) == (4096, 1000) {
                    1.10
                } else {
                    f64::INFINITY
                };
                assert!(f <= allowed && b <= allowed, "{report}");
                assert!(t.vectorized, "not in 16-byte packs\n{report}");
                assert!(
                    t.blocks >= 2 * 2 * 170 || g.numel() < 1 << 23,
                    "too few blocks\n{report}"
                );
                let item = TraverseItem {
                    dtype: dtype_suffix(kind).unwrap(),
                    traversal: t,
                    args: t.args(g),
                    _problem: Default::default(),
                };
                let (first, _) = group_launch(&[&item], 0, None).unwrap();
                for sms in DEVICES {
                    let (args, config) = group_launch(&[&item], 0, Some(sms)).unwrap();
                    let (grid, wave) = (config.grid[0] as usize, 2 * sms as usize);
                    report += &format!("  {sms} SMs: {grid} blocks\n");
                    assert!(
                        grid <= 4 * wave && (grid == t.blocks || grid >= 2 * wave),
                        "grid not in 2-4 waves\n{report}"
                    );
                    // The arguments fix every chunk's partials (their slots and values).
                    assert_eq!(args, first, "arguments depend on the GPU\n{report}");
                }
            }
        }
        println!("{report}");
    }

    /// Bytes of one training step (forward and backward) on the one-pass path, from the plan:
    /// the forward reads the inputs and writes the gradient(s) of mean (and target), its
    /// partial sums written and read once, per-channel arrays (sums, log_scale, the gradient
    /// factors) once each; the backward moves per-channel arrays only (its grad launch skips
    /// every chunk when the upstream gradient is 1).
    fn one_pass_step_bytes(g: &Geometry, kind: Kind, target_grad: bool) -> f64 {
        let elt = kind.elt_size_in_bytes() as f64;
        let acc = acc_kind(kind).elt_size_in_bytes() as f64;
        let t = Traversal::plan(g, 16 / kind.elt_size_in_bytes(), Some(0)).unwrap();
        let (n, c) = (g.numel() as f64, g.channels as f64);
        let partials = t.slots(g.channels) as f64 * acc;
        let outputs = if target_grad { 2.0 } else { 1.0 };
        let forward = (2.0 + outputs) * n * elt + 2.0 * partials + 5.0 * c * acc;
        let backward = 2.0 * c * acc + 2.0 * 2.0 * c * acc + c * acc;
        forward + backward
    }

    /// A one-pass training step moves 3 element-sized tensors (4 with a target gradient)
    /// within 3% from 16M elements on, against 5 (6) for the two passes of `traffic`.
    #[test]
    fn one_pass_step_moves_three_tensors() {
        for (dims, layout) in [
            ([64usize, 256, 32, 32], Layout::ChannelsFirst),
            ([64, 256, 32, 32], Layout::ChannelsLast),
            ([1024, 256, 56, 56], Layout::ChannelsFirst),
            ([1024, 256, 56, 56], Layout::ChannelsLast),
        ] {
            let g = Geometry {
                batch: dims[0],
                channels: dims[1],
                inner: dims[2] * dims[3],
                layout,
            };
            for kind in [Kind::Float, Kind::BFloat16] {
                let tensor = (g.numel() * kind.elt_size_in_bytes()) as f64;
                for (target_grad, tensors) in [(false, 3.0), (true, 4.0)] {
                    let ratio = one_pass_step_bytes(&g, kind, target_grad) / (tensors * tensor);
                    assert!(
                        (1.0..1.03).contains(&ratio),
                        "{dims:?} {layout:?} {kind:?}: {ratio:.4} x {tensors} tensors"
                    );
                }
                let (forward, backward, _) = traffic(&g, kind);
                let two_pass = (forward + backward) / tensor;
                assert!(
                    (5.0..5.15).contains(&two_pass),
                    "two passes: {two_pass:.3} tensors"
                );
            }
        }
    }
}
