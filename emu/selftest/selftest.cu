// Self-test kernels of the SIMT emulator (driven by tests/selftest.rs). Plain CUDA C++
// that NVRTC compiles as-is, with the kernels' own helpers.
#include "../../kernels/common.cuh"

static_assert(sizeof(float2) == 8 && alignof(float2) == 8, "float2 layout");
static_assert(sizeof(float4) == 16 && alignof(float4) == 16, "float4 layout");
static_assert(alignof(double2) == 16 && alignof(longlong2) == 16, "16-byte vectors");
static_assert(alignof(int2) == 8 && alignof(uint2) == 8 && alignof(ushort4) == 8, "8-byte vectors");
static_assert(alignof(int4) == 16 && alignof(uint4) == 16 && alignof(ushort2) == 4, "vectors");

// Sum of v over the first `lanes` lanes of the warp, in lane 0. The mask names exactly
// those lanes; a shuffle from a lane outside it is undefined, hence the guard.
__device__ __forceinline__ float selftest_warp_sum(float v, unsigned lanes) {
  const unsigned lane = threadIdx.x % warpSize;
  const unsigned mask = lanes == 32u ? 0xffffffffu : (1u << lanes) - 1u;
  for (unsigned offset = 16; offset > 0; offset /= 2) {
    const float other = __shfl_down_sync(mask, v, offset);
    if (lane + offset < lanes) v += other;
  }
  return v;
}

extern "C" __global__ void selftest_copy(const float *__restrict__ in, float *__restrict__ out,
                                         unsigned n) {
  for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    out[i] = in[i];
  }
}
VF_REGISTER_KERNEL(selftest_copy)

// out[b] = sum of row b of x (rows of n floats): per-warp sums in static shared memory,
// then the final pass by warp 0 alone while the other warps have exited.
extern "C" __global__ void __launch_bounds__(1024)
    selftest_block_sum(const float *__restrict__ x, float *__restrict__ out, unsigned n) {
  VF_SHARED_ARRAY(float, warp_sums, 32);
  const unsigned tid = threadIdx.x, lane = tid % 32u, warp = tid / 32u;
  const float *row = x + (size_t)blockIdx.x * n;
  float v = 0.0f;
  for (unsigned i = tid; i < n; i += blockDim.x) v += row[i];
  v = selftest_warp_sum(v, min(32u, blockDim.x - warp * 32u));
  if (lane == 0) VF_SHARED(warp_sums, warp) = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < (blockDim.x + 31u) / 32u ? VF_SHARED(warp_sums, lane) : 0.0f;
    v = selftest_warp_sum(v, min(32u, blockDim.x));
    if (lane == 0) out[blockIdx.x] = v;
  }
}
VF_REGISTER_KERNEL(selftest_block_sum)

// Every lane ends with its warp's sum (int, long long, double) and maximum (float).
extern "C" __global__ void selftest_butterfly(const int *in_i, const double *in_d,
                                              const float *in_f, long long *out_sum,
                                              double *out_d, float *out_max) {
  const unsigned t = blockIdx.x * blockDim.x + threadIdx.x;
  int vi = in_i[t];
  long long vl = (long long)in_i[t] << 32;
  double vd = in_d[t];
  float vf = in_f[t];
  for (int m = 16; m > 0; m /= 2) {
    vi += __shfl_xor_sync(0xffffffffu, vi, m);
    vl += __shfl_xor_sync(0xffffffffu, vl, m);
    vd += __shfl_xor_sync(0xffffffffu, vd, m);
    vf = fmaxf(vf, __shfl_xor_sync(0xffffffffu, vf, m));
  }
  out_sum[2 * t] = vi;
  out_sum[2 * t + 1] = vl;
  out_d[t] = vd;
  out_max[t] = vf;
}
VF_REGISTER_KERNEL(selftest_butterfly)

// The shuffle modes, widths, votes and a half-warp mask, seven words per thread.
extern "C" __global__ void selftest_shfl_modes(const unsigned *in, unsigned *out) {
  const unsigned t = threadIdx.x, lane = t % 32u, v = in[t];
  unsigned *o = out + 7 * t;
  o[0] = __shfl_sync(0xffffffffu, v, 5);
  o[1] = __shfl_sync(0xffffffffu, v, 3, 8);
  o[2] = __shfl_up_sync(0xffffffffu, v, 2, 8);
  o[3] = __shfl_down_sync(0xffffffffu, v, 3, 16);
  o[4] = __ballot_sync(0xffffffffu, v & 1u);
  const unsigned all = __all_sync(0xffffffffu, v != 0u), any = __any_sync(0xffffffffu, v == 7u);
  o[5] = all | any << 1;
  o[6] = lane < 16u ? __shfl_xor_sync(0x0000ffffu, v, 1) : v;
  __syncwarp();
}
VF_REGISTER_KERNEL(selftest_shfl_modes)

// out[t] = the value 8 lanes down. Launched with 40 threads: the second warp has 8 lanes,
// which shuffle with `last_mask` and read lanes outside it.
extern "C" __global__ void selftest_shfl_missing_lane(const float *in, float *out,
                                                      unsigned last_mask) {
  const unsigned mask = threadIdx.x < 32u ? 0xffffffffu : last_mask;
  out[threadIdx.x] = __shfl_down_sync(mask, in[threadIdx.x], 8);
}
VF_REGISTER_KERNEL(selftest_shfl_missing_lane)

// Reverses each block's slice through dynamic shared memory; probe[] records what the
// shared memory held before this block wrote it (read through the address: unchecked).
extern "C" __global__ void selftest_smem_reverse(const float *in, float *out, unsigned *probe) {
  VF_DYNAMIC_SHARED(float, buf);
  const unsigned t = threadIdx.x, i = blockIdx.x * blockDim.x + t;
  probe[i] = *reinterpret_cast<const unsigned *>(&VF_SHARED(buf, t));
  VF_SHARED(buf, t) = in[i];
  __syncthreads();
  out[i] = VF_SHARED(buf, blockDim.x - 1u - t);
}
VF_REGISTER_KERNEL(selftest_smem_reverse)

// Each thread writes its packed thread and block index at its global linear position.
extern "C" __global__ void selftest_index_3d(unsigned *out, unsigned *dims) {
  const unsigned block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const unsigned thread = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const unsigned g = block * (blockDim.x * blockDim.y * blockDim.z) + thread;
  out[2 * g] = threadIdx.x | threadIdx.y << 8 | threadIdx.z << 16;
  out[2 * g + 1] = blockIdx.x | blockIdx.y << 8 | blockIdx.z << 16;
  if (g == 0) {
    const dim3 b = blockDim, gr = gridDim;
    const unsigned d[6] = {b.x, b.y, b.z, gr.x, gr.y, gr.z};
    for (int k = 0; k < 6; ++k) dims[k] = d[k];
  }
}
VF_REGISTER_KERNEL(selftest_index_3d)

// y = a * x + y with float4 loads and stores.
extern "C" __global__ void selftest_axpy4(const float4 *__restrict__ x, float4 *__restrict__ y,
                                          float a, unsigned n4) {
  const unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n4) return;
  const float4 v = __ldg(x + i);
  const float4 w = y[i];
  y[i] = make_float4(fmaf(a, v.x, w.x), fmaf(a, v.y, w.y), fmaf(a, v.z, w.z), fmaf(a, v.w, w.w));
}
VF_REGISTER_KERNEL(selftest_axpy4)

// Broken on purpose. mode 0: thread 5 returns before a __syncthreads; mode 1: divergent
// __syncthreads; mode 2: lane 0 waits at __syncthreads while its warp shuffles; mode 3:
// lanes shuffle with a mask that leaves them out.
extern "C" __global__ void selftest_bad_barrier(int mode, float *out) {
  const unsigned t = threadIdx.x;
  float v = (float)t;
  if (mode == 0) {
    if (t == 5) return;
    __syncthreads();
  } else if (mode == 1) {
    if (t % 2 == 0) {
      __syncthreads();
    } else {
      __syncthreads();
    }
  } else if (mode == 3) {
    v = __shfl_sync(0x1u, v, 0);
  } else if (t == 0) {
    __syncthreads();
  } else {
    v = __shfl_xor_sync(0xffffffffu, v, 1);
  }
  out[blockIdx.x * blockDim.x + t] = v;
}
VF_REGISTER_KERNEL(selftest_bad_barrier)

// One thread evaluates the device math and integer intrinsics at x[0..3]; the test
// compares each entry with Rust's std.
extern "C" __global__ void selftest_intrinsics(const float *x, const double *d, double *out,
                                               long long *bits) {
  const float a = x[0], b = x[1], c = x[2];
  const double p = d[0], q = d[1];
  const double r[] = {
      expf(a), logf(b), log1pf(a), expm1f(a), sqrtf(b), rsqrtf(b), fabsf(c), fmaxf(a, c),
      fminf(a, c), fmaf(a, b, c), __expf(a), __logf(b), __fdividef(a, b), __frcp_rn(b),
      __fmaf_rn(a, b, c), __fadd_rn(a, b), __fmul_rn(a, b), min(a, c), max(a, c),
      exp(p), log(q), log1p(p), expm1(p), sqrt(q), rsqrt(q), fabs(-p), fmax(p, q),
      fmin(p, q), fma(p, q, p), min(p, q), max(p, q),
  };
  for (unsigned k = 0; k < sizeof(r) / sizeof(r[0]); ++k) out[k] = r[k];
  const int ia = (int)(c * 1000.0f);
  const unsigned ub = (unsigned)(b * 1000.0f);
  const long long lc = (long long)ia * 3000000000ll;
  const long long s[] = {
      __float_as_int(a), __float_as_uint(c), (long long)__int_as_float(0x3f800000),
      (long long)__uint_as_float(0x40000000u), __double_as_longlong(p),
      (long long)__longlong_as_double(0x4008000000000000ll), __popc(ub), __ffs(ia),
      __clz(ia), __clz(0), min(ia, -7), max(ub, 5u), min(lc, 1ll), max(ia, 3u),
  };
  for (unsigned k = 0; k < sizeof(s) / sizeof(s[0]); ++k) bits[k] = s[k];
}
VF_REGISTER_KERNEL(selftest_intrinsics)

// ---- what the emulation must catch ------------------------------------------------------

// Each thread writes its slot, then reads its neighbour's: a race unless `barrier`.
extern "C" __global__ void selftest_neighbour(int barrier, float *out) {
  VF_SHARED_ARRAY(float, slots, 64);
  const unsigned t = threadIdx.x;
  VF_SHARED(slots, t) = 0.0f;
  __syncthreads();
  VF_SHARED(slots, t) = (float)t;  // neighbour write
  if (barrier) __syncthreads();
  out[blockIdx.x * blockDim.x + t] = VF_SHARED(slots, (t + 1u) % blockDim.x);  // neighbour read
}
VF_REGISTER_KERNEL(selftest_neighbour)

// Lanes exchange slots after a __syncwarp, which orders a warp but not two warps: with
// partner_xor = 1 the partner is in the same warp, with 32 in the other one (a race).
extern "C" __global__ void selftest_warp_exchange(unsigned partner_xor, float *out) {
  VF_SHARED_ARRAY(float, slots, 64);
  const unsigned t = threadIdx.x;
  VF_SHARED(slots, t) = (float)t;  // exchange write
  __syncwarp();
  out[t] = VF_SHARED(slots, t ^ partner_xor);  // exchange read
}
VF_REGISTER_KERNEL(selftest_warp_exchange)

// Reads shared memory that no thread has written.
extern "C" __global__ void selftest_unwritten(float *out) {
  VF_SHARED_ARRAY(float, slots, 64);
  out[threadIdx.x] = VF_SHARED(slots, threadIdx.x);  // unwritten read
}
VF_REGISTER_KERNEL(selftest_unwritten)

// Thread 0 writes slots[index] of a 64-element array.
extern "C" __global__ void selftest_shared_index(int index) {
  VF_SHARED_ARRAY(float, slots, 64);
  if (threadIdx.x == 0) VF_SHARED(slots, index) = 1.0f;  // indexed write
}
VF_REGISTER_KERNEL(selftest_shared_index)

// Lane 31 of each warp leaves, then the others shuffle with a mask that names it.
extern "C" __global__ void selftest_mask_exited(float *out) {
  const unsigned t = threadIdx.x;
  if (t % 32u == 31u) return;
  out[t] = __shfl_down_sync(0xffffffffu, (float)t, 1);  // names an exited lane
}
VF_REGISTER_KERNEL(selftest_mask_exited)

// Thread 0 of each block appends the block's linear index to order[].
extern "C" __global__ void selftest_block_order(unsigned *counter, unsigned *order) {
  if (threadIdx.x == 0) {
    order[atomicAdd(counter, 1u)] = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  }
}
VF_REGISTER_KERNEL(selftest_block_order)

// Wrong on purpose: block b > 0 relies on block b - 1 having run, so in index order chain
// ends as 1, 2, 3, ... (from zeros).
extern "C" __global__ void selftest_block_chain(unsigned *chain) {
  if (threadIdx.x == 0) chain[blockIdx.x] = blockIdx.x == 0 ? 1u : chain[blockIdx.x - 1] + 1u;
}
VF_REGISTER_KERNEL(selftest_block_chain)

// Each thread appends its index to log[] twice, with no barrier between: the order shows
// how the emulation interleaved the threads.
extern "C" __global__ void selftest_interleave(unsigned *counter, unsigned *log) {
  log[atomicAdd(counter, 1u)] = threadIdx.x;
  log[atomicAdd(counter, 1u)] = threadIdx.x;
}
VF_REGISTER_KERNEL(selftest_interleave)
