//! The traffic model: the bytes each pass moves, from the plan, against the bytes floor (the
//! inputs read, the gradients written), and the grids every modelled GPU gets.

use tch::Kind;

use super::abi::dtype_suffix;
use super::acc_kind;
use super::launch::{group_launch, TraverseItem};
use super::traversal::{traversal_grid, Traversal, TILE_PACKS_PER_THREAD};
use crate::validate::{Geometry, Layout};

/// Bytes the combine moves besides the partials and per-channel arrays: a split combine's
/// run sums (written and read) and the f64 loss terms (written and read).
fn combine_extra(t: &Traversal, channels: usize, acc: f64) -> f64 {
    2.0 * t.run_slots(channels) as f64 * acc + 2.0 * 8.0 * channels as f64
}

/// Bytes a Mean/Sum forward and backward move, from the plan: inputs and outputs once,
/// partial sums written and read once, per-channel arrays (sums, log_scale, channel
/// table, log_scale gradient) once each, and the combine's extra.
pub(crate) fn traffic(g: &Geometry, kind: Kind) -> (f64, f64, Traversal) {
    let elt = kind.elt_size_in_bytes() as f64;
    let acc = acc_kind(kind).elt_size_in_bytes() as f64;
    let t = Traversal::plan(g, 16 / kind.elt_size_in_bytes(), Some(0)).unwrap();
    let (n, c) = (g.numel() as f64, g.channels as f64);
    let partials = t.slots(g.channels) as f64 * acc;
    let forward =
        2.0 * n * elt + 2.0 * partials + 2.0 * c * acc + combine_extra(&t, g.channels, acc);
    let backward = 3.0 * n * elt + 2.0 * c * acc + 2.0 * 2.0 * c * acc + c * acc;
    (forward, backward, t)
}

/// Every grid is all the chunks (up to 4 waves) or 2-4 waves; no SM count (unknown, or
/// a driver's 0) is one block per chunk.
#[test]
fn traversal_grids_cover_two_to_four_waves() {
    for blocks in 0..20_000 {
        assert_eq!(traversal_grid(blocks, None), blocks);
        assert_eq!(traversal_grid(blocks, Some(0)), blocks);
        for sms in [1u32, 2, 3, 46, 84, 108, 132, 170] {
            let (grid, wave) = (traversal_grid(blocks, Some(sms)), 2 * sms as usize);
            let ok = if blocks <= 4 * wave {
                grid == blocks
            } else {
                (2 * wave..=4 * wave).contains(&grid)
            };
            assert!(ok, "{blocks} chunks, {sms} SMs: {grid} blocks");
        }
    }
}

/// SM counts of the modelled GPUs (T4's 40 aside: 46 to 170).
const DEVICES: [u32; 5] = [46, 84, 108, 132, 170];

/// The plan's bytes are within 3% of the floor (reading the inputs; backward also
/// writing the gradient) from 16M elements on (10% for [4096, 1000]), every case from 32 MiB
/// of each input has chunks for two waves of two blocks per SM on a 170-SM GPU, every
/// thread walks at least TILE_PACKS_PER_THREAD packs per chunk, every modelled GPU gets a
/// grid of 2-4 waves (all chunks when fewer), and only the grid depends on the GPU: the
/// kernels' arguments, hence the partials, the bytes and the result's bits, do not.
#[test]
fn traffic_is_near_the_bytes_floor_with_enough_blocks() {
    let maps: [[usize; 4]; 4] = [
        [64, 256, 32, 32],
        [256, 256, 16, 16],
        [256, 512, 8, 8],
        [1024, 256, 56, 56],
    ];
    let mut cases = Vec::new();
    for [n, c, h, w] in maps {
        for layout in [Layout::ChannelsFirst, Layout::ChannelsLast] {
            cases.push(Geometry {
                batch: n,
                channels: c,
                inner: h * w,
                layout,
            });
        }
    }
    for (n, c) in [(4096, 1000), (8192, 32000), (16384, 1001)] {
        cases.push(Geometry {
            batch: n,
            channels: c,
            inner: 1,
            layout: Layout::ChannelsLast,
        });
    }
    // Column counts that are multiples of no pack: RGB images channels-last, and short
    // NCHW rows with an odd C * S.
    for (n, c, s, layout) in [
        (256, 3, 224 * 224, Layout::ChannelsLast),
        (64, 255, 52 * 52, Layout::ChannelsLast),
        (65536, 85, 3 * 3, Layout::ChannelsFirst),
    ] {
        cases.push(Geometry {
            batch: n,
            channels: c,
            inner: s,
            layout,
        });
    }
    let mut report = String::new();
    for g in &cases {
        for kind in [Kind::Float, Kind::BFloat16] {
            let (forward, backward, t) = traffic(g, kind);
            let floor = g.numel() as f64 * kind.elt_size_in_bytes() as f64;
            let (f, b) = (forward / (2.0 * floor), backward / (3.0 * floor));
            report += &format!(
                "{g:?} {kind:?}: forward {f:.4}x, backward {b:.4}x the floor, {} chunks ({})\n",
                t.blocks,
                if t.tile { "tile" } else { "warp" }
            );
            let allowed = if g.numel() >= 1 << 24 {
                1.03
            } else if (g.batch, g.channels) == (4096, 1000) {
                1.10
            } else {
                f64::INFINITY
            };
            assert!(f <= allowed && b <= allowed, "{report}");
            assert!(t.vectorized, "not in 16-byte packs\n{report}");
            // Chunks hold the same bytes in every dtype: enough of them from 32 MiB of each
            // input on (8M f32 elements).
            assert!(
                t.blocks >= 2 * 2 * 170 || floor < (32 << 20) as f64,
                "too few blocks\n{report}"
            );
            // Enough loads per thread to spread a chunk's fixed costs (bf16 chunks had 4 packs
            // per thread, which a review of the SASS found too few).
            let pack = 16 / kind.elt_size_in_bytes();
            assert!(
                t.packs_per_thread(pack) >= TILE_PACKS_PER_THREAD,
                "{} packs per thread per chunk\n{report}",
                t.packs_per_thread(pack)
            );
            let item = TraverseItem {
                dtype: dtype_suffix(kind).unwrap(),
                traversal: t,
                args: t.args(g),
                _problem: Default::default(),
            };
            let (first, _) = group_launch(&[&item], 0, None).unwrap();
            for sms in DEVICES {
                let (args, config) = group_launch(&[&item], 0, Some(sms)).unwrap();
                let (grid, wave) = (config.grid[0] as usize, 2 * sms as usize);
                report += &format!("  {sms} SMs: {grid} blocks\n");
                assert!(
                    grid <= 4 * wave && (grid == t.blocks || grid >= 2 * wave),
                    "grid not in 2-4 waves\n{report}"
                );
                // The arguments fix every chunk's partials (their slots and values).
                assert_eq!(args, first, "arguments depend on the GPU\n{report}");
            }
        }
    }
    println!("{report}");
}

/// Bytes of one training step (forward and backward) on the one-pass path, from the plan:
/// the forward reads the inputs and writes the gradient(s) of mean (and target), its
/// partial sums written and read once, per-channel arrays (sums, log_scale, the gradient
/// factors) once each; the backward moves per-channel arrays only (its grad launch skips
/// every chunk when the upstream gradient is 1).
fn one_pass_step_bytes(g: &Geometry, kind: Kind, target_grad: bool) -> f64 {
    let elt = kind.elt_size_in_bytes() as f64;
    let acc = acc_kind(kind).elt_size_in_bytes() as f64;
    let t = Traversal::plan(g, 16 / kind.elt_size_in_bytes(), Some(0)).unwrap();
    let (n, c) = (g.numel() as f64, g.channels as f64);
    let partials = t.slots(g.channels) as f64 * acc;
    let outputs = if target_grad { 2.0 } else { 1.0 };
    let forward = (2.0 + outputs) * n * elt
        + 2.0 * partials
        + 5.0 * c * acc
        + combine_extra(&t, g.channels, acc);
    let backward = 2.0 * c * acc + 2.0 * 2.0 * c * acc + c * acc;
    forward + backward
}

/// A one-pass training step moves 3 element-sized tensors (4 with a target gradient)
/// within 3% from 16M elements on, against 5 (6) for the two passes of `traffic`.
#[test]
fn one_pass_step_moves_three_tensors() {
    for (dims, layout) in [
        ([64usize, 256, 32, 32], Layout::ChannelsFirst),
        ([64, 256, 32, 32], Layout::ChannelsLast),
        ([1024, 256, 56, 56], Layout::ChannelsFirst),
        ([1024, 256, 56, 56], Layout::ChannelsLast),
    ] {
        let g = Geometry {
            batch: dims[0],
            channels: dims[1],
            inner: dims[2] * dims[3],
            layout,
        };
        for kind in [Kind::Float, Kind::BFloat16] {
            let tensor = (g.numel() * kind.elt_size_in_bytes()) as f64;
            for (target_grad, tensors) in [(false, 3.0), (true, 4.0)] {
                let ratio = one_pass_step_bytes(&g, kind, target_grad) / (tensors * tensor);
                assert!(
                    (1.0..1.03).contains(&ratio),
                    "{dims:?} {layout:?} {kind:?}: {ratio:.4} x {tensors} tensors"
                );
            }
            let (forward, backward, _) = traffic(&g, kind);
            let two_pass = (forward + backward) / tensor;
            assert!(
                (5.0..5.15).contains(&two_pass),
                "two passes: {two_pass:.3} tensors"
            );
        }
    }
}
