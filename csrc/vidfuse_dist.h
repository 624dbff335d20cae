/*
 * vidfuse_dist.h: a small C interface to PyTorch's distributed engine (c10d) as libtorch
 * ships it: a TCPStore rendezvous, a ProcessGroup with a Gloo (CPU) or NCCL (CUDA) backend,
 * a few collectives, and DDP's gradient Reducer. It knows nothing of VID.
 *
 * Tensors cross this boundary as `vf_tensor *` (the `at::Tensor *` of tch's C_tensor, see
 * vidfuse_shim.h). Every function but the _free ones returns NULL on success, or an error
 * message that the caller frees with vf_free_error (vidfuse_shim.h). No C++ exception ever
 * leaves these functions.
 */
#ifndef VIDFUSE_DIST_H
#define VIDFUSE_DIST_H

#include <stddef.h>
#include <stdint.h>

#include "vidfuse_shim.h"

#ifdef __cplusplus
extern "C" {
#endif

/* A process group: its store and its c10d::ProcessGroup. */
typedef struct vf_dist_group vf_dist_group;

/* DDP's c10d::Reducer over a list of parameters of one group. */
typedef struct vf_dist_reducer vf_dist_reducer;

/* Which backends this build of the shim has: bit 0 Gloo, bit 1 NCCL. */
uint32_t vf_dist_backends(void);

/*
 * Joins a process group of `world` ranks as `rank`. The rendezvous is a c10d::TCPStore at
 * host:port: rank 0 serves it unless `agent_store` is non-zero (torchrun's agent already
 * serves it there). backend: 0 Gloo (CPU tensors), 1 NCCL (CUDA tensors of device
 * `device_index`). Every wait (rendezvous, collectives) gives up after timeout_ms.
 */
char *vf_dist_group_new(int32_t backend, const char *host, uint16_t port, int32_t rank,
                        int32_t world, int32_t agent_store, int32_t device_index,
                        int64_t timeout_ms, vf_dist_group **out);

/* Frees the group (its store and backend connections). NULL is allowed. */
void vf_dist_group_free(vf_dist_group *group);

/* In-place all-reduce of one tensor; op: 0 sum, 1 max, 2 min. Waits for the result. */
char *vf_dist_all_reduce(vf_dist_group *group, vf_tensor *tensor, int32_t op);

/*
 * In-place broadcast of tensors from rank `root`, coalesced into flat buffers (c10d's
 * broadcast_coalesced), without recording autograd history (parameters are leaves).
 */
char *vf_dist_broadcast(vf_dist_group *group, vf_tensor *const *tensors, size_t n,
                        int32_t root);

/* Waits until every rank has reached this barrier. */
char *vf_dist_barrier(vf_dist_group *group);

/*
 * A c10d::Reducer (the engine of PyTorch's DistributedDataParallel) over `params` (leaf
 * tensors that require grad, the same list in the same order on every rank): during each
 * backward it averages their gradients across the group with bucketed all-reduces issued
 * from autograd hooks as buckets fill, and it writes the averages into the gradients before
 * backward returns. bucket_bytes: the bucket size cap (PyTorch: 25 MiB; its first bucket is
 * 1 MiB). find_unused: look for parameters that receive no gradient in a step (see
 * vf_dist_reducer_prepare_backward). The group must outlive the reducer.
 */
char *vf_dist_reducer_new(vf_dist_group *group, vf_tensor *const *params, size_t n,
                          int64_t bucket_bytes, int64_t first_bucket_bytes, int32_t find_unused,
                          vf_dist_reducer **out);

/* Call before each forward pass (or at least before each backward): after the first
 * step it also rebuilds the buckets in the order in which gradients became ready, as
 * DistributedDataParallel does. */
char *vf_dist_reducer_prepare_forward(vf_dist_reducer *reducer);

/* Call after the forward pass, before backward, with the tensors backward starts from. */
char *vf_dist_reducer_prepare_backward(vf_dist_reducer *reducer, vf_tensor *const *outputs,
                                       size_t n);

/* The current bucket assignment: writes the bucket of each parameter into bucket_of[n]
 * (buckets are all-reduced in index order) and their number into *n_buckets. */
char *vf_dist_reducer_buckets(vf_dist_reducer *reducer, int64_t *bucket_of, size_t n,
                              size_t *n_buckets);

/* Frees the reducer (its autograd hooks are removed). NULL is allowed. */
void vf_dist_reducer_free(vf_dist_reducer *reducer);

#ifdef __cplusplus
}
#endif

#endif /* VIDFUSE_DIST_H */
