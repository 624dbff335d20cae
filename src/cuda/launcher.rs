//! The one interface through which kernels are launched: implemented with the CUDA driver
//! for real devices, and by the host emulation in the test suite, so that grid sizes,
//! argument layouts and workspace sizes are exercised without a GPU.

use std::ffi::c_void;

use crate::error::Result;

/// Grid and block dimensions of a launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaunchConfig {
    /// Blocks in x, y, z.
    pub grid: [u32; 3],
    /// Threads per block in x, y, z.
    pub block: [u32; 3],
    /// Dynamic shared memory in bytes.
    pub shared_mem_bytes: u32,
}

/// Launches kernels of the crate's kernel sources by name.
///
/// `params` follows `cuLaunchKernel`'s convention: `params[i]` points at the i-th argument's
/// value. Device pointers inside the arguments are `data_ptr()`s of tch tensors allocated on
/// the launcher's device (host pointers for the emulation).
pub trait KernelLauncher {
    /// Launches `kernel` asynchronously (on a GPU: on PyTorch's current stream).
    fn launch(&self, kernel: &str, config: LaunchConfig, params: &mut [*mut c_void]) -> Result<()>;

    /// Streaming multiprocessors of the device, which size the traversal grids (2-4 waves of
    /// blocks looping over the plan's fixed chunks) and never change a result bit. `None`
    /// (the default) when unknown: one block per chunk.
    fn multiprocessor_count(&self) -> Result<Option<u32>> {
        Ok(None)
    }
}
