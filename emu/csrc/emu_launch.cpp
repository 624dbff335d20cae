// emu_launch.cpp: kernel registry, fiber scheduler, shared-memory checker and C ABI of the
// SIMT emulator.
//
// The emulation is stricter than a GPU, never kinder, and draws every choice it makes from
// the launch's seed, so that a failure replays exactly:
// * Blocks run one at a time in a seeded random order (never in index order when there are
//   several), so a block that depends on a lower-numbered one gets a wrong answer.
// * Each CUDA thread is a fiber with its own stack. The running fiber keeps going
//   until it parks at a barrier or warp op, exits, or a seeded coin preempts it at a
//   shared-memory access or an atomic; the next fiber is drawn at random from the ready
//   ones. Warps, and the lanes of a warp, thus interleave differently for every seed, not
//   in lock-step. When no fiber is ready, the scheduler completes every barrier whose
//   participants have all arrived; if none can, the launch stops with a deadlock report
//   naming the barrier and the thread that keeps it from completing.
// * A warp op whose mask leaves out the caller, or names a lane that does not exist or has
//   exited, is an error.
// * Shared memory is filled with 0xFF bytes at its first use in each block. A read of
//   bytes that no thread of the block has written, or an index out of bounds, is an error.
// * Races: __syncthreads starts a new epoch of the block; within an epoch only __syncwarp
//   orders threads (a vector clock per lane over its warp; shuffles and votes order
//   nothing). A write and another thread's access to the same bytes in one epoch that no
//   __syncwarp orders are a race, reported with both source lines, whichever order the
//   fibers happened to run in.
// Fibers switch with _longjmp between stacks, which glibc's fortified longjmp would take
// for stack corruption.
#undef _FORTIFY_SOURCE

#include <setjmp.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <memory>
#include <new>
#include <numeric>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

// Last: it turns CUDA qualifiers such as __noinline__ into macros.
#include "simt_emu.h"

// Defined at the end of the generated kernels translation unit; referencing it makes the
// linker keep that object, whose static initialisers register the kernels.
extern "C" void vf_emu_kernels_anchor(void);

namespace vf_emu {
namespace detail {

constexpr std::size_t kStackBytes = 64 * 1024;
constexpr unsigned kWarp = 32;
constexpr unsigned long long kPoison = ~0ull;  // a shuffle from a lane that takes no part

// One thread's access to a shared-memory cell.
struct Access {
  unsigned thread;  // linear index in the block
  unsigned clock;   // the thread's own entry of its warp clock at the access
  const char *file;
  int line;
};

// Race-detector state of one cell (a static array's element, a byte of dynamic memory).
struct Cell {
  unsigned long long epoch = 0;    // epoch of `writer` and `readers`; older ones are ordered
  unsigned long long written = 0;  // serial of the last block that wrote the cell
  bool has_writer = false;
  Access writer{};
  std::vector<Access> readers;  // since the writer, one per thread
};

struct alignas(128) SmemLine {
  unsigned char bytes[128];
};

struct SharedRegion {
  std::vector<SmemLine> storage;
  std::size_t bytes = 0;
  std::size_t granule = 1;       // bytes per cell
  unsigned long long block = 0;  // serial of the block that last poisoned it
  std::vector<Cell> cells;

  void resize(std::size_t n, std::size_t cell_bytes) {
    bytes = n;
    granule = cell_bytes;
    storage.resize(std::max<std::size_t>(1, (n + sizeof(SmemLine) - 1) / sizeof(SmemLine)));
    const std::size_t needed = (n + cell_bytes - 1) / cell_bytes;
    if (cells.size() < needed) cells.resize(needed);
    block = 0;
  }
};

namespace {

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

// splitmix64: every random choice of a launch derives from its seed.
class Rng {
 public:
  void seed(unsigned long long s) { state_ = s; }
  unsigned long long next() {
    unsigned long long z = (state_ += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  // In [0, n), n > 0 (the modulo bias is irrelevant here).
  unsigned long long below(unsigned long long n) { return next() % n; }

 private:
  unsigned long long state_ = 0;
};

// The order in which a launch runs its blocks: i -> (a i + b) mod n with a coprime to n,
// drawn from the seed; O(1) memory for any grid. Never the identity when n > 1, so that
// some block always runs before a lower-numbered one.
class BlockOrder {
 public:
  BlockOrder(unsigned long long n, Rng &rng) : n_(n) {
    if (n_ < 2) return;
    do {
      a_ = 1 + rng.below(n_ - 1);
    } while (std::gcd(a_, n_) != 1);
    b_ = rng.below(n_);
    if (a_ == 1 && b_ == 0) b_ = 1;
  }
  unsigned long long operator()(unsigned long long i) const {
    if (n_ < 2) return i;
    return static_cast<unsigned long long>((static_cast<unsigned __int128>(a_) * i + b_) % n_);
  }

 private:
  unsigned long long n_, a_ = 1, b_ = 0;
};

// An error of the kernel under test (race, bad mask, ...), as a complete message.
struct KernelFault : std::runtime_error {
  using std::runtime_error::runtime_error;
};

[[noreturn]] void fault(const std::string &message) { throw KernelFault(message); }

enum class Wait : unsigned char { Ready, Block, Warp, Exited };

// A fiber starts once per block from `start` (makecontext/setcontext) and afterwards
// switches with _setjmp/_longjmp, which, unlike swapcontext, make no signal-mask system
// call: switches are the emulation's hot path.
struct Fiber {
  ucontext_t start;
  jmp_buf jump;
  bool started;
  uint3 idx;
  Wait wait;
  unsigned slot;  // position in the ready list while Ready
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
  // clock[k]: how many __syncwarp calls of lane k of the warp this lane is ordered after
  // (its own entry: its own calls).
  std::array<unsigned, kWarp> clock;
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

std::string site(const char *file, int line) {
  return basename(file) + ":" + std::to_string(line);
}

std::string format_idx(uint3 v) {
  return "(" + std::to_string(v.x) + "," + std::to_string(v.y) + "," + std::to_string(v.z) +
         ")";
}

class Engine {
 public:
  // Draws a launch's preemption rate from its seed and sizes its dynamic shared memory.
  void start_launch(unsigned long long seed, std::size_t dynamic_smem_bytes) {
    published_.clear();
    rng_.seed(seed);
    static constexpr unsigned kPreemptOneIn[] = {2, 4, 16, 64};
    preempt_one_in_ = kPreemptOneIn[rng_.below(std::size(kPreemptOneIn))];
    dynamic_.resize(dynamic_smem_bytes, 1);
  }

  Rng &rng() { return rng_; }

  // Runs one block to completion; returns an error message, empty on success.
  std::string run_block(KernelFn fn, void **params, uint3 block_idx) {
    const dim3 dim = current.block_dim;
    const unsigned n = dim.x * dim.y * dim.z;
    fibers_.resize(n);
    while (stacks_.size() < n) stacks_.emplace_back();
    current.block_idx = block_idx;
    fn_ = fn;
    params_ = params;
    fault_.clear();
    ++block_serial_;  // poisons every shared array again at its first use
    ++epoch_;
    ready_.clear();
    for (unsigned i = 0; i < n; ++i) {
      Fiber &f = fibers_[i];
      f.idx = uint3{i % dim.x, i / dim.x % dim.y, i / (dim.x * dim.y)};
      f.clock.fill(0);
      f.started = false;
      if (getcontext(&f.start) != 0) throw std::runtime_error("getcontext failed");
      f.start.uc_stack.ss_sp = stacks_[i].bottom();
      f.start.uc_stack.ss_size = kStackBytes;
      f.start.uc_link = nullptr;
      makecontext(&f.start, &Engine::fiber_main, 0);
      make_ready(f);
    }
    live_ = n;
    for (;;) {
      if (!ready_.empty()) {
        resume(draw(nullptr), scheduler_);
      } else if (live_ == 0) {
        break;
      } else if (!resolve_warps() && fault_.empty() && !resolve_block_barrier()) {
        fault_ = deadlock_message();
      }
      if (!fault_.empty()) break;
    }
    // Fibers still waiting are abandoned; their stacks are reset by the next block.
    running_ = nullptr;
    return fault_;
  }

  bool busy() const { return running_ != nullptr; }

  // The calling fiber, arriving at a barrier or warp op.
  Fiber &arrive(const char *what, const char *file, int line) {
    Fiber &self = running(what);
    self.what = what;
    self.file = file;
    self.line = line;
    return self;
  }

  // Parks the calling fiber until the scheduler releases it.
  void wait(Fiber &self, Wait wait) {
    unready(self, wait);
    yield(self);
  }

  // The warp-op rules that need no other lane: the caller is in its mask, and the mask
  // names only lanes that exist.
  void check_mask(const Fiber &self) const {
    const unsigned lane = this->lane(self);
    if ((self.mask >> lane & 1u) == 0) {
      fault(who(self) + ": " + describe(self, true) + " is called by lane " +
            std::to_string(lane) + ", outside its mask");
    }
    const unsigned lanes = lanes_of_warp(self);
    if (lanes < kWarp && (self.mask >> lanes) != 0) {
      fault(who(self) + ": " + describe(self, true) + " names lane " +
            std::to_string(lanes + __builtin_ctz(self.mask >> lanes)) +
            ", which does not exist (the block has " + std::to_string(fibers_.size()) +
            " threads)");
    }
  }

  // A point where the running fiber may be preempted.
  void preempt() {
    if (running_ == nullptr || ready_.size() < 2 || rng_.below(preempt_one_in_) != 0) return;
    Fiber &self = *running_;
    resume(draw(&self), self.jump);
  }

  SharedView static_region(const void *key, std::size_t elem_bytes, std::size_t align,
                           std::size_t count) {
    std::unique_ptr<SharedRegion> &region = static_regions_[key];
    if (region == nullptr) {
      region = std::make_unique<SharedRegion>();
      region->resize(elem_bytes * count, elem_bytes);
    }
    return bind(*region, elem_bytes, align);
  }

  SharedView dynamic_region(std::size_t elem_bytes, std::size_t align) {
    return bind(dynamic_, elem_bytes, align);
  }

  void access(const SharedAccess &a, bool write) {
    running("a shared-memory access");
    preempt();
    const Fiber &self = *running_;
    const Access me{index(self), self.clock[lane(self)], a.file, a.line};
    SharedRegion &r = *a.region;
    const std::size_t begin = a.index * a.bytes;
    for (std::size_t c = begin / r.granule; c * r.granule < begin + a.bytes; ++c) {
      Cell &cell = r.cells[c];
      if (cell.epoch != epoch_) {  // a barrier orders everything before it
        cell.epoch = epoch_;
        cell.has_writer = false;
        cell.readers.clear();
      }
      if (cell.has_writer) check_ordered(cell.writer, "wrote", me, write, a);
      if (write) {
        for (const Access &reader : cell.readers) check_ordered(reader, "read", me, write, a);
        cell.readers.clear();
        cell.writer = me;
        cell.has_writer = true;
        cell.written = block_serial_;
      } else {
        if (cell.written != block_serial_) {
          fault(who(self) + " reads " + element(a) + " at " + site(a.file, a.line) +
                ", which no thread of the block has written (shared memory starts as "
                "garbage)");
        }
        const auto same =
            std::find_if(cell.readers.begin(), cell.readers.end(),
                         [&](const Access &other) { return other.thread == me.thread; });
        if (same != cell.readers.end()) {
          *same = me;
        } else {
          cell.readers.push_back(me);
        }
      }
    }
  }

  // Global-memory visibility across blocks, as the PTX memory model gives it: a value one
  // block writes (VF_PUBLISH) and another block of the same launch reads (VF_CONSUME) is
  // visible only if its writer fenced (__threadfence) after writing it, and the fence came
  // before an atomic of the writer's block that the reader's block observes (the "last block
  // done" counter). A fence covers the fencing thread's own earlier writes, never its
  // neighbours'; a write is released by the block's first atomic after its fence, in the
  // emulation's (randomly interleaved) order of events.
  void publish(const void *address, const char *file, int line) {
    const Fiber &self = running("VF_PUBLISH");
    published_[address] = Publication{current.block_idx, self.idx, false, false, file, line};
  }

  void release() {
    if (running_ == nullptr) return;
    for (auto &entry : published_) {
      Publication &p = entry.second;
      if (p.fenced && same_idx(p.block, current.block_idx)) p.released = true;
    }
  }

  void thread_fence() {
    if (running_ == nullptr) return;
    const Fiber &self = running("__threadfence");
    for (auto &entry : published_) {
      Publication &p = entry.second;
      if (same_idx(p.block, current.block_idx) && same_idx(p.thread, self.idx)) {
        p.fenced = true;
      }
    }
  }

  void consume(const void *address, const char *file, int line) {
    const auto it = published_.find(address);
    if (it == published_.end()) return;  // written before this launch
    const Publication &p = it->second;
    if (!p.released && !same_idx(p.block, current.block_idx)) {
      char at[32];
      std::snprintf(at, sizeof at, "%p", address);
      fault(who(running("VF_CONSUME")) + " reads " + at + " at " + site(file, line) +
            ", which thread " + format_idx(p.thread) + " of block " + format_idx(p.block) +
            " wrote at " + site(p.file, p.line) +
            (p.fenced ? " and fenced only after its block's atomic: not guaranteed visible"
                      : " without a __threadfence() of its own after the write: not "
                        "guaranteed visible"));
    }
  }

  [[noreturn]] void misaligned(const void *address, std::size_t bytes, const char *file,
                              int line) {
    char at[32];
    std::snprintf(at, sizeof at, "%p", address);
    fault(who(running("a vector access")) + " accesses " + std::to_string(bytes) +
          " bytes at " + at + " at " + site(file, line) + ", not " + std::to_string(bytes) +
          "-byte aligned");
  }

  [[noreturn]] void out_of_bounds(const char *name, long long index, std::size_t count,
                                  const char *file, int line) {
    fault(who(running("a shared-memory access")) + " indexes " + name + "[" +
          std::to_string(index) + "] at " + site(file, line) + ", outside its " +
          std::to_string(count) + " elements");
  }

 private:
  static void fiber_main();

  unsigned index(const Fiber &f) const { return static_cast<unsigned>(&f - fibers_.data()); }
  unsigned lane(const Fiber &f) const { return index(f) % kWarp; }
  unsigned warp_base(const Fiber &f) const { return index(f) / kWarp * kWarp; }
  // Lanes that exist in f's warp (fewer than 32 in a partial last warp).
  unsigned lanes_of_warp(const Fiber &f) const {
    return std::min<unsigned>(kWarp, static_cast<unsigned>(fibers_.size()) - warp_base(f));
  }

  std::string who(const Fiber &f) const {
    return "thread " + format_idx(f.idx) + " of block " + format_idx(current.block_idx);
  }

  Fiber &running(const char *what) {
    if (running_ == nullptr) throw std::logic_error(std::string(what) + " outside a launch");
    return *running_;
  }

  void make_ready(Fiber &f) {
    f.wait = Wait::Ready;
    f.slot = static_cast<unsigned>(ready_.size());
    ready_.push_back(index(f));
  }

  void unready(Fiber &f, Wait wait) {
    if (f.wait == Wait::Ready) {
      const unsigned last = ready_.back();
      ready_[f.slot] = last;
      fibers_[last].slot = f.slot;
      ready_.pop_back();
    }
    f.wait = wait;
  }

  // A ready fiber drawn at random; other than `self` when given (self is then ready too).
  Fiber &draw(const Fiber *self) {
    const std::size_t n = ready_.size() - (self != nullptr ? 1 : 0);
    std::size_t k = rng_.below(n);
    if (self != nullptr && ready_[k] == index(*self)) k = n;
    return fibers_[ready_[k]];
  }

  // Saves the caller's context in `from` and runs f; returns when `from` is jumped to.
  void resume(Fiber &f, jmp_buf from) {
    running_ = &f;
    current.thread_idx = f.idx;
    if (_setjmp(from) != 0) return;
    if (!f.started) {
      f.started = true;
      setcontext(&f.start);
    }
    _longjmp(f.jump, 1);
  }

  // Hands over from a fiber that has stopped being ready.
  void yield(Fiber &self) {
    if (!ready_.empty()) {
      resume(draw(nullptr), self.jump);
    } else if (_setjmp(self.jump) == 0) {
      _longjmp(scheduler_, 1);
    }
  }

  SharedView bind(SharedRegion &region, std::size_t elem_bytes, std::size_t align) {
    running("shared memory");
    if (align > alignof(SmemLine)) throw std::logic_error("shared memory aligned beyond 128");
    if (region.block != block_serial_) {
      std::memset(region.storage.data(), 0xFF, region.storage.size() * sizeof(SmemLine));
      region.block = block_serial_;
    }
    return SharedView{&region, region.storage.front().bytes, region.bytes / elem_bytes};
  }

  static std::string element(const SharedAccess &a) {
    return std::string(a.name) + "[" + std::to_string(a.index) + "]";
  }

  // Whether `prior`'s access is ordered before the current one by a __syncwarp.
  bool synced(const Access &prior, const Access &me) const {
    return prior.thread / kWarp == me.thread / kWarp &&
           fibers_[me.thread].clock[prior.thread % kWarp] > prior.clock;
  }

  void check_ordered(const Access &prior, const char *prior_verb, const Access &me, bool write,
                     const SharedAccess &a) const {
    if (prior.thread == me.thread || synced(prior, me)) return;
    fault("shared-memory race in block " + format_idx(current.block_idx) + ": thread " +
          format_idx(fibers_[prior.thread].idx) + " " + prior_verb + " " + element(a) +
          " at " + site(prior.file, prior.line) + ", then thread " +
          format_idx(fibers_[me.thread].idx) + (write ? " writes" : " reads") + " it at " +
          site(me.file, me.line) + ", with no barrier between them");
  }

  bool same_warp_op(const Fiber &f, const Fiber &ref) const {
    return f.wait == Wait::Warp && f.op == ref.op && f.mask == ref.mask;
  }

  // The first lane of ref's mask that has not joined ref's warp op, or nullptr.
  const Fiber *warp_straggler(const Fiber &ref) const {
    const unsigned base = warp_base(ref);
    for (unsigned k = 0; k < kWarp; ++k) {
      if ((ref.mask >> k & 1u) != 0 && !same_warp_op(fibers_[base + k], ref)) {
        return &fibers_[base + k];
      }
    }
    return nullptr;
  }

  // A lane of ref's mask that has exited, or nullptr.
  const Fiber *exited_lane(const Fiber &ref) const {
    const unsigned base = warp_base(ref);
    for (unsigned k = 0; k < kWarp; ++k) {
      if ((ref.mask >> k & 1u) != 0 && fibers_[base + k].wait == Wait::Exited) {
        return &fibers_[base + k];
      }
    }
    return nullptr;
  }

  // Completes every warp op whose lanes have all joined it. A waiting op whose mask names
  // a lane that has exited is an error: that lane can never join.
  bool resolve_warps() {
    bool progressed = false;
    for (Fiber &f : fibers_) {
      if (f.wait != Wait::Warp) continue;
      if (const Fiber *gone = exited_lane(f)) {
        fault_ = who(f) + ": " + describe(f, true) + " names lane " +
                 std::to_string(lane(*gone)) + " (thread " + format_idx(gone->idx) +
                 "), which has exited";
        return false;
      }
      if (warp_straggler(f) == nullptr) {
        complete_warp_op(f);
        progressed = true;
      }
    }
    return progressed;
  }

  void complete_warp_op(const Fiber &ref) {
    const unsigned base = warp_base(ref);
    const unsigned group = ref.mask;
    unsigned ballot = 0;
    std::array<unsigned, kWarp> joined{};
    for (unsigned k = 0; k < kWarp; ++k) {
      if ((group >> k & 1u) == 0) continue;
      Fiber &f = fibers_[base + k];
      if (f.value != 0) ballot |= 1u << k;
      if (f.op == WarpOp::Sync) {
        ++f.clock[k];
        for (unsigned j = 0; j < kWarp; ++j) joined[j] = std::max(joined[j], f.clock[j]);
      }
    }
    for (unsigned k = 0; k < kWarp; ++k) {
      if ((group >> k & 1u) == 0) continue;
      Fiber &f = fibers_[base + k];
      switch (f.op) {
        case WarpOp::Sync: f.result = 0; f.clock = joined; break;
        case WarpOp::Ballot: f.result = ballot; break;
        case WarpOp::All: f.result = ballot == group; break;
        case WarpOp::Any: f.result = ballot != 0; break;
        default: {
          const unsigned j = static_cast<unsigned>(source_lane(f.op, k, f.arg, f.width));
          f.result = j == k ? f.value : (group >> j & 1u) != 0 ? fibers_[base + j].value : kPoison;
        }
      }
      make_ready(f);
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
    ++epoch_;
    for (Fiber &f : fibers_) make_ready(f);
    return true;
  }

  // "what (file:line)", with the mask of a warp op.
  static std::string describe(const Fiber &f, bool warp_op) {
    std::string s = std::string(f.what) + " (" + site(f.file, f.line);
    if (warp_op) {
      char mask[16];
      std::snprintf(mask, sizeof mask, "0x%08x", f.mask);
      s += ", mask " + std::string(mask);
    }
    return s + ")";
  }

  static std::string describe_wait(const Fiber &f) { return describe(f, f.wait == Wait::Warp); }

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
  std::vector<unsigned> ready_;  // indices of the ready fibers, the running one included
  jmp_buf scheduler_;
  Fiber *running_ = nullptr;
  unsigned live_ = 0;
  KernelFn fn_ = nullptr;
  void **params_ = nullptr;
  std::string fault_;  // why the block stopped, set by a fiber or by the scheduler
  Rng rng_;
  unsigned preempt_one_in_ = 1;
  unsigned long long block_serial_ = 0;  // blocks run by this engine
  unsigned long long epoch_ = 0;         // bumped at every block start and __syncthreads
  SharedRegion dynamic_;
  std::unordered_map<const void *, std::unique_ptr<SharedRegion>> static_regions_;
  struct Publication {
    uint3 block;
    uint3 thread;
    bool fenced;    // its writer called __threadfence() after writing it
    bool released;  // ... and then a thread of its block made an atomic
    const char *file;
    int line;
  };
  static bool same_idx(const uint3 &a, const uint3 &b) {
    return a.x == b.x && a.y == b.y && a.z == b.z;
  }
  std::unordered_map<const void *, Publication> published_;  // this launch's cross-block writes
};

// One engine per OS thread, so that concurrent launches (parallel tests) are independent.
thread_local Engine engine;

void Engine::fiber_main() {
  Fiber &self = *engine.running_;
  try {
    engine.fn_(engine.params_);
  } catch (const KernelFault &e) {
    engine.fault_ = e.what();
  } catch (const std::exception &e) {
    engine.fault_ = engine.who(self) + " threw: " + e.what();
  } catch (...) {
    engine.fault_ = engine.who(self) + " threw an exception";
  }
  engine.unready(self, Wait::Exited);
  --engine.live_;
  if (engine.fault_.empty()) {
    engine.yield(self);
  } else {
    _longjmp(engine.scheduler_, 1);
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
                   uint32_t smem_bytes, void **params, uint64_t seed) {
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
  engine.start_launch(seed, smem_bytes);
  const unsigned long long gx = grid[0], gxy = gx * grid[1], blocks = gxy * grid[2];
  const BlockOrder order(blocks, engine.rng());
  for (unsigned long long i = 0; i < blocks; ++i) {
    const unsigned long long b = order(i);
    const uint3 idx{static_cast<unsigned>(b % gx), static_cast<unsigned>(b % gxy / gx),
                    static_cast<unsigned>(b / gxy)};
    err = engine.run_block(kernel->fn, params, idx);
    if (!err.empty()) return "kernel '" + kernel->name + "': " + err;
  }
  return {};
}

void write_error(char *buffer, size_t capacity, const std::string &message, uint64_t seed) {
  if (buffer != nullptr && capacity > 0) {
    std::snprintf(buffer, capacity, "%s (emulation seed 0x%llx)", message.c_str(),
                  static_cast<unsigned long long>(seed));
  }
}

}  // namespace

void sync_block(const char *file, int line) {
  engine.wait(engine.arrive("__syncthreads", file, line), Wait::Block);
}

unsigned long long warp_op(WarpOp op, unsigned mask, unsigned long long value, int arg,
                           int width, const char *file, int line) {
  Fiber &self = engine.arrive(op_name(op), file, line);
  self.op = op;
  self.mask = mask;
  self.value = value;
  self.arg = arg;
  self.width = width;
  engine.check_mask(self);
  engine.wait(self, Wait::Warp);
  return self.result;
}

SharedView static_shared(const void *key, std::size_t elem_bytes, std::size_t align,
                         std::size_t count) {
  return engine.static_region(key, elem_bytes, align, count);
}

SharedView dynamic_shared(std::size_t elem_bytes, std::size_t align) {
  return engine.dynamic_region(elem_bytes, align);
}

void shared_access(const SharedAccess &access, bool write) { engine.access(access, write); }

void shared_out_of_bounds(const char *name, long long index, std::size_t count,
                          const char *file, int line) {
  engine.out_of_bounds(name, index, count, file, line);
}

void misaligned_access(const void *address, std::size_t bytes, const char *file, int line) {
  engine.misaligned(address, bytes, file, line);
}

void preempt_point() { engine.preempt(); }

void publish(const void *address, const char *file, int line) {
  engine.publish(address, file, line);
}

void consume(const void *address, const char *file, int line) {
  engine.consume(address, file, line);
}

void thread_fence() { engine.thread_fence(); }

void release_point() { engine.release(); }

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
                      uint32_t dynamic_smem_bytes, void **params, uint64_t seed, char *error,
                      size_t error_capacity) noexcept {
  try {
    const std::string err =
        vf_emu::detail::launch(kernel, grid, block, dynamic_smem_bytes, params, seed);
    if (err.empty()) return 0;
    vf_emu::detail::write_error(error, error_capacity, err, seed);
    return 1;
  } catch (const std::exception &e) {
    vf_emu::detail::write_error(error, error_capacity,
                                std::string("emulator error: ") + e.what(), seed);
  } catch (...) {
    vf_emu::detail::write_error(error, error_capacity, "emulator error", seed);
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
