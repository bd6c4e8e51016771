// Rotary embedding on packed positions, in place on q and k; one block per token.
//
// Semantics (pyengine/ops.py rotary): cos_sin (max_pos, R) fp32, cos in columns [0, R/2),
// sin in [R/2, R); only the first R <= D columns of each head rotate. For pair i < R/2:
//   neox:        (x[i], x[i + R/2])     -> (x1*cos - x2*sin, x2*cos + x1*sin)
//   interleaved: (x[2i], x[2i + 1])     -> same
// computed in fp32 and rounded to the tensor's dtype. q and k may be strided views of one
// fused qkv buffer: any token and head stride, last dim contiguous.
#include "common.cuh"
#include "ops.h"

namespace pyengine {
namespace {

// Each thread rotates V consecutive pairs of one head at a time.
template <typename T, int V, bool NEOX>
__global__ void rotary_kernel(T* __restrict__ q, int64_t q_tok_stride, int64_t q_head_stride,
                              int q_heads, T* __restrict__ k, int64_t k_tok_stride,
                              int64_t k_head_stride, int k_heads,
                              const int64_t* __restrict__ positions,
                              const float* __restrict__ cos_sin, int rot_dim) {
  const int64_t t = blockIdx.x;
  const int half = rot_dim / 2;
  const float* cs = cos_sin + positions[t] * static_cast<int64_t>(rot_dim);
  const int units = half / V;  // per head
  const int total = (q_heads + k_heads) * units;
  for (int u = threadIdx.x; u < total; u += blockDim.x) {
    const int h = u / units;
    const int i = (u - h * units) * V;  // first pair
    T* base = h < q_heads ? q + t * q_tok_stride + h * q_head_stride
                          : k + t * k_tok_stride + (h - q_heads) * k_head_stride;
    Pack<float, V> c, s;
    c.load(cs + i);
    s.load(cs + half + i);
    if constexpr (NEOX) {
      Pack<T, V> a, b;
      a.load(base + i);
      b.load(base + half + i);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const float x1 = to_float(a.v[j]), x2 = to_float(b.v[j]);
        a.v[j] = from_float<T>(x1 * c.v[j] - x2 * s.v[j]);
        b.v[j] = from_float<T>(x2 * c.v[j] + x1 * s.v[j]);
      }
      a.store(base + i);
      b.store(base + half + i);
    } else if constexpr (V == 1) {
      // Scalar path: no alignment assumed beyond the element's own.
      const float x1 = to_float(base[2 * i]), x2 = to_float(base[2 * i + 1]);
      base[2 * i] = from_float<T>(x1 * c.v[0] - x2 * s.v[0]);
      base[2 * i + 1] = from_float<T>(x2 * c.v[0] + x1 * s.v[0]);
    } else {
      Pack<T, 2 * V> a;
      a.load(base + 2 * i);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const float x1 = to_float(a.v[2 * j]), x2 = to_float(a.v[2 * j + 1]);
        a.v[2 * j] = from_float<T>(x1 * c.v[j] - x2 * s.v[j]);
        a.v[2 * j + 1] = from_float<T>(x2 * c.v[j] + x1 * s.v[j]);
      }
      a.store(base + 2 * i);
    }
  }
}

template <typename T, int V, bool NEOX>
void launch_typed(uintptr_t q, int64_t q_tok_stride, int64_t q_head_stride, int64_t q_heads,
                  uintptr_t k, int64_t k_tok_stride, int64_t k_head_stride, int64_t k_heads,
                  uintptr_t positions, uintptr_t cos_sin, int64_t tokens, int64_t rot_dim,
                  cudaStream_t stream) {
  const int64_t total = (q_heads + k_heads) * (rot_dim / 2 / V);
  const int threads = static_cast<int>(std::min<int64_t>(256, std::max(32, round_up32(total))));
  rotary_kernel<T, V, NEOX><<<static_cast<unsigned>(tokens), threads, 0, stream>>>(
      reinterpret_cast<T*>(q), q_tok_stride, q_head_stride, static_cast<int>(q_heads),
      reinterpret_cast<T*>(k), k_tok_stride, k_head_stride, static_cast<int>(k_heads),
      reinterpret_cast<const int64_t*>(positions), reinterpret_cast<const float*>(cos_sin),
      static_cast<int>(rot_dim));
  check_launch("rotary", NEOX ? "rotary kernel (neox)" : "rotary kernel (interleaved)");
}

// Vector width: neox moves 16 bytes of q/k per half (V = 16/sizeof(T) pairs); interleaved
// moves 16 bytes of pairs (V = 8/sizeof(T)). Falls back to one pair per thread.
template <typename T, bool NEOX>
void launch_vec(uintptr_t q, int64_t q_tok_stride, int64_t q_head_stride, int64_t q_heads,
                uintptr_t k, int64_t k_tok_stride, int64_t k_head_stride, int64_t k_heads,
                uintptr_t positions, uintptr_t cos_sin, int64_t tokens, int64_t rot_dim,
                cudaStream_t stream) {
  constexpr int V = NEOX ? 16 / sizeof(T) : 8 / sizeof(T);
  constexpr int AX = NEOX ? pack_align<T, V>() : pack_align<T, 2 * V>();
  constexpr int AC = pack_align<float, V>();
  const int64_t half = rot_dim / 2;
  const int64_t es = sizeof(T);
  auto ok_x = [&](uintptr_t p, int64_t ts, int64_t hs) {
    return aligned(p, AX) && (ts * es) % AX == 0 && (hs * es) % AX == 0;
  };
  bool vec = half % V == 0 && ok_x(q, q_tok_stride, q_head_stride) &&
             ok_x(k, k_tok_stride, k_head_stride) && aligned(cos_sin, AC) &&
             (rot_dim * 4) % AC == 0 && (half * 4) % AC == 0;
  if (NEOX) vec = vec && (half * es) % AX == 0;
  if (vec) {
    launch_typed<T, V, NEOX>(q, q_tok_stride, q_head_stride, q_heads, k, k_tok_stride,
                             k_head_stride, k_heads, positions, cos_sin, tokens, rot_dim, stream);
  } else {
    launch_typed<T, 1, NEOX>(q, q_tok_stride, q_head_stride, q_heads, k, k_tok_stride,
                             k_head_stride, k_heads, positions, cos_sin, tokens, rot_dim, stream);
  }
}

}  // namespace

void launch_rotary(int dtype, uintptr_t q, int64_t q_tok_stride, int64_t q_head_stride,
                   int64_t q_heads, uintptr_t k, int64_t k_tok_stride, int64_t k_head_stride,
                   int64_t k_heads, uintptr_t positions, uintptr_t cos_sin, int64_t tokens,
                   int64_t rot_dim, bool neox, int device, uintptr_t stream) {
  const char* op = "rotary";
  if (rot_dim <= 0 || rot_dim % 2 != 0) throw_bad_arg(op, "rotary width must be even and > 0");
  if (tokens > 0x7fffffff) throw_bad_arg(op, "more than 2^31-1 tokens");
  if ((q_heads + k_heads) * (rot_dim / 2) > 0x7fffffff) throw_bad_arg(op, "too many heads");
  if (tokens == 0 || q_heads + k_heads == 0) return;
  DeviceGuard guard(op, device);
  auto s = reinterpret_cast<cudaStream_t>(stream);
  PYE_DISPATCH_DTYPE(op, dtype, {
    if (neox) {
      launch_vec<scalar_t, true>(q, q_tok_stride, q_head_stride, q_heads, k, k_tok_stride,
                                 k_head_stride, k_heads, positions, cos_sin, tokens, rot_dim, s);
    } else {
      launch_vec<scalar_t, false>(q, q_tok_stride, q_head_stride, q_heads, k, k_tok_stride,
                                  k_head_stride, k_heads, positions, cos_sin, tokens, rot_dim, s);
    }
  });
}

}  // namespace pyengine
