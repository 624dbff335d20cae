//! A safe wrapper over the C++ autograd shim: attach a custom backward (a Rust closure) to
//! tensors computed without grad. Generic: it knows nothing of VID.

use std::ffi::{c_char, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Mutex;

use tch::Tensor;

use crate::ffi;

/// Error a backward closure returns; its message reaches `backward()`'s caller.
pub type BackwardError = Box<dyn std::error::Error + Send + Sync>;

/// The gradients of a node's inputs, one entry per input (`None`: no gradient).
pub type InputGrads = Vec<Option<Tensor>>;

/// A backward closure: gets the outputs' gradients (None when undefined) and which inputs
/// need a gradient; returns one entry per input.
pub trait BackwardFn:
    FnMut(&[Option<Tensor>], &[bool]) -> Result<InputGrads, BackwardError> + Send + 'static
{
}
impl<F> BackwardFn for F where
    F: FnMut(&[Option<Tensor>], &[bool]) -> Result<InputGrads, BackwardError> + Send + 'static
{
}

/// What the shim's node owns: the closure, until autograd releases it.
struct NodeState {
    backward: Mutex<Option<Box<dyn BackwardFn>>>,
}

/// Takes an error string the shim allocated.
pub(crate) fn take_error(err: *mut c_char) -> Option<String> {
    if err.is_null() {
        return None;
    }
    // SAFETY: the shim returns a NUL-terminated malloc'd string, freed here once.
    let message = unsafe { CStr::from_ptr(err) }
        .to_string_lossy()
        .into_owned();
    unsafe { ffi::vf_free_error(err) };
    Some(message)
}

/// Whether autograd's grad mode is on for this thread.
pub fn grad_mode_enabled() -> Result<bool, String> {
    let mut enabled = 0;
    // SAFETY: plain out-parameter.
    let err = unsafe { ffi::vf_grad_mode_enabled(&mut enabled) };
    match take_error(err) {
        Some(message) => Err(message),
        None => Ok(enabled != 0),
    }
}

/// What must be known of a tensor before its sizes or memory are touched (tch's own
/// accessors panic on nested tensors; sparse and mkldnn tensors have no plain memory).
#[derive(Debug, Clone, Copy)]
pub struct TensorFacts {
    /// c10's layout code: 0 strided, 1 sparse COO, 2 sparse CSR, 3 mkldnn, 4 sparse CSC,
    /// 5 sparse BSR, 6 sparse BSC, 7 jagged.
    pub layout: i32,
    /// c10's device type code: 0 CPU, 1 CUDA.
    pub device_type: i32,
    pub is_nested: bool,
    pub is_quantized: bool,
    pub has_storage: bool,
    /// A lazily negated view: memory holds the negated values.
    pub is_neg: bool,
    pub is_conj: bool,
}

/// The [`TensorFacts`] of a defined tensor.
pub fn tensor_facts(t: &Tensor) -> Result<TensorFacts, String> {
    let mut facts = ffi::vf_tensor_facts {
        layout: 0,
        device_type: 0,
        is_nested: 0,
        is_quantized: 0,
        has_storage: 0,
        is_neg: 0,
        is_conj: 0,
    };
    // SAFETY: a live tch tensor, borrowed for the call; plain out-parameter.
    let err = unsafe { ffi::vf_tensor_facts_of(t.as_ptr() as *mut ffi::vf_tensor, &mut facts) };
    if let Some(message) = take_error(err) {
        return Err(message);
    }
    Ok(TensorFacts {
        layout: facts.layout,
        device_type: facts.device_type,
        is_nested: facts.is_nested != 0,
        is_quantized: facts.is_quantized != 0,
        has_storage: facts.has_storage != 0,
        is_neg: facts.is_neg != 0,
        is_conj: facts.is_conj != 0,
    })
}

/// Runs `f` with grad mode off, restoring the previous mode on every exit, unwinding
/// included (`tch::no_grad` does not restore it when `f` panics).
pub fn no_grad<T>(f: impl FnOnce() -> T) -> T {
    let _restore = tch::no_grad_guard();
    f()
}

/// PyTorch's current CUDA stream (`CUstream`) of a device, as libtorch sees it.
pub fn current_cuda_stream(device_index: usize) -> Result<*mut c_void, String> {
    let mut stream = std::ptr::null_mut();
    // SAFETY: plain out-parameter; the shim catches every exception.
    let err = unsafe { ffi::vf_current_cuda_stream(device_index as i32, &mut stream) };
    match take_error(err) {
        Some(message) => Err(message),
        None => Ok(stream),
    }
}

/// Runs `body(i)` for every `i` in `0..n` on libtorch's intra-op thread pool (the calling
/// thread included). Every index runs exactly once, also if the pool cannot be used.
pub fn parallel_for(n: usize, body: &(dyn Fn(usize) + Sync)) {
    struct Context<'a> {
        body: &'a (dyn Fn(usize) + Sync),
        done: Vec<std::sync::atomic::AtomicBool>,
        panic: Mutex<Option<Box<dyn std::any::Any + Send>>>,
    }
    unsafe extern "C" fn trampoline(context: *mut c_void, index: i64) {
        let context = &*(context as *const Context<'_>);
        let i = index as usize;
        if context.done[i].swap(true, std::sync::atomic::Ordering::AcqRel) {
            return;
        }
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| (context.body)(i))) {
            let mut slot = context.panic.lock().unwrap_or_else(|p| p.into_inner());
            slot.get_or_insert(panic);
        }
    }
    let context = Context {
        body,
        done: (0..n)
            .map(|_| std::sync::atomic::AtomicBool::new(false))
            .collect(),
        panic: Mutex::new(None),
    };
    // SAFETY: `context` outlives the call; the trampoline never unwinds.
    let err = unsafe {
        ffi::vf_parallel_for(
            n as i64,
            Some(trampoline),
            &context as *const Context<'_> as *mut c_void,
        )
    };
    drop(take_error(err));
    // Whatever the pool did not run (it failed to start), run here.
    for i in 0..n {
        unsafe { trampoline(&context as *const Context<'_> as *mut c_void, i as i64) };
    }
    if let Some(panic) = context
        .panic
        .into_inner()
        .unwrap_or_else(|p| p.into_inner())
    {
        std::panic::resume_unwind(panic);
    }
}

/// Makes `outputs` (computed under no-grad) the outputs of a new autograd node named `name`,
/// whose next edges are the `inputs`, so that `backward()` calls `backward`. Does nothing
/// (and drops `backward`) when grad mode is off or no input requires grad.
///
/// The `saved` tensors are those whose values `backward` reads (through aliases it captured):
/// the node keeps them as autograd saved variables, so that an in-place change to any of
/// them between now and backward is the engine's standard error, as for PyTorch's own ops,
/// instead of a gradient computed from the changed values.
/// Returns whether a node was attached.
pub fn attach<F: BackwardFn>(
    name: &str,
    inputs: &[&Tensor],
    outputs: &[&Tensor],
    saved: &[&Tensor],
    backward: F,
) -> Result<bool, String> {
    let name = CString::new(name).map_err(|_| "node name contains a NUL byte".to_string())?;
    let state = Box::new(NodeState {
        backward: Mutex::new(Some(Box::new(backward))),
    });
    let input_ptrs: Vec<*mut ffi::vf_tensor> = inputs
        .iter()
        .map(|t| t.as_ptr() as *mut ffi::vf_tensor)
        .collect();
    let output_ptrs: Vec<*mut ffi::vf_tensor> = outputs
        .iter()
        .map(|t| t.as_ptr() as *mut ffi::vf_tensor)
        .collect();
    let saved_ptrs: Vec<*mut ffi::vf_tensor> = saved
        .iter()
        .map(|t| t.as_ptr() as *mut ffi::vf_tensor)
        .collect();
    let callbacks = ffi::vf_node_callbacks {
        backward: Some(backward_trampoline),
        release: Some(release_trampoline),
        drop: Some(drop_trampoline),
    };
    let mut attached = 0;
    // SAFETY: the pointers are live tch tensors (at::Tensor*), borrowed for the call; the
    // shim takes ownership of `state` and hands it back to drop_trampoline exactly once.
    let err = unsafe {
        ffi::vf_attach_node(
            name.as_ptr(),
            input_ptrs.as_ptr(),
            input_ptrs.len(),
            output_ptrs.as_ptr(),
            output_ptrs.len(),
            saved_ptrs.as_ptr(),
            saved_ptrs.len(),
            Box::into_raw(state) as *mut c_void,
            callbacks,
            &mut attached,
        )
    };
    match take_error(err) {
        Some(message) => Err(message),
        None => Ok(attached != 0),
    }
}

/// Writes `message` into the shim's fixed buffer, truncated and NUL-terminated.
fn write_error(message: &str, buf: *mut c_char, capacity: usize) {
    if buf.is_null() || capacity == 0 {
        return;
    }
    let bytes = message.as_bytes();
    let n = bytes.len().min(capacity - 1);
    // SAFETY: the shim passes a buffer of `capacity` bytes.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), buf as *mut u8, n);
        *buf.add(n) = 0;
    }
}

unsafe extern "C" fn backward_trampoline(
    state: *mut c_void,
    grad_outputs: *const *mut ffi::vf_tensor,
    n_outputs: usize,
    needs_input_grad: *const u8,
    grad_inputs: *mut *mut ffi::vf_tensor,
    n_inputs: usize,
    error: *mut c_char,
    error_capacity: usize,
) -> i32 {
    // Take ownership of the incoming gradients first, so they are freed on every path.
    let grads: Vec<Option<Tensor>> = (0..n_outputs)
        .map(|i| {
            let p = *grad_outputs.add(i);
            (!p.is_null()).then(|| Tensor::from_ptr(p as *mut torch_sys::C_tensor))
        })
        .collect();
    let needs: Vec<bool> = (0..n_inputs)
        .map(|i| *needs_input_grad.add(i) != 0)
        .collect();
    let state = &*(state as *const NodeState);

    let result = catch_unwind(AssertUnwindSafe(|| -> Result<InputGrads, BackwardError> {
        let mut guard = state
            .backward
            .lock()
            .map_err(|_| "backward state poisoned")?;
        let backward = guard.as_mut().ok_or(
            "trying to backward through the graph a second time (its saved tensors were freed); \
             pass keep_graph / retain_graph = true to the first backward",
        )?;
        if grad_mode_enabled()? {
            return Err("double backward (create_graph = true) is not supported by this op".into());
        }
        backward(&grads, &needs)
    }));
    let message = match result {
        Ok(Ok(input_grads)) if input_grads.len() == n_inputs => {
            for (i, grad) in input_grads.into_iter().enumerate() {
                if let Some(mut grad) = grad {
                    *grad_inputs.add(i) = grad.as_mut_ptr() as *mut ffi::vf_tensor;
                    // Ownership of the at::Tensor* passes to the shim.
                    std::mem::forget(grad);
                }
            }
            return 0;
        }
        Ok(Ok(input_grads)) => format!(
            "backward returned {} gradients for {} inputs",
            input_grads.len(),
            n_inputs
        ),
        Ok(Err(e)) => e.to_string(),
        Err(panic) => format!("panic in backward: {}", panic_text(&panic)),
    };
    write_error(&message, error, error_capacity);
    1
}

unsafe extern "C" fn release_trampoline(state: *mut c_void) {
    let state = &*(state as *const NodeState);
    // Never unwind into C++: ignore a poisoned lock (the closure is dropped either way).
    let _ = catch_unwind(AssertUnwindSafe(|| match state.backward.lock() {
        Ok(mut guard) => drop(guard.take()),
        Err(poisoned) => drop(poisoned.into_inner().take()),
    }));
}

unsafe extern "C" fn drop_trampoline(state: *mut c_void) {
    let _ = catch_unwind(AssertUnwindSafe(|| {
        drop(Box::from_raw(state as *mut NodeState))
    }));
}

/// The message a panic carried.
pub fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A panic inside `no_grad` leaves grad mode as it was (tch::no_grad does not).
    #[test]
    fn no_grad_restores_grad_mode_when_unwinding() {
        assert!(grad_mode_enabled().unwrap());
        let r = catch_unwind(|| no_grad(|| panic!("inside")));
        assert!(r.is_err());
        assert!(grad_mode_enabled().unwrap(), "grad mode left off");
    }

    /// The indices run on libtorch's pool: with two intra-op threads, on two threads (the
    /// shim must be built with OpenMP, or at::parallel_for silently runs serially).
    #[test]
    fn parallel_for_runs_on_libtorch_threads() {
        tch::set_num_threads(2);
        let ids = Mutex::new(Vec::new());
        parallel_for(2, &|_| {
            ids.lock().unwrap().push(std::thread::current().id());
        });
        let ids = ids.into_inner().unwrap();
        assert_eq!(ids.len(), 2);
        assert_ne!(ids[0], ids[1], "at::parallel_for ran serially");
    }

    #[test]
    fn parallel_for_runs_every_index_once() {
        let counts: Vec<std::sync::atomic::AtomicUsize> =
            (0..37).map(|_| Default::default()).collect();
        parallel_for(37, &|i| {
            counts[i].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        });
        assert!(counts
            .iter()
            .all(|c| c.load(std::sync::atomic::Ordering::Relaxed) == 1));
    }
}
