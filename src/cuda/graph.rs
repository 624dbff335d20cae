//! PyTorch's CUDA streams and graphs, which tch does not expose: run work on a non-default
//! stream, and capture work into a CUDA graph and replay it. Needs a libtorch with CUDA (and
//! the crate built with the CUDA headers, which scripts/setup.sh provides); otherwise every
//! call returns [`VidError::CudaUnavailable`].

use std::ffi::{c_char, c_void, CStr};

use crate::error::{Result, VidError};
use crate::ffi;

/// Turns a shim error message into a VidError.
fn check(err: *mut c_char) -> Result<()> {
    if err.is_null() {
        return Ok(());
    }
    // SAFETY: the shim returns a NUL-terminated malloc'd string, freed here once.
    let message = unsafe { CStr::from_ptr(err) }
        .to_string_lossy()
        .into_owned();
    unsafe { ffi::vf_free_error(err) };
    Err(VidError::CudaUnavailable(message))
}

/// Runs `f` with a fresh stream from PyTorch's pool as the current stream of CUDA device
/// `device`, then restores the previous stream (also when `f` panics).
pub fn with_new_stream<R>(device: usize, f: impl FnOnce() -> R) -> Result<R> {
    struct Restore(*mut c_void);
    impl Drop for Restore {
        fn drop(&mut self) {
            // SAFETY: the handle came from vf_cuda_stream_push and is popped once.
            let _ = check(unsafe { ffi::vf_cuda_stream_pop(self.0) });
        }
    }
    let mut previous = std::ptr::null_mut();
    // SAFETY: plain out-parameter.
    check(unsafe { ffi::vf_cuda_stream_push(device as i32, &mut previous) })?;
    let _restore = Restore(previous);
    Ok(f())
}

/// PyTorch's current CUDA stream of a device, as a raw `CUstream` (to record events on it
/// with the CUDA driver API, say).
pub fn current_stream(device: usize) -> Result<*mut c_void> {
    crate::autograd::current_cuda_stream(device).map_err(VidError::CudaUnavailable)
}

/// Waits until all work queued on the device has finished.
pub fn synchronize(device: usize) -> Result<()> {
    // SAFETY: no pointers involved.
    check(unsafe { ffi::vf_cuda_synchronize(device as i32) })
}

/// A CUDA graph (PyTorch's `at::cuda::CUDAGraph`): capture the work queued on the current
/// stream, which must not be the default stream (see [`with_new_stream`]), then replay it.
///
/// Before capturing the op, call [`crate::cuda::warm_up`] for the device and run the work once
/// on that stream: kernels are loaded and the autograd engine starts its threads outside the
/// capture (neither is allowed inside one).
pub struct CudaGraph {
    graph: *mut c_void,
}

impl CudaGraph {
    /// An empty graph.
    pub fn new() -> Result<Self> {
        let mut graph = std::ptr::null_mut();
        // SAFETY: plain out-parameter.
        check(unsafe { ffi::vf_cuda_graph_new(&mut graph) })?;
        Ok(CudaGraph { graph })
    }

    /// Captures the work `f` queues (nothing runs during capture), and ends the capture even
    /// when `f` returns an error.
    pub fn capture<R>(&mut self, f: impl FnOnce() -> Result<R>) -> Result<R> {
        // SAFETY: `graph` is live until drop.
        check(unsafe { ffi::vf_cuda_graph_capture_begin(self.graph) })?;
        let result = f();
        let ended = check(unsafe { ffi::vf_cuda_graph_capture_end(self.graph) });
        let value = result?;
        ended.map(|()| value)
    }

    /// Launches the captured work on the current stream.
    pub fn replay(&self) -> Result<()> {
        // SAFETY: `graph` is live until drop.
        check(unsafe { ffi::vf_cuda_graph_replay(self.graph) })
    }
}

impl Drop for CudaGraph {
    fn drop(&mut self) {
        // SAFETY: created by vf_cuda_graph_new, freed once.
        unsafe { ffi::vf_cuda_graph_free(self.graph) }
    }
}
