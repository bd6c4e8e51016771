// Classifier activation over (B, L) logits, fp32 out; one warp per row.
//
// Semantics (pyengine/ops.py activation): x = (float(logits) - bias) * scale, then
// softmax over the row (max-subtracted), sigmoid 1 / (1 + exp(-x)), or identity. bias and
// scale are scalars or per-label fp32 vectors. With no bias / scale the launcher passes
// 0 / 1, which leave x bit-for-bit unchanged.
#include "common.cuh"
#include "ops.h"

namespace pyengine {
namespace {

constexpr int kWarpsPerBlock = 4;

template <typename T, int KIND>
__global__ void activation_kernel(const T* __restrict__ logits, int64_t row_stride,
                                  float* __restrict__ out, int64_t batch, int labels, float bias,
                                  float scale, const float* __restrict__ bias_vec,
                                  const float* __restrict__ scale_vec) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (row >= batch) return;  // whole warp leaves together
  const T* lr = logits + row * row_stride;
  float* orow = out + row * static_cast<int64_t>(labels);
  auto value = [&](int j) {
    const float b = bias_vec != nullptr ? bias_vec[j] : bias;
    const float sc = scale_vec != nullptr ? scale_vec[j] : scale;
    return (to_float(lr[j]) - b) * sc;
  };
  if constexpr (KIND == 0) {
    float m = -INFINITY;
    for (int j = lane; j < labels; j += 32) m = fmaxf(m, value(j));
    m = warp_max(m);
    float sum = 0.f;
    for (int j = lane; j < labels; j += 32) sum += expf(value(j) - m);
    sum = warp_sum(sum);
    for (int j = lane; j < labels; j += 32) {
      orow[j] = expf(value(j) - m) / sum;
    }
  } else {
    for (int j = lane; j < labels; j += 32) {
      const float x = value(j);
      orow[j] = KIND == 1 ? 1.f / (1.f + expf(-x)) : x;
    }
  }
}

template <typename T, int KIND>
void launch_typed(uintptr_t logits, int64_t row_stride, int64_t batch, int64_t labels,
                  float bias, float scale, uintptr_t bias_vec, uintptr_t scale_vec,
                  uintptr_t out, cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>(ceil_div(batch, kWarpsPerBlock));
  activation_kernel<T, KIND><<<blocks, 32 * kWarpsPerBlock, 0, stream>>>(
      reinterpret_cast<const T*>(logits), row_stride, reinterpret_cast<float*>(out), batch,
      static_cast<int>(labels), bias, scale, reinterpret_cast<const float*>(bias_vec),
      reinterpret_cast<const float*>(scale_vec));
  check_launch("activation", "activation kernel");
}

}  // namespace

void launch_activation(int dtype, uintptr_t logits, int64_t row_stride, int64_t batch,
                       int64_t labels, int kind, double bias, double scale, uintptr_t bias_vec,
                       uintptr_t scale_vec, uintptr_t out, int device, uintptr_t stream) {
  const char* op = "activation";
  if (kind < 0 || kind > 2) throw_bad_arg(op, "activation code must be 0, 1 or 2");
  if (labels > 0x7fffffff) throw_bad_arg(op, "too many labels");
  if (ceil_div(batch, kWarpsPerBlock) > 0x7fffffff) throw_bad_arg(op, "too many rows");
  if (batch == 0 || labels == 0) return;
  DeviceGuard guard(op, device);
  auto s = reinterpret_cast<cudaStream_t>(stream);
  const float fb = static_cast<float>(bias), fs = static_cast<float>(scale);
  PYE_DISPATCH_DTYPE(op, dtype, {
    switch (kind) {
      case 0: launch_typed<scalar_t, 0>(logits, row_stride, batch, labels, fb, fs, bias_vec,
                                        scale_vec, out, s); break;
      case 1: launch_typed<scalar_t, 1>(logits, row_stride, batch, labels, fb, fs, bias_vec,
                                        scale_vec, out, s); break;
      default: launch_typed<scalar_t, 2>(logits, row_stride, batch, labels, fb, fs, bias_vec,
                                         scale_vec, out, s);
    }
  });
}

}  // namespace pyengine
