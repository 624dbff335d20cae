//! The CUDA backend: NVRTC-compiled kernels (kernels/*.cu) launched on libtorch's memory and
//! on PyTorch's current stream.
//!
//! Layers: `plan` decides launches for a problem and is generic over `KernelLauncher`;
//! `driver` implements that launcher with the CUDA driver; [`nvrtc`] compiles the sources;
//! `probe` finds the libraries without panicking; [`model`] predicts the kernels' time on
//! modelled GPUs from the plan and the SASS (a model, not a measurement).

mod driver;
pub mod graph;
mod launcher;
pub mod model;
pub mod nvrtc;
pub(crate) mod plan;

/// Test hook (`test-hooks` feature): the names of every kernel the launch plan uses.
#[cfg(feature = "test-hooks")]
#[doc(hidden)]
pub use plan::kernel_names;
mod probe;

use tch::{Device, Tensor};

#[cfg(not(feature = "test-hooks"))]
pub(crate) use launcher::KernelLauncher;
/// Test hooks (`test-hooks` feature): the launch interface the host emulation implements.
#[cfg(feature = "test-hooks")]
#[doc(hidden)]
pub use launcher::{KernelLauncher, LaunchConfig};

use crate::backend_io::{ForwardOutput, Grads, GroupForward, NeedsGrad, Precomputed};
use crate::error::{Result, VidError};
use crate::validate::VidProblem;

/// Compiles (or loads from the disk cache) and loads every kernel for a CUDA device now,
/// rather than on the first call of the op (which compiles only the kernels of the dtype it
/// uses, plus the dtype-free ones). Call it before capturing a CUDA graph (module loading is
/// not allowed during a capture), or to check that CUDA works.
///
/// ```
/// // Without a GPU this is a clear error, never a panic.
/// if let Err(e) = vidfuse::cuda::warm_up(tch::Device::Cuda(0)) {
///     println!("no CUDA: {e}");
/// }
/// ```
pub fn warm_up(device: Device) -> Result<()> {
    match device {
        Device::Cuda(ordinal) => driver::device_kernels(ordinal)?.load_all(),
        other => Err(VidError::invalid(
            "device",
            format!("expected a CUDA device, got {other:?}"),
        )),
    }
}

pub(crate) fn forward(
    ordinal: usize,
    problem: &VidProblem,
    write: NeedsGrad,
) -> Result<ForwardOutput> {
    let kernels = driver::device_kernels(ordinal)?;
    plan::forward(&kernels.launcher()?, problem, write)
}

pub(crate) fn backward_unreduced(
    ordinal: usize,
    problem: &VidProblem,
    grad: &Tensor,
    needs: NeedsGrad,
) -> Result<Grads> {
    let kernels = driver::device_kernels(ordinal)?;
    plan::backward_unreduced(&kernels.launcher()?, problem, grad, needs)
}

pub(crate) fn forward_group(
    ordinal: usize,
    problems: &[&VidProblem],
    weights: &[f64],
    total_kind: tch::Kind,
    write: &[NeedsGrad],
) -> Result<GroupForward> {
    let kernels = driver::device_kernels(ordinal)?;
    plan::forward_group(&kernels.launcher()?, problems, weights, total_kind, write)
}

pub(crate) fn backward_group(
    ordinal: usize,
    problems: &[&VidProblem],
    channel_sumsq: &[&Tensor],
    grad: &Tensor,
    weights: &[f64],
    needs: &[NeedsGrad],
    precomputed: Vec<Option<Precomputed>>,
) -> Result<Vec<Grads>> {
    let kernels = driver::device_kernels(ordinal)?;
    plan::backward_group(
        &kernels.launcher()?,
        problems,
        channel_sumsq,
        grad,
        weights,
        needs,
        precomputed,
    )
}
