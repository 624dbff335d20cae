//! A cache of host buffers for the CPU backend's per-element outputs (gradients and
//! per-element losses).
//!
//! Freshly allocated memory costs page faults and kernel zeroing: for a 16 MB gradient on two
//! cores that is more than the whole backward pass (measured: BENCHMARKS.md). A training loop
//! asks for the same sizes every step, so buffers libtorch frees come back here and are
//! handed out again. Small buffers go to libtorch's allocator; the cache holds at most
//! [`MAX_CACHED_BYTES`]; [`empty_cache`] returns it all to the system.

use std::collections::HashMap;
use std::ffi::{c_char, c_void, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Mutex, MutexGuard};

use tch::Tensor;

use crate::error::{Result, VidError};
use crate::ffi;

/// Outputs smaller than this come from libtorch's allocator (their faults are cheap).
const MIN_POOLED_BYTES: usize = 1 << 20;
/// The most the cache keeps while no tensor uses it.
pub const MAX_CACHED_BYTES: usize = 1 << 30;
/// Alignment of every block (a cache line, and enough for any vector load).
const ALIGN: usize = 64;

/// Free blocks by size in bytes.
#[derive(Default)]
struct Pool {
    free: HashMap<usize, Vec<usize>>,
    cached_bytes: usize,
}

static POOL: Mutex<Option<Pool>> = Mutex::new(None);

fn pool() -> MutexGuard<'static, Option<Pool>> {
    // A panic while holding the lock cannot leave the map inconsistent: keep going.
    POOL.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn layout(bytes: usize) -> std::alloc::Layout {
    std::alloc::Layout::from_size_align(bytes, ALIGN).expect("valid layout")
}

/// An uninitialised CPU tensor with `like`'s sizes, strides (dense, any layout) and dtype.
pub(crate) fn empty_like(like: &Tensor) -> Result<Tensor> {
    let bytes = like.numel() * like.kind().elt_size_in_bytes();
    let code = scalar_type(like.kind());
    let (Some(code), true) = (code, bytes >= MIN_POOLED_BYTES) else {
        return Ok(like.f_empty_like()?);
    };
    let cached = pool().as_mut().and_then(|p| {
        let block = p.free.get_mut(&bytes)?.pop()?;
        p.cached_bytes -= bytes;
        Some(block)
    });
    let data = match cached {
        Some(block) => block as *mut u8,
        // SAFETY: non-zero size, valid alignment.
        None => unsafe { std::alloc::alloc(layout(bytes)) },
    };
    if data.is_null() {
        return Err(VidError::Torch(format!(
            "out of host memory allocating {bytes} bytes"
        )));
    }
    let (sizes, strides) = (like.size(), like.stride());
    let mut out = std::ptr::null_mut();
    // SAFETY: `data` holds `bytes` bytes, enough for the dense sizes/strides of `like`; the
    // tensor owns it until `release_block` runs.
    let err = unsafe {
        ffi::vf_tensor_from_owned(
            data as *mut c_void,
            sizes.as_ptr(),
            strides.as_ptr(),
            sizes.len(),
            code,
            Some(release_block),
            bytes as *mut c_void,
            &mut out,
        )
    };
    if !err.is_null() {
        release(data as usize, bytes);
        // SAFETY: a message from the shim, freed once.
        let message = unsafe { CStr::from_ptr(err as *const c_char) }
            .to_string_lossy()
            .into_owned();
        unsafe { ffi::vf_free_error(err) };
        return Err(VidError::Torch(message));
    }
    // SAFETY: a new at::Tensor* owned by us from here on.
    Ok(unsafe { Tensor::from_ptr(out as *mut torch_sys::C_tensor) })
}

/// c10's ScalarType code of the dtypes the CPU backend writes (others are not pooled).
fn scalar_type(kind: tch::Kind) -> Option<i32> {
    match kind {
        tch::Kind::Half => Some(5),
        tch::Kind::Float => Some(6),
        tch::Kind::Double => Some(7),
        tch::Kind::BFloat16 => Some(15),
        _ => None,
    }
}

/// Called by libtorch when a pooled tensor's storage is freed (any thread).
unsafe extern "C" fn release_block(context: *mut c_void, data: *mut c_void) {
    let _ = catch_unwind(AssertUnwindSafe(|| {
        release(data as usize, context as usize)
    }));
}

/// Keeps a block for reuse, or frees it when the cache is full.
fn release(block: usize, bytes: usize) {
    let mut guard = pool();
    let p = guard.get_or_insert_with(Pool::default);
    if p.cached_bytes + bytes <= MAX_CACHED_BYTES {
        p.free.entry(bytes).or_default().push(block);
        p.cached_bytes += bytes;
    } else {
        // SAFETY: allocated by `empty_like` with this layout, no longer referenced.
        unsafe { std::alloc::dealloc(block as *mut u8, layout(bytes)) };
    }
}

/// Returns every cached output buffer of the CPU backend to the system.
///
/// ```
/// vidfuse::cpu::empty_cache();
/// assert_eq!(vidfuse::cpu::cached_bytes(), 0);
/// ```
pub fn empty_cache() {
    let mut guard = pool();
    if let Some(p) = guard.as_mut() {
        for (bytes, blocks) in p.free.drain() {
            for block in blocks {
                // SAFETY: cached blocks were allocated with this layout and are unused.
                unsafe { std::alloc::dealloc(block as *mut u8, layout(bytes)) };
            }
        }
        p.cached_bytes = 0;
    }
}

/// Bytes the CPU backend's output cache holds right now (not counting buffers in use).
pub fn cached_bytes() -> usize {
    pool().as_ref().map_or(0, |p| p.cached_bytes)
}
