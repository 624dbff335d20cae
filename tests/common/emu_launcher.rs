//! A kernel launcher that runs the CUDA launch plan on the host emulation of kernels/*.cu
//! and records every launch, for tests without a GPU.

use std::ffi::c_void;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tch::Tensor;
use vidfuse::cuda::{KernelLauncher, LaunchConfig};
use vidfuse::{VidError, VidOptions, VidTerm};

/// Runs launches on the host emulation and records them (see [`describe`]). Launch i runs
/// with seed `base + i`, the base from `VIDFUSE_EMU_SEED`, so that every launch draws its own
/// block order and interleaving and a failing test replays with the base its error names.
pub struct EmuLauncher {
    launched: Mutex<Vec<String>>,
    grids: Mutex<Vec<TraversalGrid>>,
    base_seed: u64,
    launches: AtomicU64,
    multiprocessors: Option<u32>,
}

/// The grid of a traversal launch and the virtual blocks it loops over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraversalGrid {
    pub blocks: u32,
    pub virtual_blocks: i64,
}

impl Default for EmuLauncher {
    fn default() -> Self {
        Self {
            launched: Mutex::default(),
            grids: Mutex::default(),
            base_seed: vidfuse_emu::seed().unwrap_or_else(|e| panic!("{e}")),
            launches: AtomicU64::new(0),
            multiprocessors: None,
        }
    }
}

impl KernelLauncher for EmuLauncher {
    fn launch(
        &self,
        kernel: &str,
        config: LaunchConfig,
        params: &mut [*mut c_void],
    ) -> Result<(), VidError> {
        self.launched.lock().unwrap().push(describe(kernel, params));
        if kernel.contains("_group_") {
            // SAFETY: params[0] points at the launch's TraverseGroupArgs, alive for the call.
            let virtual_blocks =
                unsafe { (params[0].cast::<u8>().add(16) as *const i64).read_unaligned() };
            self.grids.lock().unwrap().push(TraversalGrid {
                blocks: config.grid[0],
                virtual_blocks,
            });
        }
        let n = self.launches.fetch_add(1, Ordering::Relaxed);
        vidfuse_emu::launch_seeded(
            kernel,
            config.grid,
            config.block,
            config.shared_mem_bytes,
            params,
            self.base_seed.wrapping_add(n),
        )
        .map_err(|message| VidError::Launch {
            kernel: kernel.into(),
            message: format!(
                "{message}; launch {n} of this test: rerun it with {}={:#x}",
                vidfuse_emu::SEED_VAR,
                self.base_seed
            ),
        })
    }

    fn multiprocessor_count(&self) -> Result<Option<u32>, VidError> {
        Ok(self.multiprocessors)
    }
}

impl EmuLauncher {
    /// A launcher that reports a device of `count` SMs (`None`: unknown), which sizes the
    /// traversal grids.
    pub fn with_multiprocessors(count: Option<u32>) -> Self {
        Self {
            multiprocessors: count,
            ..Self::default()
        }
    }

    /// The launches recorded since the last call.
    pub fn take_launched(&self) -> Vec<String> {
        std::mem::take(&mut self.launched.lock().unwrap())
    }

    /// The traversal launches' grids recorded since the last call.
    pub fn take_grids(&self) -> Vec<TraversalGrid> {
        std::mem::take(&mut self.grids.lock().unwrap())
    }
}

/// The kernel's name, with the traversal of each segment for traversal launches, `+v` when
/// it reads 16-byte packs: `vid_sumsq_group_f32[warp+v,tile]`. Reads
/// `vf::TraverseGroupArgs`: `count` (8 bytes), `done` (8), `blocks` (8), then segments of
/// 168 bytes whose `tile` flag follows the 144-byte `TraverseArgs` (whose `vectorized` flag
/// is at byte 112).
pub fn describe(kernel: &str, params: &[*mut c_void]) -> String {
    if !kernel.contains("_group_") {
        return kernel.to_string();
    }
    // SAFETY: params[0] points at the launch's TraverseGroupArgs, alive for the call.
    let base = params[0] as *const u8;
    let count = unsafe { (base as *const i64).read_unaligned() } as usize;
    let kinds: Vec<&str> = (0..count)
        .map(|i| {
            let field =
                |at: usize| unsafe { (base.add(24 + i * 168 + at) as *const i64).read_unaligned() };
            match (field(144) != 0, field(112) != 0) {
                (true, true) => "tile+v",
                (true, false) => "tile",
                (false, true) => "warp+v",
                (false, false) => "warp",
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
