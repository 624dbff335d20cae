// simt_emu.h: host emulation of the CUDA SIMT surface that vidfuse's kernels use.
//
// build.rs includes this header, then every kernels/*.cu file unchanged (the same bytes
// NVRTC compiles), into one C++17 translation unit. The threads of a block run as
// cooperative fibers on the launching OS thread, interleaved in a seeded random order;
// blocks run one after another, also in a seeded random order. The scheduler and the
// shared-memory checker live in csrc/emu_launch.cpp.
#ifndef VF_SIMT_EMU_H
#define VF_SIMT_EMU_H

#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdio>
#include <cstdint>
#include <cstring>
#include <math.h>  // float overloads such as exp(float) in the global namespace, as in CUDA
#include <type_traits>
#include <utility>

#define VF_EMULATION 1

// ---------------------------------------------------------------------------------------
// Qualifiers. Defined after the standard headers: libstdc++ itself spells
// __attribute__((__noinline__)).
#define __global__
#define __device__
#define __host__
#define __forceinline__
#define __noinline__
#define __constant__
#define __restrict__
#define __launch_bounds__(...)
#define __grid_constant__
#define __align__(n) __attribute__((aligned(n)))
// Shared memory is declared with VF_SHARED_ARRAY or VF_DYNAMIC_SHARED and accessed with
// VF_SHARED (below), so that the engine sees every access. A plain __shared__ declaration
// would escape the checks, so it does not compile here.
#define __shared__ vf_emu_declare_shared_memory_with_VF_SHARED_ARRAY

// ---------------------------------------------------------------------------------------
// Vector types, with CUDA's sizes and alignments.
#define VF_EMU_VEC2(T, name, align)                                                      \
  struct alignas(align) name {                                                           \
    T x, y;                                                                              \
  };                                                                                     \
  inline name make_##name(T x, T y) { return name{x, y}; }
#define VF_EMU_VEC3(T, name)                                                             \
  struct name {                                                                          \
    T x, y, z;                                                                           \
  };                                                                                     \
  inline name make_##name(T x, T y, T z) { return name{x, y, z}; }
#define VF_EMU_VEC4(T, name, align)                                                      \
  struct alignas(align) name {                                                           \
    T x, y, z, w;                                                                        \
  };                                                                                     \
  inline name make_##name(T x, T y, T z, T w) { return name{x, y, z, w}; }

VF_EMU_VEC2(float, float2, 8)
VF_EMU_VEC3(float, float3)
VF_EMU_VEC4(float, float4, 16)
VF_EMU_VEC2(double, double2, 16)
VF_EMU_VEC2(int, int2, 8)
VF_EMU_VEC3(int, int3)
VF_EMU_VEC4(int, int4, 16)
VF_EMU_VEC2(unsigned int, uint2, 8)
VF_EMU_VEC3(unsigned int, uint3)
VF_EMU_VEC4(unsigned int, uint4, 16)
VF_EMU_VEC2(unsigned short, ushort2, 4)
VF_EMU_VEC4(unsigned short, ushort4, 8)
VF_EMU_VEC2(long long, longlong2, 16)
VF_EMU_VEC2(unsigned long long, ulonglong2, 16)
#undef VF_EMU_VEC2
#undef VF_EMU_VEC3
#undef VF_EMU_VEC4

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1)
      : x(x_), y(y_), z(z_) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
};

static constexpr int warpSize = 32;

// ---------------------------------------------------------------------------------------
// Engine interface (implemented in csrc/emu_launch.cpp).
namespace vf_emu {
namespace detail {

// What the running fiber sees as its built-in variables; the scheduler rewrites
// thread_idx at every switch.
struct Current {
  uint3 thread_idx{0, 0, 0};
  uint3 block_idx{0, 0, 0};
  dim3 block_dim;
  dim3 grid_dim;
};
inline thread_local Current current;

inline const uint3 &thread_idx() { return current.thread_idx; }
inline const uint3 &block_idx() { return current.block_idx; }
inline const dim3 &block_dim() { return current.block_dim; }
inline const dim3 &grid_dim() { return current.grid_dim; }

enum class WarpOp : unsigned char { Sync, Idx, Up, Down, Xor, Ballot, All, Any };

// Blocks the calling fiber until every thread of the block reaches the same barrier.
void sync_block(const char *file, int line);
// Blocks until every running lane of `mask` calls the same warp op with the same mask;
// returns this lane's result. Values travel as raw bits.
unsigned long long warp_op(WarpOp op, unsigned mask, unsigned long long value, int arg,
                           int width, const char *file, int line);

using KernelFn = void (*)(void **params);
bool register_kernel(const char *name, KernelFn fn, unsigned param_count);

template <class... A>
constexpr unsigned param_count(void (*)(A...)) {
  return sizeof...(A);
}

template <class... A, std::size_t... I>
inline void invoke_unpacked(void (*fn)(A...), void **params, std::index_sequence<I...>) {
  (void)params;  // unused by kernels without parameters
  fn(*static_cast<A *>(params[I])...);
}

// cuLaunchKernel convention: params[i] points at the value of the i-th argument.
template <auto Fn>
void trampoline(void **params) {
  invoke_unpacked(Fn, params, std::make_index_sequence<param_count(Fn)>{});
}

template <class T>
inline unsigned long long to_bits(T v) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8,
                "warp shuffles move values of at most 8 bytes");
  unsigned long long bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  return bits;
}

template <class To, class From>
inline To bit_cast(From v) {
  static_assert(sizeof(To) <= sizeof(From), "bit_cast narrows or keeps the size");
  To out;
  std::memcpy(&out, &v, sizeof(To));
  return out;
}

template <class T>
inline T shuffle(WarpOp op, unsigned mask, T var, int arg, int width, const char *file,
                 int line) {
  return bit_cast<T>(warp_op(op, mask, to_bits(var), arg, width, file, line));
}

}  // namespace detail
}  // namespace vf_emu

#define threadIdx (::vf_emu::detail::thread_idx())
#define blockIdx (::vf_emu::detail::block_idx())
#define blockDim (::vf_emu::detail::block_dim())
#define gridDim (::vf_emu::detail::grid_dim())

#define VF_REGISTER_KERNEL(name)                                                         \
  [[maybe_unused]] static const bool vf_emu_registered_##name =                          \
      ::vf_emu::detail::register_kernel(#name, &::vf_emu::detail::trampoline<&name>,     \
                                        ::vf_emu::detail::param_count(&name));

// ---------------------------------------------------------------------------------------
// Shared memory (the NVRTC versions of these macros are in kernels/common.cuh).
//
// An array is a region of the engine's, created at its first use on an OS thread and
// filled with 0xFF bytes at its first use in each block. VF_SHARED yields a reference
// whose reads and writes the engine checks (bounds, reads of bytes the block has not
// written, races) and where it may switch to another fiber.
namespace vf_emu {
namespace detail {

struct SharedRegion;  // storage and race-detector state of one array (emu_launch.cpp)

struct SharedView {
  SharedRegion *region;
  unsigned char *data;
  std::size_t count;  // elements
};

// `key` names the declaration (one per template instantiation).
SharedView static_shared(const void *key, std::size_t elem_bytes, std::size_t align,
                         std::size_t count);
SharedView dynamic_shared(std::size_t elem_bytes, std::size_t align);

struct SharedAccess {
  SharedRegion *region;
  const char *name;   // the array, as declared
  std::size_t index;  // element
  std::size_t bytes;  // element size
  const char *file;
  int line;
};

// Checks and records one read or write; may switch fibers first.
void shared_access(const SharedAccess &access, bool write);
// A vector access of `bytes` bytes at an address that is not a multiple of `bytes`: on a GPU,
// a misaligned-address fault.
[[noreturn]] void misaligned_access(const void *address, std::size_t bytes, const char *file,
                                    int line);
inline void check_aligned(const void *address, std::size_t bytes, const char *file, int line) {
  if (reinterpret_cast<std::uintptr_t>(address) % bytes != 0) {
    misaligned_access(address, bytes, file, line);
  }
}
[[noreturn]] void shared_out_of_bounds(const char *name, long long index, std::size_t count,
                                       const char *file, int line);
// A point where the running fiber may be preempted (atomics).
void preempt_point();
// Global memory written by one block and read by another in the same launch: the read is
// an error unless the writer called __threadfence() after the write (see VF_PUBLISH).
void publish(const void *address, const char *file, int line);
void consume(const void *address, const char *file, int line);
void thread_fence();
// An atomic: releases the block's fenced writes to other blocks.
void release_point();

// What VF_SHARED returns: reads and writes go through the engine. Binding it to `auto`
// defers the read to each later use, unlike CUDA: convert it to the element type instead.
template <class T>
class SharedRef {
 public:
  SharedRef(T *p, const SharedAccess &access) : p_(p), access_(access) {}

  operator T() const {
    shared_access(access_, false);
    return *p_;
  }
  const SharedRef &operator=(const T &v) const {
    shared_access(access_, true);
    *p_ = v;
    return *this;
  }
  const SharedRef &operator=(const SharedRef &other) const {
    return *this = static_cast<T>(other);
  }
  // The address, e.g. for atomics; accesses through it are neither checked nor recorded.
  T *operator&() const { return p_; }

#define VF_EMU_COMPOUND(op)                                                              \
  template <class U>                                                                     \
  const SharedRef &operator op##=(const U &v) const {                                    \
    return *this = static_cast<T>(static_cast<T>(*this) op v);                           \
  }
  VF_EMU_COMPOUND(+)
  VF_EMU_COMPOUND(-)
  VF_EMU_COMPOUND(*)
  VF_EMU_COMPOUND(/)
  VF_EMU_COMPOUND(%)
  VF_EMU_COMPOUND(&)
  VF_EMU_COMPOUND(|)
  VF_EMU_COMPOUND(^)
  VF_EMU_COMPOUND(<<)
  VF_EMU_COMPOUND(>>)
#undef VF_EMU_COMPOUND

 private:
  T *p_;
  SharedAccess access_;
};

template <class T>
class SharedArray {
 public:
  SharedArray(const SharedView &view, const char *name) : view_(view), name_(name) {}

  template <class I>
  SharedRef<T> at(I index, const char *file, int line) const {
    static_assert(std::is_integral_v<I>, "a shared-memory index is an integer");
    // A negative index converts to a huge one.
    if (static_cast<unsigned long long>(index) >= view_.count) {
      shared_out_of_bounds(name_, static_cast<long long>(index), view_.count, file, line);
    }
    const auto i = static_cast<std::size_t>(index);
    return SharedRef<T>(reinterpret_cast<T *>(view_.data) + i,
                        SharedAccess{view_.region, name_, i, sizeof(T), file, line});
  }

 private:
  SharedView view_;
  const char *name_;
};

}  // namespace detail
}  // namespace vf_emu

// The static local's address identifies the declaration and template instantiation.
#define VF_SHARED_ARRAY(type, name, count)                                               \
  static char vf_emu_key_##name;                                                         \
  const ::vf_emu::detail::SharedArray<type> name(                                        \
      ::vf_emu::detail::static_shared(&vf_emu_key_##name, sizeof(type), alignof(type),   \
                                      (count)),                                          \
      #name)
#define VF_DYNAMIC_SHARED(type, name)                                                    \
  const ::vf_emu::detail::SharedArray<type> name(                                        \
      ::vf_emu::detail::dynamic_shared(sizeof(type), alignof(type)), #name)
#define VF_SHARED(name, index) (name).at((index), __FILE__, __LINE__)
#define VF_CHECK_ALIGNED(address, bytes)                                                 \
  ::vf_emu::detail::check_aligned((address), (bytes), __FILE__, __LINE__)
#define VF_PUBLISH(address) ::vf_emu::detail::publish((address), __FILE__, __LINE__)
#define VF_CONSUME(address) ::vf_emu::detail::consume((address), __FILE__, __LINE__)

// ---------------------------------------------------------------------------------------
// Synchronisation. The defaulted site arguments name the barrier in deadlock reports.
#define VF_EMU_SITE const char *vf_file = __builtin_FILE(), int vf_line = __builtin_LINE()

inline void __syncthreads(VF_EMU_SITE) { ::vf_emu::detail::sync_block(vf_file, vf_line); }

inline void __syncwarp(unsigned mask = 0xffffffffu, VF_EMU_SITE) {
  ::vf_emu::detail::warp_op(::vf_emu::detail::WarpOp::Sync, mask, 0, 0, warpSize, vf_file,
                            vf_line);
}

template <class T>
inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize, VF_EMU_SITE) {
  return ::vf_emu::detail::shuffle(::vf_emu::detail::WarpOp::Idx, mask, var, src_lane, width,
                                   vf_file, vf_line);
}

template <class T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                        VF_EMU_SITE) {
  return ::vf_emu::detail::shuffle(::vf_emu::detail::WarpOp::Up, mask, var,
                                   static_cast<int>(delta), width, vf_file, vf_line);
}

template <class T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                          VF_EMU_SITE) {
  return ::vf_emu::detail::shuffle(::vf_emu::detail::WarpOp::Down, mask, var,
                                   static_cast<int>(delta), width, vf_file, vf_line);
}

template <class T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize,
                         VF_EMU_SITE) {
  return ::vf_emu::detail::shuffle(::vf_emu::detail::WarpOp::Xor, mask, var, lane_mask, width,
                                   vf_file, vf_line);
}

inline unsigned __ballot_sync(unsigned mask, int pred, VF_EMU_SITE) {
  return static_cast<unsigned>(::vf_emu::detail::warp_op(
      ::vf_emu::detail::WarpOp::Ballot, mask, pred != 0, 0, warpSize, vf_file, vf_line));
}

inline int __all_sync(unsigned mask, int pred, VF_EMU_SITE) {
  return static_cast<int>(::vf_emu::detail::warp_op(::vf_emu::detail::WarpOp::All, mask,
                                                    pred != 0, 0, warpSize, vf_file, vf_line));
}

inline int __any_sync(unsigned mask, int pred, VF_EMU_SITE) {
  return static_cast<int>(::vf_emu::detail::warp_op(::vf_emu::detail::WarpOp::Any, mask,
                                                    pred != 0, 0, warpSize, vf_file, vf_line));
}
#undef VF_EMU_SITE

inline void __threadfence() {
  std::atomic_thread_fence(std::memory_order_seq_cst);
  ::vf_emu::detail::thread_fence();
}
inline void __threadfence_block() { std::atomic_signal_fence(std::memory_order_seq_cst); }

// Atomics: fibers never switch inside these (only just before) and blocks run in turn, so
// a plain read-modify-write is already atomic with respect to every other emulated thread.
namespace vf_emu {
namespace detail {
template <class T>
struct same {
  using type = T;
};
}  // namespace detail
}  // namespace vf_emu
#define VF_EMU_ATOMIC(name, update)                                                      \
  template <class T>                                                                     \
  inline T name(T *p, typename ::vf_emu::detail::same<T>::type v) {                      \
    ::vf_emu::detail::preempt_point();                                                   \
    ::vf_emu::detail::release_point();                                                   \
    const T old = *p;                                                                    \
    *p = (update);                                                                       \
    return old;                                                                          \
  }
VF_EMU_ATOMIC(atomicAdd, old + v)
VF_EMU_ATOMIC(atomicSub, old - v)
VF_EMU_ATOMIC(atomicExch, v)
VF_EMU_ATOMIC(atomicMax, v > old ? v : old)
VF_EMU_ATOMIC(atomicMin, v < old ? v : old)
VF_EMU_ATOMIC(atomicOr, old | v)
VF_EMU_ATOMIC(atomicAnd, old & v)
#undef VF_EMU_ATOMIC

template <class T>
inline T atomicCAS(T *p, typename ::vf_emu::detail::same<T>::type compare,
                   typename ::vf_emu::detail::same<T>::type v) {
  ::vf_emu::detail::preempt_point();
  ::vf_emu::detail::release_point();
  const T old = *p;
  if (old == compare) *p = v;
  return old;
}

// ---------------------------------------------------------------------------------------
// Math. The <cmath> functions (expf, logf, log1pf, ..., and their double versions) come
// from the standard library; these are the CUDA-only names.
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
// glibc declares (but does not export) __expf and __logf, so rename ours.
inline float vf_emu_expf(float x) { return std::exp(x); }
inline float vf_emu_logf(float x) { return std::log(x); }
#define __expf vf_emu_expf
#define __logf vf_emu_logf
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }

// min/max over mixed arithmetic types convert both sides as CUDA's overloads do
// (min(int, unsigned) is unsigned); floating point follows fminf/fmaxf for NaNs.
#define VF_EMU_MINMAX(name, cmp, fname)                                                  \
  template <class A, class B,                                                            \
            class = std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>>> \
  inline std::common_type_t<A, B> name(A a, B b) {                                       \
    using C = std::common_type_t<A, B>;                                                  \
    if constexpr (std::is_floating_point_v<C>) {                                         \
      return std::fname(static_cast<C>(a), static_cast<C>(b));                           \
    } else {                                                                             \
      return static_cast<C>(b) cmp static_cast<C>(a) ? static_cast<C>(b)                 \
                                                     : static_cast<C>(a);                \
    }                                                                                    \
  }
VF_EMU_MINMAX(min, <, fmin)
VF_EMU_MINMAX(max, >, fmax)
#undef VF_EMU_MINMAX

// ---------------------------------------------------------------------------------------
// Bit casts and integer intrinsics.
inline int __float_as_int(float x) { return ::vf_emu::detail::bit_cast<int>(x); }
inline float __int_as_float(int x) { return ::vf_emu::detail::bit_cast<float>(x); }
inline unsigned __float_as_uint(float x) { return ::vf_emu::detail::bit_cast<unsigned>(x); }
inline float __uint_as_float(unsigned x) { return ::vf_emu::detail::bit_cast<float>(x); }
inline long long __double_as_longlong(double x) {
  return ::vf_emu::detail::bit_cast<long long>(x);
}
inline double __longlong_as_double(long long x) {
  return ::vf_emu::detail::bit_cast<double>(x);
}

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) {
  return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x));
}

template <class T>
inline T __ldg(const T *p) {
  return *p;
}

#endif  // VF_SIMT_EMU_H
