//! Without a GPU, asking for the CUDA path is a clear error, never a panic.

use tch::Device;
use vidfuse::VidError;

#[test]
fn warm_up_without_a_driver_is_a_clear_error() {
    if tch::Cuda::is_available() {
        println!("SKIPPED: this machine has CUDA");
        return;
    }
    match vidfuse::cuda::warm_up(Device::Cuda(0)) {
        Err(VidError::CudaUnavailable(message)) => {
            assert!(message.contains("libcuda"), "{message}")
        }
        Err(other) => panic!("expected CudaUnavailable, got {other}"),
        Ok(()) => panic!("kernels loaded on a machine without CUDA"),
    }
}

#[test]
fn warm_up_rejects_a_cpu_device() {
    match vidfuse::cuda::warm_up(Device::Cpu) {
        Err(VidError::InvalidArgument { arg: "device", .. }) => {}
        other => panic!("expected an invalid-argument error, got {other:?}"),
    }
}

#[test]
fn cuda_stream_helpers_without_cuda_are_errors() {
    if tch::Cuda::is_available() {
        println!("SKIPPED: this machine has CUDA");
        return;
    }
    // libtorch is built with CUDA here, but there is no device: an error either way.
    assert!(vidfuse::cuda::graph::synchronize(0).is_err());
    assert!(vidfuse::cuda::graph::with_new_stream(0, || ()).is_err());
}
