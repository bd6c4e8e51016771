// Fused residual add + RMSNorm / LayerNorm, one block per row.
//
// Semantics (pyengine/ops.py add_rms_norm / add_layer_norm):
//   s = x + residual, rounded to x's dtype (as torch adds two half tensors);
//   statistics of s in fp32;
//   rms:   y = (s * rsqrt(mean(s^2) + eps)) * (weight + offset)
//   layer: y = (s - mean) * rsqrt(var + eps) * weight + bias   (biased variance)
//   y rounded to x's dtype; both y and s are written.
// The row of s is kept in shared memory as fp32 (H * 4 bytes, laid out [j][i] so a warp's
// accesses hit distinct banks); x and residual are read once, with 128-bit loads when the
// launcher found every pointer and row stride aligned.
#include "common.cuh"
#include "ops.h"

namespace pyengine {
namespace {

template <typename T, typename W, int VEC, bool RMS, bool HAS_RES>
__global__ void add_norm_kernel(const T* __restrict__ x, int64_t x_stride,
                                const T* __restrict__ residual, int64_t res_stride,
                                const W* __restrict__ weight, const W* __restrict__ bias,
                                T* __restrict__ out, T* __restrict__ summed, int hidden,
                                float eps, float offset) {
  extern __shared__ float srow[];  // hidden floats, element (i*VEC + j) at j*nvec + i
  __shared__ float scratch[kBlockSumScratchBytes / sizeof(float)];
  const int64_t row = blockIdx.x;
  const int nvec = hidden / VEC;
  const T* xr = x + row * x_stride;
  const T* rr = HAS_RES ? residual + row * res_stride : nullptr;
  T* sr = HAS_RES ? summed + row * static_cast<int64_t>(hidden) : nullptr;

  float acc = 0.f;
  for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
    Pack<T, VEC> s;
    s.load(xr + i * VEC);
    if constexpr (HAS_RES) {
      Pack<T, VEC> r;
      r.load(rr + i * VEC);
#pragma unroll
      for (int j = 0; j < VEC; ++j) s.v[j] = from_float<T>(to_float(s.v[j]) + to_float(r.v[j]));
      s.store(sr + i * VEC);
    }
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float f = to_float(s.v[j]);
      srow[j * nvec + i] = f;
      acc += RMS ? f * f : f;
    }
  }
  const float inv_h = 1.f / static_cast<float>(hidden);
  const float mean = block_sum(acc, scratch) * inv_h;
  float rstd;
  if constexpr (RMS) {
    rstd = rsqrtf(mean + eps);
  } else {
    // Two-pass variance over the fp32 row this thread wrote itself (no sync needed).
    rstd = layer_norm_rstd<VEC>(srow, nvec, mean, inv_h, eps, scratch);
  }

  T* orow = out + row * static_cast<int64_t>(hidden);
  for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
    Pack<W, VEC> w;
    w.load(weight + i * VEC);
    Pack<W, VEC> b;
    if constexpr (!RMS) {
      if (bias != nullptr) b.load(bias + i * VEC);
    }
    Pack<T, VEC> y;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float f = srow[j * nvec + i];
      float v;
      if constexpr (RMS) {
        v = (f * rstd) * (to_float(w.v[j]) + offset);
      } else {
        v = (f - mean) * rstd * to_float(w.v[j]);
        if (bias != nullptr) v += to_float(b.v[j]);
      }
      y.v[j] = from_float<T>(v);
    }
    y.store(orow + i * VEC);
  }
}

template <typename T, typename W, int VEC, bool RMS, bool HAS_RES>
void launch_typed(const char* op, uintptr_t x, int64_t x_stride, uintptr_t residual,
                  int64_t res_stride, uintptr_t weight, uintptr_t bias, uintptr_t out,
                  uintptr_t summed, int64_t rows, int64_t hidden, float eps, float offset,
                  cudaStream_t stream) {
  auto kernel = add_norm_kernel<T, W, VEC, RMS, HAS_RES>;
  const int64_t nvec = hidden / VEC;
  const int threads = static_cast<int>(std::min<int64_t>(1024, std::max(32, round_up32(nvec))));
  const size_t smem = static_cast<size_t>(hidden) * sizeof(float);
  // the kernel's static scratch counts against the same 48 KiB (H = 12288 needs the opt-in)
  if (smem + kBlockSumScratchBytes > 48 * 1024) {
    PYE_CUDA_CHECK(op, cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(smem)));
  }
  kernel<<<static_cast<unsigned>(rows), threads, smem, stream>>>(
      reinterpret_cast<const T*>(x), x_stride, reinterpret_cast<const T*>(residual), res_stride,
      reinterpret_cast<const W*>(weight), reinterpret_cast<const W*>(bias),
      reinterpret_cast<T*>(out), reinterpret_cast<T*>(summed), static_cast<int>(hidden), eps,
      offset);
  check_launch(op, RMS ? "add_rms_norm kernel" : "add_layer_norm kernel");
}

template <typename T, typename W, bool RMS, bool HAS_RES>
void launch_vec(const char* op, uintptr_t x, int64_t x_stride, uintptr_t residual,
                int64_t res_stride, uintptr_t weight, uintptr_t bias, uintptr_t out,
                uintptr_t summed, int64_t rows, int64_t hidden, float eps, float offset,
                cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);  // 128-bit loads of x
  constexpr int AT = pack_align<T, V>();
  constexpr int AW = pack_align<W, V>();
  bool vec = hidden % V == 0 && aligned(x, AT) && (x_stride * sizeof(T)) % AT == 0 &&
             aligned(out, AT) && aligned(weight, AW) && (bias == 0 || aligned(bias, AW));
  if (HAS_RES) {
    vec = vec && aligned(residual, AT) && (res_stride * sizeof(T)) % AT == 0 &&
          aligned(summed, AT);
  }
  if (vec) {
    launch_typed<T, W, V, RMS, HAS_RES>(op, x, x_stride, residual, res_stride, weight, bias, out,
                                        summed, rows, hidden, eps, offset, stream);
  } else {
    launch_typed<T, W, 1, RMS, HAS_RES>(op, x, x_stride, residual, res_stride, weight, bias, out,
                                        summed, rows, hidden, eps, offset, stream);
  }
}

template <typename T, typename W, bool RMS>
void launch_res(const char* op, uintptr_t x, int64_t x_stride, uintptr_t residual,
                int64_t res_stride, uintptr_t weight, uintptr_t bias, uintptr_t out,
                uintptr_t summed, int64_t rows, int64_t hidden, float eps, float offset,
                cudaStream_t stream) {
  if (residual != 0) {
    launch_vec<T, W, RMS, true>(op, x, x_stride, residual, res_stride, weight, bias, out, summed,
                                rows, hidden, eps, offset, stream);
  } else {
    launch_vec<T, W, RMS, false>(op, x, x_stride, residual, res_stride, weight, bias, out,
                                 summed, rows, hidden, eps, offset, stream);
  }
}

}  // namespace

void launch_add_norm(const char* op, bool rms, int dtype, int wdtype, uintptr_t x,
                     int64_t x_stride, uintptr_t residual, int64_t res_stride, uintptr_t weight,
                     uintptr_t bias, uintptr_t out, uintptr_t summed, int64_t rows, int64_t hidden,
                     double eps, double offset, int device, uintptr_t stream) {
  if (hidden <= 0) throw_bad_arg(op, "hidden size must be positive");
  if (rows > 0x7fffffff) throw_bad_arg(op, "more than 2^31-1 rows");
  if ((residual == 0) != (summed == 0)) throw_bad_arg(op, "residual and summed go together");
  if (wdtype != dtype && wdtype != kFloat32) {
    throw_bad_arg(op, std::string("weight dtype ") + dtype_name(wdtype) +
                          " must be float32 or the input's dtype " + dtype_name(dtype));
  }
  if (rows == 0) return;
  DeviceGuard guard(op, device);
  auto s = reinterpret_cast<cudaStream_t>(stream);
  const float feps = static_cast<float>(eps), foff = static_cast<float>(offset);
#define PYE_NORM_CALL(T, W)                                                                   \
  (rms ? launch_res<T, W, true>(op, x, x_stride, residual, res_stride, weight, bias, out,     \
                                summed, rows, hidden, feps, foff, s)                          \
       : launch_res<T, W, false>(op, x, x_stride, residual, res_stride, weight, bias, out,    \
                                 summed, rows, hidden, feps, foff, s))
  if (dtype == kFloat32) {
    PYE_NORM_CALL(float, float);
  } else if (dtype == kFloat16) {
    if (wdtype == kFloat32) PYE_NORM_CALL(__half, float); else PYE_NORM_CALL(__half, __half);
  } else if (dtype == kBFloat16) {
    if (wdtype == kFloat32) PYE_NORM_CALL(__nv_bfloat16, float);
    else PYE_NORM_CALL(__nv_bfloat16, __nv_bfloat16);
  } else {
    throw_bad_arg(op, "unsupported dtype code " + std::to_string(dtype));
  }
#undef PYE_NORM_CALL
}

}  // namespace pyengine
