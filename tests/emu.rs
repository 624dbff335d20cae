//! The CUDA kernels, run on the CPU: the exact kernels/*.cu sources compiled for the host
//! with a SIMT emulation (emu/), driven by the crate's own launch plan through
//! `f_vid_loss_with_launcher`, so grids, argument structs and workspaces are checked too.
//! Values and gradients are compared with the f64 reference. `cargo test emu` selects these.
//! The emulation is adversarial (see emu/src/lib.rs): blocks and threads run in a seeded
//! random order and shared-memory races, unwritten reads and bad warp masks are errors.

mod common;

use std::ffi::c_void;
use std::sync::Arc;

use common::emu_launcher::{emulated, EmuLauncher};
use common::*;
use tch::{Kind, Tensor};
use vidfuse::cuda::{KernelLauncher, LaunchConfig};
use vidfuse::{f_vid_loss_with_launcher, Reduction, VidError, VidOptions};

const KINDS: [Kind; 4] = [Kind::Float, Kind::Double, Kind::Half, Kind::BFloat16];

/// Checks one shape in every dtype, both layouts and all option combinations, half of them
/// on the one-pass path (the forward writes the gradients), half on the two-pass path.
fn check_shape(launcher: &Arc<EmuLauncher>, shape: &[i64], mems: &[Mem]) {
    let op = emulated(launcher);
    for (i, &kind) in KINDS.iter().enumerate() {
        // Alternate log_scale between f32 and the inputs' dtype.
        let scale_kind = if i % 2 == 0 { Kind::Float } else { kind };
        for &mem in mems {
            for (j, opts) in all_options().into_iter().enumerate() {
                let opts = opts.gradients_in_forward((i + j) % 2 == 0);
                // A sum of this many O(1) terms exceeds f16's range (65504): inf is then the
                // correctly rounded answer, but not comparable with the reference.
                let numel: i64 = shape.iter().product();
                if kind == Kind::Half && opts.reduction_mode() == Reduction::Sum && numel > 8192 {
                    continue;
                }
                let (m, t, a, up) = leaf_inputs(shape, kind, scale_kind, mem, &opts);
                let what = format!("emu {shape:?} {kind:?} {mem:?} {opts:?}");
                check_op_with(&op, &what, &m, &t, &a, &opts, &up);
            }
        }
    }
}

#[test]
fn emu_registers_every_kernel_the_plan_uses() {
    let registered = vidfuse_emu::kernel_names();
    for name in expected_kernels() {
        assert!(
            registered.contains(&name),
            "{name} is not compiled into the emulation"
        );
    }
}

#[test]
fn emu_small_shapes_all_dtypes_layouts_reductions() {
    let launcher = Arc::new(EmuLauncher::default());
    // Odd sizes, C = 1, [N, C], 3-D and 5-D; none a multiple of the block or pack width.
    for shape in [
        vec![3i64, 5, 7, 9],
        vec![2, 1, 5, 3],
        vec![7, 3],
        vec![5, 6, 11],
        vec![2, 3, 2, 3, 5],
    ] {
        check_shape(&launcher, &shape, &[Mem::Contiguous, Mem::ChannelsLast]);
    }
}

#[test]
fn emu_warp_traversal_with_several_segments() {
    // NCHW rows of S >= 512 take the warp traversal; S = 4500 > 4096 gives two segments per
    // row, and 4500 is a multiple of the f32 pack (4) but not of the f16/bf16 pack (8);
    // S = 4501 and 515 are multiples of no pack, so every row after the first starts and ends
    // between pack boundaries: 16-byte packs in the bulk, scalar heads and tails.
    let launcher = Arc::new(EmuLauncher::default());
    for shape in [[2i64, 3, 4500], [2, 3, 4501], [3, 2, 515]] {
        check_shape(&launcher, &shape, &[Mem::Contiguous]);
    }
    let launched = launcher.take_launched();
    for kernel in [
        "vid_sumsq_group_f32[warp+v]",
        "vid_sumsq_grad_group_f32[warp+v]",
        "vid_grad_group_bf16[warp+v]",
        "vid_grad_none_group_f16[warp+v]",
        "vid_loss_group_f64[warp+v]",
    ] {
        assert!(
            launched.iter().any(|k| k == kernel),
            "{kernel} was not used: {launched:?}"
        );
    }
}

#[test]
fn emu_tile_traversal_wide_and_short_rows() {
    let launcher = Arc::new(EmuLauncher::default());
    // Channels-last with C = 1100: more than one tile of 256 packs (several blocks in y).
    check_shape(&launcher, &[3, 1100, 2, 1], &[Mem::ChannelsLast]);
    // NCHW with short rows (S = 20) and many channels: the [N][C*S] tile view, channel = col / S.
    check_shape(&launcher, &[4, 70, 4, 5], &[Mem::Contiguous]);
    // Enough rows for several row chunks per tile (a narrow view's chunk covers about 8K
    // elements).
    check_shape(&launcher, &[64, 3, 16, 16], &[Mem::ChannelsLast]);
    let launched = launcher.take_launched();
    assert!(
        launched.iter().all(|k| !k.contains("warp")),
        "warp traversal used for short rows"
    );
}

/// The traversal of every segment of every traversal launch recorded (`describe`), e.g.
/// `tile+v`, `warp`.
fn traversals(launched: &[String]) -> Vec<&str> {
    launched
        .iter()
        .filter_map(|k| k.split_once('['))
        .flat_map(|(_, kinds)| kinds.trim_end_matches(']').split(','))
        .collect()
}

/// Whether there were traversals, all reading 16-byte packs.
fn all_packed(launched: &[String]) -> bool {
    let kinds = traversals(launched);
    !kinds.is_empty() && kinds.iter().all(|k| k.ends_with("+v"))
}

#[test]
fn emu_tile_traversal_any_column_count_in_packs() {
    // Column counts that are multiples of no pack width: the tile traversal walks super-rows
    // of k rows (k * cols a multiple of the pack) in 16-byte packs, the view's last partial
    // pack element by element. Channels-last with C = 3, 5, 255, 1001; [N, C] with odd C;
    // NCHW with short rows and an odd C * S.
    let launcher = Arc::new(EmuLauncher::default());
    for shape in [
        [5i64, 3, 7, 9],
        [3, 5, 4, 7],
        [2, 255, 3, 5],
        [2, 1001, 1, 3],
    ] {
        check_shape(&launcher, &shape, &[Mem::ChannelsLast]);
    }
    for shape in [
        vec![37i64, 7],
        vec![5, 1001],
        vec![3, 5, 3, 3],
        vec![4, 7, 1, 5],
    ] {
        check_shape(&launcher, &shape, &[Mem::Contiguous]);
    }
    let launched = launcher.take_launched();
    assert!(
        all_packed(&launched),
        "a traversal did not read 16-byte packs: {launched:?}"
    );
}

/// `shape` in `mem`, `offset` elements into a fresh storage: the base lies past a 16-byte
/// boundary unless `offset` is a multiple of the pack.
fn offset_random(shape: &[i64], kind: Kind, mem: Mem, offset: i64) -> Tensor {
    let numel: i64 = shape.iter().product();
    let flat = random(&[numel + offset], kind, Mem::Contiguous).narrow(0, offset, numel);
    match mem {
        Mem::Contiguous => flat.view(shape),
        Mem::ChannelsLast => {
            let (order, inverse) = channels_last_perms(shape.len());
            let nhwc: Vec<i64> = order.iter().map(|&d| shape[d as usize]).collect();
            flat.view(&nhwc[..]).permute(&inverse[..])
        }
    }
}

#[test]
fn emu_misaligned_views_take_packs_when_their_offsets_agree() {
    // Views starting 1 or 3 elements into their storage: the warp and tile traversals start
    // their packs at the first 16-byte boundary (outputs are allocated with the same offset),
    // with the elements before it and after the last one walked one by one. Views whose
    // offsets differ have no common pack boundaries and take element accesses.
    let launcher = Arc::new(EmuLauncher::default());
    let op = emulated(&launcher);
    let cases = [
        (vec![2i64, 3, 600], Mem::Contiguous),
        (vec![5, 12], Mem::Contiguous),
        (vec![3, 5, 2, 3], Mem::Contiguous),
        (vec![2, 5, 3, 4], Mem::ChannelsLast),
        // Several column tiles; several row chunks.
        (vec![6, 1001], Mem::Contiguous),
        (vec![32, 3, 16, 16], Mem::ChannelsLast),
    ];
    for (target_offset, packed) in [(None, true), (Some(0), false)] {
        for kind in KINDS {
            for (shape, mem) in &cases {
                for offset in [1, 3] {
                    for opts in all_options() {
                        let numel: i64 = shape.iter().product();
                        if kind == Kind::Half
                            && opts.reduction_mode() == Reduction::Sum
                            && numel > 8192
                        {
                            continue; // beyond f16's range, as in check_shape
                        }
                        let m = offset_random(shape, kind, *mem, offset).set_requires_grad(true);
                        let t = offset_random(shape, kind, *mem, target_offset.unwrap_or(offset));
                        let a = random_log_scale(shape[1], Kind::Float).set_requires_grad(true);
                        let up = if opts.reduction_mode() == Reduction::None {
                            offset_random(shape, kind, *mem, offset)
                        } else {
                            random_upstream(shape, kind, &opts)
                        };
                        let what = format!(
                            "emu misaligned {shape:?} {mem:?} {kind:?} offset {offset} target {target_offset:?} {opts:?}"
                        );
                        check_op_with(&op, &what, &m, &t, &a, &opts, &up);
                    }
                }
            }
        }
        let launched = launcher.take_launched();
        let kinds = traversals(&launched);
        if packed {
            assert!(
                all_packed(&launched),
                "misaligned views with one offset not read in packs: {launched:?}"
            );
        } else {
            assert!(
                !kinds.is_empty() && kinds.iter().all(|k| !k.ends_with("+v")),
                "views with different offsets read in packs: {launched:?}"
            );
        }
    }
}

#[test]
fn emu_extreme_log_scale_is_finite_and_exact() {
    let launcher = Arc::new(EmuLauncher::default());
    let op = emulated(&launcher);
    for opts in all_options() {
        let (m, t, _, up) = leaf_inputs(
            &[2, 4, 3, 5],
            Kind::Float,
            Kind::Float,
            Mem::Contiguous,
            &opts,
        );
        let a = Tensor::from_slice(&[80.0f32, -80.0, 1000.0, -30.0]).set_requires_grad(true);
        let checked = check_op_with(
            &op,
            &format!("emu extreme {opts:?}"),
            &m,
            &t,
            &a,
            &opts,
            &up,
        );
        for g in checked.grads.iter().flatten() {
            assert!(
                g.isfinite().all().int64_value(&[]) == 1,
                "non-finite gradient"
            );
        }
    }
}

#[test]
fn emu_results_are_bitwise_deterministic() {
    let launcher = Arc::new(EmuLauncher::default());
    let op = emulated(&launcher);
    for (shape, mem) in [
        (vec![3i64, 4, 700], Mem::Contiguous),
        (vec![6, 300, 3, 3], Mem::ChannelsLast),
    ] {
        let opts = VidOptions::default().reduction(Reduction::Sum);
        let (m, t, a, up) = leaf_inputs(&shape, Kind::Float, Kind::Float, mem, &opts);
        assert_deterministic(
            &op,
            &format!("emu {shape:?} {mem:?}"),
            [&m, &t, &a],
            &opts,
            &up,
        );
    }
}

/// SM counts a launcher reports: unknown (one block per chunk), 1 and 2 (8 and 16 blocks,
/// each looping over several chunks, across segments and traversals), and real GPUs.
const MULTIPROCESSORS: [Option<u32>; 6] = [None, Some(1), Some(2), Some(46), Some(132), Some(170)];

/// Asserts that every traversal grid recorded covers all chunks or 2-4 waves of 2 blocks per
/// SM, and returns whether some block looped over several chunks.
fn grids_in_waves(launcher: &EmuLauncher, sms: Option<u32>) -> bool {
    let grids = launcher.take_grids();
    assert!(!grids.is_empty(), "no traversal launch");
    let wave = 2 * sms.unwrap_or(u32::MAX / 8) as i64;
    for g in &grids {
        let blocks = g.blocks as i64;
        let all = blocks == g.virtual_blocks.max(1);
        assert!(
            blocks <= 4 * wave && (all || (blocks >= 2 * wave && blocks < g.virtual_blocks)),
            "{sms:?} SMs: {g:?}"
        );
    }
    grids.iter().any(|g| (g.blocks as i64) < g.virtual_blocks)
}

#[test]
fn emu_results_are_bitwise_identical_whatever_the_grid() {
    // 16-64 chunks each: warp segments, tile row chunks, column tiles (C = 1100), in packs
    // and (tensors at different offsets from a 16-byte boundary) element by element.
    let cases = [
        (vec![4i64, 32, 600], Mem::Contiguous, 0),
        (vec![128, 8, 16, 16], Mem::ChannelsLast, 0),
        (vec![48, 1100, 3, 1], Mem::ChannelsLast, 0),
        (vec![4, 32, 600], Mem::Contiguous, 1),
        (vec![128, 8, 16, 16], Mem::ChannelsLast, 1),
    ];
    for kind in [Kind::Float, Kind::BFloat16] {
        for (shape, mem, target_offset) in &cases {
            for opts in [
                VidOptions::default().reduction(Reduction::Sum),
                VidOptions::default().reduction(Reduction::None),
            ] {
                let m = offset_random(shape, kind, *mem, 0).set_requires_grad(true);
                let t = offset_random(shape, kind, *mem, *target_offset).set_requires_grad(true);
                let a = random_log_scale(shape[1], Kind::Float).set_requires_grad(true);
                let up = random_upstream(shape, kind, &opts);
                let mut first: Option<Checked> = None;
                let mut looped = false;
                for sms in MULTIPROCESSORS {
                    let launcher = Arc::new(EmuLauncher::with_multiprocessors(sms));
                    let what = format!("emu {shape:?} {mem:?} {kind:?} {opts:?} {sms:?} SMs");
                    let got = check_op_with(&emulated(&launcher), &what, &m, &t, &a, &opts, &up);
                    looped |= grids_in_waves(&launcher, sms);
                    let Some(first) = &first else {
                        first = Some(got);
                        continue;
                    };
                    assert!(got.loss.equal(&first.loss), "{what}: loss bits");
                    for (g, f) in got.grads.iter().zip(&first.grads) {
                        let (g, f) = (g.as_ref().unwrap(), f.as_ref().unwrap());
                        assert!(g.equal(f), "{what}: gradient bits");
                    }
                }
                assert!(looped, "{shape:?} {kind:?}: no block looped over chunks");
            }
        }
    }
}

#[test]
fn emu_launch_failure_is_an_error_not_a_panic() {
    // A launcher whose kernels all fail: the op must return the launch error.
    struct Failing;
    impl KernelLauncher for Failing {
        fn launch(
            &self,
            kernel: &str,
            _: LaunchConfig,
            _: &mut [*mut c_void],
        ) -> Result<(), VidError> {
            Err(VidError::Launch {
                kernel: kernel.into(),
                message: "device lost".into(),
            })
        }
    }
    let m = Tensor::randn([2, 3, 4], cpu(Kind::Float));
    let a = Tensor::randn([3], cpu(Kind::Float));
    let err = f_vid_loss_with_launcher(
        Arc::new(Failing),
        &m,
        &m.randn_like(),
        &a,
        &VidOptions::default(),
    )
    .expect_err("a failing launch must be an error");
    assert!(err.to_string().contains("device lost"), "{err}");
}

/// Partials with many chunks per channel: the combine sums runs of chunks in parallel in a
/// first launch, then the runs' sums (and the loss terms, and the epilogue) in a second.
/// Channels-last [1040, 64, 8, 8] has 520 (f32) or 260 (bf16) chunks of one partial per
/// channel (runs of at most 256); NCHW [4224, 2, 240] has 66 or 33 chunks of 240 partials per
/// channel (runs of at most 32). Both have several blocks in each launch, so the loss terms
/// cross blocks to the epilogue. Mean and Sum forward (the loss terms, the epilogue) and None backward (two sums per
/// channel, for the log_scale gradient) against the reference.
#[test]
fn emu_split_combine_matches_the_reference() {
    let launcher = Arc::new(EmuLauncher::default());
    let op = emulated(&launcher);
    for (shape, mem) in [
        (vec![1040i64, 64, 8, 8], Mem::ChannelsLast),
        (vec![4224, 2, 240], Mem::Contiguous),
    ] {
        for kind in [Kind::Float, Kind::BFloat16] {
            for reduction in [Reduction::Mean, Reduction::None] {
                let opts = VidOptions::default().reduction(reduction).full(true);
                let (m, t, a, up) = leaf_inputs(&shape, kind, Kind::Float, mem, &opts);
                let what = format!("emu {shape:?} {kind:?} {mem:?} {opts:?}");
                check_op_with(&op, &what, &m, &t, &a, &opts, &up);
                let launched = launcher.take_launched();
                let combines = launched
                    .iter()
                    .filter(|k| *k == "vid_channel_sum_group")
                    .count();
                assert_eq!(combines, 2, "{what}: {launched:?}");
            }
        }
    }
}
