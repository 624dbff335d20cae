//! The launch plan of the VID kernels: which kernels, with which grids, arguments and
//! workspaces, for a checked problem. Generic over [`KernelLauncher`]: the same code drives
//! the GPU and the host emulation of the tests. Every output and workspace is a tch tensor
//! on the problem's device, so PyTorch's caching allocator owns it; nothing here waits for
//! the device.

use std::ffi::c_void;

use tch::{Kind, Tensor};

use super::launcher::{KernelLauncher, LaunchConfig};
use crate::backend_io::{ForwardOutput, Grads, GroupForward, NeedsGrad};
use crate::error::{Result, VidError};
use crate::math::HALF_LN_TWO_PI;
use crate::options::Reduction;
use crate::validate::{Geometry, Layout, VidProblem};

/// Threads per block of every kernel (kernels/vid.cu: kBlock and __launch_bounds__).
const BLOCK: u32 = 256;
/// Warps per block in the warp traversal.
const WARPS_PER_BLOCK: u64 = BLOCK as u64 / 32;
/// NCHW rows at least this long use the warp traversal; shorter ones the tile traversal.
const WARP_MIN_ROW: usize = 512;
/// Elements per warp segment (a multiple of every pack width).
const WARP_SEGMENT: usize = 4096;
/// Elements a tile block aims to cover (bounds the partials to about numel / 32 values).
const TILE_ELEMENTS: usize = 32 * 1024;
/// The largest grid.y.
const MAX_GRID_Y: usize = 65_535;

/// Arguments of the traversal kernels; mirrors `vf::TraverseArgs` (all fields 8 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct TraverseArgs {
    mean: u64,
    target: u64,
    upstream: u64,
    upstream_scalar: u64,
    log_scale: u64,
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
    eps: f64,
    scale: f64,
    constant: f64,
}

/// Mirrors `vf::ChannelSumArgs`.
#[repr(C)]
struct ChannelSumArgs {
    partial: u64,
    out: u64,
    channels: i64,
    outer: i64,
    inner: i64,
    sums: i64,
}

/// Mirrors `vf::LossEpilogueArgs`.
#[repr(C)]
struct LossEpilogueArgs {
    channel_sumsq: u64,
    log_scale: u64,
    out: u64,
    channels: i64,
    eps: f64,
    per_channel: f64,
    constant_total: f64,
    scale: f64,
}

/// Mirrors `vf::LogScaleGradArgs`.
#[repr(C)]
struct LogScaleGradArgs {
    sums: u64,
    log_scale: u64,
    upstream_scalar: u64,
    out: u64,
    channels: i64,
    sums_per_channel: i64,
    eps: f64,
    per_channel: f64,
    scale: f64,
}

/// Ops of the traversal kernels, traversals, storage and accumulation dtypes: the kernels
/// are named `vid_<op>_<traversal>_<dtype>`, `vid_loss_epilogue_<dtype>`,
/// `vid_channel_sum_<acc>` and `vid_log_scale_grad_<acc>` (kernels/vid.cu).
const OPS: [&str; 4] = ["sumsq", "loss", "grad", "grad_none"];
const TRAVERSALS: [&str; 2] = ["warp", "tile"];
const DTYPES: [&str; 4] = ["f32", "f64", "f16", "bf16"];
const ACCS: [&str; 2] = ["f32", "f64"];

/// Every kernel the plan may launch, sorted.
pub fn kernel_names() -> Vec<String> {
    let mut names = Vec::new();
    for dtype in DTYPES {
        for op in OPS {
            for traversal in TRAVERSALS {
                names.push(format!("vid_{op}_{traversal}_{dtype}"));
            }
        }
        names.push(format!("vid_loss_epilogue_{dtype}"));
    }
    for acc in ACCS {
        names.push(format!("vid_channel_sum_{acc}"));
        names.push(format!("vid_log_scale_grad_{acc}"));
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

/// The accumulation dtype: f64 for f64 inputs, f32 otherwise.
fn acc_kind(kind: Kind) -> Kind {
    if kind == Kind::Double {
        Kind::Double
    } else {
        Kind::Float
    }
}

/// How a traversal walks the problem, and where its partial sums go.
#[derive(Debug, Clone, Copy)]
struct Traversal {
    name: &'static str,
    config: LaunchConfig,
    rows: usize,
    row_len: usize,
    seg_len: usize,
    channel_div: usize,
    tile_x: usize,
    vectorized: bool,
    /// Partial slots per (outer, channel): partial[((o * C + c) * inner + j) * K + k].
    outer: usize,
    inner: usize,
}

impl Traversal {
    fn plan(
        geometry: &Geometry,
        pack: usize,
        aligned: bool,
        multiprocessors: usize,
    ) -> Result<Traversal> {
        let (n, c, s) = (geometry.batch, geometry.channels, geometry.inner);
        match geometry.layout {
            Layout::ChannelsFirst if s >= WARP_MIN_ROW => {
                let vectorized = aligned && s % pack == 0;
                let segments = s.div_ceil(WARP_SEGMENT);
                let items = (n * c * segments) as u64;
                let blocks = u32::try_from(items.div_ceil(WARPS_PER_BLOCK))
                    .map_err(|_| VidError::invalid("mean", "too many rows for one launch"))?;
                Ok(Traversal {
                    name: "warp",
                    config: LaunchConfig {
                        grid: [blocks, 1, 1],
                        block: [BLOCK, 1, 1],
                        shared_mem_bytes: 0,
                    },
                    rows: n * c,
                    row_len: s,
                    seg_len: WARP_SEGMENT,
                    channel_div: 1,
                    tile_x: 0,
                    vectorized,
                    outer: n,
                    inner: segments,
                })
            }
            // Short NCHW rows: the [N][C * S] view, channel = column / S.
            Layout::ChannelsFirst => Self::tile(n, c * s, s, pack, aligned, multiprocessors),
            Layout::ChannelsLast => Self::tile(n * s, c, 1, pack, aligned, multiprocessors),
        }
    }

    fn tile(
        rows: usize,
        cols: usize,
        channel_div: usize,
        pack: usize,
        aligned: bool,
        multiprocessors: usize,
    ) -> Result<Traversal> {
        let vectorized = aligned && cols % pack == 0;
        let pack_cols = cols / if vectorized { pack } else { 1 };
        let tile_x = pack_cols.min(BLOCK as usize);
        let tile_y = BLOCK as usize / tile_x;
        let col_tiles = pack_cols.div_ceil(tile_x);
        if col_tiles > MAX_GRID_Y {
            return Err(VidError::invalid(
                "mean",
                format!("{cols} columns exceed the kernels' grid limit"),
            ));
        }
        // Rows per block: about TILE_ELEMENTS per block, but enough blocks for every SM.
        let tile_cols = tile_x * if vectorized { pack } else { 1 };
        let mut seg_len = (TILE_ELEMENTS / tile_cols).max(tile_y).div_ceil(tile_y) * tile_y;
        while seg_len > tile_y && rows.div_ceil(seg_len) * col_tiles < 4 * multiprocessors {
            seg_len = (seg_len / 2).div_ceil(tile_y) * tile_y;
        }
        let chunks = rows.div_ceil(seg_len);
        let blocks = u32::try_from(chunks)
            .map_err(|_| VidError::invalid("mean", "too many rows for one launch"))?;
        Ok(Traversal {
            name: "tile",
            config: LaunchConfig {
                grid: [blocks, col_tiles as u32, 1],
                block: [BLOCK, 1, 1],
                shared_mem_bytes: 0,
            },
            rows,
            row_len: cols,
            seg_len,
            channel_div,
            tile_x,
            vectorized,
            outer: chunks,
            inner: channel_div,
        })
    }

    /// Partial slots per sum.
    fn slots(&self, channels: usize) -> usize {
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
            ..TraverseArgs::default()
        }
    }
}

/// Everything the launches of one problem share.
struct Launch<'a, L: ?Sized> {
    launcher: &'a L,
    problem: &'a VidProblem,
    dtype: &'static str,
    acc: Kind,
    acc_suffix: &'static str,
    /// log_scale in the accumulation dtype.
    log_scale: Tensor,
}

impl<'a, L: KernelLauncher + ?Sized> Launch<'a, L> {
    fn new(launcher: &'a L, problem: &'a VidProblem) -> Result<Self> {
        let acc = acc_kind(problem.kind());
        Ok(Launch {
            launcher,
            problem,
            dtype: dtype_suffix(problem.kind())?,
            acc,
            acc_suffix: if acc == Kind::Double { "f64" } else { "f32" },
            log_scale: problem.log_scale.f_to_kind(acc)?.f_contiguous()?,
        })
    }

    fn geometry(&self) -> &Geometry {
        &self.problem.geometry
    }

    fn empty(&self, size: &[i64], kind: Kind) -> Result<Tensor> {
        Ok(Tensor::f_empty(size, (kind, self.problem.device()))?)
    }

    fn empty_like_input(&self) -> Result<Tensor> {
        Ok(self.problem.mean.f_empty_like()?)
    }

    /// Plans a traversal over mean/target and the given per-element tensors.
    fn traversal(&self, per_element: &[Option<&Tensor>]) -> Result<Traversal> {
        let p = self.problem;
        let pack = 16 / p.kind().elt_size_in_bytes();
        let aligned = [Some(&p.mean), Some(&p.target)]
            .iter()
            .chain(per_element)
            .flatten()
            .all(|t| ptr(t) % 16 == 0);
        Traversal::plan(
            self.geometry(),
            pack,
            aligned,
            self.launcher.multiprocessors(),
        )
    }

    /// Launches op `op` over the problem (elementwise ops: no partial sums).
    fn traverse(&self, op: &str, traversal: &Traversal, mut args: TraverseArgs) -> Result<()> {
        let p = self.problem;
        args.mean = ptr(&p.mean);
        args.target = ptr(&p.target);
        args.log_scale = ptr(&self.log_scale);
        args.eps = p.options.eps_value();
        let kernel = format!("vid_{op}_{}_{}", traversal.name, self.dtype);
        launch_with(self.launcher, &kernel, traversal.config, &mut args)
    }

    /// Launches a reducing op; returns its partial sums (`sums` per slot).
    fn traverse_reducing(
        &self,
        op: &str,
        traversal: &Traversal,
        mut args: TraverseArgs,
        sums: usize,
    ) -> Result<Tensor> {
        let slots = traversal.slots(self.geometry().channels) * sums;
        let partial = self.empty(&[slots as i64], self.acc)?;
        args.partial = ptr(&partial);
        self.traverse(op, traversal, args)?;
        Ok(partial)
    }

    /// Per-channel sums (`sums` per channel) of a traversal's partials.
    fn channel_sums(&self, traversal: &Traversal, partial: &Tensor, sums: usize) -> Result<Tensor> {
        let channels = self.geometry().channels;
        let out = self.empty(&[(channels * sums) as i64], self.acc)?;
        let mut args = ChannelSumArgs {
            partial: ptr(partial),
            out: ptr(&out),
            channels: channels as i64,
            outer: traversal.outer as i64,
            inner: traversal.inner as i64,
            sums: sums as i64,
        };
        let grid = channels.min(MAX_GRID_Y) as u32;
        let config = LaunchConfig {
            grid: [grid, 1, 1],
            block: [BLOCK, 1, 1],
            shared_mem_bytes: 0,
        };
        launch_with(
            self.launcher,
            &format!("vid_channel_sum_{}", self.acc_suffix),
            config,
            &mut args,
        )?;
        Ok(out)
    }

    /// d loss / d log_scale from per-channel sums (Q with upstream g, or R1/R2).
    fn log_scale_grad(
        &self,
        sums: &Tensor,
        sums_per_channel: usize,
        upstream: Option<&Tensor>,
        k: f64,
    ) -> Result<Tensor> {
        let channels = self.geometry().channels;
        let out = self.empty(&[channels as i64], self.acc)?;
        let mut args = LogScaleGradArgs {
            sums: ptr(sums),
            log_scale: ptr(&self.log_scale),
            upstream_scalar: optional_ptr(upstream),
            out: ptr(&out),
            channels: channels as i64,
            sums_per_channel: sums_per_channel as i64,
            eps: self.problem.options.eps_value(),
            per_channel: self.geometry().per_channel() as f64,
            scale: k,
        };
        let blocks = channels.div_ceil(BLOCK as usize).min(MAX_GRID_Y) as u32;
        let config = LaunchConfig {
            grid: [blocks, 1, 1],
            block: [BLOCK, 1, 1],
            shared_mem_bytes: 0,
        };
        launch_with(
            self.launcher,
            &format!("vid_log_scale_grad_{}", self.acc_suffix),
            config,
            &mut args,
        )?;
        Ok(out)
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
}

/// Forward: the loss, plus the per-channel sums backward needs (Mean/Sum).
pub(crate) fn forward<L: KernelLauncher + ?Sized>(
    launcher: &L,
    problem: &VidProblem,
) -> Result<ForwardOutput> {
    let launch = Launch::new(launcher, problem)?;
    let geometry = *launch.geometry();
    if problem.options.reduction_mode() == Reduction::None {
        let loss = launch.empty_like_input()?;
        let traversal = launch.traversal(&[Some(&loss)])?;
        let mut args = traversal.args(&geometry);
        args.out = ptr(&loss);
        args.constant = launch.constant();
        launch.traverse("loss", &traversal, args)?;
        return Ok(ForwardOutput {
            loss,
            channel_sumsq: None,
        });
    }
    let traversal = launch.traversal(&[])?;
    let partial = launch.traverse_reducing("sumsq", &traversal, traversal.args(&geometry), 1)?;
    let q = launch.channel_sums(&traversal, &partial, 1)?;
    let loss = launch.empty(&[], problem.kind())?;
    let n = geometry.numel() as f64;
    let mut args = LossEpilogueArgs {
        channel_sumsq: ptr(&q),
        log_scale: ptr(&launch.log_scale),
        out: ptr(&loss),
        channels: geometry.channels as i64,
        eps: problem.options.eps_value(),
        per_channel: geometry.per_channel() as f64,
        constant_total: n * launch.constant(),
        scale: launch.reduction_factor(),
    };
    let config = LaunchConfig {
        grid: [1, 1, 1],
        block: [BLOCK, 1, 1],
        shared_mem_bytes: 0,
    };
    launch_with(
        launcher,
        &format!("vid_loss_epilogue_{}", launch.dtype),
        config,
        &mut args,
    )?;
    Ok(ForwardOutput {
        loss,
        channel_sumsq: Some(q),
    })
}

/// Backward: `grad` is the upstream gradient (a device scalar for Mean/Sum, a tensor in the
/// problem's layout for None).
pub(crate) fn backward<L: KernelLauncher + ?Sized>(
    launcher: &L,
    problem: &VidProblem,
    channel_sumsq: Option<&Tensor>,
    grad: &Tensor,
    needs: NeedsGrad,
) -> Result<Grads> {
    let launch = Launch::new(launcher, problem)?;
    let geometry = *launch.geometry();
    let grad_mean = if needs.mean {
        Some(launch.empty_like_input()?)
    } else {
        None
    };
    let grad_target = if needs.target {
        Some(launch.empty_like_input()?)
    } else {
        None
    };
    let mut grads = Grads::default();

    if problem.options.reduction_mode() == Reduction::None {
        let upstream = grad.f_to_kind(problem.kind())?;
        let traversal =
            launch.traversal(&[Some(&upstream), grad_mean.as_ref(), grad_target.as_ref()])?;
        let mut args = traversal.args(&geometry);
        args.upstream = ptr(&upstream);
        args.out = optional_ptr(grad_mean.as_ref());
        args.out_negated = optional_ptr(grad_target.as_ref());
        let partial = launch.traverse_reducing("grad_none", &traversal, args, 2)?;
        if needs.log_scale {
            let sums = launch.channel_sums(&traversal, &partial, 2)?;
            grads.log_scale = Some(launch.log_scale_grad(&sums, 2, None, 1.0)?);
        }
    } else {
        let q =
            channel_sumsq.ok_or_else(|| VidError::Autograd("missing saved channel sums".into()))?;
        let upstream = grad.f_to_kind(launch.acc)?.f_contiguous()?;
        let k = launch.reduction_factor();
        if grad_mean.is_some() || grad_target.is_some() {
            let traversal = launch.traversal(&[grad_mean.as_ref(), grad_target.as_ref()])?;
            let mut args = traversal.args(&geometry);
            args.upstream_scalar = ptr(&upstream);
            args.out = optional_ptr(grad_mean.as_ref());
            args.out_negated = optional_ptr(grad_target.as_ref());
            args.scale = k;
            launch.traverse("grad", &traversal, args)?;
        }
        if needs.log_scale {
            grads.log_scale = Some(launch.log_scale_grad(q, 1, Some(&upstream), k)?);
        }
    }
    grads.mean = grad_mean;
    grads.target = grad_target;
    Ok(grads)
}

/// Forward of several Mean/Sum problems, and their weighted total.
pub(crate) fn forward_group<L: KernelLauncher + ?Sized>(
    launcher: &L,
    problems: &[&VidProblem],
    weights: &[f64],
    total_kind: Kind,
) -> Result<GroupForward> {
    let outputs = problems
        .iter()
        .map(|p| forward(launcher, p))
        .collect::<Result<Vec<_>>>()?;
    let mut total: Option<Tensor> = None;
    for (output, w) in outputs.iter().zip(weights) {
        let term = output.loss.f_to_kind(total_kind)?.f_mul_scalar(*w)?;
        total = Some(match total {
            None => term,
            Some(sum) => sum.f_add(&term)?,
        });
    }
    let total = total.ok_or_else(|| VidError::Internal("empty group".into()))?;
    Ok(GroupForward { total, outputs })
}

/// Backward of several Mean/Sum problems; problem k's loss receives `grad * weights[k]`.
pub(crate) fn backward_group<L: KernelLauncher + ?Sized>(
    launcher: &L,
    problems: &[&VidProblem],
    channel_sumsq: &[&Tensor],
    grad: &Tensor,
    weights: &[f64],
    needs: &[NeedsGrad],
) -> Result<Vec<Grads>> {
    problems
        .iter()
        .zip(channel_sumsq)
        .zip(weights.iter().zip(needs))
        .map(|((p, q), (w, n))| backward(launcher, p, Some(q), &grad.f_mul_scalar(*w)?, *n))
        .collect()
}
