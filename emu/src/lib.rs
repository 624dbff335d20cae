//! CPU emulation of vidfuse's CUDA kernels, for tests on machines without a GPU.
//!
//! The build script compiles every `kernels/*.cu` file of the repository (the same sources
//! NVRTC compiles at run time) together with a SIMT emulation header into this crate. The
//! threads of a block run as cooperative fibers and blocks run in turn, so a launch is
//! deterministic and synchronous. Device pointers are plain host pointers.
//!
//! ```
//! use std::ffi::c_void;
//! let input: Vec<f32> = (0..256).map(|i| i as f32).collect();
//! let mut output = vec![0.0f32; 256];
//! let (mut src, mut dst, mut n) = (input.as_ptr(), output.as_mut_ptr(), 256u32);
//! let mut params = [
//!     (&mut src as *mut *const f32).cast::<c_void>(),
//!     (&mut dst as *mut *mut f32).cast::<c_void>(),
//!     (&mut n as *mut u32).cast::<c_void>(),
//! ];
//! vidfuse_emu::launch("selftest_copy", [2, 1, 1], [64, 1, 1], 0, &mut params).unwrap();
//! assert_eq!(input, output);
//! ```
use std::ffi::{c_char, c_void, CStr, CString};

extern "C" {
    fn vf_emu_launch(
        kernel: *const c_char,
        grid: *const u32,
        block: *const u32,
        dynamic_smem_bytes: u32,
        params: *mut *mut c_void,
        error: *mut c_char,
        error_capacity: usize,
    ) -> i32;
    fn vf_emu_kernel_count() -> usize;
    fn vf_emu_kernel_name(index: usize) -> *const c_char;
    fn vf_emu_kernel_param_count(kernel: *const c_char) -> i32;
}

/// Runs the registered kernel `kernel` on the CPU, like `cuLaunchKernel` followed by a
/// synchronisation.
///
/// `grid` and `block` are the x, y, z dimensions, `dynamic_smem_bytes` the size of the
/// buffer behind `VF_DYNAMIC_SHARED` (filled with 0xFF bytes before each block, so that
/// reads of uninitialised shared memory show up). `params` follows `cuLaunchKernel`'s
/// `kernelParams`: `params[i]` points at the value of the kernel's i-th argument, and its
/// length must equal the kernel's parameter count.
///
/// The kernel dereferences whatever pointers the arguments hold: they must point at host
/// memory that is valid, suitably aligned and large enough for what the kernel accesses,
/// as device memory must be for a real launch.
///
/// Launches from several threads may run at the same time: each OS thread has its own
/// scheduler, fiber stacks and copy of static shared memory.
///
/// # Errors
///
/// An unknown kernel, a wrong parameter count, invalid dimensions (a zero dimension, more
/// than 1024 threads per block), a deadlock (a barrier or warp op that can never complete,
/// named with the block, the barrier and its source line) or a C++ exception in the
/// kernel.
pub fn launch(
    kernel: &str,
    grid: [u32; 3],
    block: [u32; 3],
    dynamic_smem_bytes: u32,
    params: &mut [*mut c_void],
) -> Result<(), String> {
    let name = CString::new(kernel).map_err(|_| format!("kernel name {kernel:?} has a NUL"))?;
    // SAFETY: `name` is a valid C string; the call only reads the registry.
    let expected = unsafe { vf_emu_kernel_param_count(name.as_ptr()) };
    if let Ok(expected) = usize::try_from(expected) {
        if expected != params.len() {
            return Err(format!(
                "kernel '{kernel}' takes {expected} parameters, {} given",
                params.len()
            ));
        }
    }
    let mut error = [0u8; 1024];
    // SAFETY: the name, dimension arrays and error buffer are valid for the call, and
    // `params` holds as many entries as the kernel reads (checked above).
    let status = unsafe {
        vf_emu_launch(
            name.as_ptr(),
            grid.as_ptr(),
            block.as_ptr(),
            dynamic_smem_bytes,
            params.as_mut_ptr(),
            error.as_mut_ptr().cast(),
            error.len(),
        )
    };
    if status == 0 {
        return Ok(());
    }
    Err(CStr::from_bytes_until_nul(&error)
        .map(|message| message.to_string_lossy().into_owned())
        .unwrap_or_else(|_| format!("launch of '{kernel}' failed ({status})")))
}

/// The names of all kernels compiled into the emulator, sorted.
pub fn kernel_names() -> Vec<String> {
    // SAFETY: the registry is filled before `main` and read-only afterwards; every index
    // below the count names a NUL-terminated string that lives as long as the process.
    unsafe {
        (0..vf_emu_kernel_count())
            .map(|i| {
                CStr::from_ptr(vf_emu_kernel_name(i))
                    .to_string_lossy()
                    .into_owned()
            })
            .collect()
    }
}
