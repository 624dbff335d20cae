//! The CPU backend's cache of output buffers: outputs of 1 MiB or more are recycled, stay
//! correct when recycled (fresh inputs each time, so stale values would show), and the cache
//! can be emptied. One test: the cache is process-wide.

mod common;

use common::*;
use tch::Kind;
use vidfuse::{Reduction, VidOptions};

#[test]
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
