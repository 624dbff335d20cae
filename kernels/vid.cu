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
// Kernels are named vid_<op>_group_<dtype> (each launch takes a table of problems, and every
// block picks the traversal of its problem); all take one argument struct by value, declared
// `const __grid_constant__`: device functions take it by reference, and without the qualifier
// taking its address makes NVVM copy the whole struct (2 KB) to a local-memory stack frame
// per thread (the test suite holds STACK 0 and LOCAL 0 for every kernel).
// A traversal launch loops over fixed chunks ("virtual blocks"): the grid is sized to the
// GPU (2-4 waves) and each block takes virtual blocks b, b + gridDim.x, ...; what a virtual
// block computes and writes depends on its index alone, so no result bit depends on the grid.
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
    const void *upstream_scalar; // Acc*: op grad when `out` already holds the forward's
                                 // gradients for an upstream of 1 (the one-pass path): the
                                 // segment is skipped when the upstream gradient is 1;
                                 // else null
    const void *table;           // Acc [2C]: the op's per-channel factors (p0, p1), computed
                                 // once per call by an O(C) kernel: no FP64 while streaming
    void *out;                   // T*: per-element result (loss or grad of mean), or null
    void *out_negated;           // T*: negated per-element result (grad of target), or null
    void *partial;               // Acc*: partial sums, K per slot (ops that reduce)
    long long rows;              // warp: N*C; tile: super-rows (below)
    long long row_len;           // warp: S; tile: columns of a super-row, a multiple of the pack
    long long seg_len;           // warp: elements per segment; tile: super-rows per block
    long long channels;          // C
    long long channel_div;       // tile: channel = column / channel_div
    long long tile_x;            // tile: threads along the columns (in packs)
    long long vectorized;        // 1: 16-byte packs
    long long phase;             // elements from the 16-byte boundary below every tensor's base
                                 // (the launcher checked they agree) to the base; 0 unless
                                 // vectorized
    long long elements;          // tile: elements of the [rows][cols] view
    long long cols;              // tile: columns of the view
};

// ---- ops: per-channel parameters and the per-element step ---------------------------------
//
// An op's per-channel factors come from the call's channel table (vid_channel_table_group, or
// the log_scale gradient kernel for `grad`), in the accumulation type: the streaming kernels
// never evaluate softplus, log or a division in double.

// The ops that read their factors from the channel table.
struct TableOp {
    template <typename A>
    static __device__ __forceinline__ void channel(const TraverseArgs &a, long long c, A &p0, A &p1) {
        const A *table = static_cast<const A *>(a.table);
        p0 = table[2 * c];
        p1 = table[2 * c + 1];
    }
};

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

// Per-element loss: p0 d^2 + p1, with p0 = 0.5/var, p1 = 0.5 ln var + constant.
struct OpLoss : TableOp {
    static const int K = 0;
    static const bool kWrites = true;
    static const bool kReadsUpstream = false;
    template <typename A>
    static __device__ __forceinline__ A element(A p0, A p1, A m, A t, A, A *) {
        A d = m - t;
        return p0 * d * d + p1;
    }
};

// Gradient of mean for Mean/Sum: p0 d, with p0 = g w k / var.
struct OpGrad : TableOp {
    static const int K = 0;
    static const bool kWrites = true;
    static const bool kReadsUpstream = false;
    template <typename A>
    static __device__ __forceinline__ A element(A p0, A, A m, A t, A, A *) {
        return p0 * (m - t);
    }
};

// The one-pass forward: Q_c = sum d^2, and the gradient of mean for an upstream gradient of
// 1, p0 d with p0 = w k / var: the same factor and product as OpGrad, so the same bits.
struct OpSumSqGrad : TableOp {
    static const int K = 1;
    static const bool kWrites = true;
    static const bool kReadsUpstream = false;
    template <typename A>
    static __device__ __forceinline__ A element(A p0, A, A m, A t, A, A *acc) {
        A d = m - t;
        acc[0] += d * d;
        return p0 * d;
    }
};

// Gradient of mean for None: G d p0 (p0 = 1 / var), with R1 = sum G, R2 = sum G d^2 per channel.
struct OpGradNone : TableOp {
    static const int K = 2;
    static const bool kWrites = true;
    static const bool kReadsUpstream = true;
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

    // The pack at element offset `at` of which only offsets in [0, end) exist (the view's
    // first and last packs): element by element, each with its own parameters and sums.
    __device__ __forceinline__ void visit_partial(const TraverseArgs &a, long long at,
                                                  long long end) {
#pragma unroll
        for (int v = 0; v < V; ++v) {
            if (at + v < 0 || at + v >= end) {
                continue;
            }
            Lane<T, Op, 1> one;
            one.p0[0] = p0[v];
            one.p1[0] = p1[v];
#pragma unroll
            for (int k = 0; k < KK; ++k) {
                one.acc[0][k] = acc[v][k];
            }
            const long long offsets[1] = {at + v};
            one.template visit<1>(a, offsets);
#pragma unroll
            for (int k = 0; k < KK; ++k) {
                acc[v][k] = one.acc[0][k];
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

// `block`: the virtual block's index within the problem's own grid (a grouped launch runs
// several problems' grids back to back).
template <typename T, class Op, int V>
__device__ void warp_traverse(const TraverseArgs &a, long long block) {
    typedef typename Traits<T>::Acc A;
    const int lane = threadIdx.x & 31;
    const long long segments = (a.row_len + a.seg_len - 1) / a.seg_len;
    const long long item = block * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (item >= a.rows * segments) {
        return; // whole warps only: this traversal has no block-level barrier
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
    long long bulk_begin = begin, bulk_end = begin + len;
    if constexpr (V > 1) {
        // A row may start or end between 16-byte boundaries (S not a multiple of the pack, or
        // a base `phase` elements past a boundary): the at most V - 1 elements before the
        // first boundary and after the last are walked one by one, the bulk in packs.
        const long long ph = a.phase;
        bulk_begin = min(begin + len, (begin + ph + V - 1) / V * V - ph);
        bulk_end = max(bulk_begin, (begin + len + ph) / V * V - ph);
        Lane<T, Op, 1> edge;
        edge.zero();
        edge.p0[0] = p0;
        edge.p1[0] = p1;
        edge.walk(a, begin + lane, 32, bulk_begin);
        edge.walk(a, bulk_end + lane, 32, begin + len);
#pragma unroll
        for (int k = 0; k < Lane<T, Op, V>::KK; ++k) {
            state.acc[0][k] += edge.acc[0][k];
        }
    }
    state.walk(a, bulk_begin + lane * V, 32 * V, bulk_end);

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

// (`block_x`, `block_y`): the virtual block's chunk of super-rows and column tile within the
// problem's grid. The view [rows][cols] is walked as super-rows of row_len = k * cols
// columns (the launcher picks k so that row_len is a multiple of V), so every thread keeps
// its V columns, hence its channels, in every super-row. Element i sits at u = i + phase:
// super-row u / row_len, column u % row_len, and every pack is 16-byte aligned. Only the
// packs at the view's two ends stick out of it; those are walked element by element.
template <typename T, class Op, int V>
__device__ void tile_traverse(const TraverseArgs &a, long long block_x, long long block_y) {
    typedef typename Traits<T>::Acc A;
    typedef Lane<T, Op, V> L;
    const int tile_x = (int)a.tile_x;
    const int tile_y = kBlock / tile_x;
    const int tid = threadIdx.x;
    const bool active = tid < tile_x * tile_y;
    const int tx = tid % tile_x;
    const int ty = tid / tile_x;
    const long long width = a.row_len;
    const long long j0 = (block_y * tile_x + tx) * V; // this thread's first column
    const bool has_col = active && j0 < width;
    const long long r0 = block_x * a.seg_len;
    const long long r1 = min(r0 + a.seg_len, a.rows);
    // Columns fit in 31 bits (the launcher checks): 32-bit divisions are a few instructions,
    // 64-bit ones a subroutine call. Column j of a super-row is column
    // (j - phase) mod cols of the view.
    const unsigned skew = (unsigned)(width - a.phase), cols = (unsigned)a.cols;

    L state;
    state.zero();
    if (has_col) {
#pragma unroll
        for (int v = 0; v < V; ++v) {
            const unsigned col = ((unsigned)j0 + v + skew) % cols;
            Op::template channel<A>(a, col / (unsigned)a.channel_div, state.p0[v], state.p1[v]);
        }
        // Super-row r's pack starts at element r * width + base; it lies wholly inside the
        // view for r in [full_begin, full_end).
        const long long base = j0 - a.phase;
        const long long full_begin = base < 0 ? 1 : 0;
        const long long last = a.elements - V - base;
        const long long full_end = last < 0 ? 0 : last / width + 1;
        long long r = r0 + ty;
        if (r < min(r1, full_begin)) {
            state.visit_partial(a, r * width + base, a.elements);
            r += tile_y;
        }
        const long long bulk_end = max(r, min(r1, full_end));
        state.walk(a, r * width + base, tile_y * width, bulk_end * width + base);
        r += (bulk_end - r + tile_y - 1) / tile_y * tile_y;
        if (r < r1 && r * width + base < a.elements) {
            state.visit_partial(a, r * width + base, a.elements);
        }
    }

    if constexpr (Op::K > 0) {
        // Sum the tile_y rows of partials of each column in a fixed tree order. A thread
        // writes only its own slots (by tid and V; another V is another array), and after
        // the last barrier only their owner reads them: the next virtual block may write
        // them with no barrier in between.
        const int pack_sums = V * L::KK;
        VF_SHARED_ARRAY(A, shared, kBlock * V * L::KK);
        if (active) {
#pragma unroll
            for (int v = 0; v < V; ++v) {
#pragma unroll
                for (int k = 0; k < L::KK; ++k) {
                    VF_SHARED(shared, tid * pack_sums + v * L::KK + k) = state.acc[v][k];
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
                for (int i = 0; i < pack_sums; ++i) {
                    VF_SHARED(shared, tid * pack_sums + i) +=
                        VF_SHARED(shared, (tid + half * tile_x) * pack_sums + i);
                }
            }
            __syncthreads();
        }
        if (has_col && ty == 0) {
            // A chunk's partials by channel c, then which of the k copies of the view's
            // column in a super-row, then column m within the channel: the combine reads a
            // channel's k * channel_div partials of each chunk side by side.
            A *partial = static_cast<A *>(a.partial) + block_x * width * Op::K;
            const unsigned div = (unsigned)a.channel_div, k = (unsigned)width / cols;
#pragma unroll
            for (int v = 0; v < V; ++v) {
                const unsigned j = ((unsigned)j0 + v + skew) % (unsigned)width;
                const unsigned col = j % cols, c = col / div;
                const unsigned slot = (c * k + j / cols) * div + (col - c * div);
                for (int q = 0; q < Op::K; ++q) {
                    partial[slot * Op::K + q] = VF_SHARED(shared, tid * pack_sums + v * L::KK + q);
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

// ---- grouped launches ------------------------------------------------------------------
//
// One launch covers several problems (the terms of a grouped loss, or a single problem):
// each problem is a *segment* with its own arguments and a range of the grid's blocks
// [block_begin, next segment's block_begin). The segment table is passed by value as the
// kernel parameter (constant memory): nothing is copied to the device, so a launch can be
// captured in a CUDA graph. A block finds its segment by a short scan.

const int kMaxSegments = 16;

// Storage dtype codes of scalars written by the epilogue.
enum ScalarCode { kF32 = 0, kF64 = 1, kF16 = 2, kBF16 = 3 };

struct TraverseSegment {
    TraverseArgs args;
    long long tile;        // 0: warp traversal, 1: tile traversal
    long long block_begin; // first block of this segment
    long long grid_x;      // tile: row chunks (the x extent of the segment's own grid)
};

struct TraverseGroupArgs {
    long long count;
    unsigned int *done;    // zeroed here (block 0) for the next launch's last-block epilogue
    long long blocks;      // virtual blocks of all segments
    TraverseSegment seg[kMaxSegments];
};

// The segment of (virtual) block `block`.
template <typename S>
__device__ __forceinline__ int find_segment(const S *seg, long long count, long long block) {
    int s = 0;
    while (s + 1 < count && block >= seg[s + 1].block_begin) {
        ++s;
    }
    return s;
}

// This block's place in a grouped launch of O(C) kernels: its segment, its index among the
// segment's blocks, and how many blocks the segment has (the last one runs to gridDim.x).
template <typename S> struct SegmentBlock {
    const S &seg;
    long long block;
    long long blocks;
};

template <typename S>
__device__ __forceinline__ SegmentBlock<S> segment_block(const S *seg, long long count) {
    const int s = find_segment(seg, count, (long long)blockIdx.x);
    const long long next = s + 1 < count ? seg[s + 1].block_begin : (long long)gridDim.x;
    return SegmentBlock<S>{seg[s], (long long)blockIdx.x - seg[s].block_begin,
                           next - seg[s].block_begin};
}

template <typename T, class Op> __device__ void group_traverse(const TraverseGroupArgs &g) {
    if (g.done != nullptr && blockIdx.x == 0 && threadIdx.x == 0) {
        *g.done = 0u;
    }
    typedef typename Traits<T>::Acc A;
    const int V = VecWidth<T>::value;
    // Uniform across the block, so the tile traversal's barriers are safe.
    for (long long b = blockIdx.x; b < g.blocks; b += gridDim.x) {
        const TraverseSegment &seg = g.seg[find_segment(g.seg, g.count, b)];
        if (seg.args.upstream_scalar != nullptr &&
            *static_cast<const A *>(seg.args.upstream_scalar) == A(1)) {
            continue; // the forward wrote exactly these values (the one-pass path)
        }
        const long long block = b - seg.block_begin;
        if (seg.tile) {
            const long long bx = block % seg.grid_x, by = block / seg.grid_x;
            if (seg.args.vectorized) {
                tile_traverse<T, Op, V>(seg.args, bx, by);
            } else {
                tile_traverse<T, Op, 1>(seg.args, bx, by);
            }
        } else if (seg.args.vectorized) {
            warp_traverse<T, Op, V>(seg.args, block);
        } else {
            warp_traverse<T, Op, 1>(seg.args, block);
        }
    }
}

// ---- per-channel sums of the partials, and the loss epilogue --------------------------------

struct SumSegment {
    const void *partial; // Acc: partial[((o * C + c) * inner + j) * sums + k]
    void *out;           // Acc: out[c * sums + k]
    long long acc_f64;   // the accumulation type: 1 f64, 0 f32
    long long channels;
    long long outer;
    long long inner;
    long long sums;
    long long block_begin;
    // When the partials have many chunks, the combine takes two launches: the first splits the
    // chunks into `groups` runs of `group_chunks` (one block per run and channel unit, in
    // parallel) and writes each run's sums to out[(g * C + c) * sums + k]; the second sums
    // those runs (outer = groups). 1: one launch.
    long long groups;
    long long group_chunks;
    // Loss epilogue (forward): loss = scale * (sum_c 0.5 (Q_c / var_c + M ln var_c) + constant_total)
    const void *log_scale; // Acc [C]
    void *terms;           // double [C]: channel c's term 0.5 (Q_c / var_c + M ln var_c), or null
    void *loss;            // the term's loss (loss_code), or null
    long long loss_code;
    double eps;
    double per_channel;    // M
    double constant_total; // n * 0.5 ln(2 pi), or 0
    double scale;          // 1/n for Mean, 1 for Sum
    double weight;         // w_k in the total
};

// Every field 8 bytes: the layout of the Rust mirror (src/cuda/plan/abi.rs checks the same sizes).
static_assert(sizeof(SumSegment) == 19 * 8, "SumSegment: 19 fields of 8 bytes");

struct ChannelSumGroupArgs {
    long long count;
    long long epilogue;  // 1: the last block to finish computes the losses and the total
    unsigned int *done;  // blocks finished (zeroed by the traversal launch)
    void *total;         // sum_k w_k loss_k (total_code), or null
    long long total_code;
    SumSegment seg[kMaxSegments];
};

// v rounded to a storage dtype and back: what a scalar of that dtype holds. As the host does,
// a double is first rounded to f32 for the 16-bit types.
__device__ __forceinline__ double round_to(long long code, double v) {
    switch (code) {
    case kF64:
        return v;
    case kF16:
        return (double)Traits<f16_t>::load(Traits<f16_t>::store((float)v));
    case kBF16:
        return (double)Traits<bf16_t>::load(Traits<bf16_t>::store((float)v));
    default:
        return (double)(float)v;
    }
}

__device__ __forceinline__ void store_scalar(long long code, void *p, double v) {
    switch (code) {
    case kF64:
        *static_cast<double *>(p) = v;
        break;
    case kF16:
        *static_cast<f16_t *>(p) = Traits<f16_t>::store((float)v);
        break;
    case kBF16:
        *static_cast<bf16_t *>(p) = Traits<bf16_t>::store((float)v);
        break;
    default:
        *static_cast<float *>(p) = (float)v;
    }
}

// Element i of an accumulation-type array, read through the L2 (another block wrote it in
// this launch: the L1 is not coherent).
__device__ __forceinline__ double load_acc(const void *p, long long i, bool f64) {
    VF_CONSUME(f64 ? (const void *)(static_cast<const double *>(p) + i)
                   : (const void *)(static_cast<const float *>(p) + i));
    if (f64) {
        return static_cast<const volatile double *>(p)[i];
    }
    return (double)static_cast<const volatile float *>(p)[i];
}

// The chunks [begin, end) a block sums: all of them, or run `group` of a split combine.
struct ChunkRun {
    long long group;
    long long begin;
    long long end;
};

// A channel's loss term, 0.5 (Q / var + M ln var) with var = softplus(log_scale) + eps, in
// double: the FP64 work of the loss, spread over the combine's blocks (the epilogue only adds
// the terms). Not inlined: one copy for the four call sites (two accumulation types, two
// walks).
__device__ __noinline__ double loss_term(double log_scale, double eps, double per_channel, double q) {
    const double var = softplus(log_scale) + eps;
    return 0.5 * (q / var + per_channel * log(var));
}

// Stores the sum of run `run` for (channel c, sum k); after the last run, also channel c's
// loss term when the segment has an epilogue. Both are read by other blocks of the launch.
template <typename A>
__device__ __forceinline__ void write_channel_sum(const SumSegment &a, const ChunkRun &run, long long c,
                                                  long long k, A sum) {
    A *out = static_cast<A *>(a.out) + (run.group * a.channels + c) * a.sums + k;
    *out = sum;
    VF_PUBLISH(out);
    if (a.terms != nullptr && k == 0) {
        double *term = static_cast<double *>(a.terms) + c;
        *term = loss_term(load_acc(a.log_scale, c, a.acc_f64), a.eps, a.per_channel, (double)sum);
        VF_PUBLISH(term);
    }
}

// Channels summed by one block when each (chunk, channel) has one partial (inner == 1):
// lane l of every warp reads channel c0 + l, so a warp's loads are consecutive addresses.
const int kChannelsPerBlock = 32;

// Partials of channels [c0, c0 + 32) when inner == 1: warp w sums chunks w, w + 8, ... (four
// loads in flight per lane), then warp 0 adds the 8 warps' sums in a fixed order.
template <typename A>
__device__ void channel_sums_across(const SumSegment &a, const ChunkRun &run, long long c0, long long k) {
    VF_SHARED_ARRAY(A, warp_sums, kBlock);
    const A *partial = static_cast<const A *>(a.partial);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const long long c = c0 + lane;
    A s = A(0);
    if (c < a.channels) {
        const long long stride = a.channels * a.sums; // between chunks
        const A *p = partial + c * a.sums + k;
        long long o = run.begin + warp;
        for (; o + 3 * warps < run.end; o += 4 * warps) {
            const A v0 = p[o * stride], v1 = p[(o + warps) * stride];
            const A v2 = p[(o + 2 * warps) * stride], v3 = p[(o + 3 * warps) * stride];
            s += ((v0 + v1) + (v2 + v3));
        }
        for (; o < run.end; o += warps) {
            s += p[o * stride];
        }
    }
    __syncthreads(); // warp_sums may still be read for the previous channels
    VF_SHARED(warp_sums, threadIdx.x) = s;
    __syncthreads();
    if (warp == 0 && c < a.channels) {
        A total = A(0);
        for (int w = 0; w < warps; ++w) {
            total += VF_SHARED(warp_sums, w * 32 + lane);
        }
        write_channel_sum(a, run, c, k, total);
    }
}

// Partials of channel c when inner > 1: warp w takes chunks w, w + 8, ...; its lanes read
// the chunk's `inner` consecutive partials of the channel; then a fixed-order block sum.
template <typename A>
__device__ void channel_sums_within(const SumSegment &a, const ChunkRun &run, long long c, long long k) {
    const A *partial = static_cast<const A *>(a.partial);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    A s = A(0);
    for (long long o = run.begin + warp; o < run.end; o += warps) {
        const A *row = partial + ((o * a.channels + c) * a.inner) * a.sums + k;
        for (long long j = lane; j < a.inner; j += 32) {
            s += row[j * a.sums];
        }
    }
    s = block_sum(s);
    if (threadIdx.x == 0) {
        write_channel_sum(a, run, c, k, s);
    }
}

// Per-channel sums of one segment's partials (partial[((o * C + c) * inner + j) * sums + k]),
// with coalesced reads and no division in the loops. Loop bounds are uniform across the
// block, so the barriers inside are safe.
template <typename A> __device__ void channel_sums(const SumSegment &a, long long block, long long blocks) {
    // The segment's blocks are `groups` equal sets, one per run of chunks (the host makes
    // `blocks` a multiple of `groups`).
    const long long groups = a.groups > 1 ? a.groups : 1;
    const long long unit_blocks = blocks / groups;
    if (unit_blocks == 0 || block >= unit_blocks * groups) {
        return; // not a block of this segment's runs (uniform across the block)
    }
    ChunkRun run;
    run.group = block / unit_blocks;
    run.begin = groups > 1 ? run.group * a.group_chunks : 0;
    run.end = groups > 1 && run.begin + a.group_chunks < a.outer ? run.begin + a.group_chunks : a.outer;
    block %= unit_blocks;
    if (a.inner == 1) {
        for (long long c0 = block * kChannelsPerBlock; c0 < a.channels; c0 += unit_blocks * kChannelsPerBlock) {
            for (long long k = 0; k < a.sums; ++k) {
                channel_sums_across<A>(a, run, c0, k);
            }
        }
        return;
    }
    for (long long c = block; c < a.channels; c += unit_blocks) {
        for (long long k = 0; k < a.sums; ++k) {
            channel_sums_within<A>(a, run, c, k);
        }
    }
}

// One block: every segment's loss in a fixed order (its channels' terms, which the combine's
// blocks computed), then the weighted total.
__device__ __noinline__ void loss_epilogue(const ChannelSumGroupArgs &g) {
    double total = 0.0;
    for (long long s = 0; s < g.count; ++s) {
        const SumSegment &a = g.seg[s];
        double sum = 0.0;
        for (long long c = threadIdx.x; c < a.channels; c += blockDim.x) {
            sum += load_acc(a.terms, c, true);
        }
        sum = block_sum(sum);
        if (threadIdx.x == 0) {
            const double loss = (sum + a.constant_total) * a.scale;
            if (a.loss != nullptr) {
                store_scalar(a.loss_code, a.loss, loss);
            }
            total += a.weight * round_to(a.loss_code, loss);
        }
    }
    if (threadIdx.x == 0 && g.total != nullptr) {
        store_scalar(g.total_code, g.total, total);
    }
}

__device__ void group_channel_sum(const ChannelSumGroupArgs &g) {
    const SegmentBlock<SumSegment> at = segment_block(g.seg, g.count);
    if (at.seg.acc_f64) {
        channel_sums<double>(at.seg, at.block, at.blocks);
    } else {
        channel_sums<float>(at.seg, at.block, at.blocks);
    }
    if (!g.epilogue) {
        return;
    }
    // The last block to finish runs the epilogue: every block's sums are visible to it once
    // each has fenced its writes before counting itself done. A fence covers only the
    // fencing thread's own writes, and up to 32 threads wrote sums here, so each thread
    // fences, and the barrier orders every fence before thread 0's count.
    VF_SHARED_ARRAY(unsigned int, ticket, 1);
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        VF_SHARED(ticket, 0) = atomicAdd(g.done, 1u);
    }
    __syncthreads();
    const unsigned int mine = VF_SHARED(ticket, 0);
    if (mine == gridDim.x - 1) {
        __threadfence();
        loss_epilogue(g);
        if (threadIdx.x == 0) {
            *g.done = 0u; // ready for another launch on the same workspace
        }
    }
}

// ---- d loss / d log_scale --------------------------------------------------------------------

struct LogScaleSegment {
    const void *sums;            // Acc: Q_c, or (R1_c, R2_c) interleaved
    const void *log_scale;       // Acc [C]
    const void *upstream_scalar; // Acc*: upstream gradient (with Q_c), else unused
    void *out;                   // Acc [C], or null (no log_scale gradient wanted)
    void *table;                 // Acc [2C]: (g w k / var, 0), the grad op's table, or null
    long long acc_f64;
    long long channels;
    long long sums_per_channel; // 1 or 2
    long long block_begin;
    double eps;
    double per_channel; // M
    double scale;       // w k: the term's weight times the reduction factor
};

struct LogScaleGroupArgs {
    long long count;
    LogScaleSegment seg[kMaxSegments];
};

// d loss / d alpha_c = 0.5 (A_c / var - B_c / var^2) sigmoid(alpha_c), with
// (A, B) = g k (M, Q_c) for Mean/Sum and (R1_c, R2_c) for None; computed as
// (A - B / var) * (sigmoid / var), as the CPU does: var^2 underflows to 0 and A / var
// overflows for var near the eps floor, where sigmoid / var stays near 1.
template <typename A> __device__ void log_scale_grad(const LogScaleSegment &a, long long block, long long blocks) {
    const A *sums = static_cast<const A *>(a.sums);
    for (long long c = block * blockDim.x + threadIdx.x; c < a.channels;
         c += blocks * blockDim.x) {
        const double alpha = (double)static_cast<const A *>(a.log_scale)[c];
        const double var = softplus(alpha) + a.eps;
        double first, second;
        if (a.sums_per_channel == 1) {
            const double gk = (double)*static_cast<const A *>(a.upstream_scalar) * a.scale;
            first = gk * a.per_channel;
            second = gk * (double)sums[c];
            if (a.table != nullptr) {
                static_cast<A *>(a.table)[2 * c] = (A)(gk / var);
                static_cast<A *>(a.table)[2 * c + 1] = A(0);
            }
        } else {
            first = (double)sums[2 * c];
            second = (double)sums[2 * c + 1];
        }
        if (a.out != nullptr) {
            static_cast<A *>(a.out)[c] = (A)(0.5 * (first - second / var) * (sigmoid(alpha) / var));
        }
    }
}

__device__ void group_log_scale_grad(const LogScaleGroupArgs &g) {
    const SegmentBlock<LogScaleSegment> at = segment_block(g.seg, g.count);
    if (at.seg.acc_f64) {
        log_scale_grad<double>(at.seg, at.block, at.blocks);
    } else {
        log_scale_grad<float>(at.seg, at.block, at.blocks);
    }
}

// ---- the channel table: an op's per-channel factors, once per call --------------------------

enum TableKind { kLossFactors = 0, kInverseVariance = 1, kGradientFactors = 2 };

struct TableSegment {
    const void *log_scale; // Acc [C]
    void *table;           // Acc [2C]
    long long acc_f64;
    long long channels;
    long long kind;        // TableKind
    long long block_begin;
    double eps;
    double constant;       // loss factors: the per-element constant (0.5 ln(2 pi) or 0);
                           // gradient factors: w k, the factor of d / var
};

struct TableGroupArgs {
    long long count;
    TableSegment seg[kMaxSegments];
};

// (0.5 / var, 0.5 ln var + constant) for the loss, (1 / var, 0) for the gradient of None,
// (w k / var, 0) for the one-pass forward: the expression the log_scale gradient kernel
// evaluates for the grad op's table when the upstream gradient is 1.
template <typename A> __device__ void channel_table(const TableSegment &a, long long block, long long blocks) {
    A *table = static_cast<A *>(a.table);
    for (long long c = block * blockDim.x + threadIdx.x; c < a.channels; c += blocks * blockDim.x) {
        const double var = softplus((double)static_cast<const A *>(a.log_scale)[c]) + a.eps;
        if (a.kind == kLossFactors) {
            table[2 * c] = (A)(0.5 / var);
            table[2 * c + 1] = (A)(0.5 * log(var) + a.constant);
        } else if (a.kind == kGradientFactors) {
            table[2 * c] = (A)(a.constant / var);
            table[2 * c + 1] = A(0);
        } else {
            table[2 * c] = (A)(1.0 / var);
            table[2 * c + 1] = A(0);
        }
    }
}

__device__ void group_channel_table(const TableGroupArgs &g) {
    const SegmentBlock<TableSegment> at = segment_block(g.seg, g.count);
    if (at.seg.acc_f64) {
        channel_table<double>(at.seg, at.block, at.blocks);
    } else {
        channel_table<float>(at.seg, at.block, at.blocks);
    }
}

} // namespace vf

// ---- kernel entry points --------------------------------------------------------------------

#define VF_GROUP_KERNEL(op, Op, T, suffix)                                                         \
    extern "C" __global__ void __launch_bounds__(256, 2) vid_##op##_group_##suffix(const __grid_constant__ vf::TraverseGroupArgs g) { \
        vf::group_traverse<T, Op>(g);                                                              \
    }                                                                                              \
    VF_REGISTER_KERNEL(vid_##op##_group_##suffix)

#define VF_DTYPE_KERNELS(T, suffix)                                                                \
    VF_GROUP_KERNEL(sumsq, vf::OpSumSq, T, suffix)                                                 \
    VF_GROUP_KERNEL(sumsq_grad, vf::OpSumSqGrad, T, suffix)                                        \
    VF_GROUP_KERNEL(loss, vf::OpLoss, T, suffix)                                                   \
    VF_GROUP_KERNEL(grad, vf::OpGrad, T, suffix)                                                   \
    VF_GROUP_KERNEL(grad_none, vf::OpGradNone, T, suffix)

// The run-time compiler builds one module per dtype in use (VF_ONLY_<dtype>) and one of the
// dtype-free kernels (VF_NO_DTYPE_KERNELS), so that a first call compiles only what it needs;
// with neither defined (the host emulation, the compile tests) everything is built.
#if !defined(VF_NO_DTYPE_KERNELS)
#if !defined(VF_ONLY_DTYPE) || defined(VF_ONLY_f32)
VF_DTYPE_KERNELS(float, f32)
#endif
#if !defined(VF_ONLY_DTYPE) || defined(VF_ONLY_f64)
VF_DTYPE_KERNELS(double, f64)
#endif
#if !defined(VF_ONLY_DTYPE) || defined(VF_ONLY_f16)
VF_DTYPE_KERNELS(vf::f16_t, f16)
#endif
#if !defined(VF_ONLY_DTYPE) || defined(VF_ONLY_bf16)
VF_DTYPE_KERNELS(vf::bf16_t, bf16)
#endif
#endif

#if !defined(VF_ONLY_DTYPE)

extern "C" __global__ void __launch_bounds__(256) vid_channel_sum_group(const __grid_constant__ vf::ChannelSumGroupArgs g) {
    vf::group_channel_sum(g);
}
VF_REGISTER_KERNEL(vid_channel_sum_group)

extern "C" __global__ void __launch_bounds__(256) vid_log_scale_grad_group(const __grid_constant__ vf::LogScaleGroupArgs g) {
    vf::group_log_scale_grad(g);
}
VF_REGISTER_KERNEL(vid_log_scale_grad_group)

extern "C" __global__ void __launch_bounds__(256) vid_channel_table_group(const __grid_constant__ vf::TableGroupArgs g) {
    vf::group_channel_table(g);
}
VF_REGISTER_KERNEL(vid_channel_table_group)
#endif // !VF_ONLY_DTYPE
