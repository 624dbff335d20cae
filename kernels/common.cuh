// common.cuh: self-contained helpers for the vidfuse kernels. NVRTC compiles these with no
// CUDA toolkit headers; the host emulation (tests) includes its own SIMT header first and
// defines VF_EMULATION. Kernels therefore use only built-in types and these helpers.
#ifndef VIDFUSE_COMMON_CUH
#define VIDFUSE_COMMON_CUH

// Shared memory: declare it inside a kernel or device function with VF_SHARED_ARRAY
// (static) or VF_DYNAMIC_SHARED (the launch's dynamic buffer), and touch it only through
// VF_SHARED:
//     VF_SHARED_ARRAY(float, sums, 32);
//     VF_SHARED(sums, warp) = v;
//     v = VF_SHARED(sums, lane);
// Here these are a plain __shared__ array and plain indexing (the CUBIN does not change).
// The host emulation turns every VF_SHARED into a checked access (races, unwritten bytes,
// bounds) and refuses a bare __shared__. VF_SHARED yields a reference: assign to it, use
// compound assignment, or convert it to the element type (not to `auto`, which in the
// emulation would defer the read). Accesses through its address (&VF_SHARED(a, i), e.g.
// for atomics) are neither checked nor recorded.
#ifndef VF_EMULATION
#define VF_REGISTER_KERNEL(name)
#define VF_SHARED_ARRAY(type, name, count) __shared__ type name[count]
#define VF_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
#define VF_SHARED(name, index) (name[index])
// A GPU faults on a misaligned vector access; the host emulation checks it here.
#define VF_CHECK_ALIGNED(address, bytes)
// A global write that another block of the same launch reads (VF_PUBLISH, after the write),
// and that read (VF_CONSUME): the host emulation faults the read unless the writing thread
// itself called __threadfence() after the write, as the PTX memory model requires.
#define VF_PUBLISH(address)
#define VF_CONSUME(address)
#endif

namespace vf {

// 16-bit float storage types (bit patterns), so that no cuda_fp16.h / cuda_bf16.h is needed.
struct f16_t {
    unsigned short bits;
};
struct bf16_t {
    unsigned short bits;
};

__device__ __forceinline__ float f16_to_float(unsigned short h) {
#ifndef VF_EMULATION
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
#else
    // Exact software conversion (normals, subnormals, inf, nan).
    unsigned int sign = (unsigned int)(h & 0x8000u) << 16;
    unsigned int exponent = (h >> 10) & 0x1fu;
    unsigned int mantissa = h & 0x3ffu;
    if (exponent == 0x1fu) {
        return __uint_as_float(sign | 0x7f800000u | (mantissa << 13));
    }
    if (exponent == 0) {
        // Subnormal (or zero): mantissa * 2^-24.
        float magnitude = (float)mantissa * 5.9604644775390625e-8f;
        return sign ? -magnitude : magnitude;
    }
    return __uint_as_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
#endif
}

__device__ __forceinline__ unsigned short float_to_f16(float f) {
#ifndef VF_EMULATION
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
#else
    // Round to nearest even, with overflow to inf, subnormals and nan.
    unsigned int x = __float_as_uint(f);
    unsigned int sign = (x >> 16) & 0x8000u;
    unsigned int abs = x & 0x7fffffffu;
    if (abs > 0x7f800000u) {
        return (unsigned short)(sign | 0x7e00u);
    }
    if (abs >= 0x477ff000u) { // rounds to >= 65520: inf
        return (unsigned short)(sign | 0x7c00u);
    }
    if (abs < 0x38800000u) { // below the smallest normal half: subnormal or zero
        // Scale so that the half subnormal unit (2^-24) becomes 1, then round to even.
        float scaled = __uint_as_float(abs) * 16777216.0f;
        unsigned int q = (unsigned int)scaled;
        float rest = scaled - (float)q;
        if (rest > 0.5f || (rest == 0.5f && (q & 1u))) {
            q += 1;
        }
        return (unsigned short)(sign | q);
    }
    unsigned int mantissa = abs & 0x7fffffu;
    unsigned int exponent = (abs >> 23) - 112u;
    unsigned int h = (exponent << 10) | (mantissa >> 13);
    unsigned int rest = mantissa & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) {
        h += 1; // may carry into the exponent, which is the correct rounding
    }
    return (unsigned short)(sign | h);
#endif
}

__device__ __forceinline__ float bf16_to_float(unsigned short b) {
    return __uint_as_float((unsigned int)b << 16);
}

__device__ __forceinline__ unsigned short float_to_bf16(float f) {
#if !defined(VF_EMULATION) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    // sm_80+ converts in hardware (round to nearest even, as below; NaN becomes the
    // canonical quiet NaN).
    unsigned short b;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(b) : "f"(f));
    return b;
#endif
    // Exact software rounding: older parts and the host emulation.
    unsigned int x = __float_as_uint(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) {
        return (unsigned short)((x >> 16) | 0x40u); // quiet nan
    }
    x += 0x7fffu + ((x >> 16) & 1u); // round to nearest even
    return (unsigned short)(x >> 16);
}

// Storage type -> accumulation type, with conversions both ways.
template <typename T> struct Traits;
template <> struct Traits<float> {
    typedef float Acc;
    static __device__ __forceinline__ float load(float v) { return v; }
    static __device__ __forceinline__ float store(float v) { return v; }
};
template <> struct Traits<double> {
    typedef double Acc;
    static __device__ __forceinline__ double load(double v) { return v; }
    static __device__ __forceinline__ double store(double v) { return v; }
};
template <> struct Traits<f16_t> {
    typedef float Acc;
    static __device__ __forceinline__ float load(f16_t v) { return f16_to_float(v.bits); }
    static __device__ __forceinline__ f16_t store(float v) {
        f16_t r;
        r.bits = float_to_f16(v);
        return r;
    }
};
template <> struct Traits<bf16_t> {
    typedef float Acc;
    static __device__ __forceinline__ float load(bf16_t v) { return bf16_to_float(v.bits); }
    static __device__ __forceinline__ bf16_t store(float v) {
        bf16_t r;
        r.bits = float_to_bf16(v);
        return r;
    }
};

// Elements per 16-byte vector.
template <typename T> struct VecWidth {
    static const int value = 16 / sizeof(T);
};

// V elements of T moved as one 16-byte access when `vectorized` (caller checked alignment).
template <typename T, int V> struct alignas(V * sizeof(T) == 16 ? 16 : alignof(T)) Pack {
    T v[V];
};

template <typename T, int V>
__device__ __forceinline__ Pack<T, V> load_pack(const T *__restrict__ p) {
    Pack<T, V> r;
    if (V * sizeof(T) == 16) {
        VF_CHECK_ALIGNED(p, 16);
        uint4 raw = *reinterpret_cast<const uint4 *>(p);
        r = *reinterpret_cast<const Pack<T, V> *>(&raw);
    } else {
#pragma unroll
        for (int i = 0; i < V; ++i) {
            r.v[i] = p[i];
        }
    }
    return r;
}

// A 16-byte pack is stored with one explicit vector store: through a reinterpreted pointer,
// NVVM split the unrolled loops' stores into 32/64-bit pieces (the test suite holds as many
// STG.128 per output as LDG.128 per input).
template <typename T, int V>
__device__ __forceinline__ void store_pack(T *__restrict__ p, const Pack<T, V> &x) {
    if constexpr (V * sizeof(T) == 16) {
        VF_CHECK_ALIGNED(p, 16);
        const uint4 w = *reinterpret_cast<const uint4 *>(&x);
#ifndef VF_EMULATION
        asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(w.x), "r"(w.y),
                     "r"(w.z), "r"(w.w)
                     : "memory");
#else
        *reinterpret_cast<uint4 *>(p) = w;
#endif
    } else {
#pragma unroll
        for (int i = 0; i < V; ++i) {
            p[i] = x.v[i];
        }
    }
}

// Numerically stable softplus and sigmoid (no overflow for |x| large).
__device__ __forceinline__ double softplus(double x) {
    return x > 0.0 ? x + log1p(exp(-x)) : log1p(exp(x));
}
__device__ __forceinline__ double sigmoid(double x) {
    if (x >= 0.0) {
        return 1.0 / (1.0 + exp(-x));
    }
    double e = exp(x);
    return e / (1.0 + e);
}

template <typename A> __device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        v += __shfl_down_sync(0xffffffffu, v, offset);
    }
    return v;
}

} // namespace vf

#endif // VIDFUSE_COMMON_CUH
