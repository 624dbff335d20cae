//! The CUDA-driver side: per-device contexts and modules (compiled once per architecture,
//! cached in the process and on disk), and a [`KernelLauncher`] on PyTorch's current stream.

use std::collections::HashMap;
use std::ffi::c_void;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{result as driver, sys, CudaContext, CudaFunction, CudaModule};
use cudarc::nvrtc::Ptx;

use super::launcher::{KernelLauncher, LaunchConfig};
use super::{nvrtc, probe};
use crate::autograd;
use crate::error::{Result, VidError};

/// A device's loaded kernels.
pub(crate) struct DeviceKernels {
    ordinal: usize,
    context: Arc<CudaContext>,
    module: Arc<CudaModule>,
    functions: Mutex<HashMap<String, CudaFunction>>,
    multiprocessors: usize,
}

fn driver_error(call: &'static str) -> impl Fn(driver::DriverError) -> VidError {
    move |e| VidError::Driver {
        call,
        message: format!("{e:?}"),
    }
}

/// The kernels of device `ordinal`, compiled and loaded on first use.
pub(crate) fn device_kernels(ordinal: usize) -> Result<Arc<DeviceKernels>> {
    static DEVICES: OnceLock<Mutex<HashMap<usize, Arc<DeviceKernels>>>> = OnceLock::new();
    let devices = DEVICES.get_or_init(Default::default);
    let mut devices = devices
        .lock()
        .map_err(|_| VidError::CudaUnavailable("device cache poisoned".into()))?;
    if let Some(kernels) = devices.get(&ordinal) {
        return Ok(kernels.clone());
    }
    let kernels = Arc::new(load(ordinal)?);
    devices.insert(ordinal, kernels.clone());
    Ok(kernels)
}

fn load(ordinal: usize) -> Result<DeviceKernels> {
    probe::ensure_driver()?;
    probe::ensure_nvrtc()?;
    // Retains the primary context: the one PyTorch uses.
    let context = CudaContext::new(ordinal).map_err(driver_error("cuCtx (primary context)"))?;
    let (major, minor) = context
        .compute_capability()
        .map_err(driver_error("cuDeviceGetAttribute"))?;
    let multiprocessors = context
        .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .map_err(driver_error("cuDeviceGetAttribute"))? as usize;
    let arch = format!("sm_{major}{minor}");
    let cubin = cached_cubin(&arch)?;
    let module = context
        .load_module(Ptx::from_binary(cubin))
        .map_err(driver_error("cuModuleLoadData"))?;
    Ok(DeviceKernels {
        ordinal,
        context,
        module,
        functions: Mutex::new(HashMap::new()),
        multiprocessors,
    })
}

/// The CUBIN for `arch`: from the disk cache when the same source, options and NVRTC built it.
fn cached_cubin(arch: &str) -> Result<Vec<u8>> {
    let (major, minor) = nvrtc::version()?;
    let key = format!(
        "{}\n{:?}\nnvrtc {major}.{minor}\n{arch}",
        nvrtc::kernel_source(),
        nvrtc::compile_options(arch)
    );
    let path =
        cache_dir().map(|dir| dir.join(format!("vid-{arch}-{:016x}.cubin", fnv1a(key.as_bytes()))));
    if let Some(image) = path.as_ref().and_then(|p| std::fs::read(p).ok()) {
        return Ok(image);
    }
    let compiled = nvrtc::compile(arch)?;
    if let Some(path) = path {
        // Best effort: a cache that cannot be written only costs a recompile next time.
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        if std::fs::create_dir_all(path.parent().unwrap_or(&path)).is_ok()
            && std::fs::write(&tmp, &compiled.cubin).is_ok()
        {
            let _ = std::fs::rename(&tmp, &path);
        }
    }
    Ok(compiled.cubin)
}

/// `VIDFUSE_CACHE_DIR`, else `$XDG_CACHE_HOME/vidfuse`, else `~/.cache/vidfuse`;
/// `VIDFUSE_CACHE_DIR=""` turns the disk cache off.
fn cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("VIDFUSE_CACHE_DIR") {
        return (!dir.is_empty()).then(|| PathBuf::from(dir));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("vidfuse"))
}

/// FNV-1a, 64 bits: a hash that is stable across Rust versions, for cache file names.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

impl DeviceKernels {
    fn function(&self, name: &str) -> Result<CudaFunction> {
        let mut functions = self
            .functions
            .lock()
            .map_err(|_| VidError::CudaUnavailable("function cache poisoned".into()))?;
        if let Some(f) = functions.get(name) {
            return Ok(f.clone());
        }
        let f = self
            .module
            .load_function(name)
            .map_err(|e| VidError::Launch {
                kernel: name.into(),
                message: format!("not found in the module: {e:?}"),
            })?;
        functions.insert(name.to_string(), f.clone());
        Ok(f)
    }

    /// A launcher on PyTorch's current stream of this device.
    pub(crate) fn launcher(&self) -> Result<StreamLauncher<'_>> {
        self.context
            .bind_to_thread()
            .map_err(driver_error("cuCtxSetCurrent"))?;
        let stream =
            autograd::current_cuda_stream(self.ordinal).map_err(VidError::CudaUnavailable)?;
        Ok(StreamLauncher {
            kernels: self,
            stream: stream as sys::CUstream,
        })
    }
}

/// Launches on one CUDA stream (borrowed from PyTorch, never synchronised here).
pub(crate) struct StreamLauncher<'a> {
    kernels: &'a DeviceKernels,
    stream: sys::CUstream,
}

impl KernelLauncher for StreamLauncher<'_> {
    fn launch(&self, kernel: &str, config: LaunchConfig, params: &mut [*mut c_void]) -> Result<()> {
        let function = self.kernels.function(kernel)?;
        let [gx, gy, gz] = config.grid;
        let [bx, by, bz] = config.block;
        // SAFETY: `params` point at argument structs that mirror the kernels' signatures, and
        // every device pointer in them belongs to a live tensor on this device.
        unsafe {
            driver::launch_kernel(
                function.cu_function(),
                (gx, gy, gz),
                (bx, by, bz),
                config.shared_mem_bytes,
                self.stream,
                params,
            )
        }
        .map_err(|e| VidError::Launch {
            kernel: kernel.into(),
            message: format!("{e:?}"),
        })
    }

    fn multiprocessors(&self) -> usize {
        self.kernels.multiprocessors
    }
}
