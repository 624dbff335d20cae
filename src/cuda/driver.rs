//! The CUDA-driver side: per-device contexts and modules (compiled once per architecture,
//! cached in the process and on disk), and a [`KernelLauncher`] on PyTorch's current stream.

use std::collections::HashMap;
use std::ffi::c_void;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{result as driver, sys, CudaContext, CudaFunction};
use cudarc::nvrtc::Ptx;

use super::launcher::{KernelLauncher, LaunchConfig};
use super::nvrtc::{KernelPart, Target};
use super::{nvrtc, plan, probe};
use crate::autograd;
use crate::error::{Result, VidError};

/// The functions of one loaded module, by kernel name (each keeps the module loaded).
type Functions = HashMap<String, CudaFunction>;

/// One part's module, loaded on first use. The slot's own lock is held while that part
/// compiles, so NVRTC never blocks other parts, other devices, or launches of loaded kernels.
type PartSlot = Mutex<Option<Arc<Functions>>>;

/// The parts of the kernels, one module each: the dtype-free kernels and one per dtype.
const PARTS: [KernelPart; 5] = [
    KernelPart::Common,
    KernelPart::Dtype("f32"),
    KernelPart::Dtype("f64"),
    KernelPart::Dtype("f16"),
    KernelPart::Dtype("bf16"),
];

/// A device's context and its kernels' modules.
pub(crate) struct DeviceKernels {
    ordinal: usize,
    context: Arc<CudaContext>,
    target: Target,
    /// `None` when the driver reports no positive count (traversals then launch one block
    /// per chunk).
    multiprocessors: Option<u32>,
    parts: [PartSlot; 5],
}

fn driver_error(call: &'static str) -> impl Fn(driver::DriverError) -> VidError {
    move |e| VidError::Driver {
        call,
        message: format!("{e:?}"),
    }
}

/// Device `ordinal`'s context and kernel cache (no kernel is compiled here).
pub(crate) fn device_kernels(ordinal: usize) -> Result<Arc<DeviceKernels>> {
    static DEVICES: OnceLock<Mutex<HashMap<usize, Arc<DeviceKernels>>>> = OnceLock::new();
    let devices = DEVICES.get_or_init(Default::default);
    let mut devices = devices
        .lock()
        .map_err(|_| VidError::CudaUnavailable("device cache poisoned".into()))?;
    if let Some(kernels) = devices.get(&ordinal) {
        return Ok(kernels.clone());
    }
    let kernels = Arc::new(open(ordinal)?);
    devices.insert(ordinal, kernels.clone());
    Ok(kernels)
}

fn open(ordinal: usize) -> Result<DeviceKernels> {
    probe::ensure_driver()?;
    probe::ensure_nvrtc()?;
    driver::init().map_err(driver_error("cuInit"))?;
    // CudaContext::new makes the device's context current: give the caller its own back.
    let _restore = ContextRestore::save()?;
    // Retains the primary context: the one PyTorch uses.
    let context = CudaContext::new(ordinal).map_err(driver_error("cuCtx (primary context)"))?;
    let capability = context
        .compute_capability()
        .map_err(driver_error("cuDeviceGetAttribute"))?;
    let target = nvrtc::select_target(capability, &nvrtc::supported_archs()?)?;
    let multiprocessors = context
        .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .map_err(driver_error(
            "cuDeviceGetAttribute(CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)",
        ))?;
    Ok(DeviceKernels {
        ordinal,
        context,
        target,
        multiprocessors: u32::try_from(multiprocessors).ok().filter(|&n| n > 0),
        parts: Default::default(),
    })
}

impl DeviceKernels {
    /// Compiles (or takes from the caches) and loads every part now: call before capturing a
    /// CUDA graph, where module loading is refused.
    pub(crate) fn load_all(&self) -> Result<()> {
        for part in PARTS {
            self.part(part)?;
        }
        Ok(())
    }

    /// The functions of `part`, compiled and loaded on first use.
    fn part(&self, part: KernelPart) -> Result<Arc<Functions>> {
        let index = PARTS.iter().position(|p| *p == part).unwrap_or(0);
        let mut slot = self.parts[index]
            .lock()
            .map_err(|_| VidError::CudaUnavailable("kernel cache poisoned".into()))?;
        if let Some(functions) = slot.as_ref() {
            return Ok(functions.clone());
        }
        let functions = Arc::new(self.load_part(part)?);
        *slot = Some(functions.clone());
        Ok(functions)
    }

    fn load_part(&self, part: KernelPart) -> Result<Functions> {
        let _restore = ContextRestore::save()?;
        self.context
            .bind_to_thread()
            .map_err(driver_error("cuCtxSetCurrent"))?;
        let (image, cache_file) = cached_image(&self.target, part)?;
        let module = match self.context.load_module(Ptx::from_binary(image)) {
            Ok(module) => module,
            // A damaged cache file: drop it and compile afresh.
            Err(_) if cache_file.is_some() => {
                let _ = std::fs::remove_file(cache_file.unwrap_or_default());
                self.context
                    .load_module(Ptx::from_binary(
                        nvrtc::compile_part(&self.target, part)?.cubin,
                    ))
                    .map_err(driver_error("cuModuleLoadData"))?
            }
            Err(e) => return Err(driver_error("cuModuleLoadData")(e)),
        };
        // Look every kernel of the part up now, so that nothing is loaded at launch time.
        let mut functions = HashMap::new();
        for name in plan::kernel_names()
            .into_iter()
            .filter(|n| KernelPart::of_kernel(n) == part)
        {
            let function = module.load_function(&name).map_err(|e| VidError::Launch {
                kernel: name.clone(),
                message: format!("not found in the module: {e:?}"),
            })?;
            functions.insert(name, function);
        }
        Ok(functions)
    }
}

/// The image of `part` for `target`: from the disk cache (with its path) when the same
/// source, options and NVRTC built it, else freshly compiled (and cached).
fn cached_image(target: &Target, part: KernelPart) -> Result<(Vec<u8>, Option<PathBuf>)> {
    let (major, minor) = nvrtc::version()?;
    let key = format!(
        "{}\n{:?}\n{}\nnvrtc {major}.{minor}\n{target:?}",
        nvrtc::kernel_source(),
        nvrtc::compile_options(target.arch()),
        part.define(),
    );
    let extension = if matches!(target, Target::Ptx(_)) {
        "ptx"
    } else {
        "cubin"
    };
    let path = cache_dir().map(|dir| {
        dir.join(format!(
            "vid-{}-{:016x}.{extension}",
            target.arch(),
            fnv1a(key.as_bytes())
        ))
    });
    if let Some(image) = path.as_ref().and_then(|p| std::fs::read(p).ok()) {
        return Ok((image, path));
    }
    let compiled = nvrtc::compile_part(target, part)?;
    if let Some(path) = path {
        // Best effort: a cache that cannot be written only costs a recompile next time.
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        if std::fs::create_dir_all(path.parent().unwrap_or(&path)).is_ok()
            && std::fs::write(&tmp, &compiled.cubin).is_ok()
        {
            let _ = std::fs::rename(&tmp, &path);
        }
    }
    Ok((compiled.cubin, None))
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
        self.part(KernelPart::of_kernel(name))?
            .get(name)
            .cloned()
            .ok_or_else(|| VidError::Launch {
                kernel: name.into(),
                message: "no such kernel in the module".into(),
            })
    }

    /// A launcher on PyTorch's current stream of this device.
    pub(crate) fn launcher(&self) -> Result<StreamLauncher<'_>> {
        let restore = ContextRestore::save()?;
        self.context
            .bind_to_thread()
            .map_err(driver_error("cuCtxSetCurrent"))?;
        let stream =
            autograd::current_cuda_stream(self.ordinal).map_err(VidError::CudaUnavailable)?;
        Ok(StreamLauncher {
            kernels: self,
            stream: stream as sys::CUstream,
            _restore: restore,
        })
    }
}

/// Launches on one CUDA stream (borrowed from PyTorch, never synchronised here); the
/// thread's previous current context comes back when it is dropped.
pub(crate) struct StreamLauncher<'a> {
    kernels: &'a DeviceKernels,
    stream: sys::CUstream,
    _restore: ContextRestore,
}

/// Puts back the calling thread's current CUDA context on drop, so that binding a device's
/// context for our launches does not change which device the rest of PyTorch sees.
struct ContextRestore(Option<sys::CUcontext>);

impl ContextRestore {
    fn save() -> Result<Self> {
        Ok(ContextRestore(
            driver::ctx::get_current().map_err(driver_error("cuCtxGetCurrent"))?,
        ))
    }
}

impl Drop for ContextRestore {
    fn drop(&mut self) {
        if let Some(ctx) = self.0 {
            // SAFETY: a context that was current on this thread; primary contexts stay alive.
            let _ = unsafe { driver::ctx::set_current(ctx) };
        }
    }
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

    fn multiprocessor_count(&self) -> Result<Option<u32>> {
        Ok(self.kernels.multiprocessors)
    }
}
