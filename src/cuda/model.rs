//! A performance model of the CUDA kernels: the predicted time of every launch of a Mean/Sum
//! forward or backward pass on modelled GPUs (H100, H200, A100, L4, RTX 4090), from the
//! launch plan and the kernels' SASS. Nothing here has been measured on a GPU: a GPU run
//! tests these predictions, and its errors calibrate the constants below.
//!
//! What a pass launches comes from the plan (src/cuda/plan.rs): each problem's traversal
//! (chunks, grid, partial-sum slots) is planned by the planner itself, and a unit test
//! checks the launches and grids predicted here against those the plan makes through a
//! recording launcher. Per pass, for Mean/Sum problems:
//!
//! * [`Pass::Forward`] (no gradient written in the forward: grad mode off, no input needing
//!   a gradient, or `VidOptions::gradients_in_forward(false)`): `vid_sumsq_group_<dtype>`
//!   (reads mean and target, writes a partial sum per chunk and channel), then
//!   `vid_channel_sum_group` (sums the partials per channel and computes each channel's
//!   loss term in FP64; its last block adds the terms: the loss epilogue). When a channel
//!   has many chunks, a first `vid_channel_sum_group` launch sums runs of them in parallel;
//!   the second sums the runs;
//! * [`Pass::Backward`] (after that forward): `vid_log_scale_grad_group` (O(C) FP64 work over
//!   C/256 blocks: the log_scale gradient and the grad op's channel table), then
//!   `vid_grad_group_<dtype>` (reads mean and target, writes the gradient of mean);
//! * [`Pass::OnePassForward`] (the default in training): `vid_channel_table_group` (O(C)
//!   FP64: the gradient factors), `vid_sumsq_grad_group_<dtype>` (the sums' pass also writes
//!   the gradient of mean for an upstream gradient of 1), `vid_channel_sum_group`;
//! * [`Pass::OnePassBackward`] (after it, upstream gradient exactly 1):
//!   `vid_log_scale_grad_group`, then `vid_grad_group_<dtype>`, whose blocks find the
//!   upstream gradient equal to 1 and skip every chunk.
//!
//! Each kernel's time is
//!
//! ```text
//! launch overhead + max(bytes / bandwidth, warp instructions / issue rate, FP64 ops / FP64 rate)
//!                 + serial chain (dependent memory round trips, the last block's epilogue)
//! ```
//!
//! and a pass is the sum of its launches (they are ordered on one stream). The fraction of
//! copy bandwidth a pass reaches is its unavoidable bytes (forward: reading 2 tensors;
//! backward: reading 2 and writing 1) over the copy bandwidth, divided by the predicted time.
//!
//! ```
//! use vidfuse::cuda::model::{predict, Dtype, Launches, Pass, Shape, H100};
//!
//! let shape = Shape::nchw(&[64, 256, 32, 32]);
//! let forward = predict(&H100, &[shape], Dtype::F32, Pass::Forward, Launches::Host).unwrap();
//! assert!(forward.time_us > 40.0 && forward.time_us < 80.0);
//! assert!(forward.copy_fraction > 0.5 && forward.copy_fraction < 1.0);
//! ```

use std::fmt::Write as _;

use tch::Kind;

use super::plan::{
    acc_kind, traversal_grid, Traversal, BLOCK, BLOCKS_PER_SM, MAX_GRID_Y, MAX_SEGMENTS,
};
use crate::error::{Result, VidError};
use crate::validate::{Geometry, Layout};

/// A modelled GPU: its specifications as data. Bandwidths are the datasheet's; the copy
/// bandwidth, which every bound here uses, is taken as 90% of it (what a device-to-device
/// copy typically reaches). Latencies are assumptions shared by every GPU, to be calibrated
/// by a GPU run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Gpu {
    /// Marketing name, e.g. `H100 SXM`.
    pub name: &'static str,
    /// The architecture NVRTC compiles for, e.g. `sm_90`; picks the SASS counts.
    pub arch: &'static str,
    /// Streaming multiprocessors.
    pub multiprocessors: u32,
    /// Boost clock in GHz (the datasheet's).
    pub clock_ghz: f64,
    /// DRAM bandwidth of the datasheet, GB/s.
    pub datasheet_bandwidth_gbs: f64,
    /// Device-copy bandwidth (bytes read + written per second), GB/s: 90% of the datasheet.
    pub copy_bandwidth_gbs: f64,
    /// FP64 operations (results) per SM per clock.
    pub fp64_per_sm_clock: f64,
    /// Warp instructions issued per SM per clock (4 schedulers).
    pub issue_per_sm_clock: f64,
    /// Latency of a load that misses the L2 (DRAM round trip), ns.
    pub dram_latency_ns: f64,
    /// Latency of a load that hits the L2, ns.
    pub l2_latency_ns: f64,
}

/// The fraction of the datasheet's DRAM bandwidth a device copy reaches (an assumption).
pub const COPY_FRACTION_OF_DATASHEET: f64 = 0.9;
/// Assumed DRAM round trip, ns (all modelled GPUs).
const DRAM_LATENCY_NS: f64 = 600.0;
/// Assumed L2-hit round trip, ns (all modelled GPUs).
const L2_LATENCY_NS: f64 = 250.0;

/// NVIDIA H100 SXM5 80 GB: 132 SMs, 1.98 GHz boost, HBM3 3.35 TB/s, FP64 (non-tensor)
/// 34 TFLOPS = 64 FMA per SM per clock.
pub const H100: Gpu = Gpu {
    name: "H100 SXM",
    arch: "sm_90",
    multiprocessors: 132,
    clock_ghz: 1.98,
    datasheet_bandwidth_gbs: 3350.0,
    copy_bandwidth_gbs: 3350.0 * COPY_FRACTION_OF_DATASHEET,
    fp64_per_sm_clock: 64.0,
    issue_per_sm_clock: 4.0,
    dram_latency_ns: DRAM_LATENCY_NS,
    l2_latency_ns: L2_LATENCY_NS,
};

/// NVIDIA H200 SXM 141 GB: the H100's GH100 (132 SMs, 1.98 GHz, 64 FP64 per SM per clock)
/// with HBM3e at 4.8 TB/s.
pub const H200: Gpu = Gpu {
    name: "H200 SXM",
    arch: "sm_90",
    multiprocessors: 132,
    clock_ghz: 1.98,
    datasheet_bandwidth_gbs: 4800.0,
    copy_bandwidth_gbs: 4800.0 * COPY_FRACTION_OF_DATASHEET,
    fp64_per_sm_clock: 64.0,
    issue_per_sm_clock: 4.0,
    dram_latency_ns: DRAM_LATENCY_NS,
    l2_latency_ns: L2_LATENCY_NS,
};

/// NVIDIA A100 80 GB SXM: 108 SMs, 1.41 GHz boost, HBM2e 2.04 TB/s (2039 GB/s), FP64
/// (non-tensor) 9.7 TFLOPS = 32 FMA per SM per clock.
pub const A100: Gpu = Gpu {
    name: "A100 80GB SXM",
    arch: "sm_80",
    multiprocessors: 108,
    clock_ghz: 1.41,
    datasheet_bandwidth_gbs: 2039.0,
    copy_bandwidth_gbs: 2039.0 * COPY_FRACTION_OF_DATASHEET,
    fp64_per_sm_clock: 32.0,
    issue_per_sm_clock: 4.0,
    dram_latency_ns: DRAM_LATENCY_NS,
    l2_latency_ns: L2_LATENCY_NS,
};

/// NVIDIA L4 (AD104, sm_89): 58 SMs, 2.04 GHz boost, GDDR6 300 GB/s, FP64 at 1/64 of FP32
/// (0.47 TFLOPS) = 2 per SM per clock.
pub const L4: Gpu = Gpu {
    name: "L4",
    arch: "sm_89",
    multiprocessors: 58,
    clock_ghz: 2.04,
    datasheet_bandwidth_gbs: 300.0,
    copy_bandwidth_gbs: 300.0 * COPY_FRACTION_OF_DATASHEET,
    fp64_per_sm_clock: 2.0,
    issue_per_sm_clock: 4.0,
    dram_latency_ns: DRAM_LATENCY_NS,
    l2_latency_ns: L2_LATENCY_NS,
};

/// NVIDIA GeForce RTX 4090 (AD102, sm_89): 128 SMs, 2.52 GHz boost, GDDR6X 1.008 TB/s, FP64
/// at 1/64 of FP32 (1.3 TFLOPS) = 2 per SM per clock.
pub const RTX_4090: Gpu = Gpu {
    name: "RTX 4090",
    arch: "sm_89",
    multiprocessors: 128,
    clock_ghz: 2.52,
    datasheet_bandwidth_gbs: 1008.0,
    copy_bandwidth_gbs: 1008.0 * COPY_FRACTION_OF_DATASHEET,
    fp64_per_sm_clock: 2.0,
    issue_per_sm_clock: 4.0,
    dram_latency_ns: DRAM_LATENCY_NS,
    l2_latency_ns: L2_LATENCY_NS,
};

/// Every modelled GPU, in the order of the tables.
pub const GPUS: [Gpu; 5] = [H100, H200, A100, L4, RTX_4090];

impl Gpu {
    /// Copy bandwidth in bytes per microsecond.
    fn bytes_per_us(&self) -> f64 {
        self.copy_bandwidth_gbs * 1e3
    }

    /// Clocks per microsecond.
    fn clocks_per_us(&self) -> f64 {
        self.clock_ghz * 1e3
    }
}

/// How the kernels of a call are launched, which sets the fixed cost of every launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launches {
    /// Launched from the host one by one: about 3 us per launch (the launch call and the
    /// gap between dependent kernels when the host is not far ahead of the GPU).
    Host,
    /// Replayed from a CUDA graph: about 1 us per kernel.
    Graph,
}

impl Launches {
    /// The assumed fixed cost of one launch, us.
    pub fn overhead_us(self) -> f64 {
        match self {
            Launches::Host => 3.0,
            Launches::Graph => 1.0,
        }
    }
}

/// Storage dtype of mean and target (the model covers the two the goals name).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    /// f32: 4-element 16-byte packs, f32 accumulation.
    F32,
    /// bf16: 8-element 16-byte packs, f32 accumulation.
    Bf16,
}

impl Dtype {
    /// The kernels' dtype suffix (`f32`, `bf16`).
    pub fn suffix(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::Bf16 => "bf16",
        }
    }

    fn kind(self) -> Kind {
        match self {
            Dtype::F32 => Kind::Float,
            Dtype::Bf16 => Kind::BFloat16,
        }
    }

    /// Bytes per element.
    pub fn bytes(self) -> usize {
        self.kind().elt_size_in_bytes()
    }

    /// Elements per 16-byte pack.
    fn pack(self) -> usize {
        16 / self.bytes()
    }

    /// Bytes of the accumulation type (partials, sums, tables).
    fn acc_bytes(self) -> f64 {
        acc_kind(self.kind()).elt_size_in_bytes() as f64
    }
}

/// The sizes and memory format of one problem's mean/target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shape {
    /// `[N, C, *S]`.
    pub dims: Vec<usize>,
    /// Channels-last strides (NHWC); ignored for `[N, C]`, whose rows are channels anyway.
    pub channels_last: bool,
}

impl Shape {
    /// An NCHW-contiguous (or `[N, C]`) tensor of these sizes.
    pub fn nchw(dims: &[usize]) -> Shape {
        Shape {
            dims: dims.to_vec(),
            channels_last: false,
        }
    }

    /// A channels-last tensor of these sizes.
    pub fn channels_last(dims: &[usize]) -> Shape {
        Shape {
            dims: dims.to_vec(),
            channels_last: true,
        }
    }

    /// Whether the shape has spatial dimensions (so that its layout matters).
    pub fn has_spatial(&self) -> bool {
        self.dims.len() > 2
    }

    /// `N * C * prod(S)`.
    pub fn elements(&self) -> usize {
        self.dims.iter().product()
    }

    /// `64x256x32x32`.
    pub fn label(&self) -> String {
        let dims: Vec<String> = self.dims.iter().map(|d| d.to_string()).collect();
        dims.join("x")
    }

    /// The geometry the plan sees, as validation makes it: `[N, C]` and S = 1 are rows of
    /// channels; channels-last strides give channels-last, anything else NCHW.
    fn geometry(&self) -> Result<Geometry> {
        if self.dims.len() < 2 || self.dims.contains(&0) {
            return Err(VidError::invalid(
                "mean",
                format!("expected [N, C, *S] with no zero size, got {:?}", self.dims),
            ));
        }
        let inner: usize = self.dims[2..].iter().product();
        let layout = if inner == 1 || self.channels_last {
            Layout::ChannelsLast
        } else {
            Layout::ChannelsFirst
        };
        Ok(Geometry {
            batch: self.dims[0],
            channels: self.dims[1],
            inner,
            layout,
        })
    }
}

/// Which pass of the op (Mean/Sum; gradients of mean and log_scale wanted, target
/// detached).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// The loss and the per-channel sums, writing no gradient.
    Forward,
    /// The gradients of mean and log_scale after [`Pass::Forward`].
    Backward,
    /// The loss and the per-channel sums, and in the same pass the gradient of mean for an
    /// upstream gradient of 1 (the one-pass path).
    OnePassForward,
    /// The backward after [`Pass::OnePassForward`] with an upstream gradient of exactly 1:
    /// the log_scale gradient; the gradient of mean is already written.
    OnePassBackward,
}

impl Pass {
    /// Tensors of the input's size the pass must read or write at least: forward reads 2;
    /// backward reads 2 and writes 1, as does the one-pass forward; the backward after it
    /// none.
    fn floor_tensors(self) -> f64 {
        match self {
            Pass::Forward => 2.0,
            Pass::Backward | Pass::OnePassForward => 3.0,
            Pass::OnePassBackward => 0.0,
        }
    }

    /// `forward`, `backward`, `one-pass forward`, `one-pass backward`.
    pub fn name(self) -> &'static str {
        match self {
            Pass::Forward => "forward",
            Pass::Backward => "backward",
            Pass::OnePassForward => "one-pass forward",
            Pass::OnePassBackward => "one-pass backward",
        }
    }
}

// ---- constants from the SASS and the kernels ------------------------------------------------

/// Packs per tensor each thread has in flight in the streaming loop (kernels/vid.cu:
/// `Lane::walk`, `U = 4`).
const PACKS_IN_FLIGHT: usize = 4;

/// SASS instructions of the longest unrolled streaming loop (4 packs of each input per
/// thread, one backward branch) of a streaming kernel, per architecture: counted with
/// `cuobjdump -sass` on NVRTC's CUBIN (the unit test `sass_loop_counts_match_the_cubin`
/// recounts them and fails when they drift). `(kernel op, dtype, arch, instructions)`.
///
/// Each kernel has one or two such loops per traversal (tile, warp); the longest is taken
/// (they differ by 3-25%). f32: sumsq's 3 FP32 operations per element (`--fmad=false`:
/// FADD, FMUL, FADD) plus 64-bit addressing, 5.6 (sumsq), 9.1 (grad) and 11 (sumsq_grad)
/// per element; bf16 widens every input (PRMT / IMAD.U32) and rounds every output
/// (F2FP.BF16.F32.PACK_AB, two at a time, the negated output's too), 7.6, 11 and 12.9 per
/// element. At 4 warp instructions per SM per clock that streams at least 3.5x the DRAM
/// bandwidth of every modelled GPU (the least: bf16 sumsq_grad on H200): issue never binds
/// the streaming kernels.
const LOOP_INSTRUCTIONS: [(&str, Dtype, &str, u32); 18] = [
    ("sumsq", Dtype::F32, "sm_80", 89),
    ("sumsq", Dtype::F32, "sm_89", 89),
    ("sumsq", Dtype::F32, "sm_90", 89),
    ("grad", Dtype::F32, "sm_80", 145),
    ("grad", Dtype::F32, "sm_89", 145),
    ("grad", Dtype::F32, "sm_90", 145),
    ("sumsq", Dtype::Bf16, "sm_80", 243),
    ("sumsq", Dtype::Bf16, "sm_89", 243),
    ("sumsq", Dtype::Bf16, "sm_90", 243),
    ("grad", Dtype::Bf16, "sm_80", 351),
    ("grad", Dtype::Bf16, "sm_89", 351),
    ("grad", Dtype::Bf16, "sm_90", 345),
    ("sumsq_grad", Dtype::F32, "sm_80", 176),
    ("sumsq_grad", Dtype::F32, "sm_89", 176),
    ("sumsq_grad", Dtype::F32, "sm_90", 176),
    ("sumsq_grad", Dtype::Bf16, "sm_80", 413),
    ("sumsq_grad", Dtype::Bf16, "sm_89", 413),
    ("sumsq_grad", Dtype::Bf16, "sm_90", 412),
];

/// Warp instructions each warp spends per chunk (virtual block) outside the streaming loop:
/// finding its segment, its channels (32-bit divisions), the head and tail packs, the
/// partial sums' reduction and stores. An estimate from reading the SASS around the loops
/// (about 350 static instructions before the tile loop and 400 after it, of which a chunk
/// runs a part); not recounted by a test.
const CHUNK_OVERHEAD_INSTRUCTIONS: f64 = 300.0;

/// FP64 operations a channel's loss term costs (softplus: exp and log1p; log; a division), on
/// the path one channel takes, in the combine's last launch (kernels/vid.cu: `loss_term`,
/// called once per channel). Its SASS holds about 191 FP64 instructions (sm_89, sm_90):
/// both branches of softplus and the special-value paths of exp and log; the unit test
/// `sass_fp64_constants_fit_the_cubin` keeps this constant within 40-100% of that static
/// count.
pub const LOSS_TERM_FP64_PER_CHANNEL: f64 = 120.0;

/// FP64 operations `vid_log_scale_grad_group` spends per channel (softplus, sigmoid, three
/// divisions), on one channel's path; its SASS loop holds about 240 (held within 40-100% by
/// the same test).
pub const LOG_SCALE_GRAD_FP64_PER_CHANNEL: f64 = 130.0;

/// FP64 operations `vid_channel_table_group` spends per channel for the one-pass forward's
/// gradient factors (softplus and one division); its SASS loop, which also holds the loss
/// factors' logarithm, has about 200 (held within 30-100% by the same test).
pub const TABLE_FP64_PER_CHANNEL: f64 = 80.0;

/// Clocks a block of the one-pass backward's grad launch spends per chunk it skips (find
/// the segment, load the upstream gradient from L1, compare): an estimate.
const SKIP_CLOCKS_PER_CHUNK: f64 = 60.0;

/// The fraction of a channel's FP64 operations that depend on each other (softplus, then
/// log and the division of its result): the length of the dependent chain per channel.
const FP64_DEPENDENT_FRACTION: f64 = 0.5;

/// Clocks of one dependent FP64 operation (DFMA latency on sm_80/sm_90; on sm_89 the
/// throughput bound, 2 per SM per clock, is far longer anyway).
const FP64_LATENCY_CLOCKS: f64 = 8.0;

/// Resident blocks per SM of `vid_channel_sum_group` (64 registers x 256 threads: 4 blocks
/// fill the 64K-register file; ptxas' report in BENCHMARKS.md).
const COMBINE_BLOCKS_PER_SM: usize = 4;

/// Channels per block of the combine when each chunk has one partial per channel
/// (kernels/vid.cu: kChannelsPerBlock).
const COMBINE_CHANNELS_PER_BLOCK: usize = 32;

/// Warps per block of every kernel.
const WARPS: usize = BLOCK as usize / 32;

/// Loads in flight per lane in the combine's loops (kernels/vid.cu: four chunks per
/// iteration in `channel_sums_across`; ptxas unrolls `channel_sums_within`'s lane loop by 4).
const COMBINE_LOADS_IN_FLIGHT: usize = 4;

/// The longest unrolled loop of a streaming kernel, from [`LOOP_INSTRUCTIONS`].
fn loop_instructions(op: &str, dtype: Dtype, arch: &str) -> Result<u32> {
    LOOP_INSTRUCTIONS
        .iter()
        .find(|(o, d, a, _)| *o == op && *d == dtype && *a == arch)
        .map(|entry| entry.3)
        .ok_or_else(|| {
            VidError::invalid(
                "gpu",
                format!(
                    "no SASS count for vid_{op}_group_{} on {arch}",
                    dtype.suffix()
                ),
            )
        })
}

// ---- the prediction -------------------------------------------------------------------------

/// The predicted cost of one launch, every term in microseconds.
#[derive(Debug, Clone, PartialEq)]
pub struct KernelTime {
    /// The kernel's name (`vid_sumsq_group_f32`, ...).
    pub kernel: String,
    /// Blocks launched.
    pub grid: usize,
    /// Bytes it reads and writes in DRAM.
    pub bytes: f64,
    /// Warp instructions issued.
    pub warp_instructions: f64,
    /// FP64 operations (for the combine: the loss terms and the epilogue's additions).
    pub fp64_ops: f64,
    /// The launch's fixed cost.
    pub launch_us: f64,
    /// Bytes over the bandwidth the launch can use (the copy bandwidth, or less when too few
    /// loads are in flight to cover the DRAM latency).
    pub memory_us: f64,
    /// Warp instructions over the issue rate of the SMs the grid occupies.
    pub issue_us: f64,
    /// FP64 operations over the FP64 rate of the SMs the grid occupies (for the combine: the
    /// loss terms; the epilogue's additions are in `epilogue_us`).
    pub fp64_us: f64,
    /// Dependent round trips no parallelism hides: a streaming pass's first loads and last
    /// stores, the combine's walk over the chunks, the last-block ticket.
    pub chain_us: f64,
    /// The combine's last block adding every channel's loss term alone: the larger of its
    /// additions on one SM's FP64 units and each thread's chain of dependent additions, plus
    /// the block sum and the loss store.
    pub epilogue_us: f64,
}

impl KernelTime {
    /// launch + max(memory, issue, FP64) + chain + epilogue.
    pub fn total_us(&self) -> f64 {
        self.launch_us
            + self.memory_us.max(self.issue_us).max(self.fp64_us)
            + self.chain_us
            + self.epilogue_us
    }

    /// The largest term of the total, by name.
    pub fn limiter(&self) -> &'static str {
        let terms = [
            (self.launch_us, "launch"),
            (self.memory_us, "bandwidth"),
            (self.issue_us, "issue"),
            (self.fp64_us, "FP64"),
            (self.chain_us, "serial chain"),
            (self.epilogue_us, "epilogue"),
        ];
        terms
            .iter()
            .fold(
                (f64::MIN, ""),
                |best, &(t, name)| {
                    if t > best.0 {
                        (t, name)
                    } else {
                        best
                    }
                },
            )
            .1
    }
}

/// The predicted cost of a pass: its launches in order and their sum.
#[derive(Debug, Clone, PartialEq)]
pub struct PassTime {
    /// The pass.
    pub pass: Pass,
    /// Every launch of the pass, in stream order.
    pub kernels: Vec<KernelTime>,
    /// Bytes the pass cannot avoid: forward reads mean and target, backward also writes the
    /// gradient of mean.
    pub floor_bytes: f64,
    /// The sum of the launches' times, us.
    pub time_us: f64,
    /// `floor_bytes / copy bandwidth / time_us`: the fraction of copy bandwidth reached.
    pub copy_fraction: f64,
}

impl PassTime {
    /// The bytes every launch moves together.
    pub fn bytes(&self) -> f64 {
        self.kernels.iter().map(|k| k.bytes).sum()
    }

    /// Total launch overhead, us.
    pub fn launch_us(&self) -> f64 {
        self.kernels.iter().map(|k| k.launch_us).sum()
    }
}

/// One problem as the plan sees it.
struct Planned {
    geometry: Geometry,
    traversal: Traversal,
}

impl Planned {
    fn new(shape: &Shape, dtype: Dtype) -> Result<Planned> {
        let geometry = shape.geometry()?;
        // Every tensor at a 16-byte boundary, as fresh allocations are: packs throughout.
        let traversal = Traversal::plan(&geometry, dtype.pack(), Some(0))?;
        Ok(Planned {
            geometry,
            traversal,
        })
    }

    fn elements(&self) -> f64 {
        self.geometry.numel() as f64
    }

    fn channels(&self) -> usize {
        self.geometry.channels
    }

    /// Bytes of this problem's partial sums (one per slot, K = 1).
    fn partial_bytes(&self, dtype: Dtype) -> f64 {
        self.traversal.slots(self.channels()) as f64 * dtype.acc_bytes()
    }

    /// The combine's view of this problem's partials in its last launch: `(chunks, partials
    /// per chunk and channel)`; a split combine's last launch sums the runs' sums.
    fn combine_partials(&self) -> (usize, usize) {
        match self.traversal.combine_runs() {
            (1, _) => (self.traversal.outer, self.traversal.inner),
            (groups, _) => (groups, 1),
        }
    }

    /// Whether the combine splits this problem's chunks into runs (two launches).
    fn combine_splits(&self) -> bool {
        self.traversal.combine_runs().0 > 1
    }

    /// Dependent round trips of one combine block's walk over the chunks of its last launch
    /// (`runs` false) or of a run (its first launch), for the warp with the most, times the
    /// channel groups each block takes in turn.
    fn combine_rounds(&self, runs: bool) -> f64 {
        let (groups, run) = self.traversal.combine_runs();
        let ((outer, inner), groups) = if runs {
            ((run, self.traversal.inner), groups)
        } else {
            (self.combine_partials(), 1)
        };
        let units = self.combine_units(inner);
        let per_block = (units * groups).div_ceil(units.clamp(1, MAX_GRID_Y) * groups) as f64;
        walk_rounds(outer, inner) as f64 * per_block
    }

    /// Blocks of one run of the combine for this problem, before the grid clamp, when each
    /// chunk has `inner` partials per channel (src/cuda/plan/launch.rs: channel_sum_launch).
    fn combine_units(&self, inner: usize) -> usize {
        if inner == 1 {
            self.channels().div_ceil(COMBINE_CHANNELS_PER_BLOCK)
        } else {
            self.channels()
        }
    }

    /// Blocks of the combine's launch (its first, `runs`, or its last) for this problem.
    fn combine_blocks(&self, runs: bool) -> usize {
        let (groups, _) = self.traversal.combine_runs();
        if runs {
            self.combine_units(self.traversal.inner)
                .clamp(1, MAX_GRID_Y)
                * groups
        } else {
            self.combine_units(self.combine_partials().1)
                .clamp(1, MAX_GRID_Y)
        }
    }
}

/// Dependent round trips of the warp with the most in a combine block's walk over `outer`
/// chunks of `inner` partials per channel (kernels/vid.cu).
fn walk_rounds(outer: usize, inner: usize) -> usize {
    if inner == 1 {
        // channel_sums_across: warp 0 takes chunks 0, 8, 16, ...: 4 per iteration while
        // o + 24 < outer, then one per iteration.
        let unrolled = if outer > 3 * WARPS {
            (outer - 3 * WARPS - 1) / (COMBINE_LOADS_IN_FLIGHT * WARPS) + 1
        } else {
            0
        };
        let rest = outer.saturating_sub(unrolled * COMBINE_LOADS_IN_FLIGHT * WARPS);
        unrolled + rest.div_ceil(WARPS)
    } else {
        // channel_sums_within: a warp's chunks one after another; per chunk its lanes read
        // ceil(inner / 32) partials each, 4 per unrolled iteration, then one by one.
        let per_lane = inner.div_ceil(32);
        let per_chunk = per_lane / COMBINE_LOADS_IN_FLIGHT + per_lane % COMBINE_LOADS_IN_FLIGHT;
        outer.div_ceil(WARPS) * per_chunk
    }
}

/// The streaming op of a traversal launch.
#[derive(Clone, Copy, PartialEq, Eq)]
enum StreamOp {
    SumSq,
    Grad,
    SumSqGrad,
}

impl StreamOp {
    fn name(self) -> &'static str {
        match self {
            StreamOp::SumSq => "sumsq",
            StreamOp::Grad => "grad",
            StreamOp::SumSqGrad => "sumsq_grad",
        }
    }
}

/// One traversal launch over up to MAX_SEGMENTS problems.
fn traversal_kernel(
    gpu: &Gpu,
    launches: Launches,
    problems: &[&Planned],
    dtype: Dtype,
    op: StreamOp,
) -> Result<KernelTime> {
    let sms = gpu.multiprocessors as usize;
    let chunks: usize = problems.iter().map(|p| p.traversal.blocks).sum();
    let grid = traversal_grid(chunks, Some(gpu.multiprocessors)).max(1);
    let elt = dtype.bytes() as f64;
    let elements: f64 = problems.iter().map(|p| p.elements()).sum();
    let bytes: f64 = problems
        .iter()
        .map(|p| match op {
            // Read mean and target; write a partial per slot.
            StreamOp::SumSq => 2.0 * p.elements() * elt + p.partial_bytes(dtype),
            // Read mean and target and the channel table; write the gradient of mean.
            StreamOp::Grad => {
                3.0 * p.elements() * elt + 2.0 * p.channels() as f64 * dtype.acc_bytes()
            }
            // Both: the gradient and a partial per slot.
            StreamOp::SumSqGrad => {
                3.0 * p.elements() * elt
                    + p.partial_bytes(dtype)
                    + 2.0 * p.channels() as f64 * dtype.acc_bytes()
            }
        })
        .sum();
    // Little's law: the resident blocks' loads in flight over the DRAM latency bound the
    // bandwidth a small grid can use (launch bounds: at least 2 blocks of 256 per SM).
    let resident = grid.min(sms * BLOCKS_PER_SM) * BLOCK as usize;
    let in_flight = (resident * PACKS_IN_FLIGHT * 2 * 16) as f64;
    let bandwidth = gpu
        .bytes_per_us()
        .min(in_flight / (gpu.dram_latency_ns * 1e-3));
    let per_iteration = loop_instructions(op.name(), dtype, gpu.arch)? as f64;
    let per_element = per_iteration / (PACKS_IN_FLIGHT * dtype.pack()) as f64;
    let warp_instructions =
        elements * per_element / 32.0 + (chunks * WARPS) as f64 * CHUNK_OVERHEAD_INSTRUCTIONS;
    let active_sms = grid.min(sms) as f64;
    Ok(KernelTime {
        kernel: format!("vid_{}_group_{}", op.name(), dtype.suffix()),
        grid,
        bytes,
        warp_instructions,
        fp64_ops: 0.0,
        launch_us: launches.overhead_us(),
        memory_us: bytes / bandwidth,
        issue_us: warp_instructions / (gpu.issue_per_sm_clock * gpu.clocks_per_us() * active_sms),
        fp64_us: 0.0,
        // The first loads' round trip before the stream flows, the last stores' after.
        chain_us: gpu.dram_latency_ns * 1e-3,
        epilogue_us: 0.0,
    })
}

/// The dependent chain of a thread computing `iterations` channels one after another (one
/// for the O(C) kernels and the combine's loss terms: a thread per channel), each a load
/// round trip of `latency_ns` and the channel's dependent FP64 operations.
fn fp64_chain_us(gpu: &Gpu, ops_per_channel: f64, iterations: f64, latency_ns: f64) -> f64 {
    let chain_clocks = ops_per_channel * FP64_DEPENDENT_FRACTION * FP64_LATENCY_CLOCKS;
    iterations * (latency_ns * 1e-3 + chain_clocks / gpu.clocks_per_us())
}

/// The combine over up to MAX_SEGMENTS problems: a first launch summing runs of chunks in
/// parallel when some problem's combine splits, then the last launch, whose blocks also
/// compute each channel's loss term in FP64 and whose last block adds the terms.
fn combine_kernels(
    gpu: &Gpu,
    launches: Launches,
    problems: &[&Planned],
    dtype: Dtype,
) -> Vec<KernelTime> {
    let acc = dtype.acc_bytes();
    let resident = gpu.multiprocessors as usize * COMBINE_BLOCKS_PER_SM;
    let walk = |problems: &[&Planned], runs: bool, bytes: f64| {
        let grid: usize = problems.iter().map(|p| p.combine_blocks(runs)).sum();
        let rounds = problems
            .iter()
            .map(|p| p.combine_rounds(runs))
            .fold(0.0, f64::max);
        let waves = grid.div_ceil(resident) as f64;
        KernelTime {
            kernel: "vid_channel_sum_group".into(),
            grid,
            bytes,
            warp_instructions: 0.0,
            fp64_ops: 0.0,
            launch_us: launches.overhead_us(),
            memory_us: bytes / gpu.bytes_per_us(),
            issue_us: 0.0,
            fp64_us: 0.0,
            // The walk, wave after wave; the last launch adds the last-block ticket (a fence
            // and an atomic).
            chain_us: (waves * rounds * gpu.dram_latency_ns
                + if runs { 0.0 } else { gpu.l2_latency_ns })
                * 1e-3,
            epilogue_us: 0.0,
        }
    };
    let mut kernels = Vec::new();
    let split: Vec<&Planned> = problems
        .iter()
        .copied()
        .filter(|p| p.combine_splits())
        .collect();
    if !split.is_empty() {
        // Partials read, the runs' sums written.
        let bytes = split
            .iter()
            .map(|p| p.partial_bytes(dtype) + p.traversal.run_slots(p.channels()) as f64 * acc)
            .sum();
        kernels.push(walk(&split, true, bytes));
    }
    // The partials (or the runs' sums) read; per channel, the sum written and log_scale read,
    // the f64 term written and read by the epilogue.
    let bytes = problems
        .iter()
        .map(|p| {
            let (outer, inner) = p.combine_partials();
            (outer * inner * p.channels()) as f64 * acc + p.channels() as f64 * (2.0 * acc + 16.0)
        })
        .sum();
    let mut last = walk(problems, false, bytes);
    let channels: f64 = problems.iter().map(|p| p.channels() as f64).sum();
    last.fp64_ops = channels * (LOSS_TERM_FP64_PER_CHANNEL + 1.0);
    // The terms: the FP64 units of the SMs the grid occupies, and each block's lanes one
    // channel each (one dependent chain) before the ticket.
    let active_sms = last.grid.min(gpu.multiprocessors as usize) as f64;
    last.fp64_us = channels * LOSS_TERM_FP64_PER_CHANNEL
        / (gpu.fp64_per_sm_clock * gpu.clocks_per_us() * active_sms);
    last.chain_us += fp64_chain_us(gpu, LOSS_TERM_FP64_PER_CHANNEL, 1.0, gpu.l2_latency_ns);
    // The last block adds every term: one DADD per channel on one SM, each thread's adds a
    // dependent chain; then the block sum and the loss store, one more L2 round trip.
    for p in problems {
        let c = p.channels() as f64;
        let throughput = c / (gpu.fp64_per_sm_clock * gpu.clocks_per_us());
        let iterations = p.channels().div_ceil(BLOCK as usize) as f64;
        let chain = iterations * FP64_LATENCY_CLOCKS / gpu.clocks_per_us();
        last.epilogue_us += throughput.max(chain) + 2.0 * gpu.l2_latency_ns * 1e-3;
    }
    kernels.push(last);
    kernels
}

/// An O(C) launch, one thread per channel over C/256 blocks per problem, up to
/// MAX_SEGMENTS problems: `vid_log_scale_grad_group` (Q_c and log_scale read; the grad
/// op's table, two entries, and the gradient written: 5 values per channel) or
/// `vid_channel_table_group` (log_scale read, the table written: 3).
fn per_channel_kernel(
    gpu: &Gpu,
    launches: Launches,
    problems: &[&Planned],
    dtype: Dtype,
    kernel: &str,
) -> KernelTime {
    let (values, fp64_per_channel) = if kernel == "vid_log_scale_grad_group" {
        (5.0, LOG_SCALE_GRAD_FP64_PER_CHANNEL)
    } else {
        (3.0, TABLE_FP64_PER_CHANNEL)
    };
    let grid: usize = problems
        .iter()
        .map(|p| p.channels().div_ceil(BLOCK as usize).clamp(1, MAX_GRID_Y))
        .sum();
    let channels: f64 = problems.iter().map(|p| p.channels() as f64).sum();
    let bytes = values * channels * dtype.acc_bytes();
    let fp64_ops = channels * fp64_per_channel;
    let active_sms = grid.min(gpu.multiprocessors as usize) as f64;
    KernelTime {
        kernel: kernel.into(),
        grid,
        bytes,
        warp_instructions: 0.0,
        fp64_ops,
        launch_us: launches.overhead_us(),
        memory_us: bytes / gpu.bytes_per_us(),
        issue_us: 0.0,
        fp64_us: fp64_ops / (gpu.fp64_per_sm_clock * gpu.clocks_per_us() * active_sms),
        // One channel per thread: its loads (DRAM), its dependent FP64 ops, its stores.
        chain_us: fp64_chain_us(gpu, fp64_per_channel, 1.0, gpu.dram_latency_ns),
        epilogue_us: 0.0,
    }
}

/// The one-pass backward's grad launch: the grid of a grad traversal whose blocks read the
/// upstream gradient, find it equal to 1 and skip each of their chunks.
fn skipped_grad_kernel(
    gpu: &Gpu,
    launches: Launches,
    problems: &[&Planned],
    dtype: Dtype,
) -> KernelTime {
    let chunks: usize = problems.iter().map(|p| p.traversal.blocks).sum();
    let grid = traversal_grid(chunks, Some(gpu.multiprocessors)).max(1);
    let per_block = chunks.div_ceil(grid) as f64;
    KernelTime {
        kernel: format!("vid_grad_group_{}", dtype.suffix()),
        grid,
        bytes: 0.0,
        warp_instructions: 0.0,
        fp64_ops: 0.0,
        launch_us: launches.overhead_us(),
        memory_us: 0.0,
        issue_us: 0.0,
        fp64_us: 0.0,
        // The upstream gradient's first load, then the block's chunks one after another.
        chain_us: gpu.l2_latency_ns * 1e-3
            + per_block * SKIP_CLOCKS_PER_CHUNK / gpu.clocks_per_us(),
        epilogue_us: 0.0,
    }
}

/// Predicts one pass of a call over `shapes` (one problem, or the terms of a grouped call)
/// of one dtype, Mean or Sum reduction, with the gradients of mean and log_scale wanted.
/// Errors for a shape the plan rejects (or no shape).
pub fn predict(
    gpu: &Gpu,
    shapes: &[Shape],
    dtype: Dtype,
    pass: Pass,
    launches: Launches,
) -> Result<PassTime> {
    if shapes.is_empty() {
        return Err(VidError::invalid("shapes", "no problem to model"));
    }
    let planned = shapes
        .iter()
        .map(|s| Planned::new(s, dtype))
        .collect::<Result<Vec<_>>>()?;
    let mut kernels = Vec::new();
    // The plan launches each kernel once per MAX_SEGMENTS problems of a dtype.
    let chunks: Vec<Vec<&Planned>> = planned
        .chunks(MAX_SEGMENTS)
        .map(|c| c.iter().collect())
        .collect();
    let log_scale = "vid_log_scale_grad_group";
    match pass {
        Pass::Forward | Pass::OnePassForward => {
            let op = if pass == Pass::Forward {
                StreamOp::SumSq
            } else {
                for chunk in &chunks {
                    let table = "vid_channel_table_group";
                    kernels.push(per_channel_kernel(gpu, launches, chunk, dtype, table));
                }
                StreamOp::SumSqGrad
            };
            for chunk in &chunks {
                kernels.push(traversal_kernel(gpu, launches, chunk, dtype, op)?);
            }
            for chunk in &chunks {
                kernels.extend(combine_kernels(gpu, launches, chunk, dtype));
            }
        }
        Pass::Backward | Pass::OnePassBackward => {
            for chunk in &chunks {
                kernels.push(per_channel_kernel(gpu, launches, chunk, dtype, log_scale));
            }
            for chunk in &chunks {
                kernels.push(if pass == Pass::Backward {
                    traversal_kernel(gpu, launches, chunk, dtype, StreamOp::Grad)?
                } else {
                    skipped_grad_kernel(gpu, launches, chunk, dtype)
                });
            }
        }
    }
    let elements: f64 = planned.iter().map(|p| p.elements()).sum();
    let floor_bytes = pass.floor_tensors() * elements * dtype.bytes() as f64;
    let time_us: f64 = kernels.iter().map(KernelTime::total_us).sum();
    Ok(PassTime {
        pass,
        kernels,
        floor_bytes,
        time_us,
        copy_fraction: floor_bytes / gpu.bytes_per_us() / time_us,
    })
}

// ---- the table ------------------------------------------------------------------------------

/// One row of the predicted table: a call over one or more problems of one dtype.
#[derive(Debug, Clone, PartialEq)]
pub struct Case {
    /// The call's problems (several: one grouped call).
    pub shapes: Vec<Shape>,
    /// Their dtype.
    pub dtype: Dtype,
}

impl Case {
    /// `4x[128x64x8x8]` for a grouped call, else the shape.
    pub fn label(&self) -> String {
        let first = self.shapes[0].label();
        if self.shapes.len() > 1 && self.shapes.iter().all(|s| s.dims == self.shapes[0].dims) {
            format!("{}x[{first}]", self.shapes.len())
        } else {
            let labels: Vec<String> = self.shapes.iter().map(Shape::label).collect();
            labels.join(" + ")
        }
    }

    /// `NCHW`, `channels-last`, or `-` without spatial dimensions.
    pub fn layout(&self) -> &'static str {
        match (self.shapes[0].has_spatial(), self.shapes[0].channels_last) {
            (false, _) => "-",
            (true, false) => "NCHW",
            (true, true) => "channels-last",
        }
    }

    /// Elements of every problem together.
    pub fn elements(&self) -> usize {
        self.shapes.iter().map(Shape::elements).sum()
    }

    /// Predicts one pass of this call.
    pub fn predict(&self, gpu: &Gpu, pass: Pass, launches: Launches) -> Result<PassTime> {
        predict(gpu, &self.shapes, self.dtype, pass, launches)
    }
}

/// The problems of the table (the issue's shapes); `[..]` repeated 4 times is one grouped
/// call.
pub const TABLE_SHAPES: [(&[usize], usize); 7] = [
    (&[64, 256, 32, 32], 1),
    (&[256, 512, 8, 8], 1),
    (&[1024, 256, 56, 56], 1),
    (&[4096, 1000], 1),
    (&[8192, 32000], 1),
    (&[128, 64, 8, 8], 4),
    (&[64, 10], 1),
];

/// Every case of the table: each shape in f32 and bf16, NCHW and channels-last where it has
/// spatial dimensions.
pub fn table_cases() -> Vec<Case> {
    let mut cases = Vec::new();
    for (dims, count) in TABLE_SHAPES {
        let layouts: &[bool] = if dims.len() > 2 {
            &[false, true]
        } else {
            &[false]
        };
        for dtype in [Dtype::F32, Dtype::Bf16] {
            for &channels_last in layouts {
                let shape = Shape {
                    dims: dims.to_vec(),
                    channels_last,
                };
                cases.push(Case {
                    shapes: vec![shape; count],
                    dtype,
                });
            }
        }
    }
    cases
}

/// Elements from which the goal is >= 90% of copy bandwidth (16M).
pub const LARGE_ELEMENTS: usize = 1 << 24;

/// The goal for large cases: this fraction of copy bandwidth, forward and backward.
pub const LARGE_GOAL: f64 = 0.9;

/// The goal for small cases: within this factor of launch overhead plus bytes.
pub const SMALL_GOAL: f64 = 2.0;

/// Microseconds with three significant digits.
fn us(t: f64) -> String {
    if t >= 100.0 {
        format!("{t:.0}")
    } else if t >= 10.0 {
        format!("{t:.1}")
    } else {
        format!("{t:.2}")
    }
}

/// A fraction as a whole percentage, rounded down (so that a miss of 90% never reads 90%).
fn percent(fraction: f64) -> String {
    format!("{}%", (100.0 * fraction).floor())
}

/// `predicted / (launch overhead + floor bytes / copy bandwidth)` of a pass: how far a small
/// case is from the launch-and-bytes reference.
pub fn small_case_ratio(gpu: &Gpu, time: &PassTime) -> f64 {
    time.time_us / (time.launch_us() + time.floor_bytes / gpu.bytes_per_us())
}

/// The predicted table in Markdown: for every case and modelled GPU, forward and backward
/// time (us) and the fraction of copy bandwidth; then the goals' status on H100 and A100
/// (host launches and CUDA-graph replay), the small cases against launch overhead + bytes,
/// the dominant extra term of every large case that misses its goal, and the time of a
/// training step on the two-pass and the one-pass path.
pub fn render_table() -> Result<String> {
    let mut out = String::new();
    let passes = [Pass::Forward, Pass::Backward];
    let cases = table_cases();

    out += "Host launches (3 us each). Each cell: predicted us / % of copy bandwidth.\n\n";
    out += "| case | dtype | layout | elements |";
    for gpu in GPUS {
        let _ = write!(out, " {} fwd | {} bwd |", gpu.name, gpu.name);
    }
    out += "\n|---|---|---|---|";
    out += &"---|---|".repeat(GPUS.len());
    out += "\n";
    for case in &cases {
        let _ = write!(
            out,
            "| {} | {} | {} | {} |",
            case.label(),
            case.dtype.suffix(),
            case.layout(),
            case.elements()
        );
        for gpu in GPUS {
            for pass in passes {
                let t = case.predict(&gpu, pass, Launches::Host)?;
                let _ = write!(out, " {} / {} |", us(t.time_us), percent(t.copy_fraction));
            }
        }
        out += "\n";
    }

    out += "\nGoal 1: every case of >= 16M elements at >= 90% of copy bandwidth on H100 and \
            A100, forward and backward (% of copy bandwidth; host launches / CUDA graph):\n\n";
    out += "| case | dtype | layout | H100 fwd | H100 bwd | A100 fwd | A100 bwd |\n";
    out += "|---|---|---|---|---|---|---|\n";
    let mut misses = Vec::new();
    for case in cases.iter().filter(|c| c.elements() >= LARGE_ELEMENTS) {
        let _ = write!(
            out,
            "| {} | {} | {} |",
            case.label(),
            case.dtype.suffix(),
            case.layout()
        );
        for gpu in [H100, A100] {
            for pass in passes {
                let host = case.predict(&gpu, pass, Launches::Host)?;
                let graph = case.predict(&gpu, pass, Launches::Graph)?;
                let mark = if host.copy_fraction >= LARGE_GOAL {
                    ""
                } else {
                    misses.push(describe_miss(&gpu, case, &host));
                    " (miss)"
                };
                let _ = write!(
                    out,
                    " {} / {}{mark} |",
                    percent(host.copy_fraction),
                    percent(graph.copy_fraction)
                );
            }
        }
        out += "\n";
    }
    if !misses.is_empty() {
        out += "\nWhere the misses lose their time (host launches):\n\n";
        for m in &misses {
            let _ = writeln!(out, "- {m}");
        }
    }

    out += "\nGoal 2: cases below 16M elements within 2x of launch overhead + bytes at copy \
            bandwidth (predicted / that reference; host launches):\n\n";
    out += "| case | dtype | layout |";
    for gpu in GPUS {
        let _ = write!(out, " {} fwd | {} bwd |", gpu.name, gpu.name);
    }
    out += "\n|---|---|---|";
    out += &"---|---|".repeat(GPUS.len());
    out += "\n";
    for case in cases.iter().filter(|c| c.elements() < LARGE_ELEMENTS) {
        let _ = write!(
            out,
            "| {} | {} | {} |",
            case.label(),
            case.dtype.suffix(),
            case.layout()
        );
        for gpu in GPUS {
            for pass in passes {
                let t = case.predict(&gpu, pass, Launches::Host)?;
                let ratio = small_case_ratio(&gpu, &t);
                let mark = if ratio <= SMALL_GOAL { "" } else { " (miss)" };
                let _ = write!(out, " {ratio:.2}x{mark} |");
            }
        }
        out += "\n";
    }

    out += "\nTraining step (forward + backward, host launches): the two-pass path -> the \
            one-pass path (the default with grad mode on), us, and the one-pass step's % of copy \
            bandwidth (its floor: reading 2 tensors and writing 1):\n\n";
    out += "| case | dtype | layout |";
    for gpu in GPUS {
        let _ = write!(out, " {} |", gpu.name);
    }
    out += "\n|---|---|---|";
    out += &"---|".repeat(GPUS.len());
    out += "\n";
    for case in &cases {
        let _ = write!(
            out,
            "| {} | {} | {} |",
            case.label(),
            case.dtype.suffix(),
            case.layout()
        );
        for gpu in GPUS {
            let step = |passes: [Pass; 2]| -> Result<(f64, f64)> {
                let (f, b) = (
                    case.predict(&gpu, passes[0], Launches::Host)?,
                    case.predict(&gpu, passes[1], Launches::Host)?,
                );
                Ok((f.time_us + b.time_us, f.floor_bytes + b.floor_bytes))
            };
            let (two, _) = step([Pass::Forward, Pass::Backward])?;
            let (one, floor) = step([Pass::OnePassForward, Pass::OnePassBackward])?;
            let fraction = floor / gpu.bytes_per_us() / one;
            let _ = write!(out, " {} -> {} ({}) |", us(two), us(one), percent(fraction));
        }
        out += "\n";
    }
    Ok(out)
}

/// One line on a pass that misses its goal: its fraction and the terms beyond streaming.
fn describe_miss(gpu: &Gpu, case: &Case, time: &PassTime) -> String {
    let pass = time.pass.name();
    let streaming: f64 = time
        .kernels
        .iter()
        .filter(|k| k.kernel.ends_with(case.dtype.suffix()))
        .map(|k| k.memory_us.max(k.issue_us))
        .sum();
    let mut parts = vec![format!(
        "streaming {} us, launches {} us",
        us(streaming),
        us(time.launch_us())
    )];
    for k in &time.kernels {
        if k.kernel == "vid_channel_sum_group" {
            parts.push(format!(
                "combine chain {} us over {} blocks",
                us(k.chain_us),
                k.grid
            ));
            if k.epilogue_us > 0.0 {
                parts.push(format!("epilogue {} us", us(k.epilogue_us)));
            }
        } else if k.kernel == "vid_log_scale_grad_group" {
            parts.push(format!(
                "log_scale gradient {} us",
                us(k.memory_us.max(k.fp64_us) + k.chain_us)
            ));
        }
    }
    let layout = match case.layout() {
        "-" => String::new(),
        layout => format!(" {layout}"),
    };
    format!(
        "{} {pass}, {} {}{layout}: {} of {} us ({})",
        gpu.name,
        case.label(),
        case.dtype.suffix(),
        percent(time.copy_fraction),
        us(time.time_us),
        parts.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use std::ffi::c_void;
    use std::path::PathBuf;
    use std::process::Command;
    use std::sync::{Arc, Mutex};

    use tch::{Device, Tensor};

    use super::super::launcher::{KernelLauncher, LaunchConfig};
    use super::super::nvrtc::{compile_part, KernelPart, Target};
    use super::super::plan::traffic::traffic;
    use super::*;
    use crate::backend::Backend;
    use crate::options::VidOptions;
    use crate::VidTerm;

    const PASSES: [Pass; 4] = [
        Pass::Forward,
        Pass::Backward,
        Pass::OnePassForward,
        Pass::OnePassBackward,
    ];

    fn shapes(dims: &[usize], channels_last: bool, count: usize) -> Vec<Shape> {
        vec![
            Shape {
                dims: dims.to_vec(),
                channels_last,
            };
            count
        ]
    }

    fn host(gpu: &Gpu, dims: &[usize], channels_last: bool, dtype: Dtype, pass: Pass) -> PassTime {
        predict(
            gpu,
            &shapes(dims, channels_last, 1),
            dtype,
            pass,
            Launches::Host,
        )
        .unwrap()
    }

    fn kernel<'a>(t: &'a PassTime, name: &str) -> &'a KernelTime {
        t.kernels
            .iter()
            .find(|k| k.kernel == name)
            .unwrap_or_else(|| panic!("no {name} in {t:?}"))
    }

    /// The bytes of every pass add up to the plan's own traffic count (plan.rs tests:
    /// inputs and outputs once, partials written and read, per-channel arrays once each).
    #[test]
    fn model_bytes_equal_the_plans_traffic() {
        for case in table_cases().iter().filter(|c| c.shapes.len() == 1) {
            let geometry = case.shapes[0].geometry().unwrap();
            let (forward, backward, _) = traffic(&geometry, case.dtype.kind());
            for gpu in GPUS {
                let f = case.predict(&gpu, Pass::Forward, Launches::Host).unwrap();
                let b = case.predict(&gpu, Pass::Backward, Launches::Host).unwrap();
                let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * b;
                assert!(
                    close(f.bytes(), forward),
                    "{case:?}: {} vs {forward}",
                    f.bytes()
                );
                assert!(
                    close(b.bytes(), backward),
                    "{case:?}: {} vs {backward}",
                    b.bytes()
                );
            }
        }
    }

    /// A large pure streaming case (NCHW, the warp traversal's few partials) comes within a
    /// few percent of the bandwidth bound on every GPU, and bandwidth limits its traversal.
    #[test]
    fn model_large_streaming_approaches_the_bandwidth_bound() {
        for gpu in GPUS {
            for dtype in [Dtype::F32, Dtype::Bf16] {
                for pass in [Pass::Forward, Pass::Backward, Pass::OnePassForward] {
                    let t = host(&gpu, &[4096, 256, 64, 64], false, dtype, pass);
                    assert!(
                        t.copy_fraction > 0.95 && t.copy_fraction <= 1.0,
                        "{} {dtype:?} {pass:?}: {t:?}",
                        gpu.name
                    );
                    let streaming = &t.kernels[if pass == Pass::Forward { 0 } else { 1 }];
                    assert!(streaming.kernel.ends_with(dtype.suffix()), "{streaming:?}");
                    assert_eq!(streaming.limiter(), "bandwidth", "{streaming:?}");
                }
                // The backward after a one-pass forward streams nothing: under 1% of the
                // two-pass backward.
                let dims = [4096, 256, 64, 64];
                let t = host(&gpu, &dims, false, dtype, Pass::OnePassBackward);
                let two_pass = host(&gpu, &dims, false, dtype, Pass::Backward);
                assert!(t.time_us < 0.01 * two_pass.time_us, "{t:?}");
            }
        }
    }

    /// A tiny case is launch-bound: launches are most of the time, and the prediction is
    /// within 2x of launch overhead + bytes.
    #[test]
    fn model_tiny_case_is_launch_bound() {
        for gpu in GPUS {
            for pass in PASSES {
                let t = host(&gpu, &[64, 10], false, Dtype::F32, pass);
                assert!(t.kernels.len() >= 2);
                assert!(
                    t.launch_us() > 0.6 * t.time_us,
                    "{} {pass:?}: {t:?}",
                    gpu.name
                );
                for k in &t.kernels {
                    assert_eq!(k.limiter(), "launch", "{k:?}");
                }
                assert!(small_case_ratio(&gpu, &t) < SMALL_GOAL, "{t:?}");
                assert!(t.copy_fraction < 0.01);
            }
        }
    }

    /// The loss terms' FP64 work runs in the combine's blocks, over every SM, and the
    /// epilogue's one block only adds them: on sm_89 (2 FP64 ops per SM per clock), where the
    /// single-block loop cost about 0.8 ms at C = 32000 (25 us at C = 1000), the epilogue
    /// now costs under 10 us, the combine is not FP64-bound, and the case meets the
    /// bandwidth goal.
    #[test]
    fn model_loss_terms_spread_over_the_combine() {
        for gpu in [RTX_4090, L4, H100, A100] {
            for dtype in [Dtype::F32, Dtype::Bf16] {
                let big = host(&gpu, &[8192, 32000], false, dtype, Pass::Forward);
                let combine = kernel(&big, "vid_channel_sum_group");
                let case = format!("{} {dtype:?}: {combine:?}", gpu.name);
                assert!(combine.epilogue_us < 10.0, "{case}");
                assert!(combine.fp64_us < combine.memory_us, "{case}");
                assert!(big.copy_fraction >= LARGE_GOAL, "{case}\n{big:?}");
                let small = host(&gpu, &[4096, 1000], false, dtype, Pass::Forward);
                let epilogue = kernel(&small, "vid_channel_sum_group").epilogue_us;
                assert!(epilogue < 2.0, "{} {dtype:?}: {epilogue}", gpu.name);
            }
        }
    }

    /// [1024, 256, 56, 56] channels-last has 49x more chunks per channel than NCHW (the tile
    /// traversal's 64-row chunks against one warp per NCHW row): one combine block per 32
    /// channels walking all of them took 1,568 dependent round trips per warp. The split
    /// combine sums runs of 256 chunks in parallel, then the runs: a few round trips per
    /// launch, a small part of the pass, and the layouts within 10% of each other.
    #[test]
    fn model_split_combine_keeps_channels_last_near_nchw() {
        for gpu in GPUS {
            for dtype in [Dtype::F32, Dtype::Bf16] {
                let dims = [1024, 256, 56, 56];
                let nchw = host(&gpu, &dims, false, dtype, Pass::Forward);
                let last = host(&gpu, &dims, true, dtype, Pass::Forward);
                let combines: Vec<&KernelTime> = last
                    .kernels
                    .iter()
                    .filter(|k| k.kernel == "vid_channel_sum_group")
                    .collect();
                let case = format!("{} {dtype:?}: {combines:?}", gpu.name);
                assert_eq!(combines.len(), 2, "{case}");
                // The serial walk was about a third of the pass on H100.
                for k in &combines {
                    assert!(k.chain_us < 0.02 * last.time_us, "{case}");
                }
                assert!(
                    last.time_us < 1.1 * nchw.time_us,
                    "{case}\n{nchw:?}\n{last:?}"
                );
                if gpu == H100 || gpu == A100 {
                    assert!(last.copy_fraction >= LARGE_GOAL, "{case}\n{last:?}");
                }
            }
        }
    }

    /// More elements never predict less time, along N for every table shape, both layouts,
    /// both dtypes and passes, on every GPU; up to the combine's remainder loop: a warp walks
    /// 4 chunks per round trip only while 4 remain, so 32 chunks per channel take one round
    /// trip and 16 take two (the kernel does this too), a difference of at most 3 round trips.
    #[test]
    fn model_time_grows_with_size() {
        for gpu in GPUS {
            let slack = 3.0 * gpu.dram_latency_ns * 1e-3;
            for (dims, _) in TABLE_SHAPES {
                for channels_last in [false, true] {
                    for dtype in [Dtype::F32, Dtype::Bf16] {
                        for pass in PASSES {
                            let (mut previous, mut previous_bytes) = (0.0, 0.0);
                            for n in [1, 2, 3, 5, 8, 16, 33, 64, 100, 128, 256, 1000, 1024, 4096] {
                                let mut d = dims.to_vec();
                                d[0] = n;
                                let t = host(&gpu, &d, channels_last, dtype, pass);
                                let case = format!(
                                    "{} {d:?} {channels_last} {dtype:?} {pass:?}",
                                    gpu.name
                                );
                                assert!(t.time_us >= previous - slack, "{case}: {t:?}");
                                if pass != Pass::OnePassBackward {
                                    assert!(t.bytes() > previous_bytes, "{case}: {t:?}");
                                }
                                previous = t.time_us;
                                previous_bytes = t.bytes();
                            }
                        }
                    }
                }
            }
        }
    }

    /// Records the launches a call makes, launching nothing.
    struct Recorder {
        multiprocessors: u32,
        launched: Mutex<Vec<(String, usize)>>,
    }

    impl KernelLauncher for Recorder {
        fn launch(&self, kernel: &str, config: LaunchConfig, _: &mut [*mut c_void]) -> Result<()> {
            let grid = config.grid.iter().map(|&g| g as usize).product();
            self.launched
                .lock()
                .unwrap()
                .push((kernel.to_string(), grid));
            Ok(())
        }

        fn multiprocessor_count(&self) -> Result<Option<u32>> {
            Ok(Some(self.multiprocessors))
        }
    }

    impl Recorder {
        fn take(&self) -> Vec<(String, usize)> {
            std::mem::take(&mut *self.launched.lock().unwrap())
        }
    }

    fn uninitialised(shape: &Shape, kind: Kind) -> Tensor {
        let dims: Vec<i64> = shape.dims.iter().map(|&d| d as i64).collect();
        if shape.channels_last && shape.has_spatial() {
            // [N, *S, C] permuted to [N, C, *S]: channels-last strides.
            let mut last = vec![dims[0]];
            last.extend(&dims[2..]);
            last.push(dims[1]);
            let mut order = vec![0i64, dims.len() as i64 - 1];
            order.extend(1..dims.len() as i64 - 1);
            Tensor::empty(&last[..], (kind, Device::Cpu)).permute(&order[..])
        } else {
            Tensor::empty(&dims[..], (kind, Device::Cpu))
        }
    }

    /// The launches and grids the model predicts are those the plan makes: every case of
    /// the table small enough to allocate here (plus smaller versions of the others), run
    /// through the real op with a launcher that records instead of launching, with each
    /// modelled GPU's SM count.
    #[test]
    fn model_launches_follow_the_plan() {
        let mut cases: Vec<Case> = table_cases()
            .into_iter()
            .filter(|c| c.elements() <= 1 << 22)
            .collect();
        for (dims, last) in [
            (vec![2, 64, 56, 56], false),
            (vec![2, 64, 56, 56], true),
            (vec![16, 256, 32, 32], false),
            (vec![16, 256, 32, 32], true),
            (vec![64, 512, 8, 8], true),
            // f32: 512 chunks, a split combine (two launches).
            (vec![32, 256, 32, 32], true),
            (vec![256, 3200], false),
        ] {
            for dtype in [Dtype::F32, Dtype::Bf16] {
                cases.push(Case {
                    shapes: vec![Shape {
                        dims: dims.clone(),
                        channels_last: last,
                    }],
                    dtype,
                });
            }
        }
        // No gradients written in the forward (the two-pass path), and written (the default
        // one-pass path, whose backward receives an upstream gradient of 1).
        let paths = [
            (false, Pass::Forward, Pass::Backward),
            (true, Pass::OnePassForward, Pass::OnePassBackward),
        ];
        for case in &cases {
            let tensors: Vec<(Tensor, Tensor, Tensor)> = case
                .shapes
                .iter()
                .map(|s| {
                    let mean = uninitialised(s, case.dtype.kind()).set_requires_grad(true);
                    let target = uninitialised(s, case.dtype.kind());
                    let log_scale = Tensor::zeros([s.dims[1] as i64], (Kind::Float, Device::Cpu))
                        .set_requires_grad(true);
                    (mean, target, log_scale)
                })
                .collect();
            for (gpu, (one_pass, forward_pass, backward_pass)) in
                GPUS.iter().flat_map(|g| paths.map(|p| (g, p)))
            {
                let opts = VidOptions::default().gradients_in_forward(one_pass);
                let recorder = Arc::new(Recorder {
                    multiprocessors: gpu.multiprocessors,
                    launched: Mutex::new(Vec::new()),
                });
                let backend = Some(Backend::Launcher(recorder.clone()));
                let loss = if tensors.len() == 1 {
                    let (m, t, l) = &tensors[0];
                    crate::op::vid_loss_on(backend, m, t, l, &opts)
                } else {
                    let terms: Vec<VidTerm<'_>> = tensors
                        .iter()
                        .map(|(mean, target, log_scale)| VidTerm {
                            mean,
                            target,
                            log_scale,
                            weight: 1.0,
                        })
                        .collect();
                    crate::op::vid_loss_grouped_on(backend, &terms, &opts)
                }
                .unwrap();
                let forward = recorder.take();
                let inputs: Vec<&Tensor> = tensors.iter().flat_map(|(m, _, l)| [m, l]).collect();
                // The upstream gradient of a scalar loss: exactly 1.
                let _ = Tensor::run_backward(&[loss], &inputs, false, false);
                let backward = recorder.take();
                for (pass, recorded) in [(forward_pass, forward), (backward_pass, backward)] {
                    let predicted: Vec<(String, usize)> = case
                        .predict(gpu, pass, Launches::Host)
                        .unwrap()
                        .kernels
                        .iter()
                        .map(|k| (k.kernel.clone(), k.grid))
                        .collect();
                    assert_eq!(
                        predicted,
                        recorded,
                        "{} {} {} {} {pass:?}",
                        gpu.name,
                        case.label(),
                        case.dtype.suffix(),
                        case.layout()
                    );
                }
            }
        }
    }

    // ---- the SASS behind the constants ------------------------------------------------------

    /// `cuobjdump` next to the torch this crate was built with (scripts/setup.sh installs it).
    fn cuobjdump() -> PathBuf {
        let lib = PathBuf::from(env!("VIDFUSE_LIBTORCH_LIB"));
        let path = lib.join("../../triton/backends/nvidia/bin/cuobjdump");
        assert!(
            path.exists(),
            "cuobjdump not found at {} (the torch wheel's triton package brings it: run \
             scripts/setup.sh)",
            path.display()
        );
        path
    }

    /// One SASS instruction: its address and text (opcode and operands, predicate included).
    struct Instruction {
        address: u64,
        text: String,
    }

    impl Instruction {
        /// The opcode, without a predicate guard (`@P0`, `@!PT`).
        fn opcode(&self) -> &str {
            let text = self.text.trim_start();
            let text = match text.strip_prefix('@') {
                Some(rest) => rest.split_once(' ').map_or(rest, |(_, r)| r).trim_start(),
                None => text,
            };
            text.split_whitespace().next().unwrap_or("")
        }

        /// The target of a branch to an earlier (or the same) address: a loop's back edge.
        fn back_edge(&self) -> Option<u64> {
            if !self.opcode().starts_with("BRA") {
                return None;
            }
            let target = self
                .text
                .split([' ', ','])
                .filter_map(|t| t.strip_prefix("0x"))
                .next_back()?;
            let target = u64::from_str_radix(target, 16).ok()?;
            (target <= self.address).then_some(target)
        }

        fn is_fp64(&self) -> bool {
            let opcode = self.opcode();
            let base = opcode.split('.').next().unwrap_or("");
            matches!(
                base,
                "DADD" | "DMUL" | "DFMA" | "DSETP" | "DMNMX" | "DSET" | "DRSQ"
            ) || opcode.contains(".F64")
                || opcode.contains("64H")
        }
    }

    /// `(kernel, instructions)` of a CUBIN.
    fn disassemble(cubin: &[u8], tag: &str) -> Vec<(String, Vec<Instruction>)> {
        let dir = std::env::temp_dir().join(format!("vidfuse-model-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("vid.cubin");
        std::fs::write(&file, cubin).unwrap();
        let out = Command::new(cuobjdump())
            .arg("-sass")
            .arg(&file)
            .output()
            .expect("run cuobjdump");
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            out.status.success(),
            "cuobjdump failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut kernels: Vec<(String, Vec<Instruction>)> = Vec::new();
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some(name) = line.trim().strip_prefix("Function : ") {
                kernels.push((name.trim().to_string(), Vec::new()));
                continue;
            }
            // `        /*16c0*/   MOV R9, R50 ;   /* 0x... */`
            let Some((_, rest)) = line.trim_start().split_once("/*") else {
                continue;
            };
            let Some((address, rest)) = rest.split_once("*/") else {
                continue;
            };
            let (Ok(address), Some((text, _))) =
                (u64::from_str_radix(address, 16), rest.split_once(';'))
            else {
                continue;
            };
            if let Some((_, instructions)) = kernels.last_mut() {
                instructions.push(Instruction {
                    address,
                    text: text.trim().to_string(),
                });
            }
        }
        kernels
    }

    /// Every innermost loop of a kernel: the instructions from a back edge's target to the
    /// back edge, with no other back edge inside.
    fn innermost_loops(instructions: &[Instruction]) -> Vec<&[Instruction]> {
        let mut loops = Vec::new();
        for (end, branch) in instructions.iter().enumerate() {
            let Some(target) = branch.back_edge() else {
                continue;
            };
            let Some(begin) = instructions.iter().position(|i| i.address == target) else {
                continue;
            };
            let body = &instructions[begin..=end];
            if body[..body.len() - 1]
                .iter()
                .all(|i| i.back_edge().is_none())
            {
                loops.push(body);
            }
        }
        loops
    }

    /// The subroutines a kernel calls (its non-inlined device functions and the compiler's
    /// slow paths): `(address, instructions)` from each call target to the next one, or to
    /// the end of the listing.
    fn callees(instructions: &[Instruction]) -> Vec<(u64, &[Instruction])> {
        let mut targets: Vec<u64> = instructions
            .iter()
            .filter_map(|i| {
                let (_, rest) = i.text.split_once("CALL.")?;
                let target = rest.rsplit(' ').next()?.trim_start_matches("0x");
                u64::from_str_radix(target, 16).ok()
            })
            .collect();
        targets.sort_unstable();
        targets.dedup();
        let position = |address: u64| {
            instructions
                .iter()
                .position(|i| i.address >= address)
                .unwrap_or(instructions.len())
        };
        targets
            .iter()
            .enumerate()
            .map(|(k, &t)| {
                let end = targets
                    .get(k + 1)
                    .map_or(instructions.len(), |&n| position(n));
                (t, &instructions[position(t)..end])
            })
            .collect()
    }

    fn find<'a>(kernels: &'a [(String, Vec<Instruction>)], name: &str) -> &'a [Instruction] {
        &kernels
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("{name} not in the CUBIN"))
            .1
    }

    /// The constants of [`LOOP_INSTRUCTIONS`] are the SASS: for each streaming kernel the
    /// model uses, the longest innermost loop that loads 4 packs of each input (8 LDG.128)
    /// has exactly that many instructions.
    #[test]
    fn sass_loop_counts_match_the_cubin() {
        let mut report = String::new();
        let mut wrong = Vec::new();
        for arch in ["sm_80", "sm_89", "sm_90"] {
            for dtype in [Dtype::F32, Dtype::Bf16] {
                let compiled = compile_part(
                    &Target::Cubin(arch.into()),
                    KernelPart::Dtype(dtype.suffix()),
                )
                .unwrap_or_else(|e| panic!("{e}"));
                let kernels = disassemble(&compiled.cubin, &format!("{arch}-{}", dtype.suffix()));
                for op in [StreamOp::SumSq, StreamOp::Grad, StreamOp::SumSqGrad] {
                    let name = format!("vid_{}_group_{}", op.name(), dtype.suffix());
                    let longest = innermost_loops(find(&kernels, &name))
                        .iter()
                        .filter(|body| {
                            body.iter()
                                .filter(|i| {
                                    i.opcode().starts_with("LDG") && i.opcode().contains(".128")
                                })
                                .count()
                                == 2 * PACKS_IN_FLIGHT
                        })
                        .map(|body| body.len())
                        .max()
                        .unwrap_or_else(|| panic!("{arch} {name}: no unrolled loop"));
                    let _ = writeln!(
                        report,
                        "    (\"{}\", Dtype::{dtype:?}, \"{arch}\", {longest}),",
                        op.name()
                    );
                    if loop_instructions(op.name(), dtype, arch).unwrap() != longest as u32 {
                        wrong.push(format!("{arch} {name}: {longest}"));
                    }
                }
            }
        }
        println!("{report}");
        assert!(
            wrong.is_empty(),
            "LOOP_INSTRUCTIONS drifted from the SASS ({}); the counts now:\n{report}",
            wrong.join(", ")
        );
    }

    /// The per-channel FP64 constants lie within 40-100% (the channel table's: 30-100%) of the
    /// static FP64 instructions of the code they model: the loss term (the FP64-heaviest
    /// subroutine vid_channel_sum_group calls, `loss_term`), and the innermost loops of the
    /// log_scale gradient and of the channel table. The static count holds both branches of
    /// softplus and the special-value paths (the table's also the other kinds' logarithm and
    /// divisions), of which one channel takes a part. The epilogue's loop only adds the
    /// terms: a handful of FP64 instructions (the 120-per-channel loop it held ran in one
    /// block).
    #[test]
    fn sass_fp64_constants_fit_the_cubin() {
        let fp64 = |body: &[Instruction]| body.iter().filter(|i| i.is_fp64()).count() as f64;
        for arch in ["sm_89", "sm_90"] {
            let compiled = compile_part(&Target::Cubin(arch.into()), KernelPart::Common)
                .unwrap_or_else(|e| panic!("{e}"));
            let kernels = disassemble(&compiled.cubin, &format!("{arch}-common"));
            let combine = find(&kernels, "vid_channel_sum_group");
            let most_in_a_loop = |code: &[Instruction]| {
                innermost_loops(code)
                    .iter()
                    .map(|b| fp64(b))
                    .fold(0.0, f64::max)
            };
            let loss_term = callees(combine)
                .iter()
                .map(|(_, b)| fp64(b))
                .fold(0.0, f64::max);
            let epilogue_loop = most_in_a_loop(combine);
            println!("{arch}: loss_term {loss_term} FP64 instructions, the combine's loops {epilogue_loop} at most");
            assert!(
                epilogue_loop <= 24.0,
                "{arch}: {epilogue_loop} FP64 instructions in a loop of the combine"
            );
            for (name, constant, least, fp64) in [
                ("loss_term", LOSS_TERM_FP64_PER_CHANNEL, 0.4, loss_term),
                (
                    "vid_log_scale_grad_group",
                    LOG_SCALE_GRAD_FP64_PER_CHANNEL,
                    0.4,
                    most_in_a_loop(find(&kernels, "vid_log_scale_grad_group")),
                ),
                (
                    "vid_channel_table_group",
                    TABLE_FP64_PER_CHANNEL,
                    0.3,
                    most_in_a_loop(find(&kernels, "vid_channel_table_group")),
                ),
            ] {
                println!("{arch} {name}: {fp64} FP64 instructions");
                assert!(
                    (least * fp64..=fp64).contains(&constant),
                    "{arch} {name}: {constant} FP64 ops per channel against {fp64} in the SASS"
                );
            }
        }
        // The detector itself.
        let at = |text: &str| Instruction {
            address: 0x70,
            text: text.into(),
        };
        assert!(at("@!P0 DADD R2, R4, R6").is_fp64());
        assert!(at("F2F.F64.F32 R2, R4").is_fp64());
        assert!(!at("FADD R2, R4, R6").is_fp64());
        assert_eq!(at("@!P1 BRA 0x40").back_edge(), Some(0x40));
        assert_eq!(at("@!P0 BRA !P2, 0x60").back_edge(), Some(0x60));
        assert_eq!(at("BRA 0x80").back_edge(), None);
    }

    /// Renders the table, writes it to the temporary directory and prints it (`cargo test
    /// --lib model_table -- --nocapture`).
    #[test]
    fn model_table_renders() {
        let table = render_table().unwrap();
        // Every case in the main table, and each in one of the goals' tables; with headers.
        let cases = table_cases().len();
        assert_eq!(
            table.lines().filter(|l| l.starts_with("| ")).count(),
            (cases + 1) + (cases + 2) + (cases + 1),
            "{table}"
        );
        let path = std::env::temp_dir().join("perf-model.md");
        std::fs::write(&path, &table).unwrap();
        println!("{table}\n(written to {})", path.display());
    }
}
