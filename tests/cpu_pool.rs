//! The CPU backend's cache of output buffers: outputs of 1 MiB or more are recycled, stay
//! correct when recycled (fresh inputs each time, so stale values would show), nearby sizes
//! share size classes, the limit holds and is settable, and the cache can be emptied.
//! One test calling the parts in order: the cache is process-wide.

mod common;

use common::*;
use tch::Kind;
use vidfuse::{Reduction, VidOptions};

#[test]
fn host_output_cache() {
    recycled_output_buffers_are_reused_correct_and_releasable();
    nearby_sizes_share_buffers();
    the_limit_is_settable_and_evicts_the_oldest();
}

fn recycled_output_buffers_are_reused_correct_and_releasable() {
    vidfuse::cpu::empty_cache();
    assert_eq!(vidfuse::cpu::cached_bytes(), 0);
    // [4, 64, 32, 32] f32: 1 MiB per tensor, the smallest size that is pooled.
    let shape = [4i64, 64, 32, 32];
    let bytes = 4 * 64 * 32 * 32 * 4;
    for (round, mem) in [Mem::Contiguous, Mem::ChannelsLast, Mem::Contiguous]
        .into_iter()
        .enumerate()
    {
        for reduction in [Reduction::None, Reduction::Mean] {
            let opts = VidOptions::default().reduction(reduction);
            let (m, t, a, up) = leaf_inputs(&shape, Kind::Float, Kind::Float, mem, &opts);
            let what = format!("round {round} {mem:?} {reduction:?}");
            let checked = check_op(&what, &m, &t, &a, &opts, &up);
            drop(checked);
        }
        // The outputs of this round (loss of None, d/dmean, d/dtarget) are back in the cache.
        assert!(
            vidfuse::cpu::cached_bytes() >= bytes,
            "round {round}: nothing was cached"
        );
        assert!(vidfuse::cpu::cached_bytes() <= vidfuse::cpu::MAX_CACHED_BYTES);
    }
    // A recycled buffer is handed out again: the cache shrinks while the tensor lives.
    let before = vidfuse::cpu::cached_bytes();
    let opts = VidOptions::default().reduction(Reduction::None);
    let (m, t, a, _) = leaf_inputs(&shape, Kind::Float, Kind::Float, Mem::Contiguous, &opts);
    let loss = vidfuse::vid_loss(&m, &t, &a, &opts);
    assert_eq!(vidfuse::cpu::cached_bytes(), before - bytes);
    drop(loss);
    assert_eq!(vidfuse::cpu::cached_bytes(), before);
    vidfuse::cpu::empty_cache();
    assert_eq!(vidfuse::cpu::cached_bytes(), 0);
}

/// A training loop whose batch size varies (64 sizes between 1 and 2 MiB of output) keeps a
/// handful of buffers, not one per size.
fn nearby_sizes_share_buffers() {
    vidfuse::cpu::empty_cache();
    let mut largest = 0;
    for batch in 64..128i64 {
        let shape = [batch, 16, 16, 16];
        drop(per_element_loss(&shape));
        largest = largest.max((batch * 16 * 16 * 16 * 4) as usize);
    }
    // Sizes 1-2 MiB fall into 8 size classes of at most `largest` * 1.125 bytes each.
    let cached = vidfuse::cpu::cached_bytes();
    assert!(
        cached <= 8 * largest * 9 / 8,
        "{cached} bytes cached for 64 nearby sizes (one buffer per size?)"
    );
    // And they are reused: the same sizes again allocate nothing new.
    for batch in 64..128i64 {
        let shape = [batch, 16, 16, 16];
        drop(per_element_loss(&shape));
    }
    assert_eq!(vidfuse::cpu::cached_bytes(), cached);
    vidfuse::cpu::empty_cache();
}

fn the_limit_is_settable_and_evicts_the_oldest() {
    let default = vidfuse::cpu::cache_limit();
    assert_eq!(default, vidfuse::cpu::MAX_CACHED_BYTES);
    let mib = 1 << 20;
    vidfuse::cpu::set_cache_limit(5 * mib / 2);
    // Three outputs of 1 MiB alive at once, then freed: the third does not fit the limit,
    // and the oldest is evicted.
    let outputs: Vec<_> = (0..3).map(|_| per_element_loss(&[4, 64, 32, 32])).collect();
    drop(outputs);
    assert_eq!(vidfuse::cpu::cached_bytes(), 2 * mib);
    vidfuse::cpu::set_cache_limit(0);
    assert_eq!(vidfuse::cpu::cached_bytes(), 0);
    drop(per_element_loss(&[4, 64, 32, 32]));
    assert_eq!(vidfuse::cpu::cached_bytes(), 0, "cached with limit 0");
    vidfuse::cpu::set_cache_limit(default);
}

/// The per-element loss (an output of the CPU path's cache) of fresh f32 inputs.
fn per_element_loss(shape: &[i64]) -> tch::Tensor {
    let opts = VidOptions::default().reduction(Reduction::None);
    let (m, t, a, _) = leaf_inputs(shape, Kind::Float, Kind::Float, Mem::Contiguous, &opts);
    vidfuse::vid_loss(&m, &t, &a, &opts)
}
