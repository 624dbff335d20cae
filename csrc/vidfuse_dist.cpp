// The C++ side of vidfuse_dist.h: PyTorch's own c10d (TCPStore, ProcessGroupGloo,
// ProcessGroupNCCL, the DDP Reducer), which libtorch exports. Every entry point catches every
// exception and returns it as a message.
//
// Built with VIDFUSE_WITH_GLOO (and USE_C10D_GLOO, which the c10d headers guard Gloo with)
// when gloo's headers are found: the torch wheel does not ship them, and ProcessGroupGloo.hpp
// includes them. Built with VIDFUSE_WITH_NCCL (USE_C10D_NCCL) when nccl.h and the CUDA headers
// are found and libtorch has CUDA. Without either, the functions report what is missing.
#include "vidfuse_dist.h"
#include "vidfuse_guard.h"

#include <torch/csrc/autograd/grad_mode.h>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/csrc/distributed/c10d/comm.hpp>
#include <torch/csrc/distributed/c10d/logger.hpp>
#include <torch/csrc/distributed/c10d/reducer.hpp>
#ifdef VIDFUSE_WITH_GLOO
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#endif
#ifdef VIDFUSE_WITH_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <stdexcept>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

struct vf_dist_group {
    c10::intrusive_ptr<c10d::Store> store;
    c10::intrusive_ptr<c10d::ProcessGroup> group;
    std::chrono::milliseconds timeout;
};

struct vf_dist_reducer {
    std::shared_ptr<c10d::Reducer> reducer;
    // DDP's logger: the Reducer reports through it (searching for unused parameters
    // dereferences it), as torch.nn.parallel.DistributedDataParallel sets it up.
    std::shared_ptr<c10d::Logger> logger;
    std::vector<at::Tensor> params;
};

namespace {

using vidfuse::guarded;

at::Tensor &as_tensor(vf_tensor *t) { return *reinterpret_cast<at::Tensor *>(t); }

std::vector<at::Tensor> tensor_list(vf_tensor *const *tensors, size_t n) {
    std::vector<at::Tensor> out;
    out.reserve(n);
    for (size_t i = 0; i < n; ++i) {
        out.push_back(as_tensor(tensors[i]));
    }
    return out;
}

void need(const void *p, const char *what) {
    if (p == nullptr) {
        throw std::invalid_argument(std::string(what) + " is NULL");
    }
}

} // namespace

extern "C" {

uint32_t vf_dist_backends(void) {
    uint32_t out = 0;
#ifdef VIDFUSE_WITH_GLOO
    out |= 1u;
#endif
#ifdef VIDFUSE_WITH_NCCL
    out |= 2u;
#endif
    return out;
}

char *vf_dist_group_new(int32_t backend, const char *host, uint16_t port, int32_t rank,
                        int32_t world, int32_t agent_store, int32_t device_index,
                        int64_t timeout_ms, vf_dist_group **out) {
    *out = nullptr;
    return guarded([&] {
        need(host, "host");
        if (world < 1 || rank < 0 || rank >= world) {
            throw std::invalid_argument("rank " + std::to_string(rank) +
                                        " is not in a world of " + std::to_string(world));
        }
        if (timeout_ms <= 0) {
            throw std::invalid_argument("the timeout must be positive");
        }
        const std::chrono::milliseconds timeout(timeout_ms);
        c10d::TCPStoreOptions opts;
        opts.port = port;
        opts.isServer = agent_store == 0 && rank == 0;
        opts.numWorkers = static_cast<size_t>(world);
        opts.waitWorkers = true;
        opts.timeout = timeout;
        auto tcp = c10::make_intrusive<c10d::TCPStore>(std::string(host), opts);
        // One namespace for this crate's keys (torchrun's agent store is shared).
        auto store = c10::make_intrusive<c10d::PrefixStore>("vidfuse/", tcp);
        auto group = c10::make_intrusive<c10d::ProcessGroup>(store, rank, world);
        if (backend == 0) {
#ifdef VIDFUSE_WITH_GLOO
            auto options = c10d::ProcessGroupGloo::Options::create_default(timeout);
            auto gloo = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, options);
            group->setBackend(c10::DeviceType::CPU, c10d::ProcessGroup::BackendType::GLOO, gloo);
            group->setDefaultBackend(c10d::ProcessGroup::BackendType::GLOO);
#else
            throw std::runtime_error(
                "vidfuse was built without gloo's headers (install libgloo-dev, or run "
                "scripts/setup.sh, and rebuild): the Gloo backend is unavailable");
#endif
        } else if (backend == 1) {
#ifdef VIDFUSE_WITH_NCCL
            auto options = c10d::ProcessGroupNCCL::Options::create();
            options->timeout = timeout;
            auto nccl = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, world, options);
            nccl->setBoundDeviceId(c10::Device(c10::DeviceType::CUDA,
                                               static_cast<c10::DeviceIndex>(device_index)));
            group->setBackend(c10::DeviceType::CUDA, c10d::ProcessGroup::BackendType::NCCL, nccl);
            group->setDefaultBackend(c10d::ProcessGroup::BackendType::NCCL);
#else
            (void)device_index;
            throw std::runtime_error(
                "vidfuse was built without NCCL (it needs libtorch with CUDA, the CUDA headers "
                "and nccl.h from the nvidia-nccl wheel): the NCCL backend is unavailable");
#endif
        } else {
            throw std::invalid_argument("unknown backend " + std::to_string(backend));
        }
        auto *g = new vf_dist_group{store, group, timeout};
        *out = g;
    });
}

void vf_dist_group_free(vf_dist_group *group) {
    try {
        delete group;
    } catch (...) {
    }
}

char *vf_dist_all_reduce(vf_dist_group *group, vf_tensor *tensor, int32_t op) {
    return guarded([&] {
        need(group, "group");
        need(tensor, "tensor");
        c10d::AllreduceOptions opts;
        switch (op) {
        case 0:
            opts.reduceOp = c10d::ReduceOp::SUM;
            break;
        case 1:
            opts.reduceOp = c10d::ReduceOp::MAX;
            break;
        case 2:
            opts.reduceOp = c10d::ReduceOp::MIN;
            break;
        default:
            throw std::invalid_argument("unknown reduce op " + std::to_string(op));
        }
        opts.timeout = group->timeout;
        std::vector<at::Tensor> tensors{as_tensor(tensor)};
        at::NoGradGuard no_grad;
        group->group->allreduce(tensors, opts)->wait(group->timeout);
    });
}

char *vf_dist_broadcast(vf_dist_group *group, vf_tensor *const *tensors, size_t n,
                        int32_t root) {
    return guarded([&] {
        need(group, "group");
        if (root < 0 || root >= group->group->getSize()) {
            throw std::invalid_argument("broadcast root " + std::to_string(root) +
                                        " is not a rank");
        }
        auto list = tensor_list(tensors, n);
        if (list.empty()) {
            return;
        }
        at::NoGradGuard no_grad;
        // PyTorch's DDP broadcasts module states in 250 MiB buffers.
        c10d::broadcast_coalesced(group->group, list, 250u << 20, root);
    });
}

char *vf_dist_barrier(vf_dist_group *group) {
    return guarded([&] {
        need(group, "group");
        c10d::BarrierOptions opts;
        opts.timeout = group->timeout;
        group->group->barrier(opts)->wait(group->timeout);
    });
}

char *vf_dist_reducer_new(vf_dist_group *group, vf_tensor *const *params, size_t n,
                          int64_t bucket_bytes, int64_t first_bucket_bytes, int32_t find_unused,
                          vf_dist_reducer **out) {
    *out = nullptr;
    return guarded([&] {
        need(group, "group");
        if (bucket_bytes <= 0 || first_bucket_bytes <= 0) {
            throw std::invalid_argument("bucket sizes must be positive");
        }
        auto list = tensor_list(params, n);
        if (list.empty()) {
            throw std::invalid_argument("no parameters to reduce");
        }
        for (size_t i = 0; i < list.size(); ++i) {
            if (!list[i].defined() || !list[i].requires_grad() || !list[i].is_leaf()) {
                throw std::invalid_argument("parameter " + std::to_string(i) +
                                            " is not a leaf tensor that requires grad");
            }
        }
        // As torch.nn.parallel.DistributedDataParallel does: buckets in parameter order,
        // the first (small) one for the parameters whose gradients come last, then reversed,
        // since backward produces the last parameters' gradients first.
        std::vector<size_t> limits{static_cast<size_t>(first_bucket_bytes),
                                   static_cast<size_t>(bucket_bytes)};
        auto assignment = c10d::compute_bucket_assignment_by_size(
            list, limits, std::vector<bool>(list.size(), false));
        std::vector<std::vector<size_t>> buckets(std::get<0>(assignment).rbegin(),
                                                 std::get<0>(assignment).rend());
        auto r = std::make_unique<vf_dist_reducer>();
        r->params = list;
        r->reducer = std::make_shared<c10d::Reducer>(
            list, std::move(buckets), group->group, std::vector<bool>(list.size(), false),
            bucket_bytes, find_unused != 0, /*gradient_as_bucket_view=*/false,
            std::unordered_map<size_t, std::string>{}, first_bucket_bytes,
            /*skip_all_reduce_unused_params=*/false, /*use_python_reducer=*/false,
            // No per-bucket caps for the rebuild: first_bucket_bytes, then bucket_bytes.
            /*bucket_bytes_cap_list=*/std::vector<int64_t>{});
        r->logger = std::make_shared<c10d::Logger>(r->reducer);
        r->reducer->set_logger(r->logger);
        *out = r.release();
    });
}

char *vf_dist_reducer_prepare_forward(vf_dist_reducer *reducer) {
    return guarded([&] {
        need(reducer, "reducer");
        reducer->reducer->prepare_for_forward();
        // As DistributedDataParallel's forward: after the first step, the buckets are
        // rebuilt in the order in which the gradients became ready (rank 0's order, so that
        // every rank agrees), so that each bucket fills, and is all-reduced, while backward
        // still runs. A no-op afterwards (and with find_unused).
        reducer->reducer->rebuild_buckets();
    });
}

char *vf_dist_reducer_prepare_backward(vf_dist_reducer *reducer, vf_tensor *const *outputs,
                                       size_t n) {
    return guarded([&] {
        need(reducer, "reducer");
        reducer->reducer->prepare_for_backward(tensor_list(outputs, n));
    });
}

char *vf_dist_reducer_buckets(vf_dist_reducer *reducer, int64_t *bucket_of, size_t n,
                              size_t *n_buckets) {
    return guarded([&] {
        need(reducer, "reducer");
        const auto &params = reducer->params;
        if (n != params.size()) {
            throw std::invalid_argument("the reducer has " + std::to_string(params.size()) +
                                        " parameters, not " + std::to_string(n));
        }
        std::fill(bucket_of, bucket_of + n, -1);
        const auto buckets = reducer->reducer->get_grad_buckets(/*return_zero_tensors=*/true);
        for (const auto &bucket : buckets) {
            for (const auto &p : bucket.getParameters()) {
                for (size_t i = 0; i < n; ++i) {
                    if (params[i].unsafeGetTensorImpl() == p.unsafeGetTensorImpl()) {
                        bucket_of[i] = static_cast<int64_t>(bucket.getIndex());
                    }
                }
            }
        }
        *n_buckets = buckets.size();
    });
}

void vf_dist_reducer_free(vf_dist_reducer *reducer) {
    if (reducer == nullptr) {
        return;
    }
    // The logger holds the reducer: the logger goes first. (~Logger and ~Reducer are
    // noexcept(false), but throw only on a failed internal assertion of libtorch's.)
    reducer->logger.reset();
    reducer->reducer.reset();
    delete reducer;
}

} // extern "C"
