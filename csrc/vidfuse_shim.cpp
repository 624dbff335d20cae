// The C++ side of vidfuse_shim.h: a torch::autograd::Node that forwards backward to a
// callback. Every entry point catches every exception and returns it as a message.
#include "vidfuse_shim.h"
#include "vidfuse_guard.h"

#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/grad_mode.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <ATen/Parallel.h>
#include <ATen/ops/from_blob.h>
#include <c10/core/Stream.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/version.h>

#ifdef VIDFUSE_WITH_TORCH_CUDA
#include <ATen/cuda/CUDAGraph.h>
#include <c10/core/DeviceGuard.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <string>
#include <vector>

// PyTorch 2.13 holds autograd nodes in c10::intrusive_ptr (Node derives from
// c10::intrusive_ptr_target, and torch::autograd::deleteNode is gone); earlier releases hold
// them in std::shared_ptr with deleteNode as the deleter.
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 13)
#define VIDFUSE_INTRUSIVE_NODES 1
#endif

namespace {

using vidfuse::copy_message;
using vidfuse::guarded;

at::Tensor &as_tensor(vf_tensor *t) { return *reinterpret_cast<at::Tensor *>(t); }

class CallbackNode final : public torch::autograd::Node {
  public:
    CallbackNode(std::string name, void *state, vf_node_callbacks callbacks)
        : name_(std::move(name)), state_(state), callbacks_(callbacks) {}

    ~CallbackNode() override { callbacks_.drop(state_); }

    std::string name() const override { return name_; }

    // Keeps the tensors backward reads, version-counted (set after the node is wired up).
    void save(const torch::autograd::variable_list &tensors) {
        saved_.reserve(tensors.size());
        for (const auto &t : tensors) {
            saved_.emplace_back(t, /*is_output=*/false);
        }
    }

    torch::autograd::variable_list apply(torch::autograd::variable_list &&grads) override {
        // Throws the engine's own errors for a tensor modified in place since forward, or
        // for a graph already freed; nothing is handed to the callback before this.
        for (const auto &s : saved_) {
            (void)s.unpack();
        }
        const size_t n_out = grads.size();
        const size_t n_in = num_outputs();
        std::vector<vf_tensor *> grad_ptrs(n_out, nullptr);
        for (size_t i = 0; i < n_out; ++i) {
            if (grads[i].defined()) {
                grad_ptrs[i] = reinterpret_cast<vf_tensor *>(new at::Tensor(grads[i]));
            }
        }
        std::vector<uint8_t> needs(n_in);
        for (size_t i = 0; i < n_in; ++i) {
            needs[i] = should_compute_output(i) ? 1 : 0;
        }
        std::vector<vf_tensor *> result(n_in, nullptr);
        char error[4096] = {0};
        // The callee owns grad_ptrs from here on, whatever it returns.
        int32_t rc = callbacks_.backward(state_, grad_ptrs.data(), n_out, needs.data(),
                                         result.data(), n_in, error, sizeof(error));
        torch::autograd::variable_list out(n_in);
        for (size_t i = 0; i < n_in; ++i) {
            if (result[i] != nullptr) {
                at::Tensor *t = reinterpret_cast<at::Tensor *>(result[i]);
                out[i] = std::move(*t);
                delete t;
            }
        }
        if (rc != 0) {
            error[sizeof(error) - 1] = '\0';
            throw std::runtime_error(name_ + ": " + error);
        }
        return out;
    }

    void release_variables() override {
        for (auto &s : saved_) {
            s.reset_data();
        }
        callbacks_.release(state_);
    }

  private:
    std::vector<torch::autograd::SavedVariable> saved_;
    std::string name_;
    void *state_;
    vf_node_callbacks callbacks_;
};

} // namespace

extern "C" {

char *vf_attach_node(const char *name, vf_tensor *const *inputs, size_t n_inputs,
                     vf_tensor *const *outputs, size_t n_outputs, vf_tensor *const *saved,
                     size_t n_saved, void *state, vf_node_callbacks callbacks,
                     int32_t *attached) {
    *attached = 0;
    bool owned_by_node = false;
    char *err = guarded([&] {
        torch::autograd::variable_list in;
        in.reserve(n_inputs);
        for (size_t i = 0; i < n_inputs; ++i) {
            in.push_back(as_tensor(inputs[i]));
        }
        if (!torch::autograd::compute_requires_grad(in)) {
            return;
        }
#ifdef VIDFUSE_INTRUSIVE_NODES
        auto node = c10::make_intrusive<CallbackNode>(name, state, callbacks);
#else
        std::shared_ptr<CallbackNode> node(new CallbackNode(name, state, callbacks),
                                           torch::autograd::deleteNode);
#endif
        owned_by_node = true;
        node->set_next_edges(torch::autograd::collect_next_edges(in));
        for (size_t i = 0; i < n_outputs; ++i) {
            torch::autograd::set_history(as_tensor(outputs[i]), node);
        }
        torch::autograd::variable_list keep;
        keep.reserve(n_saved);
        for (size_t i = 0; i < n_saved; ++i) {
            keep.push_back(as_tensor(saved[i]));
        }
        node->save(keep);
        *attached = 1;
    });
    if (!owned_by_node) {
        callbacks.drop(state);
    }
    return err;
}

char *vf_tensor_facts_of(vf_tensor *tensor, vf_tensor_facts *facts) {
    *facts = vf_tensor_facts{};
    return guarded([&] {
        const at::Tensor &t = as_tensor(tensor);
        facts->layout = static_cast<int32_t>(t.layout());
        facts->device_type = static_cast<int32_t>(t.device().type());
        facts->is_nested = t.is_nested() ? 1 : 0;
        facts->is_quantized = t.is_quantized() ? 1 : 0;
        facts->has_storage = t.has_storage() ? 1 : 0;
        facts->is_neg = t.is_neg() ? 1 : 0;
        facts->is_conj = t.is_conj() ? 1 : 0;
    });
}

char *vf_tensor_from_owned(void *data, const int64_t *sizes, const int64_t *strides, size_t ndim,
                           int32_t scalar_type, vf_release_data_fn release, void *context,
                           vf_tensor **out) {
    *out = nullptr;
    return guarded([&] {
        const auto options = at::TensorOptions()
                                 .dtype(static_cast<c10::ScalarType>(scalar_type))
                                 .device(c10::kCPU);
        at::Tensor t = at::from_blob(
            data, c10::IntArrayRef(sizes, ndim), c10::IntArrayRef(strides, ndim),
            [release, context](void *p) { release(context, p); }, options);
        *out = reinterpret_cast<vf_tensor *>(new at::Tensor(std::move(t)));
    });
}

char *vf_parallel_for(int64_t n, vf_parallel_body_fn body, void *context) {
    return guarded([&] {
        at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
            for (int64_t i = begin; i < end; ++i) {
                body(context, i);
            }
        });
    });
}

char *vf_grad_mode_enabled(int32_t *enabled) {
    return guarded([&] { *enabled = at::GradMode::is_enabled() ? 1 : 0; });
}

char *vf_current_cuda_stream(int32_t device_index, void **stream) {
    *stream = nullptr;
    return guarded([&] {
        const c10::Device device(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(device_index));
        const auto *impl = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
        *stream = impl->getStream(device).native_handle();
    });
}

#ifdef VIDFUSE_WITH_TORCH_CUDA

char *vf_cuda_stream_push(int32_t device_index, void **previous) {
    *previous = nullptr;
    return guarded([&] {
        const auto index = static_cast<c10::DeviceIndex>(device_index);
        auto *saved = new c10::cuda::CUDAStream(c10::cuda::getCurrentCUDAStream(index));
        c10::cuda::setCurrentCUDAStream(c10::cuda::getStreamFromPool(false, index));
        *previous = saved;
    });
}

char *vf_cuda_stream_pop(void *previous) {
    return guarded([&] {
        std::unique_ptr<c10::cuda::CUDAStream> saved(static_cast<c10::cuda::CUDAStream *>(previous));
        c10::cuda::setCurrentCUDAStream(*saved);
    });
}

char *vf_cuda_synchronize(int32_t device_index) {
    return guarded([&] {
        // The generic guard (through c10's registry): CUDAGuard's inline code needs cudart.
        const c10::DeviceGuard guard(
            c10::Device(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(device_index)));
        c10::cuda::device_synchronize();
    });
}

char *vf_cuda_graph_new(void **graph) {
    *graph = nullptr;
    return guarded([&] { *graph = new at::cuda::CUDAGraph(); });
}

char *vf_cuda_graph_capture_begin(void *graph) {
    return guarded([&] { static_cast<at::cuda::CUDAGraph *>(graph)->capture_begin(); });
}

char *vf_cuda_graph_capture_end(void *graph) {
    return guarded([&] { static_cast<at::cuda::CUDAGraph *>(graph)->capture_end(); });
}

char *vf_cuda_graph_replay(void *graph) {
    return guarded([&] { static_cast<at::cuda::CUDAGraph *>(graph)->replay(); });
}

void vf_cuda_graph_free(void *graph) {
    try {
        delete static_cast<at::cuda::CUDAGraph *>(graph);
    } catch (...) {
    }
}

// libtorch_cuda registers PyTorch's CUDA backend from its static initialisers, yet a program
// need not call any of its functions, and rustc links with --as-needed: without a live
// reference a binary would not load it, and tch would report no CUDA. These retained pointers
// (kept through the linker's section garbage collection) to functions that use libtorch_cuda
// and libc10_cuda make both libraries needed by every binary that links the shim.
__attribute__((used, retain)) static const void *const vf_keep_cuda_libraries[] = {
    reinterpret_cast<const void *>(&vf_cuda_graph_new),
    reinterpret_cast<const void *>(&vf_cuda_graph_free),
    reinterpret_cast<const void *>(&vf_cuda_stream_push),
};

#else // libtorch without CUDA

static const char kNoTorchCuda[] = "vidfuse was built against a libtorch without CUDA";

char *vf_cuda_stream_push(int32_t, void **previous) {
    *previous = nullptr;
    return copy_message(kNoTorchCuda);
}
char *vf_cuda_stream_pop(void *) { return copy_message(kNoTorchCuda); }
char *vf_cuda_synchronize(int32_t) { return copy_message(kNoTorchCuda); }
char *vf_cuda_graph_new(void **graph) {
    *graph = nullptr;
    return copy_message(kNoTorchCuda);
}
char *vf_cuda_graph_capture_begin(void *) { return copy_message(kNoTorchCuda); }
char *vf_cuda_graph_capture_end(void *) { return copy_message(kNoTorchCuda); }
char *vf_cuda_graph_replay(void *) { return copy_message(kNoTorchCuda); }
void vf_cuda_graph_free(void *) {}

#endif

void vf_free_error(char *error) { std::free(error); }

} // extern "C"
