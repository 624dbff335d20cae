//! CPU emulation of vidfuse's CUDA kernels, for tests on machines without a GPU.
//!
//! The build script compiles every `kernels/*.cu` file of the repository (the same sources
//! NVRTC compiles at run time) together with a SIMT emulation header into this crate.
//! Device pointers are plain host pointers, and a launch is synchronous.
//!
//! The emulation is stricter than a GPU, so that a test here fails where a GPU would only
//! sometimes go wrong (or where racecheck and memcheck would complain):
//!
//! * blocks run one at a time in a seeded random order, never in index order;
//! * the threads of a block are cooperative fibers interleaved in a seeded random order,
//!   switching at barriers, warp ops, shared-memory accesses and atomics: warps and the
//!   lanes of a warp are not in lock-step;
//! * shared memory (declared with `VF_SHARED_ARRAY` or `VF_DYNAMIC_SHARED`, accessed with
//!   `VF_SHARED`, see `kernels/common.cuh`) holds 0xFF bytes at the start of every block;
//!   reading bytes the block has not written, or indexing out of bounds, is an error;
//! * a write and another thread's access to the same shared-memory bytes with no barrier
//!   between them (`__syncthreads`, or a `__syncwarp` both threads join) is a race, reported
//!   with both source lines whatever the interleaving;
//! * a warp op whose mask leaves out the caller or names a lane that does not exist or has
//!   exited is an error; a barrier that cannot complete is a deadlock error, not a hang.
//!
//! Every random choice derives from the launch's seed, printed in every error message, so
//! a failure replays exactly: [`launch`] takes it from `VIDFUSE_EMU_SEED` (default
//! [`DEFAULT_SEED`]), [`launch_seeded`] from its caller.
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
        seed: u64,
        error: *mut c_char,
        error_capacity: usize,
    ) -> i32;
    fn vf_emu_kernel_count() -> usize;
    fn vf_emu_kernel_name(index: usize) -> *const c_char;
    fn vf_emu_kernel_param_count(kernel: *const c_char) -> i32;
}

/// The seed of a launch when `VIDFUSE_EMU_SEED` is not set.
pub const DEFAULT_SEED: u64 = 0x5eed_0f1d;

/// The environment variable that sets [`launch`]'s seed (decimal, or hex with `0x`).
pub const SEED_VAR: &str = "VIDFUSE_EMU_SEED";

/// [`launch`]'s seed: `VIDFUSE_EMU_SEED` when set, else [`DEFAULT_SEED`].
///
/// # Errors
///
/// The variable is set but is not a decimal or `0x`-prefixed hexadecimal `u64`.
pub fn seed() -> Result<u64, String> {
    std::env::var(SEED_VAR).map_or(Ok(DEFAULT_SEED), |text| parse_seed(&text))
}

fn parse_seed(text: &str) -> Result<u64, String> {
    let text = text.trim();
    match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => text.parse(),
    }
    .map_err(|_| format!("{SEED_VAR}={text:?} is not a u64 (decimal or 0x-prefixed hex)"))
}

/// Runs the registered kernel `kernel` on the CPU, like `cuLaunchKernel` followed by a
/// synchronisation, with the seed of [`seed`].
///
/// # Errors
///
/// As [`launch_seeded`], or an invalid `VIDFUSE_EMU_SEED`.
pub fn launch(
    kernel: &str,
    grid: [u32; 3],
    block: [u32; 3],
    dynamic_smem_bytes: u32,
    params: &mut [*mut c_void],
) -> Result<(), String> {
    launch_seeded(kernel, grid, block, dynamic_smem_bytes, params, seed()?)
}

/// Runs the registered kernel `kernel` on the CPU, like `cuLaunchKernel` followed by a
/// synchronisation, with the block order and thread interleaving drawn from `seed`.
///
/// `grid` and `block` are the x, y, z dimensions, `dynamic_smem_bytes` the size of the
/// buffer behind `VF_DYNAMIC_SHARED`. `params` follows `cuLaunchKernel`'s `kernelParams`:
/// `params[i]` points at the value of the kernel's i-th argument, and its length must equal
/// the kernel's parameter count.
///
/// The kernel dereferences whatever pointers the arguments hold: they must point at host
/// memory that is valid, suitably aligned and large enough for what the kernel accesses,
/// as device memory must be for a real launch.
///
/// Launches from several threads may run at the same time: each OS thread has its own
/// scheduler, fiber stacks and shared memory.
///
/// # Errors
///
/// An unknown kernel, a wrong parameter count, invalid dimensions (a zero dimension, more
/// than 1024 threads per block), a C++ exception in the kernel, or one of the faults the
/// emulation detects (see the crate documentation): a deadlock, a shared-memory race, a
/// read of unwritten or out-of-bounds shared memory, a bad warp-op mask. The message names
/// the block, the threads and source lines involved, and ends with the seed.
pub fn launch_seeded(
    kernel: &str,
    grid: [u32; 3],
    block: [u32; 3],
    dynamic_smem_bytes: u32,
    params: &mut [*mut c_void],
    seed: u64,
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
    let mut error = [0u8; 2048];
    // SAFETY: the name, dimension arrays and error buffer are valid for the call, and
    // `params` holds as many entries as the kernel reads (checked above).
    let status = unsafe {
        vf_emu_launch(
            name.as_ptr(),
            grid.as_ptr(),
            block.as_ptr(),
            dynamic_smem_bytes,
            params.as_mut_ptr(),
            seed,
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

#[cfg(test)]
mod tests {
    use super::parse_seed;

    #[test]
    fn seeds_parse_as_decimal_or_hex() {
        assert_eq!(parse_seed("42"), Ok(42));
        assert_eq!(parse_seed(" 0x5eed0f1d "), Ok(0x5eed_0f1d));
        assert_eq!(parse_seed("0XFF"), Ok(255));
        assert!(parse_seed("seed").unwrap_err().contains("VIDFUSE_EMU_SEED"));
        assert!(parse_seed("-1").is_err());
    }
}
