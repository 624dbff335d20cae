/*
 * vidfuse_shim.h: a small, generic C interface to a custom libtorch autograd node
 * whose backward is a callback supplied by the caller (Rust). It knows nothing of VID.
 *
 * Tensors cross this boundary as `vf_tensor *`, which is the `at::Tensor *` that tch's
 * `C_tensor` wraps. Every function returns NULL on success, or an error message that the
 * caller frees with vf_free_error. No C++ exception ever leaves these functions.
 */
#ifndef VIDFUSE_SHIM_H
#define VIDFUSE_SHIM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* An at::Tensor*, the same pointer tch's C_tensor is. */
typedef struct vf_tensor vf_tensor;

/*
 * Computes the gradients of the node's inputs.
 * grad_outputs[i] is a new tensor the callee owns, or NULL when that output's gradient is
 * undefined. needs_input_grad[i] is 1 when input i needs a gradient. The callee stores in
 * grad_inputs[i] a new tensor (ownership passes to the caller) or leaves it NULL.
 * Returns 0 on success; otherwise writes a NUL-terminated message of at most
 * error_capacity bytes into error and returns non-zero.
 */
typedef int32_t (*vf_backward_fn)(void *state, vf_tensor *const *grad_outputs, size_t n_outputs,
                                  const uint8_t *needs_input_grad, vf_tensor **grad_inputs,
                                  size_t n_inputs, char *error, size_t error_capacity);

/* Frees what backward needs (autograd's release_variables: the graph will not be reused). */
typedef void (*vf_release_fn)(void *state);

/* Destroys the state; called exactly once. */
typedef void (*vf_drop_fn)(void *state);

typedef struct vf_node_callbacks {
    vf_backward_fn backward;
    vf_release_fn release;
    vf_drop_fn drop;
} vf_node_callbacks;

/*
 * Makes the outputs (computed by the caller without grad) the outputs of a new autograd node
 * named `name` whose next edges are the inputs' gradient edges, if grad mode is on and an
 * input requires grad. *attached is set to 1 when a node was made. The state is owned by the
 * node when one is made and dropped (callbacks.drop) otherwise, also on error.
 * The `saved` tensors (which the backward callback reads through its own aliases) are kept
 * as autograd SavedVariables: when any of them was modified in place after this call,
 * backward fails with the engine's standard "modified by an inplace operation" error before
 * the callback runs, and after release_variables with its "backward through the graph a
 * second time" error.
 */
char *vf_attach_node(const char *name, vf_tensor *const *inputs, size_t n_inputs,
                     vf_tensor *const *outputs, size_t n_outputs, vf_tensor *const *saved,
                     size_t n_saved, void *state, vf_node_callbacks callbacks,
                     int32_t *attached);

/* What the safe side must know about a tensor before touching its sizes or memory. */
typedef struct vf_tensor_facts {
    int32_t layout;       /* c10::Layout: 0 strided, 1 sparse COO, 2 sparse CSR, 3 mkldnn, ... */
    int32_t device_type;  /* c10::DeviceType: 0 CPU, 1 CUDA, ... */
    uint8_t is_nested;    /* a nested (jagged) tensor */
    uint8_t is_quantized; /* a quantized dtype */
    uint8_t has_storage;  /* backed by a plain storage (data_ptr is meaningful) */
    uint8_t is_neg;       /* a lazily negated view (_neg_view): memory holds -value */
    uint8_t is_conj;      /* a lazily conjugated view */
} vf_tensor_facts;

/* Fills *facts for a defined tensor. */
char *vf_tensor_facts_of(vf_tensor *tensor, vf_tensor_facts *facts);

/*
 * A CPU tensor over `data` with the given sizes and strides (in elements) and dtype (a c10
 * ScalarType code); when libtorch frees its storage it calls release(context, data). On
 * error the caller still owns `data`.
 */
typedef void (*vf_release_data_fn)(void *context, void *data);
char *vf_tensor_from_owned(void *data, const int64_t *sizes, const int64_t *strides, size_t ndim,
                           int32_t scalar_type, vf_release_data_fn release, void *context,
                           vf_tensor **out);

/*
 * Runs body(context, i) for every i in 0..n on libtorch's intra-op thread pool (the calling
 * thread included), one index per task, so that the caller's parallel work shares threads
 * with libtorch's instead of competing with them. The body must not throw.
 */
typedef void (*vf_parallel_body_fn)(void *context, int64_t index);
char *vf_parallel_for(int64_t n, vf_parallel_body_fn body, void *context);

/* Whether autograd's grad mode is enabled on this thread. */
char *vf_grad_mode_enabled(int32_t *enabled);

/*
 * PyTorch's current CUDA stream for the device (a CUstream / cudaStream_t), through c10's
 * device-guard registry, so that no CUDA header is needed. Fails when libtorch has no CUDA.
 */
char *vf_current_cuda_stream(int32_t device_index, void **stream);

/*
 * CUDA streams and graphs of libtorch (tch exposes neither). Available when the shim was
 * built against a libtorch with CUDA; otherwise each returns an error.
 */

/* Makes a fresh stream from PyTorch's pool the current stream of the device; *previous
 * receives the stream it replaces, for vf_cuda_stream_pop. */
char *vf_cuda_stream_push(int32_t device_index, void **previous);

/* Makes `previous` (from vf_cuda_stream_push) current again and frees the handle. */
char *vf_cuda_stream_pop(void *previous);

/* Waits until the device has finished all work. */
char *vf_cuda_synchronize(int32_t device_index);

/* An at::cuda::CUDAGraph: capture the work queued on the current (non-default) stream
 * between begin and end, then replay it. */
char *vf_cuda_graph_new(void **graph);
char *vf_cuda_graph_capture_begin(void *graph);
char *vf_cuda_graph_capture_end(void *graph);
char *vf_cuda_graph_replay(void *graph);
void vf_cuda_graph_free(void *graph);

/* Frees a message returned by the functions above. */
void vf_free_error(char *error);

#ifdef __cplusplus
}
#endif

#endif /* VIDFUSE_SHIM_H */
