// vid.cu: the fused VID loss kernels.
//
// Per element, with var_c = softplus(log_scale_c) + eps and d = mean - target:
//     l = 0.5 * (d^2 / var_c + ln var_c)  [+ 0.5 ln(2 pi) when full]
//
// Every elementwise pass is one *traversal* of mean/target (and the upstream gradient for
// Reduction::None) with an *op* applied to each element; ops that reduce write per-warp or
// per-block partial sums, which `vid_channel_sum_*` combines per channel in a fixed order (no
// float atomics: results are bitwise deterministic). Two traversals:
//   warp: NCHW rows (n, c) of S elements cut into segments, one warp per segment; the channel
//         is constant per warp. For S large.
//   tile: a 2-D view [rows][cols] walked by blocks of (tile_x columns x 256/tile_x rows); each
//         thread keeps its columns, hence its channels. For channels-last ([N*S][C], channel
//         = column) and for NCHW with small S ([N][C*S], channel = column / S).
// Kernels are named vid_<op>_<traversal>_<dtype>; all take one argument struct by value.
// Traversal kernels declare __launch_bounds__(256, 2): with (256) alone, ptxas chose small
// register spills in a few of them on sm_80/sm_89; the test suite holds zero spills.
#include "common.cuh"

namespace vf {

// Arguments of every traversal kernel. All fields are 8 bytes wide, so the layout is the same
// as the #[repr(C)] Rust struct that fills it.
struct TraverseArgs {
    const void *mean;            // T*
    const void *target;          // T*
    const void *upstream;        // T*: per-element upstream gradient (op grad_none), else null
    const void *upstream_scalar; // Acc*: upstream gradient of Mean/Sum (op grad), else null
    const void *log_scale;       // Acc*, [C]
    void *out;                   // T*: per-element result (loss or grad of mean), or null
    void *out_negated;           // T*: negated per-element result (grad of target), or null
    void *partial;               // Acc*: partial sums, K per slot (ops that reduce)
    long long rows;              // warp: N*C; tile: rows of the 2-D view
    long long row_len;           // warp: S; tile: columns
    long long seg_len;           // warp: elements per segment; tile: rows per block
    long long channels;          // C
    long long channel_div;       // tile: channel = column / channel_div
    long long tile_x;            // tile: threads along the columns (in packs)
    long long vectorized;        // 1: 16-byte packs (alignment checked by the launcher)
    double eps;
    double scale;    // reduction factor k (1/n for Mean, 1 for Sum), op grad
    double constant; // per-element constant (0.5 ln(2 pi) or 0), op loss
};

// ---- ops: per-channel parameters and the per-element step ---------------------------------

struct ChannelBasics {
    double alpha, var;
};

template <typename A>
__device__ __forceinline__ ChannelBasics channel_basics(const TraverseArgs &a, long long c) {
    double alpha = (double)static_cast<const A *>(a.log_scale)[c];
    ChannelBasics b;
    b.alpha = alpha;
    b.var = softplus(alpha) + a.eps;
    return b;
}

// Q_c = sum d^2.
struct OpSumSq {
    static const int K = 1;
    static const bool kWrites = false;
    static const bool kReadsUpstream = false;
    template <typename A>
    static __device__ __forceinline__ void channel(const TraverseArgs &, long long, A &, A &) {}
    template <typename A>
    static __device__ __forceinline__ A element(A, A, A m, A t, A, A *acc) {
        A d = m - t;
        acc[0] += d * d;
        return A(0);
    }
};

// Per-element loss: 0.5/var * d^2 + (0.5 ln var + constant).
struct OpLoss {
    static const int K = 0;
    static const bool kWrites = true;
    static const bool kReadsUpstream = false;
    template <typename A>
    static __device__ __forceinline__ void channel(const TraverseArgs &a, long long c, A &p0, A &p1) {
        ChannelBasics b = channel_basics<A>(a, c);
        p0 = (A)(0.5 / b.var);
        p1 = (A)(0.5 * log(b.var) + a.constant);
    }
    template <typename A>
    static __device__ __forceinline__ A element(A p0, A p1, A m, A t, A, A *) {
        A d = m - t;
        return p0 * d * d + p1;
    }
};

// Gradient of mean for Mean/Sum: g * k / var * d.
struct OpGrad {
    static const int K = 0;
    static const bool kWrites = true;
    static const bool kReadsUpstream = false;
    template <typename A>
    static __device__ __forceinline__ void channel(const TraverseArgs &a, long long c, A &p0, A &) {
        ChannelBasics b = channel_basics<A>(a, c);
        double g = (double)*static_cast<const A *>(a.upstream_scalar);
        p0 = (A)(g * a.scale / b.var);
    }
    template <typename A>
    static __device__ __forceinline__ A element(A p0, A, A m, A t, A, A *) {
        return p0 * (m - t);
    }
};

// Gradient of mean for None: G * d / var, with R1 = sum G and R2 = sum G d^2 per channel.
struct OpGradNone {
    static const int K = 2;
    static const bool kWrites = true;
    static const bool kReadsUpstream = true;
    template <typename A>
    static __device__ __forceinline__ void channel(const TraverseArgs &a, long long c, A &p0, A &) {
        p0 = (A)(1.0 / channel_basics<A>(a, c).var);
    }
    template <typename A>
    static __device__ __forceinline__ A element(A p0, A, A m, A t, A g, A *acc) {
        A d = m - t;
        acc[0] += g;
        acc[1] += g * d * d;
        return g * d * p0;
    }
};

// ---- per-thread state: V elements per pack, each with its channel's parameters -------------

template <typename T, class Op, int V> struct Lane {
    typedef typename Traits<T>::Acc A;
    static const int KK = Op::K > 0 ? Op::K : 1;
    A p0[V], p1[V];
    A acc[V][KK];

    __device__ __forceinline__ void zero() {
#pragma unroll
        for (int v = 0; v < V; ++v) {
            p0[v] = A(0);
            p1[v] = A(0);
#pragma unroll
            for (int k = 0; k < KK; ++k) {
                acc[v][k] = A(0);
            }
        }
    }

    // Processes U packs starting at the given element offsets: all loads first, so that U
    // independent 16-byte requests per tensor are in flight.
    template <int U>
    __device__ __forceinline__ void visit(const TraverseArgs &a, const long long (&at)[U]) {
        const T *mean = static_cast<const T *>(a.mean);
        const T *target = static_cast<const T *>(a.target);
        Pack<T, V> m[U], t[U], g[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            m[u] = load_pack<T, V>(mean + at[u]);
            t[u] = load_pack<T, V>(target + at[u]);
            if (Op::kReadsUpstream) {
                g[u] = load_pack<T, V>(static_cast<const T *>(a.upstream) + at[u]);
            }
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            Pack<T, V> out, negated;
#pragma unroll
            for (int v = 0; v < V; ++v) {
                A gv = Op::kReadsUpstream ? Traits<T>::load(g[u].v[v]) : A(0);
                A r = Op::template element<A>(p0[v], p1[v], Traits<T>::load(m[u].v[v]),
                                              Traits<T>::load(t[u].v[v]), gv, acc[v]);
                out.v[v] = Traits<T>::store(r);
                negated.v[v] = Traits<T>::store(-r);
            }
            if (Op::kWrites) {
                if (a.out != nullptr) {
                    store_pack<T, V>(static_cast<T *>(a.out) + at[u], out);
                }
                if (a.out_negated != nullptr) {
                    store_pack<T, V>(static_cast<T *>(a.out_negated) + at[u], negated);
                }
            }
        }
    }

    // Walks elements first, first + step, ... below end (all multiples of V apart).
    __device__ __forceinline__ void walk(const TraverseArgs &a, long long first, long long step,
                                         long long end) {
        const int U = 4;
        long long at = first;
        for (; at + (U - 1) * step < end; at += U * step) {
            long long offsets[U];
#pragma unroll
            for (int u = 0; u < U; ++u) {
                offsets[u] = at + u * step;
            }
            visit<U>(a, offsets);
        }
        for (; at < end; at += step) {
            long long offsets[1] = {at};
            visit<1>(a, offsets);
        }
    }
};

// ---- warp traversal -------------------------------------------------------------------------

template <typename T, class Op, int V> __device__ void warp_traverse(const TraverseArgs &a) {
    typedef typename Traits<T>::Acc A;
    const int lane = threadIdx.x & 31;
    const long long segments = (a.row_len + a.seg_len - 1) / a.seg_len;
    const long long item = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (item >= a.rows * segments) {
        return; // whole warps only: no block-level barrier follows
    }
    const long long row = item / segments;
    const long long seg = item - row * segments;
    const long long begin = row * a.row_len + seg * a.seg_len;
    const long long len = min(a.seg_len, a.row_len - seg * a.seg_len);

    Lane<T, Op, V> state;
    state.zero();
    A p0 = A(0), p1 = A(0);
    Op::template channel<A>(a, row % a.channels, p0, p1);
#pragma unroll
    for (int v = 0; v < V; ++v) {
        state.p0[v] = p0;
        state.p1[v] = p1;
    }
    state.walk(a, begin + lane * V, 32 * V, begin + len);

    if constexpr (Op::K > 0) {
        A *partial = static_cast<A *>(a.partial);
#pragma unroll
        for (int k = 0; k < Lane<T, Op, V>::KK; ++k) {
            A s = A(0);
#pragma unroll
            for (int v = 0; v < V; ++v) {
                s += state.acc[v][k];
            }
            s = warp_sum(s);
            if (lane == 0) {
                partial[item * Op::K + k] = s;
            }
        }
    }
}

// ---- tile traversal -------------------------------------------------------------------------

const int kBlock = 256;

template <typename T, class Op, int V> __device__ void tile_traverse(const TraverseArgs &a) {
    typedef typename Traits<T>::Acc A;
    typedef Lane<T, Op, V> L;
    const int tile_x = (int)a.tile_x;
    const int tile_y = kBlock / tile_x;
    const int tid = threadIdx.x;
    const bool active = tid < tile_x * tile_y;
    const int tx = tid % tile_x;
    const int ty = tid / tile_x;
    const long long cols = a.row_len;
    const long long pack_col = (long long)blockIdx.y * tile_x + tx;
    const bool has_col = active && pack_col * V < cols;
    const long long r0 = (long long)blockIdx.x * a.seg_len;
    const long long r1 = min(r0 + a.seg_len, a.rows);

    L state;
    state.zero();
    if (has_col) {
        // Columns and channel_div fit in 32 bits (the launcher checks): a 32-bit division is a
        // few instructions, a 64-bit one a subroutine call.
#pragma unroll
        for (int v = 0; v < V; ++v) {
            const unsigned col = (unsigned)(pack_col * V + v);
            Op::template channel<A>(a, col / (unsigned)a.channel_div, state.p0[v], state.p1[v]);
        }
        state.walk(a, (r0 + ty) * cols + pack_col * V, tile_y * cols, r1 * cols);
    }

    if constexpr (Op::K > 0) {
        // Sum the tile_y rows of partials of each column in a fixed tree order.
        const int width = V * L::KK;
        VF_SHARED_ARRAY(A, shared, kBlock * V * L::KK);
        if (active) {
#pragma unroll
            for (int v = 0; v < V; ++v) {
#pragma unroll
                for (int k = 0; k < L::KK; ++k) {
                    VF_SHARED(shared, tid * width + v * L::KK + k) = state.acc[v][k];
                }
            }
        }
        __syncthreads();
        int half = 1;
        while (half * 2 < tile_y) {
            half *= 2;
        }
        for (; half > 0; half >>= 1) {
            if (active && ty < half && ty + half < tile_y) {
                for (int i = 0; i < width; ++i) {
                    VF_SHARED(shared, tid * width + i) +=
                        VF_SHARED(shared, (tid + half * tile_x) * width + i);
                }
            }
            __syncthreads();
        }
        if (has_col && ty == 0) {
            A *partial = static_cast<A *>(a.partial);
#pragma unroll
            for (int v = 0; v < V; ++v) {
                const long long col = pack_col * V + v;
                for (int k = 0; k < Op::K; ++k) {
                    partial[((long long)blockIdx.x * cols + col) * Op::K + k] =
                        VF_SHARED(shared, tid * width + v * L::KK + k);
                }
            }
        }
    }
}

// ---- block reduction helper -----------------------------------------------------------------

// Sum over the block in a fixed order; the result is valid in thread 0.
template <typename A> __device__ A block_sum(A v) {
    VF_SHARED_ARRAY(A, warp_sums, 32);
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int warps = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads(); // warp_sums may still be read by a previous call
    if (lane == 0) {
        VF_SHARED(warp_sums, warp) = v;
    }
    __syncthreads();
    if (warp == 0) {
        v = lane < warps ? VF_SHARED(warp_sums, lane) : A(0);
        v = warp_sum(v);
    }
    return v;
}

// ---- stage 2: per-channel sums of the partials ----------------------------------------------

struct ChannelSumArgs {
    const void *partial; // Acc: partial[((o * C + c) * inner + j) * sums + k]
    void *out;           // Acc: out[c * sums + k]
    long long channels;
    long long outer;
    long long inner;
    long long sums;
};

template <typename A> __device__ void channel_sum(const ChannelSumArgs &a) {
    const A *partial = static_cast<const A *>(a.partial);
    const long long items = a.outer * a.inner;
    // The loop bound is uniform across the block, so the barriers in block_sum are safe.
    for (long long c = blockIdx.x; c < a.channels; c += gridDim.x) {
        for (long long k = 0; k < a.sums; ++k) {
            A s = A(0);
            for (long long i = threadIdx.x; i < items; i += blockDim.x) {
                const long long o = i / a.inner;
                const long long j = i - o * a.inner;
                s += partial[((o * a.channels + c) * a.inner + j) * a.sums + k];
            }
            s = block_sum(s);
            if (threadIdx.x == 0) {
                static_cast<A *>(a.out)[c * a.sums + k] = s;
            }
        }
    }
}

// ---- epilogues: O(C) -----------------------------------------------------------------------

struct LossEpilogueArgs {
    const void *channel_sumsq; // Acc [C]
    const void *log_scale;     // Acc [C]
    void *out;                 // T, one element
    long long channels;
    double eps;
    double per_channel;    // M = N * prod(S)
    double constant_total; // n * 0.5 ln(2 pi), or 0
    double scale;          // 1/n for Mean, 1 for Sum
};

// One block: loss = scale * (sum_c 0.5 (Q_c / var_c + M ln var_c) + constant_total), in f64.
template <typename T> __device__ void loss_epilogue(const LossEpilogueArgs &a) {
    typedef typename Traits<T>::Acc A;
    const A *q = static_cast<const A *>(a.channel_sumsq);
    const A *alpha = static_cast<const A *>(a.log_scale);
    double s = 0.0;
    for (long long c = threadIdx.x; c < a.channels; c += blockDim.x) {
        const double var = softplus((double)alpha[c]) + a.eps;
        s += 0.5 * ((double)q[c] / var + a.per_channel * log(var));
    }
    s = block_sum(s);
    if (threadIdx.x == 0) {
        *static_cast<T *>(a.out) = Traits<T>::store((typename Traits<T>::Acc)((s + a.constant_total) * a.scale));
    }
}

struct LogScaleGradArgs {
    const void *sums;            // Acc: Q_c, or (R1_c, R2_c) interleaved
    const void *log_scale;       // Acc [C]
    const void *upstream_scalar; // Acc*: upstream gradient (with Q_c), else unused
    void *out;                   // Acc [C]
    long long channels;
    long long sums_per_channel; // 1 or 2
    double eps;
    double per_channel; // M
    double scale;       // k
};

// d loss / d alpha_c = 0.5 (A_c / var - B_c / var^2) sigmoid(alpha_c), with
// (A, B) = g k (M, Q_c) for Mean/Sum and (R1_c, R2_c) for None; computed as
// (A - B / var) / var, since var^2 underflows to 0 for var near the smallest normal.
template <typename A> __device__ void log_scale_grad(const LogScaleGradArgs &a) {
    const A *sums = static_cast<const A *>(a.sums);
    for (long long c = (long long)blockIdx.x * blockDim.x + threadIdx.x; c < a.channels;
         c += (long long)gridDim.x * blockDim.x) {
        const double alpha = (double)static_cast<const A *>(a.log_scale)[c];
        const double var = softplus(alpha) + a.eps;
        double first, second;
        if (a.sums_per_channel == 1) {
            const double gk = (double)*static_cast<const A *>(a.upstream_scalar) * a.scale;
            first = gk * a.per_channel;
            second = gk * (double)sums[c];
        } else {
            first = (double)sums[2 * c];
            second = (double)sums[2 * c + 1];
        }
        static_cast<A *>(a.out)[c] = (A)(0.5 * ((first - second / var) / var) * sigmoid(alpha));
    }
}

} // namespace vf

// ---- kernel entry points --------------------------------------------------------------------

#define VF_TRAVERSE_KERNEL(op, Op, traversal, T, suffix)                                           \
    extern "C" __global__ void __launch_bounds__(256, 2) vid_##op##_##traversal##_##suffix(vf::TraverseArgs a) { \
        if (a.vectorized) {                                                                        \
            vf::traversal##_traverse<T, Op, vf::VecWidth<T>::value>(a);                            \
        } else {                                                                                   \
            vf::traversal##_traverse<T, Op, 1>(a);                                                 \
        }                                                                                          \
    }                                                                                              \
    VF_REGISTER_KERNEL(vid_##op##_##traversal##_##suffix)

#define VF_OPS(traversal, T, suffix)                                                               \
    VF_TRAVERSE_KERNEL(sumsq, vf::OpSumSq, traversal, T, suffix)                                   \
    VF_TRAVERSE_KERNEL(loss, vf::OpLoss, traversal, T, suffix)                                     \
    VF_TRAVERSE_KERNEL(grad, vf::OpGrad, traversal, T, suffix)                                     \
    VF_TRAVERSE_KERNEL(grad_none, vf::OpGradNone, traversal, T, suffix)

#define VF_DTYPE_KERNELS(T, suffix)                                                                \
    VF_OPS(warp, T, suffix)                                                                        \
    VF_OPS(tile, T, suffix)                                                                        \
    extern "C" __global__ void __launch_bounds__(256) vid_loss_epilogue_##suffix(vf::LossEpilogueArgs a) { \
        vf::loss_epilogue<T>(a);                                                                   \
    }                                                                                              \
    VF_REGISTER_KERNEL(vid_loss_epilogue_##suffix)

#define VF_ACC_KERNELS(A, suffix)                                                                  \
    extern "C" __global__ void __launch_bounds__(256) vid_channel_sum_##suffix(vf::ChannelSumArgs a) { \
        vf::channel_sum<A>(a);                                                                     \
    }                                                                                              \
    VF_REGISTER_KERNEL(vid_channel_sum_##suffix)                                                   \
    extern "C" __global__ void __launch_bounds__(256) vid_log_scale_grad_##suffix(vf::LogScaleGradArgs a) { \
        vf::log_scale_grad<A>(a);                                                                  \
    }                                                                                              \
    VF_REGISTER_KERNEL(vid_log_scale_grad_##suffix)

VF_DTYPE_KERNELS(float, f32)
VF_DTYPE_KERNELS(double, f64)
VF_DTYPE_KERNELS(vf::f16_t, f16)
VF_DTYPE_KERNELS(vf::bf16_t, bf16)
VF_ACC_KERNELS(float, f32)
VF_ACC_KERNELS(double, f64)
