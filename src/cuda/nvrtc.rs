//! Run-time compilation of the kernel sources with NVRTC, to a CUBIN for one exact
//! architecture, with the compiler log (and ptxas' resource report) kept.

use std::ffi::{c_char, CString};

use cudarc::nvrtc::{result as nvrtc, sys};

use super::probe;
use crate::error::{Result, VidError};

/// The shared helpers, inlined into the source handed to NVRTC.
const COMMON_CUH: &str = include_str!("../../kernels/common.cuh");
/// The VID kernels.
const VID_CU: &str = include_str!("../../kernels/vid.cu");

/// Name under which the program is compiled (shows in the log).
pub(crate) const PROGRAM_NAME: &str = "vid.cu";

/// The architectures the kernels are checked against (NVRTC 13's lowest is sm_75).
pub const CHECKED_ARCHS: [&str; 4] = ["sm_75", "sm_80", "sm_89", "sm_90"];

/// The kernel source as NVRTC sees it: vid.cu with common.cuh inlined (NVRTC is given no
/// include path, so that nothing outside the crate is read).
pub fn kernel_source() -> String {
    VID_CU.replace("#include \"common.cuh\"", COMMON_CUH)
}

/// The options kernels are compiled with for `arch` (e.g. `sm_90`, or `compute_90` for PTX).
pub fn compile_options(arch: &str) -> Vec<String> {
    let mut options = vec![
        format!("--gpu-architecture={arch}"),
        "-std=c++17".into(),
        "-DNDEBUG".into(),
        // No multiply-add contraction: NVVM then writes every float add and multiply with
        // explicit round-to-nearest (`add.rn.f32`, `mul.rn.f32`), which neither ptxas nor
        // the driver's PTX JIT may fuse, so a CUBIN and the PTX compiled by the driver for a
        // newer GPU give the same bits (and the host emulation, which never fuses, too).
        "--fmad=false".into(),
    ];
    if arch.starts_with("sm_") {
        // ptxas runs only for a real architecture.
        options.push("--ptxas-options=-v".into());
    }
    options
}

/// A part of the kernels, compiled into a module of its own so that a first call compiles
/// only what it uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KernelPart {
    /// The kernels that do not depend on the input dtype (sums, channel tables, gradients
    /// of log_scale).
    Common,
    /// The streaming kernels of one dtype (`f32`, `f64`, `f16`, `bf16`).
    Dtype(&'static str),
}

impl KernelPart {
    /// The part a kernel belongs to, from its name (`vid_<op>_group_<dtype>`).
    pub fn of_kernel(name: &str) -> KernelPart {
        for dtype in ["bf16", "f16", "f32", "f64"] {
            if name.ends_with(&format!("_group_{dtype}")) {
                return KernelPart::Dtype(dtype);
            }
        }
        KernelPart::Common
    }

    /// The preprocessor definition that selects this part in kernels/vid.cu.
    pub fn define(self) -> String {
        match self {
            KernelPart::Common => "-DVF_NO_DTYPE_KERNELS".into(),
            KernelPart::Dtype(dtype) => format!("-DVF_ONLY_DTYPE -DVF_ONLY_{dtype}"),
        }
    }
}

/// What to compile for a device: a CUBIN for its exact architecture when this NVRTC knows
/// it, else PTX for the newest virtual architecture it knows, which the driver compiles for
/// the device when loading it (a GPU newer than the NVRTC).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `sm_XX`.
    Cubin(String),
    /// `compute_XX`.
    Ptx(String),
}

impl Target {
    /// The `--gpu-architecture` value.
    pub fn arch(&self) -> &str {
        match self {
            Target::Cubin(a) | Target::Ptx(a) => a,
        }
    }
}

/// The target for a device of compute capability `(major, minor)`, given the architectures
/// NVRTC supports (as `nvrtcGetSupportedArchs` lists them: 75, 80, ...). A device older than
/// every supported architecture cannot run the kernels.
pub fn select_target(capability: (i32, i32), supported: &[i32]) -> Result<Target> {
    let cc = capability.0 * 10 + capability.1;
    if supported.contains(&cc) {
        return Ok(Target::Cubin(format!("sm_{cc}")));
    }
    match supported.iter().copied().filter(|&a| a <= cc).max() {
        Some(newest) => Ok(Target::Ptx(format!("compute_{newest}"))),
        None => Err(VidError::CudaUnavailable(format!(
            "this GPU (compute capability {}.{}) is older than every architecture this NVRTC \
             supports ({supported:?})",
            capability.0, capability.1
        ))),
    }
}

/// The architectures this NVRTC compiles for, as numbers (75, 80, ...).
pub fn supported_archs() -> Result<Vec<i32>> {
    probe::ensure_nvrtc()?;
    let mut count = 0;
    // SAFETY: plain out-parameter; then a buffer of `count` ints.
    let status = unsafe { sys::nvrtcGetNumSupportedArchs(&mut count) };
    if status != sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(VidError::CudaUnavailable(format!(
            "nvrtcGetNumSupportedArchs failed: {status:?}"
        )));
    }
    let mut archs = vec![0i32; count.max(0) as usize];
    let status = unsafe { sys::nvrtcGetSupportedArchs(archs.as_mut_ptr()) };
    if status != sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(VidError::CudaUnavailable(format!(
            "nvrtcGetSupportedArchs failed: {status:?}"
        )));
    }
    Ok(archs)
}

/// Compiles one part of the kernels for a target: a CUBIN, or PTX text (NUL-terminated)
/// for [`Target::Ptx`].
pub fn compile_part(target: &Target, part: KernelPart) -> Result<CompiledKernels> {
    let mut options = compile_options(target.arch());
    options.extend(part.define().split(' ').map(String::from));
    compile_with(
        PROGRAM_NAME,
        &kernel_source(),
        target.arch(),
        &options,
        matches!(target, Target::Ptx(_)),
    )
}

/// A compiled image and what the compiler said.
#[derive(Debug, Clone)]
pub struct CompiledKernels {
    /// The target, e.g. `sm_90` (or `compute_90` for PTX).
    pub arch: String,
    /// The image, loadable with `cuModuleLoadData`: a CUBIN, or NUL-terminated PTX.
    pub cubin: Vec<u8>,
    /// NVRTC's program log, including ptxas' per-kernel resource report.
    pub log: String,
}

/// NVRTC's version, (major, minor).
pub fn version() -> Result<(i32, i32)> {
    probe::ensure_nvrtc()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: plain out-parameters; the library is loaded.
    let status = unsafe { sys::nvrtcVersion(&mut major, &mut minor) };
    if status != sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(VidError::CudaUnavailable(format!(
            "nvrtcVersion failed: {status:?}"
        )));
    }
    Ok((major, minor))
}

/// Compiles the crate's kernels for `arch` (`sm_XX`). Needs libnvrtc but no GPU.
pub fn compile(arch: &str) -> Result<CompiledKernels> {
    compile_source(PROGRAM_NAME, &kernel_source(), arch)
}

/// Compiles any self-contained CUDA source with the crate's options.
pub(crate) fn compile_source(
    program_name: &str,
    source: &str,
    arch: &str,
) -> Result<CompiledKernels> {
    compile_with(program_name, source, arch, &compile_options(arch), false)
}

/// Compiles `source` with `options`; the image is PTX when `ptx`, else a CUBIN.
fn compile_with(
    program_name: &str,
    source: &str,
    arch: &str,
    options: &[String],
    ptx: bool,
) -> Result<CompiledKernels> {
    probe::ensure_nvrtc()?;
    let fail = |message: String, log: String| VidError::Compile {
        source_name: program_name.into(),
        arch: arch.into(),
        message,
        log,
    };
    let source = CString::new(source)
        .map_err(|_| fail("source contains a NUL byte".into(), String::new()))?;
    let name = CString::new(program_name)
        .map_err(|_| fail("name contains a NUL byte".into(), String::new()))?;
    let program = nvrtc::create_program(&source, Some(&name))
        .map_err(|e| fail(format!("{e:?}"), String::new()))?;
    // SAFETY: `program` is valid until destroyed below.
    let compiled = unsafe { nvrtc::compile_program(program, options) };
    let log = unsafe { nvrtc::get_program_log(program) }
        .map(|raw| c_chars_to_string(&raw))
        .unwrap_or_default();
    let result = match compiled {
        Err(e) => Err(fail(format!("{e:?}"), log)),
        Ok(()) => image(program, ptx)
            .map(|cubin| CompiledKernels {
                arch: arch.into(),
                cubin,
                log,
            })
            .map_err(|e| fail(e, String::new())),
    };
    // SAFETY: destroyed once.
    let _ = unsafe { nvrtc::destroy_program(program) };
    result
}

/// The program's PTX (NUL-terminated, as cuModuleLoadData wants it) or CUBIN.
fn image(program: sys::nvrtcProgram, ptx: bool) -> std::result::Result<Vec<u8>, String> {
    if ptx {
        // SAFETY: a compiled program.
        let text = unsafe { nvrtc::get_ptx(program) }.map_err(|e| format!("nvrtcGetPTX: {e:?}"))?;
        let mut bytes: Vec<u8> = text
            .iter()
            .map(|&c| c as u8)
            .take_while(|&b| b != 0)
            .collect();
        bytes.push(0);
        return Ok(bytes);
    }
    cubin(program)
}

fn cubin(program: sys::nvrtcProgram) -> std::result::Result<Vec<u8>, String> {
    let mut size = 0usize;
    // SAFETY: valid program; the buffer has `size` bytes.
    let status = unsafe { sys::nvrtcGetCUBINSize(program, &mut size) };
    if status != sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(format!("nvrtcGetCUBINSize: {status:?}"));
    }
    let mut image = vec![0u8; size];
    let status = unsafe { sys::nvrtcGetCUBIN(program, image.as_mut_ptr() as *mut c_char) };
    if status != sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(format!("nvrtcGetCUBIN: {status:?}"));
    }
    Ok(image)
}

fn c_chars_to_string(raw: &[c_char]) -> String {
    let bytes: Vec<u8> = raw
        .iter()
        .map(|&c| c as u8)
        .take_while(|&b| b != 0)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// One kernel's resources, from ptxas' report in the NVRTC log (test hook: `test-hooks`
/// feature).
#[cfg(feature = "test-hooks")]
#[doc(hidden)]
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelResources {
    /// The kernel's name.
    pub name: String,
    /// Registers per thread.
    pub registers: u32,
    /// Bytes of static shared memory.
    pub shared_bytes: u32,
    /// Bytes of stack frame.
    pub stack_bytes: u32,
    /// Bytes of spill stores.
    pub spill_stores: u32,
    /// Bytes of spill loads.
    pub spill_loads: u32,
}

/// Parses ptxas' `-v` report ("Compiling entry function 'k' ...", "N bytes stack frame, N bytes
/// spill stores, N bytes spill loads", "Used N registers, ... N bytes smem ...").
/// Test hook (`test-hooks` feature).
#[cfg(feature = "test-hooks")]
#[doc(hidden)]
pub fn resource_report(log: &str) -> Vec<KernelResources> {
    let mut kernels: Vec<KernelResources> = Vec::new();
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest.split('\'').next().unwrap_or_default().to_string();
            kernels.push(KernelResources {
                name,
                ..Default::default()
            });
            continue;
        }
        let Some(current) = kernels.last_mut() else {
            continue;
        };
        let number_before = |unit: &str| -> Option<u32> {
            let at = line.find(unit)?;
            line[..at].split_whitespace().last()?.parse().ok()
        };
        if line.contains("stack frame") {
            current.stack_bytes = number_before(" bytes stack frame").unwrap_or(0);
            current.spill_stores = number_before(" bytes spill stores").unwrap_or(0);
            current.spill_loads = number_before(" bytes spill loads").unwrap_or(0);
        }
        if line.contains("Used") && line.contains("registers") {
            current.registers = number_before(" registers").unwrap_or(0);
            current.shared_bytes = number_before(" bytes smem").unwrap_or(0);
        }
    }
    kernels
}
