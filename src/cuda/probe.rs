//! Finds libcuda and libnvrtc without panicking (cudarc panics on first use of a missing
//! library, so every entry point checks here first).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::error::{Result, VidError};

/// The libtorch lib folder this crate was built against (set by build.rs).
const LIBTORCH_LIB: Option<&str> = option_env!("VIDFUSE_LIBTORCH_LIB");

/// Where libnvrtc may live besides the loader's search path: `VIDFUSE_NVRTC` (the file), and
/// the nvidia wheel next to the torch this crate was built with.
fn nvrtc_candidates() -> Vec<PathBuf> {
    let mut paths = Vec::new();
    if let Some(explicit) = std::env::var_os("VIDFUSE_NVRTC") {
        paths.push(PathBuf::from(explicit));
    }
    if let Some(lib) = LIBTORCH_LIB {
        // site-packages/torch/lib -> site-packages/nvidia/cu13/lib
        paths.push(PathBuf::from(lib).join("../../nvidia/cu13/lib/libnvrtc.so.13"));
    }
    paths
}

/// Loads a library for the rest of the process (so that later loads by soname find it).
fn preload(path: &Path) -> bool {
    // SAFETY: NVIDIA's libraries run no initialisation of concern when loaded. The handle is
    // leaked on purpose.
    match unsafe { libloading::Library::new(path) } {
        Ok(lib) => {
            std::mem::forget(lib);
            true
        }
        Err(_) => false,
    }
}

/// libnvrtc opens libnvrtc-builtins by name at compile time, which the loader finds only on
/// LD_LIBRARY_PATH; preloading it from libnvrtc's folder makes the rpath'd copy usable too.
fn preload_builtins() {
    for dir in nvrtc_candidates().iter().filter_map(|p| p.parent()) {
        if preload(&dir.join("libnvrtc-builtins.so.13.0")) {
            return;
        }
    }
}

/// Makes sure libnvrtc can be loaded, preloading it from known places if the loader's search
/// path lacks it. Cached: the answer does not change during a run.
pub fn ensure_nvrtc() -> Result<()> {
    static FOUND: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    FOUND
        .get_or_init(|| {
            // SAFETY: only probes whether the library can be opened.
            let present = || unsafe { cudarc::nvrtc::sys::is_culib_present() };
            if present() || nvrtc_candidates().iter().any(|path| preload(path) && present()) {
                preload_builtins();
                return Ok(());
            }
            Err("libnvrtc (CUDA 13) was not found: install the CUDA 13 torch wheel (scripts/setup.sh), \
                 put libnvrtc.so.13 on LD_LIBRARY_PATH, or point VIDFUSE_NVRTC at it"
                .to_string())
        })
        .clone()
        .map_err(VidError::CudaUnavailable)
}

/// Makes sure the CUDA driver library (libcuda, from the NVIDIA driver) can be loaded.
pub fn ensure_driver() -> Result<()> {
    // SAFETY: only probes whether the library can be opened.
    if unsafe { cudarc::driver::sys::is_culib_present() } {
        Ok(())
    } else {
        Err(VidError::CudaUnavailable(
            "libcuda (the NVIDIA driver) was not found on this machine".into(),
        ))
    }
}
