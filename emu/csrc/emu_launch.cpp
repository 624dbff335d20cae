// emu_launch.cpp: kernel registry, fiber scheduler and C ABI of the SIMT emulator.
//
// One block at a time: each CUDA thread is a ucontext fiber with its own stack. A fiber
// runs until it waits at a barrier or warp op (or exits), then hands over to the next
// ready fiber; when none is ready, the scheduler completes every barrier whose
// participants have all arrived. If none can complete, the launch is a deadlock.
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <new>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

// Last: it turns CUDA qualifiers such as __noinline__ into macros.
#include "simt_emu.h"

// Defined at the end of the generated kernels translation unit; referencing it makes the
// linker keep that object, whose static initialisers register the kernels.
extern "C" void vf_emu_kernels_anchor(void);

namespace vf_emu {
namespace detail {
namespace {

constexpr std::size_t kStackBytes = 64 * 1024;
constexpr unsigned kWarp = 32;
constexpr unsigned long long kPoison = ~0ull;  // a shuffle from a lane that takes no part

struct Kernel {
  std::string name;
  KernelFn fn;
  unsigned param_count;
};

// Sorted by name; filled by static initialisers, read-only afterwards.
std::vector<Kernel> &registry() {
  static std::vector<Kernel> kernels;
  vf_emu_kernels_anchor();
  return kernels;
}

const Kernel *find_kernel(const char *name) {
  const auto &kernels = registry();
  const auto it = std::lower_bound(kernels.begin(), kernels.end(), name,
                                   [](const Kernel &k, const char *n) { return k.name < n; });
  return it != kernels.end() && it->name == name ? &*it : nullptr;
}

// A fiber stack with a PROT_NONE guard page below it, so an overflow faults instead of
// silently corrupting the neighbouring stack.
class Stack {
 public:
  Stack() : guard_(static_cast<std::size_t>(sysconf(_SC_PAGESIZE))) {
    void *p = mmap(nullptr, guard_ + kStackBytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) throw std::bad_alloc();
    base_ = static_cast<char *>(p);
    mprotect(base_, guard_, PROT_NONE);
  }
  Stack(Stack &&other) noexcept
      : guard_(other.guard_), base_(std::exchange(other.base_, nullptr)) {}
  Stack(const Stack &) = delete;
  Stack &operator=(const Stack &) = delete;
  Stack &operator=(Stack &&) = delete;
  ~Stack() {
    if (base_ != nullptr) munmap(base_, guard_ + kStackBytes);
  }
  void *bottom() const { return base_ + guard_; }

 private:
  std::size_t guard_;
  char *base_;
};

enum class Wait : unsigned char { Ready, Block, Warp, Exited };

struct Fiber {
  ucontext_t ctx;
  uint3 idx;
  Wait wait;
  // The barrier or warp op the fiber waits at.
  const char *what;
  const char *file;
  int line;
  WarpOp op;
  unsigned mask;
  unsigned long long value;  // this lane's operand, as raw bits
  int arg;                   // source lane, delta or lane mask
  int width;
  unsigned long long result;
};

const char *op_name(WarpOp op) {
  switch (op) {
    case WarpOp::Sync: return "__syncwarp";
    case WarpOp::Idx: return "__shfl_sync";
    case WarpOp::Up: return "__shfl_up_sync";
    case WarpOp::Down: return "__shfl_down_sync";
    case WarpOp::Xor: return "__shfl_xor_sync";
    case WarpOp::Ballot: return "__ballot_sync";
    case WarpOp::All: return "__all_sync";
    case WarpOp::Any: return "__any_sync";
  }
  return "warp op";
}

// shfl.sync as the PTX ISA defines it: CUDA passes width as a segment mask of
// (32 - width), and an out-of-segment source reads the lane's own value.
int source_lane(WarpOp op, int lane, int arg, int width) {
  const int seg = (kWarp - width) & 31;
  const int b = arg & 31;
  const int max_lane = (lane & seg) | ((op == WarpOp::Up ? 0 : 31) & ~seg);
  int j = 0;
  bool in_segment = false;
  switch (op) {
    case WarpOp::Up: j = lane - b; in_segment = j >= max_lane; break;
    case WarpOp::Down: j = lane + b; in_segment = j <= max_lane; break;
    case WarpOp::Xor: j = lane ^ b; in_segment = j <= max_lane; break;
    default: j = (lane & seg) | (b & ~seg); in_segment = j <= max_lane; break;
  }
  return in_segment ? j : lane;
}

std::string basename(const char *path) {
  const char *slash = std::strrchr(path, '/');
  return slash != nullptr ? slash + 1 : path;
}

std::string format_idx(uint3 v) {
  return "(" + std::to_string(v.x) + "," + std::to_string(v.y) + "," + std::to_string(v.z) +
         ")";
}

class Engine {
 public:
  // Runs one block to completion; returns an error message, empty on success.
  std::string run_block(KernelFn fn, void **params, uint3 block_idx) {
    const dim3 dim = current.block_dim;
    const unsigned n = dim.x * dim.y * dim.z;
    fibers_.resize(n);
    while (stacks_.size() < n) stacks_.emplace_back();
    std::memset(smem_.data(), 0xFF, smem_.size() * sizeof(SmemLine));
    current.block_idx = block_idx;
    fn_ = fn;
    params_ = params;
    error_.clear();
    for (unsigned i = 0; i < n; ++i) {
      Fiber &f = fibers_[i];
      f.idx = uint3{i % dim.x, i / dim.x % dim.y, i / (dim.x * dim.y)};
      f.wait = Wait::Ready;
      if (getcontext(&f.ctx) != 0) throw std::runtime_error("getcontext failed");
      f.ctx.uc_stack.ss_sp = stacks_[i].bottom();
      f.ctx.uc_stack.ss_size = kStackBytes;
      f.ctx.uc_link = nullptr;
      makecontext(&f.ctx, &Engine::fiber_main, 0);
    }
    live_ = n;
    std::string outcome;
    for (;;) {
      if (Fiber *f = next_ready(0)) {
        resume(f, &scheduler_);
        if (!error_.empty()) {
          outcome = error_;
          break;
        }
      } else if (live_ == 0) {
        break;
      } else if (!resolve_warps() && !resolve_block_barrier()) {
        outcome = deadlock_message();
        break;
      }
    }
    // Fibers still waiting are abandoned; their stacks are reset by the next block.
    running_ = nullptr;
    return outcome;
  }

  // Prepares the dynamic shared memory of a launch (poisoned again before each block).
  void set_dynamic_smem(std::size_t bytes) {
    smem_.resize(std::max<std::size_t>(1, (bytes + sizeof(SmemLine) - 1) / sizeof(SmemLine)));
    current.dynamic_smem = smem_.data();
  }

  bool busy() const { return running_ != nullptr; }

  unsigned lane(const Fiber &f) const { return index(f) % kWarp; }

  // Called by a fiber: park at a barrier or warp op until the scheduler releases it.
  Fiber &park(Wait wait, const char *what, const char *file, int line) {
    if (running_ == nullptr) throw std::logic_error(std::string(what) + " outside a launch");
    Fiber &self = *running_;
    self.wait = wait;
    self.what = what;
    self.file = file;
    self.line = line;
    return self;
  }

  void yield(Fiber &self) {
    if (Fiber *next = next_ready(index(self) + 1)) {
      resume(next, &self.ctx);
    } else {
      swapcontext(&self.ctx, &scheduler_);
    }
  }

 private:
  struct alignas(128) SmemLine {
    unsigned char bytes[128];
  };

  static void fiber_main();

  unsigned index(const Fiber &f) const { return static_cast<unsigned>(&f - fibers_.data()); }

  Fiber *next_ready(unsigned from) {
    for (unsigned i = from; i < fibers_.size(); ++i) {
      if (fibers_[i].wait == Wait::Ready) return &fibers_[i];
    }
    return nullptr;
  }

  void resume(Fiber *f, ucontext_t *from) {
    running_ = f;
    current.thread_idx = f->idx;
    swapcontext(from, &f->ctx);
  }

  // Lanes of warp `base` named in `mask` that exist and have not exited.
  unsigned participants(unsigned base, unsigned mask) const {
    const unsigned lanes = std::min<unsigned>(kWarp, fibers_.size() - base);
    unsigned group = 0;
    for (unsigned k = 0; k < lanes; ++k) {
      if ((mask >> k & 1u) != 0 && fibers_[base + k].wait != Wait::Exited) group |= 1u << k;
    }
    return group;
  }

  bool same_warp_op(const Fiber &f, const Fiber &ref) const {
    return f.wait == Wait::Warp && f.op == ref.op && f.mask == ref.mask;
  }

  // The first participant of ref's warp op that has not joined it, or nullptr.
  const Fiber *warp_straggler(const Fiber &ref) const {
    const unsigned base = index(ref) / kWarp * kWarp;
    const unsigned group = participants(base, ref.mask);
    for (unsigned k = 0; k < kWarp; ++k) {
      if ((group >> k & 1u) != 0 && !same_warp_op(fibers_[base + k], ref)) {
        return &fibers_[base + k];
      }
    }
    return nullptr;
  }

  bool resolve_warps() {
    bool progressed = false;
    for (Fiber &f : fibers_) {
      if (f.wait == Wait::Warp && warp_straggler(f) == nullptr) {
        complete_warp_op(f);
        progressed = true;
      }
    }
    return progressed;
  }

  void complete_warp_op(const Fiber &ref) {
    const unsigned base = index(ref) / kWarp * kWarp;
    const unsigned group = participants(base, ref.mask);
    unsigned ballot = 0;
    for (unsigned k = 0; k < kWarp; ++k) {
      if ((group >> k & 1u) != 0 && fibers_[base + k].value != 0) ballot |= 1u << k;
    }
    for (unsigned k = 0; k < kWarp; ++k) {
      if ((group >> k & 1u) == 0) continue;
      Fiber &f = fibers_[base + k];
      switch (f.op) {
        case WarpOp::Sync: f.result = 0; break;
        case WarpOp::Ballot: f.result = ballot; break;
        case WarpOp::All: f.result = ballot == group; break;
        case WarpOp::Any: f.result = ballot != 0; break;
        default: {
          const unsigned j = static_cast<unsigned>(source_lane(f.op, k, f.arg, f.width));
          f.result = j == k ? f.value : (group >> j & 1u) != 0 ? fibers_[base + j].value : kPoison;
        }
      }
      f.wait = Wait::Ready;
    }
  }

  static bool same_site(const Fiber &a, const Fiber &b) {
    return a.line == b.line && std::strcmp(a.file, b.file) == 0;
  }

  // The first thread keeping ref's __syncthreads from completing, or nullptr.
  const Fiber *block_straggler(const Fiber &ref) const {
    for (const Fiber &f : fibers_) {
      if (f.wait != Wait::Block || !same_site(f, ref)) return &f;
    }
    return nullptr;
  }

  bool resolve_block_barrier() {
    if (fibers_.empty() || block_straggler(fibers_[0]) != nullptr) return false;
    for (Fiber &f : fibers_) f.wait = Wait::Ready;
    return true;
  }

  static std::string describe_wait(const Fiber &f) {
    std::string s = std::string(f.what) + " (" + basename(f.file) + ":" + std::to_string(f.line);
    if (f.wait == Wait::Warp) {
      char mask[16];
      std::snprintf(mask, sizeof mask, "0x%08x", f.mask);
      s += ", mask " + std::string(mask);
    }
    return s + ")";
  }

  std::string deadlock_message() const {
    const Fiber *stuck = nullptr;
    for (const Fiber &f : fibers_) {
      if (f.wait == Wait::Block || f.wait == Wait::Warp) {
        stuck = &f;
        break;
      }
    }
    if (stuck == nullptr) return "deadlock in block " + format_idx(current.block_idx);
    const Fiber *culprit =
        stuck->wait == Wait::Block ? block_straggler(*stuck) : warp_straggler(*stuck);
    std::string msg = "deadlock in block " + format_idx(current.block_idx) + ": thread " +
                      format_idx(stuck->idx) + " waits at " + describe_wait(*stuck) +
                      ", which cannot complete";
    if (culprit != nullptr) {
      msg += " because thread " + format_idx(culprit->idx) +
             (culprit->wait == Wait::Exited ? std::string(" has exited")
                                            : " waits at " + describe_wait(*culprit));
    }
    return msg;
  }

  std::vector<Fiber> fibers_;
  std::vector<Stack> stacks_;  // reused by every block and launch of this OS thread
  std::vector<SmemLine> smem_;
  ucontext_t scheduler_{};
  Fiber *running_ = nullptr;
  unsigned live_ = 0;
  KernelFn fn_ = nullptr;
  void **params_ = nullptr;
  std::string error_;  // set by a fiber whose kernel threw
};

// One engine per OS thread, so that concurrent launches (parallel tests) are independent.
thread_local Engine engine;

void Engine::fiber_main() {
  Fiber &self = *engine.running_;
  try {
    engine.fn_(engine.params_);
  } catch (const std::exception &e) {
    engine.error_ = "thread " + format_idx(self.idx) + " of block " +
                    format_idx(current.block_idx) + " threw: " + e.what();
  } catch (...) {
    engine.error_ = "thread " + format_idx(self.idx) + " of block " +
                    format_idx(current.block_idx) + " threw an exception";
  }
  self.wait = Wait::Exited;
  --engine.live_;
  if (engine.error_.empty()) {
    engine.yield(self);
  } else {
    swapcontext(&self.ctx, &engine.scheduler_);
  }
  // Never resumed: the scheduler does not pick exited fibers.
}

std::string check_dims(const char *what, const uint32_t d[3], const uint32_t max[3]) {
  for (int i = 0; i < 3; ++i) {
    if (d[i] == 0 || d[i] > max[i]) {
      return std::string(what) + " dimension " + "xyz"[i] + " = " + std::to_string(d[i]) +
             " is outside [1, " + std::to_string(max[i]) + "]";
    }
  }
  return {};
}

std::string launch(const char *name, const uint32_t grid[3], const uint32_t block[3],
                   uint32_t smem_bytes, void **params) {
  if (name == nullptr || grid == nullptr || block == nullptr) {
    return "kernel name, grid and block must not be null";
  }
  const Kernel *kernel = find_kernel(name);
  if (kernel == nullptr) {
    return "unknown kernel '" + std::string(name) + "' (" +
           std::to_string(registry().size()) + " kernels registered)";
  }
  static const uint32_t kMaxGrid[3] = {0x7fffffffu, 65535, 65535};
  static const uint32_t kMaxBlock[3] = {1024, 1024, 64};
  std::string err = check_dims("grid", grid, kMaxGrid);
  if (err.empty()) err = check_dims("block", block, kMaxBlock);
  if (err.empty() && uint64_t{block[0]} * block[1] * block[2] > 1024) {
    err = "block of " + std::to_string(uint64_t{block[0]} * block[1] * block[2]) +
          " threads exceeds 1024";
  }
  for (unsigned i = 0; err.empty() && i < kernel->param_count; ++i) {
    if (params == nullptr || params[i] == nullptr) {
      err = "parameter " + std::to_string(i) + " is null";
    }
  }
  if (engine.busy()) err = "launch from inside a running kernel";
  if (!err.empty()) return "kernel '" + kernel->name + "': " + err;

  current.grid_dim = dim3(grid[0], grid[1], grid[2]);
  current.block_dim = dim3(block[0], block[1], block[2]);
  engine.set_dynamic_smem(smem_bytes);
  for (uint32_t z = 0; z < grid[2]; ++z) {
    for (uint32_t y = 0; y < grid[1]; ++y) {
      for (uint32_t x = 0; x < grid[0]; ++x) {
        err = engine.run_block(kernel->fn, params, uint3{x, y, z});
        if (!err.empty()) return "kernel '" + kernel->name + "': " + err;
      }
    }
  }
  return {};
}

void write_error(char *buffer, size_t capacity, const char *prefix, const char *message) {
  if (buffer != nullptr && capacity > 0) std::snprintf(buffer, capacity, "%s%s", prefix, message);
}

}  // namespace

void sync_block(const char *file, int line) {
  engine.yield(engine.park(Wait::Block, "__syncthreads", file, line));
}

unsigned long long warp_op(WarpOp op, unsigned mask, unsigned long long value, int arg,
                           int width, const char *file, int line) {
  Fiber &self = engine.park(Wait::Warp, op_name(op), file, line);
  if ((mask >> engine.lane(self) & 1u) == 0) {
    throw std::logic_error(std::string(op_name(op)) + " called by a lane outside its mask");
  }
  self.op = op;
  self.mask = mask;
  self.value = value;
  self.arg = arg;
  self.width = width;
  engine.yield(self);
  return self.result;
}

bool register_kernel(const char *name, KernelFn fn, unsigned param_count) {
  auto &kernels = registry();
  const auto it = std::lower_bound(kernels.begin(), kernels.end(), name,
                                   [](const Kernel &k, const char *n) { return k.name < n; });
  kernels.insert(it, Kernel{name, fn, param_count});
  return true;
}

}  // namespace detail
}  // namespace vf_emu

extern "C" {

int32_t vf_emu_launch(const char *kernel, const uint32_t grid[3], const uint32_t block[3],
                      uint32_t dynamic_smem_bytes, void **params, char *error,
                      size_t error_capacity) noexcept {
  try {
    const std::string err =
        vf_emu::detail::launch(kernel, grid, block, dynamic_smem_bytes, params);
    if (err.empty()) return 0;
    vf_emu::detail::write_error(error, error_capacity, "", err.c_str());
    return 1;
  } catch (const std::exception &e) {
    vf_emu::detail::write_error(error, error_capacity, "emulator error: ", e.what());
  } catch (...) {
    vf_emu::detail::write_error(error, error_capacity, "emulator error", "");
  }
  return 2;
}

size_t vf_emu_kernel_count(void) noexcept { return vf_emu::detail::registry().size(); }

const char *vf_emu_kernel_name(size_t index) noexcept {
  const auto &kernels = vf_emu::detail::registry();
  return index < kernels.size() ? kernels[index].name.c_str() : nullptr;
}

int32_t vf_emu_kernel_param_count(const char *kernel) noexcept {
  const vf_emu::detail::Kernel *k =
      kernel != nullptr ? vf_emu::detail::find_kernel(kernel) : nullptr;
  return k != nullptr ? static_cast<int32_t>(k->param_count) : -1;
}

}  // extern "C"
