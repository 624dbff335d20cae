//! A kernel launcher that runs the CUDA launch plan on the host emulation of kernels/*.cu
//! and records every launch, for tests without a GPU.

use std::ffi::c_void;
use std::sync::{Arc, Mutex};

use tch::Tensor;
use vidfuse::cuda::{KernelLauncher, LaunchConfig};
use vidfuse::{VidError, VidOptions, VidTerm};

/// Runs launches on the host emulation and records them (see [`describe`]).
#[derive(Default)]
pub struct EmuLauncher {
    launched: Mutex<Vec<String>>,
}

impl KernelLauncher for EmuLauncher {
    fn launch(
        &self,
        kernel: &str,
        config: LaunchConfig,
        params: &mut [*mut c_void],
    ) -> Result<(), VidError> {
        self.launched.lock().unwrap().push(describe(kernel, params));
        vidfuse_emu::launch(
            kernel,
            config.grid,
            config.block,
            config.shared_mem_bytes,
            params,
        )
        .map_err(|message| VidError::Launch {
            kernel: kernel.into(),
            message,
        })
    }

    /// Few multiprocessors: keeps grids small, and makes the plan split rows into many blocks.
    fn multiprocessors(&self) -> usize {
        2
    }
}

impl EmuLauncher {
    /// The launches recorded since the last call.
    pub fn take_launched(&self) -> Vec<String> {
        std::mem::take(&mut self.launched.lock().unwrap())
    }
}

/// The kernel's name, with the traversal of each segment for traversal launches:
/// `vid_sumsq_group_f32[warp,tile]`. Reads `vf::TraverseGroupArgs`: `count` (8 bytes), `done`
/// (8), then segments of 168 bytes whose `tile` flag follows the 144-byte `TraverseArgs`.
pub fn describe(kernel: &str, params: &[*mut c_void]) -> String {
    if !kernel.contains("_group_") {
        return kernel.to_string();
    }
    // SAFETY: params[0] points at the launch's TraverseGroupArgs, alive for the call.
    let base = params[0] as *const u8;
    let count = unsafe { (base as *const i64).read_unaligned() } as usize;
    let kinds: Vec<&str> = (0..count)
        .map(|i| {
            let tile = unsafe { (base.add(16 + i * 168 + 144) as *const i64).read_unaligned() };
            if tile != 0 {
                "tile"
            } else {
                "warp"
            }
        })
        .collect();
    format!("{kernel}[{}]", kinds.join(","))
}

/// The op through an emulated launcher.
pub fn emulated(
    launcher: &Arc<EmuLauncher>,
) -> impl Fn(&Tensor, &Tensor, &Tensor, &VidOptions) -> Result<Tensor, VidError> {
    let launcher = launcher.clone();
    move |m, t, a, o| vidfuse::f_vid_loss_with_launcher(launcher.clone(), m, t, a, o)
}

/// The grouped op through an emulated launcher.
pub fn emulated_grouped(
    launcher: &Arc<EmuLauncher>,
    terms: &[VidTerm<'_>],
    opts: &VidOptions,
) -> Result<Tensor, VidError> {
    vidfuse::f_vid_loss_grouped_with_launcher(launcher.clone(), terms, opts)
}
