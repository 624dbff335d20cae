//! Peak memory of the `Reduction::None` backward when the upstream gradient is a broadcast
//! scalar (`loss.sum().backward()` hands over a stride-0 expansion). It is read in place:
//! the backward allocates nothing of the inputs' size but the gradient of `mean` (which the
//! crate's host cache serves from the freed loss), where a full-size copy of the upstream
//! gradient once added 1x the input.
//!
//! One test in its own binary: the peak resident set (`VmHWM`, reset through
//! `/proc/self/clear_refs`) is process-wide.

use tch::{Device, Kind, Tensor};
use vidfuse::{f_vid_loss, Reduction, VidOptions};

/// `VmHWM` and `VmRSS` of this process, in bytes.
fn resident() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let field = |name: &str| -> u64 {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("{name} missing from /proc/self/status"));
        let kb: u64 = line
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("unreadable {line}"));
        kb * 1024
    };
    (field("VmHWM:"), field("VmRSS:"))
}

fn reset_peak() {
    std::fs::write("/proc/self/clear_refs", "5").expect("resetting VmHWM via clear_refs");
}

/// The peak growth of the resident set during `backward` of `loss.sum()`, with `mean` and
/// `target` of `shape` in f32, channels-last or NCHW.
fn backward_peak_growth(shape: &[i64], channels_last: bool) -> (u64, u64) {
    let f = (Kind::Float, Device::Cpu);
    let layout = |t: Tensor| {
        if channels_last {
            t.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2])
        } else {
            t
        }
    };
    let mean = layout(Tensor::randn(shape, f)).set_requires_grad(true);
    let target = layout(Tensor::randn(shape, f));
    let log_scale = Tensor::randn([shape[1]], f).set_requires_grad(true);
    let opts = VidOptions::default().reduction(Reduction::None);
    let loss = f_vid_loss(&mean, &target, &log_scale, &opts).unwrap();
    let root = loss.sum(Kind::Float);
    drop(loss);
    reset_peak();
    let (_, before) = resident();
    let grads = Tensor::run_backward(&[root], &[&mean, &log_scale], false, false);
    let (peak, _) = resident();
    assert!(bool::try_from(grads[0].isfinite().all()).unwrap());
    let input_bytes = (mean.numel() * 4) as u64;
    (peak.saturating_sub(before), input_bytes)
}

extern "C" {
    /// glibc's allocator tuning.
    fn mallopt(param: i32, value: i32) -> i32;
}
/// glibc's `M_MMAP_THRESHOLD`.
const M_MMAP_THRESHOLD: i32 = -3;

#[test]
fn none_backward_of_a_summed_loss_allocates_only_the_gradient() {
    // Every allocation of 1 MiB or more gets fresh pages and returns them when freed (glibc
    // otherwise raises the threshold after a large free and recycles heap memory, which
    // would hide a new allocation behind a freed one). AddressSanitizer's allocator refuses
    // the setting; it quarantines freed memory, so its large allocations are fresh anyway.
    // SAFETY: a plain setting of the C allocator, made before this test allocates.
    let _ = unsafe { mallopt(M_MMAP_THRESHOLD, 1 << 20) };
    // Warm up: the autograd engine's threads and libtorch's first-use allocations.
    backward_peak_growth(&[2, 3, 4, 4], false);
    vidfuse::cpu::empty_cache();
    for channels_last in [false, true] {
        let (growth, input) = backward_peak_growth(&[32, 64, 32, 32], channels_last);
        let ratio = growth as f64 / input as f64;
        // The gradient of mean takes the buffer the dropped per-element loss returned to
        // the crate's host cache, so nothing of the input's size is new (a copy of the
        // upstream gradient was 1x more).
        assert!(
            ratio < 0.5,
            "channels_last {channels_last}: the backward's peak grew by {ratio:.2}x the input \
             ({growth} bytes for {input}); nothing of the input's size should be new"
        );
        vidfuse::cpu::empty_cache();
    }
}
