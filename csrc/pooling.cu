// Pooled rows over a ragged batch: one output row per sequence b = rows [cu[b], cu[b+1]).
//
// gather_pooled (pyengine/ops.py gather_pooled):
//   cls: hidden[cu[b]]   last: hidden[cu[b+1] - 1]   mean: fp32 sum / length
//   out in hidden's dtype (or fp32, for pooled_norm without a norm).
//   Grid (B, column blocks); block (TX, TY): TX threads across VEC-wide column packs,
//   TY threads down the rows of a sequence (mean only), reduced through shared memory.
//
// pooled_norm (pyengine/ops.py pooled_norm): s = hidden (+ residual, rounded to hidden's
//   dtype); each pooled token's row goes through LayerNorm / RMSNorm (weight + offset) in
//   fp32; mean averages the normed rows; fp32 out, nothing rounded back. One block per
//   sequence; the current row lives in shared memory as fp32, the running sum too.
#include "common.cuh"
#include "ops.h"

namespace pyengine {
namespace {

constexpr int kMeanRows = 8;  // TY for mean pooling

// ---------------------------------------------------------------------------------------
// gather_pooled
// ---------------------------------------------------------------------------------------

template <typename T, typename O, int VEC, int POOL>
__global__ void gather_pooled_kernel(const T* __restrict__ hidden, int64_t row_stride,
                                     const int* __restrict__ cu_seqlens, O* __restrict__ out,
                                     int hidden_size) {
  const int b = blockIdx.x;
  const int col = (blockIdx.y * blockDim.x + threadIdx.x) * VEC;
  const bool active = col < hidden_size;
  const int64_t start = cu_seqlens[b], end = cu_seqlens[b + 1];
  O* orow = out + static_cast<int64_t>(b) * hidden_size;
  if constexpr (POOL != 2) {
    if (!active) return;
    const int64_t row = POOL == 0 ? start : end - 1;
    Pack<T, VEC> v;
    v.load(hidden + row * row_stride + col);
    Pack<O, VEC> o;
#pragma unroll
    for (int j = 0; j < VEC; ++j) o.v[j] = from_float<O>(to_float(v.v[j]));
    o.store(orow + col);
  } else {
    float acc[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) acc[j] = 0.f;
    if (active) {
      for (int64_t r = start + threadIdx.y; r < end; r += blockDim.y) {
        Pack<T, VEC> v;
        v.load(hidden + r * row_stride + col);
#pragma unroll
        for (int j = 0; j < VEC; ++j) acc[j] += to_float(v.v[j]);
      }
    }
    // Reduce over threadIdx.y: partial sums laid out [y-1][j][x] (conflict-free).
    extern __shared__ float part[];
    const int tx = threadIdx.x, nx = blockDim.x;
    if (threadIdx.y > 0) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) part[((threadIdx.y - 1) * VEC + j) * nx + tx] = acc[j];
    }
    __syncthreads();
    if (threadIdx.y == 0 && active) {
      for (int y = 1; y < static_cast<int>(blockDim.y); ++y) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) acc[j] += part[((y - 1) * VEC + j) * nx + tx];
      }
      // An empty sequence gives 0 / 0 = NaN, as the reference does.
      const float len = static_cast<float>(end - start);
      Pack<O, VEC> o;
#pragma unroll
      for (int j = 0; j < VEC; ++j) o.v[j] = from_float<O>(acc[j] / len);
      o.store(orow + col);
    }
  }
}

template <typename T, typename O, int VEC, int POOL>
void launch_gather_typed(const char* op, uintptr_t hidden, int64_t row_stride,
                         int64_t hidden_size, uintptr_t cu_seqlens, int64_t batch, uintptr_t out,
                         cudaStream_t stream) {
  const int64_t packs = hidden_size / VEC;
  const int tx = static_cast<int>(std::min<int64_t>(128, std::max(32, round_up32(packs))));
  const int ty = POOL == 2 ? kMeanRows : 1;
  const dim3 grid(static_cast<unsigned>(batch), static_cast<unsigned>(ceil_div(packs, tx)));
  const size_t smem = POOL == 2 ? static_cast<size_t>(ty - 1) * VEC * tx * sizeof(float) : 0;
  gather_pooled_kernel<T, O, VEC, POOL><<<grid, dim3(tx, ty), smem, stream>>>(
      reinterpret_cast<const T*>(hidden), row_stride, reinterpret_cast<const int*>(cu_seqlens),
      reinterpret_cast<O*>(out), static_cast<int>(hidden_size));
  check_launch(op, "gather_pooled kernel");
}

template <typename T, typename O, int POOL>
void launch_gather_vec(const char* op, uintptr_t hidden, int64_t row_stride,
                       int64_t hidden_size, uintptr_t cu_seqlens, int64_t batch, uintptr_t out,
                       cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  constexpr int A = pack_align<T, V>();
  constexpr int AO = pack_align<O, V>();
  if (hidden_size % V == 0 && aligned(hidden, A) && (row_stride * sizeof(T)) % A == 0 &&
      aligned(out, AO)) {
    launch_gather_typed<T, O, V, POOL>(op, hidden, row_stride, hidden_size, cu_seqlens, batch,
                                       out, stream);
  } else {
    launch_gather_typed<T, O, 1, POOL>(op, hidden, row_stride, hidden_size, cu_seqlens, batch,
                                       out, stream);
  }
}

template <typename T, typename O>
void launch_gather_pool(const char* op, uintptr_t hidden, int64_t row_stride,
                        int64_t hidden_size, uintptr_t cu_seqlens, int64_t batch, int pooling,
                        uintptr_t out, cudaStream_t s) {
  switch (pooling) {
    case 0:
      launch_gather_vec<T, O, 0>(op, hidden, row_stride, hidden_size, cu_seqlens, batch, out, s);
      break;
    case 1:
      launch_gather_vec<T, O, 1>(op, hidden, row_stride, hidden_size, cu_seqlens, batch, out, s);
      break;
    default:
      launch_gather_vec<T, O, 2>(op, hidden, row_stride, hidden_size, cu_seqlens, batch, out, s);
  }
}

// ---------------------------------------------------------------------------------------
// pooled_norm
// ---------------------------------------------------------------------------------------

template <typename T, typename W, int VEC>
__global__ void pooled_norm_kernel(const T* __restrict__ hidden, int64_t h_stride,
                                   const T* __restrict__ residual, int64_t r_stride,
                                   const int* __restrict__ cu_seqlens, int pooling, int norm_kind,
                                   const W* __restrict__ weight, const W* __restrict__ bias,
                                   float eps, float offset, float* __restrict__ out,
                                   int hidden_size) {
  // [0, H): the current row in fp32; [H, 2H): the running sum of normed rows. Element
  // (i*VEC + j) sits at j*nvec + i, and each thread only touches its own elements.
  extern __shared__ float smem[];
  __shared__ float scratch[32];
  const int H = hidden_size;
  const int nvec = H / VEC;
  float* srow = smem;
  float* acc = smem + H;
  const int b = blockIdx.x;
  const int64_t start = cu_seqlens[b], end = cu_seqlens[b + 1];
  const int64_t r0 = pooling == 1 ? end - 1 : start;
  const int64_t r1 = pooling == 2 ? end : r0 + 1;
  const float inv_h = 1.f / static_cast<float>(H);

  for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) acc[j * nvec + i] = 0.f;
  }
  for (int64_t r = r0; r < r1; ++r) {
    float part = 0.f;
    for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
      Pack<T, VEC> x;
      x.load(hidden + r * h_stride + i * VEC);
      if (residual != nullptr) {
        Pack<T, VEC> res;
        res.load(residual + r * r_stride + i * VEC);
#pragma unroll
        for (int j = 0; j < VEC; ++j) x.v[j] = from_float<T>(to_float(x.v[j]) + to_float(res.v[j]));
      }
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float f = to_float(x.v[j]);
        srow[j * nvec + i] = f;
        part += norm_kind == 2 ? f * f : f;
      }
    }
    if (norm_kind == 0) {
      for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) acc[j * nvec + i] += srow[j * nvec + i];
      }
      continue;
    }
    float mean = 0.f, rstd;
    if (norm_kind == 1) {
      mean = block_sum(part, scratch) * inv_h;
      rstd = layer_norm_rstd<VEC>(srow, nvec, mean, inv_h, eps, scratch);
    } else {
      rstd = rsqrtf(block_sum(part, scratch) * inv_h + eps);
    }
    for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
      Pack<W, VEC> w, bb;
      w.load(weight + i * VEC);
      if (norm_kind == 1 && bias != nullptr) bb.load(bias + i * VEC);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float f = srow[j * nvec + i];
        float y;
        if (norm_kind == 1) {
          y = (f - mean) * rstd * to_float(w.v[j]);
          if (bias != nullptr) y += to_float(bb.v[j]);
        } else {
          y = (f * rstd) * (to_float(w.v[j]) + offset);
        }
        acc[j * nvec + i] += y;
      }
    }
  }
  // cls / last divide by 1 (exact); an empty sequence under mean gives NaN, as the reference.
  const float len = static_cast<float>(r1 - r0);
  float* orow = out + static_cast<int64_t>(b) * H;
  for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
    Pack<float, VEC> o;
#pragma unroll
    for (int j = 0; j < VEC; ++j) o.v[j] = acc[j * nvec + i] / len;
    o.store(orow + i * VEC);
  }
}

template <typename T, typename W, int VEC>
void launch_pooled_norm_typed(uintptr_t hidden, int64_t h_stride, uintptr_t residual,
                              int64_t r_stride, uintptr_t cu_seqlens, int64_t batch, int pooling,
                              int norm_kind, uintptr_t weight, uintptr_t bias, float eps,
                              float offset, uintptr_t out, int64_t hidden_size,
                              cudaStream_t stream) {
  const char* op = "pooled_norm";
  auto kernel = pooled_norm_kernel<T, W, VEC>;
  const int64_t nvec = hidden_size / VEC;
  const int threads = static_cast<int>(std::min<int64_t>(1024, std::max(32, round_up32(nvec))));
  const size_t smem = 2 * static_cast<size_t>(hidden_size) * sizeof(float);
  if (smem > 48 * 1024) {
    PYE_CUDA_CHECK(op, cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(smem)));
  }
  kernel<<<static_cast<unsigned>(batch), threads, smem, stream>>>(
      reinterpret_cast<const T*>(hidden), h_stride, reinterpret_cast<const T*>(residual),
      r_stride, reinterpret_cast<const int*>(cu_seqlens), pooling, norm_kind,
      reinterpret_cast<const W*>(weight), reinterpret_cast<const W*>(bias), eps, offset,
      reinterpret_cast<float*>(out), static_cast<int>(hidden_size));
  check_launch(op, "pooled_norm kernel");
}

template <typename T, typename W>
void launch_pooled_norm_vec(uintptr_t hidden, int64_t h_stride, uintptr_t residual,
                            int64_t r_stride, uintptr_t cu_seqlens, int64_t batch, int pooling,
                            int norm_kind, uintptr_t weight, uintptr_t bias, float eps,
                            float offset, uintptr_t out, int64_t hidden_size,
                            cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  constexpr int AT = pack_align<T, V>();
  constexpr int AW = pack_align<W, V>();
  constexpr int AO = pack_align<float, V>();
  bool vec = hidden_size % V == 0 && aligned(hidden, AT) && (h_stride * sizeof(T)) % AT == 0 &&
             aligned(out, AO) && (weight == 0 || aligned(weight, AW)) &&
             (bias == 0 || aligned(bias, AW));
  if (residual != 0) vec = vec && aligned(residual, AT) && (r_stride * sizeof(T)) % AT == 0;
  if (vec) {
    launch_pooled_norm_typed<T, W, V>(hidden, h_stride, residual, r_stride, cu_seqlens, batch,
                                      pooling, norm_kind, weight, bias, eps, offset, out,
                                      hidden_size, stream);
  } else {
    launch_pooled_norm_typed<T, W, 1>(hidden, h_stride, residual, r_stride, cu_seqlens, batch,
                                      pooling, norm_kind, weight, bias, eps, offset, out,
                                      hidden_size, stream);
  }
}

}  // namespace

void launch_gather_pooled(int dtype, uintptr_t hidden, int64_t row_stride, int64_t hidden_size,
                          uintptr_t cu_seqlens, int64_t batch, int pooling, uintptr_t out,
                          int device, uintptr_t stream) {
  const char* op = "gather_pooled";
  if (pooling < 0 || pooling > 2) throw_bad_arg(op, "pooling code must be 0, 1 or 2");
  if (hidden_size <= 0 || hidden_size > 0x7fffffff) throw_bad_arg(op, "bad hidden size");
  if (batch > 0x7fffffff) throw_bad_arg(op, "more than 2^31-1 sequences");
  if (batch == 0) return;
  DeviceGuard guard(op, device);
  auto s = reinterpret_cast<cudaStream_t>(stream);
  PYE_DISPATCH_DTYPE(op, dtype, {
    launch_gather_pool<scalar_t, scalar_t>(op, hidden, row_stride, hidden_size, cu_seqlens,
                                           batch, pooling, out, s);
  });
}

void launch_pooled_norm(int dtype, int wdtype, uintptr_t hidden, int64_t h_stride,
                        uintptr_t residual, int64_t r_stride, uintptr_t cu_seqlens, int64_t batch,
                        int pooling, int norm_kind, uintptr_t weight, uintptr_t bias, double eps,
                        double offset, uintptr_t out, int64_t hidden_size, int device,
                        uintptr_t stream) {
  const char* op = "pooled_norm";
  if (pooling < 0 || pooling > 2) throw_bad_arg(op, "pooling code must be 0, 1 or 2");
  if (norm_kind < 0 || norm_kind > 2) throw_bad_arg(op, "norm code must be 0, 1 or 2");
  if (norm_kind != 0 && weight == 0) throw_bad_arg(op, "a norm needs its weight");
  if (hidden_size <= 0 || hidden_size > 0x7fffffff) throw_bad_arg(op, "bad hidden size");
  if (batch > 0x7fffffff) throw_bad_arg(op, "more than 2^31-1 sequences");
  if (norm_kind != 0 && wdtype != dtype && wdtype != kFloat32) {
    throw_bad_arg(op, std::string("weight dtype ") + dtype_name(wdtype) +
                          " must be float32 or the input's dtype " + dtype_name(dtype));
  }
  if (batch == 0) return;
  DeviceGuard guard(op, device);
  auto s = reinterpret_cast<cudaStream_t>(stream);
  if (norm_kind == 0 && residual == 0) {
    // Plain pooling with an fp32 result: the gather kernel (rows read in parallel).
    PYE_DISPATCH_DTYPE(op, dtype, {
      launch_gather_pool<scalar_t, float>(op, hidden, h_stride, hidden_size, cu_seqlens, batch,
                                          pooling, out, s);
    });
    return;
  }
  const float feps = static_cast<float>(eps), foff = static_cast<float>(offset);
#define PYE_PN_CALL(T, W)                                                                      \
  launch_pooled_norm_vec<T, W>(hidden, h_stride, residual, r_stride, cu_seqlens, batch, pooling, \
                               norm_kind, weight, bias, feps, foff, out, hidden_size, s)
  const bool wf = norm_kind == 0 || wdtype == kFloat32;
  if (dtype == kFloat32) {
    PYE_PN_CALL(float, float);
  } else if (dtype == kFloat16) {
    if (wf) PYE_PN_CALL(__half, float); else PYE_PN_CALL(__half, __half);
  } else if (dtype == kBFloat16) {
    if (wf) PYE_PN_CALL(__nv_bfloat16, float); else PYE_PN_CALL(__nv_bfloat16, __nv_bfloat16);
  } else {
    throw_bad_arg(op, "unsupported dtype code " + std::to_string(dtype));
  }
#undef PYE_PN_CALL
}

}  // namespace pyengine
