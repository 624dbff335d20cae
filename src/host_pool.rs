//! A cache of host buffers for the CPU backend's per-element outputs (gradients and
//! per-element losses).
//!
//! Freshly allocated memory costs page faults and kernel zeroing: for a 16 MB gradient on two
//! cores that is more than the whole backward pass (measured: BENCHMARKS.md). A training loop
//! asks for the same sizes every step, so buffers libtorch frees come back here and are
//! handed out again. Small buffers go to libtorch's allocator.
//!
//! Buffers are allocated in size classes (8 per doubling, at most 12.5% larger than asked),
//! so that nearby sizes (a varying batch size, say) share buffers. The cache holds at most
//! [`cache_limit`] bytes of free buffers, evicting the least recently freed first: the
//! default is [`MAX_CACHED_BYTES`], the environment variable `VIDFUSE_HOST_CACHE_BYTES` (read
//! once, a number of bytes) or [`set_cache_limit`] change it, and [`empty_cache`] returns
//! everything to the system.

use std::collections::VecDeque;
use std::ffi::{c_char, c_void, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, Once};

use tch::Tensor;

use crate::error::{Result, VidError};
use crate::ffi;

/// Outputs smaller than this come from libtorch's allocator (their faults are cheap).
const MIN_POOLED_BYTES: usize = 1 << 20;
/// The default limit of the cache: the most it keeps while no tensor uses it.
pub const MAX_CACHED_BYTES: usize = 1 << 30;
/// The environment variable that sets the limit at first use.
pub const CACHE_LIMIT_ENV: &str = "VIDFUSE_HOST_CACHE_BYTES";
/// Alignment of every block (a cache line, and enough for any vector load).
const ALIGN: usize = 64;
/// Size classes per doubling of the size.
const CLASSES_PER_DOUBLING: u32 = 8;

/// Free blocks `(class bytes, address)`, least recently freed first.
#[derive(Default)]
struct Pool {
    free: VecDeque<(usize, usize)>,
    cached_bytes: usize,
}

static POOL: Mutex<Option<Pool>> = Mutex::new(None);
static LIMIT: AtomicUsize = AtomicUsize::new(MAX_CACHED_BYTES);
static LIMIT_FROM_ENV: Once = Once::new();

fn pool() -> MutexGuard<'static, Option<Pool>> {
    // A panic while holding the lock cannot leave the queue inconsistent: keep going.
    POOL.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn layout(bytes: usize) -> Option<std::alloc::Layout> {
    std::alloc::Layout::from_size_align(bytes, ALIGN).ok()
}

/// The size class of a request: `bytes` rounded up to one of 8 steps per power of two.
fn size_class(bytes: usize) -> Option<usize> {
    if bytes == 0 {
        return Some(0);
    }
    let magnitude = usize::BITS - 1 - bytes.leading_zeros();
    let step = 1usize << magnitude.saturating_sub(CLASSES_PER_DOUBLING.trailing_zeros());
    bytes.checked_next_multiple_of(step)
}

/// The cache's limit in bytes (see the module docs).
///
/// ```
/// vidfuse::cpu::set_cache_limit(64 << 20);
/// assert_eq!(vidfuse::cpu::cache_limit(), 64 << 20);
/// ```
pub fn cache_limit() -> usize {
    LIMIT_FROM_ENV.call_once(|| {
        let parsed = std::env::var(CACHE_LIMIT_ENV)
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok());
        if let Some(bytes) = parsed {
            LIMIT.store(bytes, Ordering::Relaxed);
        }
    });
    LIMIT.load(Ordering::Relaxed)
}

/// Sets the most bytes of free buffers the cache keeps (0: no caching), releasing what is
/// above it now. Overrides `VIDFUSE_HOST_CACHE_BYTES`.
pub fn set_cache_limit(bytes: usize) {
    cache_limit(); // the environment is read first, so it cannot override this later
    LIMIT.store(bytes, Ordering::Relaxed);
    let mut guard = pool();
    if let Some(p) = guard.as_mut() {
        p.evict_above(bytes);
    }
}

impl Pool {
    /// Frees the least recently freed blocks until at most `limit` bytes are cached.
    fn evict_above(&mut self, limit: usize) {
        while self.cached_bytes > limit {
            let Some((bytes, block)) = self.free.pop_front() else {
                break;
            };
            self.cached_bytes -= bytes;
            dealloc(block, bytes);
        }
    }

    /// The most recently freed block of class `bytes`, if any.
    fn take(&mut self, bytes: usize) -> Option<usize> {
        let at = self.free.iter().rposition(|&(b, _)| b == bytes)?;
        let (_, block) = self.free.remove(at)?;
        self.cached_bytes -= bytes;
        Some(block)
    }
}

fn dealloc(block: usize, bytes: usize) {
    if let Some(layout) = layout(bytes) {
        // SAFETY: allocated by `empty_like` with this layout, no longer referenced.
        unsafe { std::alloc::dealloc(block as *mut u8, layout) };
    }
}

/// An uninitialised CPU tensor with `like`'s sizes, strides (dense, any layout) and dtype.
pub(crate) fn empty_like(like: &Tensor) -> Result<Tensor> {
    let bytes = like
        .numel()
        .checked_mul(like.kind().elt_size_in_bytes())
        .and_then(size_class);
    let code = scalar_type(like.kind());
    let (Some(code), Some(bytes)) = (code, bytes) else {
        return Ok(like.f_empty_like()?);
    };
    let Some(block_layout) = layout(bytes).filter(|_| bytes >= MIN_POOLED_BYTES) else {
        return Ok(like.f_empty_like()?);
    };
    let cached = pool().as_mut().and_then(|p| p.take(bytes));
    let data = match cached {
        Some(block) => block as *mut u8,
        // SAFETY: non-zero size, valid alignment.
        None => unsafe { std::alloc::alloc(block_layout) },
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

/// Keeps a block for reuse, evicting older blocks to stay within the limit.
fn release(block: usize, bytes: usize) {
    let limit = cache_limit();
    if bytes > limit {
        dealloc(block, bytes);
        return;
    }
    let mut guard = pool();
    let p = guard.get_or_insert_with(Pool::default);
    p.free.push_back((bytes, block));
    p.cached_bytes += bytes;
    p.evict_above(limit);
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
        p.evict_above(0);
    }
}

/// Bytes the CPU backend's output cache holds right now (not counting buffers in use).
pub fn cached_bytes() -> usize {
    pool().as_ref().map_or(0, |p| p.cached_bytes)
}
