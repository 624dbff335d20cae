//! Data parallelism on PyTorch's own distributed engine (c10d), launched by torchrun.
//!
//! libtorch ships the engine PyTorch's `DistributedDataParallel` runs on: the `TCPStore`
//! rendezvous, the Gloo (CPU) and NCCL (CUDA) process groups, and DDP's gradient
//! `Reducer`. This module brings them to tch trainers through the crate's C++ shim; no
//! collective is home-made.
//!
//! * [`Dist::init`] joins the group that torchrun describes in the environment (`RANK`,
//!   `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`), or runs alone (world 1) when
//!   those are absent: `torchrun --nproc-per-node 8 --no-python target/release/my_trainer`.
//! * [`DataParallel`] broadcasts the initial parameters from rank 0 and, in each
//!   [`DataParallel::backward`], averages the gradients across ranks with bucketed
//!   all-reduces that c10d's Reducer issues from autograd hooks while backward still runs.
//! * [`Dist::all_reduce`], [`Dist::all_reduce_mean`], [`Dist::broadcast`], [`Dist::barrier`]
//!   for metrics, and [`Dist::shard_range`] / [`Dist::shard`] to split a global batch.
//!
//! A peer that dies, or never arrives, is an error ([`VidError::Distributed`]) within
//! [`DistOptions::timeout`], not a hang; a bad launch environment is an error naming the
//! variable ([`VidError::Environment`]).
//!
//! ```no_run
//! use tch::{nn, nn::OptimizerConfig, Device, Kind, Tensor};
//! use vidfuse::dist::{Dist, DistOptions};
//!
//! # fn main() -> Result<(), vidfuse::VidError> {
//! let dist = Dist::init(Device::Cpu, &DistOptions::default())?;
//! let vs = nn::VarStore::new(Device::Cpu);
//! let net = nn::linear(vs.root(), 4, 1, Default::default());
//! let ddp = dist.data_parallel(&vs)?; // rank 0's initial parameters everywhere
//! let mut opt = nn::Sgd::default().build(&vs, 0.1)?;
//! let global: Vec<i64> = (0..64).collect(); // this step's samples, the same on every rank
//! let local = dist.shard(&global); // this rank's share
//! let x = Tensor::randn([local.len() as i64, 4], (Kind::Float, Device::Cpu));
//! let loss = x.apply(&net).square().mean(Kind::Float);
//! opt.zero_grad();
//! ddp.backward(&loss)?; // gradients averaged over the ranks
//! opt.step();
//! let global_loss = dist.all_reduce_mean(&loss.detach())?;
//! # let _ = global_loss;
//! # Ok(())
//! # }
//! ```
//!
//! ## How VID composes with data parallelism
//!
//! Each rank computes the loss, VID's included, as the Mean over its local batch
//! ([`crate::Reduction::Mean`]); the Reducer sums the ranks' gradients and divides by the
//! world size. With equal local batches that average is exactly the gradient of the Mean
//! over the global batch, so training at world `w` with `B` samples per rank follows the
//! same path as one process with `w * B` samples (up to the order of float sums). The VID
//! variances (`log_scale`) and regressors are parameters like any other and are averaged
//! the same way. For a ragged last batch (local sizes `n_r` summing to `N`), scale each
//! rank's loss by [`Dist::local_loss_weight`] (`w * n_r / N`) before backward, or drop the
//! remainder, so that the average is again the global-batch gradient.

mod env;
mod ffi;

use std::ops::Range;
use std::ptr::NonNull;
use std::time::Duration;

use tch::{nn::VarStore, Device, Tensor};

use crate::autograd::take_error;
use crate::error::VidError;
use crate::ffi::vf_tensor;

pub use env::LaunchEnv;

/// Which c10d backend carries the collectives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Gloo, for CPU tensors.
    Gloo,
    /// NCCL, for CUDA tensors.
    Nccl,
}

impl Backend {
    /// The backend for tensors on `device`: NCCL for CUDA, Gloo for the CPU.
    pub fn for_device(device: Device) -> Backend {
        match device {
            Device::Cuda(_) => Backend::Nccl,
            _ => Backend::Gloo,
        }
    }

    /// Whether this build of the shim has the backend (Gloo needs gloo's headers at build
    /// time, NCCL needs nccl.h, the CUDA headers and a libtorch with CUDA).
    pub fn is_built(self) -> bool {
        // SAFETY: no arguments.
        let built = unsafe { ffi::vf_dist_backends() };
        match self {
            Backend::Gloo => built & 1 != 0,
            Backend::Nccl => built & 2 != 0,
        }
    }
}

/// Settings of [`Dist`] and [`DataParallel`].
#[derive(Debug, Clone)]
pub struct DistOptions {
    /// How long any wait may take (rendezvous, a collective, the gradient reduction) before
    /// it is an error. Default: 5 minutes.
    pub timeout: Duration,
    /// The gradient bucket size cap in bytes (PyTorch's default: 25 MiB).
    pub bucket_bytes: usize,
    /// The cap of the first bucket (the last parameters' gradients, ready first; PyTorch's
    /// default: 1 MiB), so that communication starts early in backward.
    pub first_bucket_bytes: usize,
    /// Whether some parameters may receive no gradient in a step (like PyTorch's
    /// `find_unused_parameters`): each backward then first walks the graph from the loss and
    /// marks the parameters it does not reach as ready. A parameter unused on every rank
    /// keeps no gradient; one used on some ranks gets the average over all ranks (zero where
    /// unused). Without it, such a step is an error at the next backward. Default: false.
    pub find_unused_parameters: bool,
}

impl Default for DistOptions {
    fn default() -> Self {
        DistOptions {
            timeout: Duration::from_secs(300),
            bucket_bytes: 25 << 20,
            first_bucket_bytes: 1 << 20,
            find_unused_parameters: false,
        }
    }
}

impl DistOptions {
    /// Sets [`DistOptions::timeout`].
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
    /// Sets [`DistOptions::bucket_bytes`] and [`DistOptions::first_bucket_bytes`].
    pub fn buckets(mut self, first_bucket_bytes: usize, bucket_bytes: usize) -> Self {
        self.first_bucket_bytes = first_bucket_bytes;
        self.bucket_bytes = bucket_bytes;
        self
    }
    /// Sets [`DistOptions::find_unused_parameters`].
    pub fn find_unused_parameters(mut self, on: bool) -> Self {
        self.find_unused_parameters = on;
        self
    }
}

/// A reduction of [`Dist::all_reduce`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    /// The sum over ranks.
    Sum,
    /// The element-wise maximum.
    Max,
    /// The element-wise minimum.
    Min,
}

/// An owned c10d process group.
struct Group(NonNull<ffi::vf_dist_group>);

impl Drop for Group {
    fn drop(&mut self) {
        // SAFETY: made by vf_dist_group_new, freed once.
        unsafe { ffi::vf_dist_group_free(self.0.as_ptr()) };
    }
}

fn ptr(t: &Tensor) -> *mut vf_tensor {
    t.as_ptr() as *mut vf_tensor
}

fn check(op: &'static str, err: *mut std::os::raw::c_char) -> Result<(), VidError> {
    match take_error(err) {
        None => Ok(()),
        Some(message) => Err(VidError::Distributed { op, message }),
    }
}

/// This process's place in a data-parallel job, and its process group (none when it runs
/// alone). Collectives on a single-process `Dist` return at once, unchanged.
pub struct Dist {
    group: Option<Group>,
    rank: usize,
    world_size: usize,
    local_rank: usize,
    device: Device,
    options: DistOptions,
}

impl std::fmt::Debug for Dist {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dist")
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .field("local_rank", &self.local_rank)
            .field("device", &self.device)
            .field("distributed", &self.group.is_some())
            .finish()
    }
}

impl Dist {
    /// Joins the process group that the launcher (torchrun) describes in the environment,
    /// for tensors on `device` (NCCL for CUDA, Gloo for the CPU); alone (world 1, no group)
    /// when the launch variables are absent. Returns once every rank has arrived, or an
    /// error after `options.timeout`.
    pub fn init(device: Device, options: &DistOptions) -> Result<Dist, VidError> {
        Self::with_env(LaunchEnv::from_env()?, device, options)
    }

    /// [`Dist::init`] with the launch described by `env` (`None`: alone).
    pub fn with_env(
        env: Option<LaunchEnv>,
        device: Device,
        options: &DistOptions,
    ) -> Result<Dist, VidError> {
        let Some(env) = env else {
            return Ok(Dist::local(device, options));
        };
        let backend = Backend::for_device(device);
        let device_index = match device {
            Device::Cuda(i) => i as i32,
            _ => -1,
        };
        let host =
            std::ffi::CString::new(env.master_addr.clone()).map_err(|_| VidError::Environment {
                var: "MASTER_ADDR",
                message: "contains a NUL byte".into(),
            })?;
        let timeout_ms = i64::try_from(options.timeout.as_millis())
            .unwrap_or(i64::MAX)
            .max(1);
        let mut raw = std::ptr::null_mut();
        // SAFETY: valid C string and out-pointer; the shim catches every exception.
        let err = unsafe {
            ffi::vf_dist_group_new(
                match backend {
                    Backend::Gloo => 0,
                    Backend::Nccl => 1,
                },
                host.as_ptr(),
                env.master_port,
                env.rank as i32,
                env.world_size as i32,
                env.agent_store as i32,
                device_index,
                timeout_ms,
                &mut raw,
            )
        };
        check("rendezvous", err).map_err(|e| match e {
            VidError::Distributed { op, message } => VidError::Distributed {
                op,
                message: format!(
                    "rank {} of {} at {}:{}: {message}",
                    env.rank, env.world_size, env.master_addr, env.master_port
                ),
            },
            other => other,
        })?;
        let group = NonNull::new(raw)
            .map(Group)
            .ok_or_else(|| VidError::Internal("the process group was not created".into()))?;
        Ok(Dist {
            group: Some(group),
            rank: env.rank,
            world_size: env.world_size,
            local_rank: env.local_rank,
            device,
            options: options.clone(),
        })
    }

    /// A single process: rank 0 of 1, no process group.
    pub fn local(device: Device, options: &DistOptions) -> Dist {
        Dist {
            group: None,
            rank: 0,
            world_size: 1,
            local_rank: 0,
            device,
            options: options.clone(),
        }
    }

    /// This process's rank, `0..world_size()`.
    pub fn rank(&self) -> usize {
        self.rank
    }
    /// The number of processes.
    pub fn world_size(&self) -> usize {
        self.world_size
    }
    /// The rank among this machine's processes (`LOCAL_RANK`).
    pub fn local_rank(&self) -> usize {
        self.local_rank
    }
    /// The device the collectives' tensors live on.
    pub fn device(&self) -> Device {
        self.device
    }
    /// The options given at [`Dist::init`].
    pub fn options(&self) -> &DistOptions {
        &self.options
    }
    /// Whether a process group was joined (a launched job, even of world 1).
    pub fn is_distributed(&self) -> bool {
        self.group.is_some()
    }

    fn raw(&self) -> Option<*mut ffi::vf_dist_group> {
        self.group.as_ref().map(|g| g.0.as_ptr())
    }

    /// Reduces `tensor` in place over all ranks (a defined tensor on [`Dist::device`];
    /// every rank passes the same shape and dtype).
    pub fn all_reduce(&self, tensor: &mut Tensor, op: ReduceOp) -> Result<(), VidError> {
        let Some(group) = self.raw() else {
            return Ok(());
        };
        let code = match op {
            ReduceOp::Sum => 0,
            ReduceOp::Max => 1,
            ReduceOp::Min => 2,
        };
        // SAFETY: live group and tensor; the shim catches every exception.
        check("all_reduce", unsafe {
            ffi::vf_dist_all_reduce(group, ptr(tensor), code)
        })
    }

    /// The mean of `tensor` over all ranks, as a new tensor (float dtypes): for metrics such
    /// as the loss of the global batch.
    pub fn all_reduce_mean(&self, tensor: &Tensor) -> Result<Tensor, VidError> {
        let mut out = tensor.f_detach_copy()?;
        if self.world_size > 1 {
            self.all_reduce(&mut out, ReduceOp::Sum)?;
            out = out.f_div_scalar(self.world_size as f64)?;
        }
        Ok(out)
    }

    /// Overwrites `tensors` on every rank with rank `root`'s values (in place, without
    /// autograd history; parameters may be passed as they are).
    pub fn broadcast(&self, tensors: &[Tensor], root: usize) -> Result<(), VidError> {
        let Some(group) = self.raw() else {
            return Ok(());
        };
        let ptrs: Vec<*mut vf_tensor> = tensors.iter().map(ptr).collect();
        // SAFETY: live group and tensors; the shim catches every exception.
        check("broadcast", unsafe {
            ffi::vf_dist_broadcast(group, ptrs.as_ptr(), ptrs.len(), root as i32)
        })
    }

    /// Waits until every rank has called it (an error after the timeout).
    pub fn barrier(&self) -> Result<(), VidError> {
        let Some(group) = self.raw() else {
            return Ok(());
        };
        // SAFETY: live group; the shim catches every exception.
        check("barrier", unsafe { ffi::vf_dist_barrier(group) })
    }

    /// This rank's part of `len` items: contiguous blocks in rank order, the first
    /// `len % world` ranks one item larger. With `len = world * B` rank `r` gets
    /// `r*B..(r+1)*B`, so the global batch is the same at any world size.
    pub fn shard_range(&self, len: usize) -> Range<usize> {
        shard_range(len, self.rank, self.world_size)
    }

    /// This rank's part of `items` (see [`Dist::shard_range`]).
    pub fn shard<'a, T>(&self, items: &'a [T]) -> &'a [T] {
        &items[self.shard_range(items.len())]
    }

    /// The weight of this rank's Mean loss that makes the averaged gradient the gradient
    /// of the Mean over all `global_len` samples when local batches differ in size (a
    /// ragged last batch): `world * n_local / global_len`, 1 for equal shares.
    pub fn local_loss_weight(&self, global_len: usize) -> f64 {
        if global_len == 0 {
            return 0.0;
        }
        let local = self.shard_range(global_len).len();
        (self.world_size * local) as f64 / global_len as f64
    }

    /// Overwrites every variable of `vs` (trainable or not, in name order) with rank
    /// `root`'s values.
    pub fn broadcast_var_store(&self, vs: &VarStore, root: usize) -> Result<(), VidError> {
        let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let all: Vec<Tensor> = named.into_iter().map(|(_, t)| t).collect();
        self.broadcast(&all, root)
    }

    /// [`DataParallel`] over the trainable variables of `vs` (every variable is first
    /// broadcast from rank 0).
    pub fn data_parallel(&self, vs: &VarStore) -> Result<DataParallel<'_>, VidError> {
        self.broadcast_var_store(vs, 0)?;
        DataParallel::reducing(self, vs.trainable_variables())
    }
}

/// Rank `rank`'s part of `len` items split over `world` ranks (see [`Dist::shard_range`]).
pub fn shard_range(len: usize, rank: usize, world: usize) -> Range<usize> {
    let world = world.max(1);
    let (base, extra) = (len / world, len % world);
    let start = rank * base + rank.min(extra);
    let size = base + usize::from(rank < extra);
    start.min(len)..(start + size).min(len)
}

/// Data-parallel gradients for a list of parameters, on c10d's DDP Reducer: the
/// parameters start from rank 0's values, and each [`DataParallel::backward`] leaves in
/// every parameter's gradient the average over the ranks of their local gradients. The
/// Reducer all-reduces a bucket as soon as autograd has produced all of its gradients, so
/// communication overlaps the rest of backward.
pub struct DataParallel<'a> {
    dist: &'a Dist,
    reducer: Option<NonNull<ffi::vf_dist_reducer>>,
    params: Vec<Tensor>,
}

impl std::fmt::Debug for DataParallel<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataParallel")
            .field("dist", self.dist)
            .field("params", &self.params.len())
            .finish()
    }
}

impl<'a> DataParallel<'a> {
    /// Broadcasts `params` from rank 0 and sets up the gradient reduction. The parameters
    /// must be leaf tensors that require grad, on the group's device, and the same list in
    /// the same order on every rank.
    pub fn new(dist: &'a Dist, params: Vec<Tensor>) -> Result<DataParallel<'a>, VidError> {
        dist.broadcast(&params, 0)?;
        Self::reducing(dist, params)
    }

    /// [`DataParallel::new`] without the broadcast.
    fn reducing(dist: &'a Dist, params: Vec<Tensor>) -> Result<DataParallel<'a>, VidError> {
        let Some(group) = dist.raw() else {
            return Ok(DataParallel {
                dist,
                reducer: None,
                params,
            });
        };
        let ptrs: Vec<*mut vf_tensor> = params.iter().map(ptr).collect();
        let opts = &dist.options;
        let mut raw = std::ptr::null_mut();
        // SAFETY: live group and tensors; the shim catches every exception.
        let err = unsafe {
            ffi::vf_dist_reducer_new(
                group,
                ptrs.as_ptr(),
                ptrs.len(),
                opts.bucket_bytes as i64,
                opts.first_bucket_bytes as i64,
                opts.find_unused_parameters as i32,
                &mut raw,
            )
        };
        check("data_parallel", err)?;
        Ok(DataParallel {
            dist,
            reducer: NonNull::new(raw),
            params,
        })
    }

    /// The parameters whose gradients are averaged.
    pub fn params(&self) -> &[Tensor] {
        &self.params
    }

    /// The bucket of each parameter (buckets are all-reduced in order `0, 1, ...`) and the
    /// number of buckets; empty when alone. The first assignment goes by parameter order,
    /// reversed (the last parameters' gradients are usually ready first); from the second
    /// step on, as in PyTorch's DDP, the buckets follow the order in which the gradients
    /// became ready in the first step (rank 0's).
    pub fn buckets(&self) -> Result<(Vec<usize>, usize), VidError> {
        let Some(r) = self.reducer else {
            return Ok((Vec::new(), 0));
        };
        let mut of = vec![0i64; self.params.len()];
        let mut n = 0usize;
        // SAFETY: live reducer, buffer of its parameter count.
        check("buckets", unsafe {
            ffi::vf_dist_reducer_buckets(r.as_ptr(), of.as_mut_ptr(), of.len(), &mut n)
        })?;
        Ok((of.into_iter().map(|b| b as usize).collect(), n))
    }

    /// Runs backward from `loss` (this rank's loss, a scalar) and averages the parameters'
    /// gradients over all ranks, overlapping the all-reduces with backward. Every rank must
    /// call it in the same step. An error (a peer died or timed out) leaves the gradients
    /// undefined for this step; the group cannot be used further.
    pub fn backward(&self, loss: &Tensor) -> Result<(), VidError> {
        if let Some(r) = self.reducer {
            // SAFETY: live reducer; the shim catches every exception.
            check("backward", unsafe {
                ffi::vf_dist_reducer_prepare_forward(r.as_ptr())
            })?;
            let outputs: Vec<*mut vf_tensor> = if self.dist.options.find_unused_parameters {
                vec![ptr(loss)]
            } else {
                Vec::new()
            };
            // SAFETY: as above; the loss outlives the call.
            check("backward", unsafe {
                ffi::vf_dist_reducer_prepare_backward(r.as_ptr(), outputs.as_ptr(), outputs.len())
            })?;
        }
        loss.f_backward().map_err(|e| VidError::Distributed {
            op: "backward",
            message: e.to_string(),
        })
    }
}

impl Drop for DataParallel<'_> {
    fn drop(&mut self) {
        if let Some(r) = self.reducer.take() {
            // SAFETY: made by vf_dist_reducer_new, freed once, before its group (borrowed).
            unsafe { ffi::vf_dist_reducer_free(r.as_ptr()) };
        }
    }
}
