//! The kernels' arguments as the device sees them: `#[repr(C)]` mirrors of the structs in
//! kernels/vid.cu (every field 8 bytes wide, so the layouts agree), the segment tables of
//! grouped launches, and the kernels' names.

use tch::Kind;

use super::launch::TraverseItem;
use crate::error::{Result, VidError};

/// Arguments of the traversal kernels; mirrors `vf::TraverseArgs` (all fields 8 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(super) struct TraverseArgs {
    pub(super) mean: u64,
    pub(super) target: u64,
    pub(super) upstream: u64,
    pub(super) upstream_scalar: u64,
    /// The op's channel table (Acc [2C]).
    pub(super) table: u64,
    pub(super) out: u64,
    pub(super) out_negated: u64,
    pub(super) partial: u64,
    pub(super) rows: i64,
    pub(super) row_len: i64,
    pub(super) seg_len: i64,
    pub(super) channels: i64,
    pub(super) channel_div: i64,
    pub(super) tile_x: i64,
    pub(super) vectorized: i64,
    pub(super) phase: i64,
    pub(super) elements: i64,
    pub(super) cols: i64,
}

/// Segments per grouped launch (kernels/vid.cu: kMaxSegments); larger groups take several.
pub(crate) const MAX_SEGMENTS: usize = 16;

/// Mirrors `vf::TraverseSegment`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(super) struct TraverseSegment {
    pub(super) args: TraverseArgs,
    pub(super) tile: i64,
    pub(super) block_begin: i64,
    pub(super) grid_x: i64,
}

/// Mirrors `vf::TraverseGroupArgs`.
#[repr(C)]
#[derive(Debug, PartialEq)]
pub(super) struct TraverseGroupArgs {
    pub(super) count: i64,
    pub(super) done: u64,
    /// Virtual blocks (the plan's fixed chunks) of all segments.
    pub(super) blocks: i64,
    pub(super) seg: [TraverseSegment; MAX_SEGMENTS],
}

impl TraverseGroupArgs {
    /// Up to MAX_SEGMENTS items, their virtual blocks back to back.
    pub(super) fn new(items: &[&TraverseItem<'_>], done: u64) -> TraverseGroupArgs {
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

/// Mirrors `vf::SumSegment`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct SumSegment {
    pub(super) partial: u64,
    pub(super) out: u64,
    pub(super) acc_f64: i64,
    pub(super) channels: i64,
    pub(super) outer: i64,
    pub(super) inner: i64,
    pub(super) sums: i64,
    pub(super) block_begin: i64,
    /// Runs of chunks a split combine sums in parallel (its first launch), and their length.
    pub(super) groups: i64,
    pub(super) group_chunks: i64,
    pub(super) log_scale: u64,
    /// Per-channel loss terms (f64 [C]) the epilogue adds, or 0.
    pub(super) terms: u64,
    pub(super) loss: u64,
    pub(super) loss_code: i64,
    pub(super) eps: f64,
    pub(super) per_channel: f64,
    pub(super) constant_total: f64,
    pub(super) scale: f64,
    pub(super) weight: f64,
}

// kernels/vid.cu static_asserts the same size for `vf::SumSegment`.
const _: () = assert!(std::mem::size_of::<SumSegment>() == 19 * 8);

/// Mirrors `vf::ChannelSumGroupArgs`.
#[repr(C)]
pub(super) struct ChannelSumGroupArgs {
    pub(super) count: i64,
    pub(super) epilogue: i64,
    pub(super) done: u64,
    pub(super) total: u64,
    pub(super) total_code: i64,
    pub(super) seg: [SumSegment; MAX_SEGMENTS],
}

/// Mirrors `vf::LogScaleSegment`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct LogScaleSegment {
    pub(super) sums: u64,
    pub(super) log_scale: u64,
    pub(super) upstream_scalar: u64,
    pub(super) out: u64,
    pub(super) table: u64,
    pub(super) acc_f64: i64,
    pub(super) channels: i64,
    pub(super) sums_per_channel: i64,
    pub(super) block_begin: i64,
    pub(super) eps: f64,
    pub(super) per_channel: f64,
    pub(super) scale: f64,
}

/// The argument of an O(C) kernel's grouped launch: mirrors `vf::LogScaleGroupArgs` and
/// `vf::TableGroupArgs` (a count, then the segment table).
#[repr(C)]
pub(super) struct PerChannelGroupArgs<S> {
    pub(super) count: i64,
    pub(super) seg: [S; MAX_SEGMENTS],
}

/// A segment of an O(C) kernel: its channel count sizes its share of the grid.
pub(super) trait PerChannelSegment: Copy + Default {
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
pub(super) struct TableSegment {
    pub(super) log_scale: u64,
    pub(super) table: u64,
    pub(super) acc_f64: i64,
    pub(super) channels: i64,
    pub(super) kind: i64,
    pub(super) block_begin: i64,
    pub(super) eps: f64,
    pub(super) constant: f64,
}

/// `vf::TableKind`: what a channel table holds.
pub(super) const TABLE_LOSS_FACTORS: i64 = 0;
pub(super) const TABLE_INVERSE_VARIANCE: i64 = 1;
pub(super) const TABLE_GRADIENT_FACTORS: i64 = 2;

/// Ops of the traversal kernels and storage dtypes: the kernels are named
/// `vid_<op>_group_<dtype>`, plus `vid_channel_sum_group` and `vid_log_scale_grad_group`
/// (kernels/vid.cu).
pub(super) const OPS: [&str; 5] = ["sumsq", "sumsq_grad", "loss", "grad", "grad_none"];
pub(super) const DTYPES: [&str; 4] = ["f32", "f64", "f16", "bf16"];

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

/// Kernel name suffix of a storage dtype.
pub(super) fn dtype_suffix(kind: Kind) -> Result<&'static str> {
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
pub(super) fn scalar_code(kind: Kind) -> i64 {
    match kind {
        Kind::Double => 1,
        Kind::Half => 2,
        Kind::BFloat16 => 3,
        _ => 0,
    }
}
