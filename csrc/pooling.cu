// Pooled rows over a ragged batch: one output row per sequence b = rows [cu[b], cu[b+1]).
//
// gather_pooled (pyengine/ops.py gather_pooled):
//   cls: hidden[cu[b]]   last: hidden[cu[b+1] - 1]   mean: fp32 sum / length
//   out in hidden's dtype (or fp32, for pooled_norm without a norm).
//   Grid (B, column blocks); block (TX, TY): TX threads across VEC-wide column packs,
//   TY threads down the rows of a sequence (mean only), each with kMeanUnroll rows' loads
//   in flight per step, reduced through shared memory in a fixed order (deterministic).
//
// pooled_norm (pyengine/ops.py pooled_norm): s = hidden (+ residual, rounded to hidden's
//   dtype); each pooled token's row goes through LayerNorm / RMSNorm (weight + offset) in
//   fp32; mean averages the normed rows; fp32 out, nothing rounded back.
//   mean (vectorisable rows, H <= 32 * VEC * 16, or * 8 with a residual):
//     pooled_norm_mean_kernel, one warp per row, statistics by warp shuffles only, no block
//     barrier until the epilogue.
//   cls / last (vectorisable rows, the same bounds): pooled_norm_row_kernel, one warp per
//     sequence, statistics by warp shuffles.
//   Rows neither warp kernel can hold: pooled_norm_kernel, one block per sequence; the
//     current row lives in shared memory as fp32, the running sum too.
//   A config (ops.h PooledNormConfig) may swap the warp kernel for the sliced variant in
//     pooled_norm_slices.cu, on the same inputs, or run it with its rows staged in shared
//     memory (variant 3, up to 4 packs a lane).
#include <type_traits>

#include "pooling_internal.cuh"

namespace pyengine {
namespace {

// gather_pooled mean: TY rows of threads, each keeping kMeanUnroll independent 16-byte loads
// in flight per step, so a (128 x 4)-thread block has 16 rows (32 KB of bf16 at H=1024) in
// flight. More rows per block (rather than more blocks) also shortens the tail that the
// longest sequences' blocks leave at the end of a ragged batch.
constexpr int kMeanRows = 4;
constexpr int kMeanUnroll = 4;

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
    Pack<O, VEC> o;
    if (end == start) {  // no such row: NaN, as mean's 0 / 0 (and no load out of bounds)
#pragma unroll
      for (int j = 0; j < VEC; ++j) o.v[j] = from_float<O>(std::numeric_limits<float>::quiet_NaN());
      o.store(orow + col);
      return;
    }
    const int64_t row = POOL == 0 ? start : end - 1;
    Pack<T, VEC> v;
    v.load(hidden + row * row_stride + col);
#pragma unroll
    for (int j = 0; j < VEC; ++j) o.v[j] = from_float<O>(to_float(v.v[j]));
    o.store(orow + col);
  } else {
    float acc[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) acc[j] = 0.f;
    if (active) {
      const int64_t ny = blockDim.y;
      // All kMeanUnroll loads are issued before any is summed; rows past the end are
      // skipped (not added as zeros), and the order of the sums is fixed, so the result
      // is bitwise reproducible.
      for (int64_t r = start + threadIdx.y; r < end; r += kMeanUnroll * ny) {
        Pack<T, VEC> v[kMeanUnroll];
#pragma unroll
        for (int u = 0; u < kMeanUnroll; ++u) {
          if (r + u * ny < end) v[u].load(hidden + (r + u * ny) * row_stride + col);
        }
#pragma unroll
        for (int u = 0; u < kMeanUnroll; ++u) {
          if (r + u * ny < end) {
#pragma unroll
            for (int j = 0; j < VEC; ++j) acc[j] += to_float(v[u].v[j]);
          }
        }
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
  if (ceil_div(packs, tx) > 65535) {  // grid.y's limit: one block per tx packs of a row
    throw_bad_arg(op, "hidden_size " + std::to_string(hidden_size) + " is too wide for the gather kernel (at most " +
                          std::to_string(65535LL * tx * VEC) + " here)");
  }
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
  __shared__ float scratch[kBlockSumScratchBytes / sizeof(float)];
  const int H = hidden_size;
  const int nvec = H / VEC;
  float* srow = smem;
  float* acc = smem + H;
  const int b = blockIdx.x;
  const int64_t start = cu_seqlens[b], end = cu_seqlens[b + 1];
  const int64_t r0 = pooling == 1 ? end - 1 : start;
  // cls / last of an empty sequence: no row, so the 0 / 0 below gives NaN, as under mean
  const int64_t r1 = pooling == 2 ? end : (end > start ? r0 + 1 : r0);
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
  // cls / last divide by 1 (exact); an empty sequence gives NaN, as the reference.
  const float len = static_cast<float>(r1 - r0);
  float* orow = out + static_cast<int64_t>(b) * H;
  for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
    Pack<float, VEC> o;
#pragma unroll
    for (int j = 0; j < VEC; ++j) o.v[j] = acc[j * nvec + i] / len;
    o.store(orow + i * VEC);
  }
}

// Mean pooling through the norm, one warp per row: blockDim (32, kPnWarps), one block per
// sequence; warp w takes rows start + w, start + w + kPnWarps, ... Lane l holds the packs
// (p * 32 + l), p < PACKS, of its row in registers (packs past H are masked), so the row's
// mean / variance / mean square are warp shuffles and the block never synchronises inside
// the row loop. Each warp keeps its own fp32 running sum of
//   z = (s - mean) * rstd   (layer)      z = s * rstd   (rms)      z = s   (none)
// and the affine part is applied once per column after averaging, since it is the same for
// every row: mean_t(z_t * w + b) = mean_t(z_t) * w + b, and likewise (w + offset) for rms.
// That keeps the weight and bias out of the per-row loop and out of the registers.
//
// hidden: (T, H) rows of h_stride elements, 16-byte aligned; residual: the same or null;
// weight, bias: (H,) in W, bias may be null; out: (B, H) fp32. H % VEC == 0 and
// H <= 32 * VEC * PACKS (checked by the launcher).
constexpr int kPnWarps = 8;

// A lane's packs (p * 32 + lane), p < PACKS, of one row starting at `row`; masked packs
// (ok[p] false: past H) hold zeros, so they drop out of plain sums.
template <typename T, int VEC, int PACKS>
__device__ __forceinline__ void load_row_packs(Pack<T, VEC> (&dst)[PACKS], const T* row, const bool (&ok)[PACKS],
                                               int lane) {
#pragma unroll
  for (int p = 0; p < PACKS; ++p) {
    if (ok[p]) {
      dst[p].load(row + p * 32 * VEC + lane * VEC);
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) dst[p].v[j] = from_float<T>(0.f);
    }
  }
}

// A warp's statistics of the row its lanes hold (load_row_packs): LayerNorm (norm_kind 1)
// the mean and 1 / sqrt(var + eps) of the two-pass variance of (s - mean), as the
// reference; RMSNorm (2) mean 0 and 1 / sqrt(mean square + eps); none (0) 0 and 1. Every
// pass re-reads the packed row (a 16-bit to fp32 conversion is one instruction) instead of
// keeping an fp32 copy, which would cost as many registers as a caller's running sums.
template <typename T, int VEC, int PACKS>
__device__ __forceinline__ void warp_row_stats(const Pack<T, VEC> (&x)[PACKS], const bool (&ok)[PACKS],
                                               int norm_kind, float inv_h, float eps, float& mean,
                                               float& rstd) {
  mean = 0.f;
  rstd = 1.f;
  if (norm_kind == 0) return;
  float part = 0.f;
#pragma unroll
  for (int p = 0; p < PACKS; ++p) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float f = to_float(x[p].v[j]);
      part += norm_kind == 2 ? f * f : f;
    }
  }
  if (norm_kind == 2) {
    rstd = rsqrtf(warp_sum(part) * inv_h + eps);
    return;
  }
  mean = warp_sum(part) * inv_h;
  float sq = 0.f;
#pragma unroll
  for (int p = 0; p < PACKS; ++p) {
    if (!ok[p]) continue;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float d = to_float(x[p].v[j]) - mean;
      sq += d * d;
    }
  }
  rstd = rsqrtf(warp_sum(sq) * inv_h + eps);
}

// MODE (pyengine.cuda_ops' pooled_norm config variants): 0 the default; 1 early_affine
// (below); 2 async: rows come through shared memory by cp.async, `ahead` (1, 2 or 4) rows
// per warp in flight beside the one being normed, instead of one row prefetched into
// registers. Measured on the H200 (2026-11-27), the default kernel reached 83% of a copy
// with 16 warps per SM (two blocks of 106 registers) and one 2 KB row in flight per warp:
// 32 KB per SM, about what the DRAM latency needs at that bandwidth and no more. Staged in
// shared memory the rows in flight cost no registers. Each lane copies and later reads back
// only its own packs, so the stages need no barrier: cp.async.wait_group is per thread.
// Modes 1 and 2 apply up to 4 packs (H <= 1024 at 16 bits); the launcher runs mode 0 above.
template <typename T, typename W, int VEC, int PACKS, bool RES, int MODE = 0>
__global__ void __launch_bounds__(32 * kPnWarps)
pooled_norm_mean_kernel(const T* __restrict__ hidden, int64_t h_stride,
                        const T* __restrict__ residual, int64_t r_stride,
                        const int* __restrict__ cu_seqlens, int norm_kind,
                        const W* __restrict__ weight, const W* __restrict__ bias, float eps,
                        float offset, float* __restrict__ out, int hidden_size, int ahead) {
  constexpr bool kAsync = MODE == 2 && PACKS <= 4;
  // Up to 64 bytes of the next row per lane are loaded before the current one is reduced,
  // so a warp's loads stay in flight during its shuffles. Larger rows (and residual rows,
  // which double the bytes) already give each warp enough loads in flight, and double
  // buffering them would cost registers the running sums need.
  constexpr bool kPrefetch = !kAsync && !RES && PACKS * VEC * sizeof(T) <= 64;
  constexpr int kChunk = 32 * VEC;  // columns covered by one pack index p across the warp
  static_assert(kChunk <= 32 * kPnWarps, "the epilogue gives each thread at most one column per chunk");
  __shared__ float red[kPnWarps][kChunk];

  const int lane = threadIdx.x, warp = threadIdx.y;
  const int H = hidden_size;
  const int b = blockIdx.x;
  // EARLY: the columns this thread finishes in the epilogue (p * kChunk + tid), their weight
  // and bias loaded before anything else, so the round trip overlaps the row loop. Up to 4
  // packs (H <= 1024 at 16 bits): past that the registers are the running sums' (ptxas
  // spilled 240 bytes at 16 packs), and a longer row loop hides the epilogue anyway.
  constexpr bool kEarly = MODE != 0 && PACKS <= 4;
  float w_early[kEarly ? PACKS : 1], b_early[kEarly ? PACKS : 1];
  if constexpr (kEarly) {
    const int tid = warp * 32 + lane;
#pragma unroll
    for (int p = 0; p < PACKS; ++p) {
      const int c = p * kChunk + tid;
      const bool mine = tid < kChunk && c < H;
      w_early[p] = mine && norm_kind != 0 ? to_float(weight[c]) : 0.f;
      b_early[p] = mine && norm_kind == 1 && bias != nullptr ? to_float(bias[c]) : 0.f;
    }
  }
  const int64_t start = cu_seqlens[b], end = cu_seqlens[b + 1];
  const float inv_h = 1.f / static_cast<float>(H);

  bool ok[PACKS];
#pragma unroll
  for (int p = 0; p < PACKS; ++p) ok[p] = p * kChunk + lane * VEC < H;

  float acc[PACKS][VEC];
#pragma unroll
  for (int p = 0; p < PACKS; ++p) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) acc[p][j] = 0.f;
  }

  Pack<T, VEC> x[PACKS], xn[PACKS];
  Pack<T, VEC> rs[RES ? PACKS : 1];
  // Masked packs load as zeros.
  auto load = [&](Pack<T, VEC>* dst, int64_t r) {
#pragma unroll
    for (int p = 0; p < PACKS; ++p) {
      if (ok[p]) {
        dst[p].load(hidden + r * h_stride + p * kChunk + lane * VEC);
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) dst[p].v[j] = from_float<T>(0.f);
      }
    }
    if constexpr (RES) {
#pragma unroll
      for (int p = 0; p < PACKS; ++p) {
        if (ok[p]) rs[p].load(residual + r * r_stride + p * kChunk + lane * VEC);
      }
    }
  };

  // kAsync: stage k of this lane holds packs (p, lane) of one row (and of its residual):
  // a ring of ahead + 1 stages, per warp, in dynamic shared memory.
  extern __shared__ uint4 pn_stages[];
  constexpr int kPerStage = (RES ? 2 : 1) * PACKS * 32;  // 16-byte packs per warp and stage
  uint4* my_stages = pn_stages + static_cast<int64_t>(warp) * (ahead + 1) * kPerStage + lane;
  auto stage_row = [&](int k, int64_t row) {
    // An empty group past the end keeps the wait count uniform.
    if (row < end) {
      uint4* dst = my_stages + k * kPerStage;
#pragma unroll
      for (int p = 0; p < PACKS; ++p) {
        if (!ok[p]) continue;
        cp_async16(dst + p * 32, hidden + row * h_stride + p * kChunk + lane * VEC);
        if constexpr (RES) cp_async16(dst + (PACKS + p) * 32, residual + row * r_stride + p * kChunk + lane * VEC);
      }
    }
    cp_async_commit();
  };
  int stage = 0;  // the stage of row r

  int64_t r = start + warp;
  if constexpr (kAsync) {
    for (int k = 0; k < ahead; ++k) stage_row(k, r + static_cast<int64_t>(k) * kPnWarps);
  } else {
    if (r < end) load(x, r);
  }
  for (; r < end; r += kPnWarps) {
    const int64_t rn = r + kPnWarps;
    if constexpr (kAsync) {
      // Row r + ahead steps goes into the stage this lane read in the previous step (its
      // values were used there, so that read is complete).
      stage_row(stage == 0 ? ahead : stage - 1, r + static_cast<int64_t>(ahead) * kPnWarps);
      cp_async_wait_pending(ahead);  // row r's group has landed
      const uint4* src = my_stages + stage * kPerStage;
#pragma unroll
      for (int p = 0; p < PACKS; ++p) {
        if (ok[p]) {
          *reinterpret_cast<uint4*>(x[p].v) = src[p * 32];
          if constexpr (RES) *reinterpret_cast<uint4*>(rs[p].v) = src[(PACKS + p) * 32];
        } else {
#pragma unroll
          for (int j = 0; j < VEC; ++j) x[p].v[j] = from_float<T>(0.f);
        }
      }
      stage = stage == ahead ? 0 : stage + 1;
    } else if constexpr (kPrefetch) {
      if (rn < end) load(xn, rn);
    }
    if constexpr (RES) {
      // The reference adds in hidden's dtype before the norm. Masked packs stay zero (their
      // residual pack was never loaded).
#pragma unroll
      for (int p = 0; p < PACKS; ++p) {
        if (!ok[p]) continue;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          x[p].v[j] = from_float<T>(to_float(x[p].v[j]) + to_float(rs[p].v[j]));
        }
      }
    }
    // Every pass re-reads the row from its packed form (a 16-bit to fp32 conversion is one
    // instruction) instead of keeping an fp32 copy, which would cost as many registers as
    // the running sums. Masked packs hold zeros, so they drop out of the plain sums.
    // (warp_row_stats computes the same statistics; written out here, this kernel compiles
    // to the code that was measured: 106 registers at bf16, H = 1024, against 117.)
    float part = 0.f;
#pragma unroll
    for (int p = 0; p < PACKS; ++p) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float f = to_float(x[p].v[j]);
        part += norm_kind == 2 ? f * f : f;
      }
    }
    if (norm_kind == 1) {
      // Two passes: the variance of (s - mean), as the reference.
      const float mean = warp_sum(part) * inv_h;
      float sq = 0.f;
#pragma unroll
      for (int p = 0; p < PACKS; ++p) {
        if (!ok[p]) continue;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float d = to_float(x[p].v[j]) - mean;
          sq += d * d;
        }
      }
      const float rstd = rsqrtf(warp_sum(sq) * inv_h + eps);
#pragma unroll
      for (int p = 0; p < PACKS; ++p) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) acc[p][j] += (to_float(x[p].v[j]) - mean) * rstd;
      }
    } else if (norm_kind == 2) {
      const float rstd = rsqrtf(warp_sum(part) * inv_h + eps);
#pragma unroll
      for (int p = 0; p < PACKS; ++p) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) acc[p][j] += to_float(x[p].v[j]) * rstd;
      }
    } else {
#pragma unroll
      for (int p = 0; p < PACKS; ++p) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) acc[p][j] += to_float(x[p].v[j]);
      }
    }
    if constexpr (kPrefetch) {
#pragma unroll
      for (int p = 0; p < PACKS; ++p) x[p] = xn[p];
    } else if constexpr (!kAsync) {
      if (rn < end) load(x, rn);
    }
  }

  // Epilogue, one kChunk of columns at a time: the warps' sums meet in shared memory and
  // are added in warp order (deterministic); thread t finishes column p * kChunk + t, so
  // the weight / bias reads and the output stores are coalesced. An empty sequence gives
  // 0 / 0 = NaN, as the reference does.
  const float len = static_cast<float>(end - start);
  float* orow = out + static_cast<int64_t>(b) * H;
  const int tid = warp * 32 + lane;
#pragma unroll
  for (int p = 0; p < PACKS; ++p) {
    if (p * kChunk >= H) break;  // uniform across the block
    if (p > 0) __syncthreads();  // the previous chunk has been read
#pragma unroll
    for (int j = 0; j < VEC; ++j) red[warp][lane * VEC + j] = acc[p][j];
    __syncthreads();
    for (int t = tid; t < kChunk; t += 32 * kPnWarps) {
      const int c = p * kChunk + t;
      if (c >= H) break;
      float sum = 0.f;
#pragma unroll
      for (int w = 0; w < kPnWarps; ++w) sum += red[w][t];
      float y = sum / len;
      if constexpr (kEarly) {
        // this thread's column of chunk p: t == tid here (kChunk <= threads)
        if (norm_kind == 1) {
          y = y * w_early[p] + b_early[p];
        } else if (norm_kind == 2) {
          y *= w_early[p] + offset;
        }
      } else if (norm_kind == 1) {
        y *= to_float(weight[c]);
        if (bias != nullptr) y += to_float(bias[c]);
      } else if (norm_kind == 2) {
        y *= to_float(weight[c]) + offset;
      }
      orow[c] = y;
    }
  }
}

// cls / last through the norm, one warp per sequence: blockDim (32, kPnWarps), block x
// takes sequences x * kPnWarps + warp. A lane holds packs (p * 32 + l), p < PACKS, of the
// one pooled row (and of its residual), so the statistics are warp shuffles and nothing
// touches shared memory or waits at a block barrier. The block kernel, whose row goes
// through shared memory and block reductions, took 8.4 us for 2048 last rows at H = 1024
// bf16 with a residual, against Triton's 4.6 us (H200); this one took 7.5 us there before
// its residual and weight loads went out with the row's (below), and is not timed since.
// Same arithmetic as the block kernel: the residual added in hidden's dtype, two-pass
// LayerNorm, the affine part per element, fp32 out.
template <typename T, typename W, int VEC, int PACKS, bool RES>
__global__ void __launch_bounds__(32 * kPnWarps)
pooled_norm_row_kernel(const T* __restrict__ hidden, int64_t h_stride,
                       const T* __restrict__ residual, int64_t r_stride,
                       const int* __restrict__ cu_seqlens, int64_t batch, int pooling,
                       int norm_kind, const W* __restrict__ weight, const W* __restrict__ bias,
                       float eps, float offset, float* __restrict__ out, int hidden_size) {
  constexpr int kChunk = 32 * VEC;
  const int lane = threadIdx.x;
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kPnWarps + threadIdx.y;
  if (b >= batch) return;  // a whole warp: no barrier below
  const int H = hidden_size;
  const int64_t start = cu_seqlens[b], end = cu_seqlens[b + 1];
  if (start == end) {  // an empty sequence has no such row: NaN, as mean's 0 / 0
    for (int c = lane; c < H; c += 32) out[b * H + c] = std::numeric_limits<float>::quiet_NaN();
    return;
  }
  const int64_t r = pooling == 0 ? start : end - 1;
  const float inv_h = 1.f / static_cast<float>(H);
  bool ok[PACKS];
#pragma unroll
  for (int p = 0; p < PACKS; ++p) ok[p] = p * kChunk + lane * VEC < H;
  Pack<T, VEC> x[PACKS];
  load_row_packs(x, hidden + r * h_stride, ok, lane);
  // The weight and bias go out with the row's loads where they fit in registers, so their
  // round trip overlaps the row's instead of following the statistics (H <= 32 * VEC * 4;
  // not at one pack, where ptxas put them in 8 bytes of local memory with an fp32 weight).
  constexpr bool kEarly = PACKS <= 4 && PACKS > 1;
  Pack<W, VEC> we[kEarly ? PACKS : 1], be[kEarly ? PACKS : 1];
  if constexpr (kEarly) {
#pragma unroll
    for (int p = 0; p < PACKS; ++p) {
      if (!ok[p]) continue;
      if (norm_kind != 0) we[p].load(weight + p * kChunk + lane * VEC);
      if (norm_kind == 1 && bias != nullptr) be[p].load(bias + p * kChunk + lane * VEC);
    }
  }
  if constexpr (RES) {
    // All of the residual's packs in flight together, as the row's: loaded and added one
    // pack at a time, they were four dependent round trips (sm_90 SASS).
    Pack<T, VEC> rs[PACKS];
    load_row_packs(rs, residual + r * r_stride, ok, lane);
#pragma unroll
    for (int p = 0; p < PACKS; ++p) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) x[p].v[j] = from_float<T>(to_float(x[p].v[j]) + to_float(rs[p].v[j]));
    }
  }
  float mean, rstd;
  warp_row_stats(x, ok, norm_kind, inv_h, eps, mean, rstd);
  float* orow = out + b * H;
#pragma unroll
  for (int p = 0; p < PACKS; ++p) {
    if (!ok[p]) continue;
    const int c = p * kChunk + lane * VEC;
    Pack<W, VEC> w, bb;
    if constexpr (kEarly) {
      w = we[p];
      bb = be[p];
    } else {
      if (norm_kind != 0) w.load(weight + c);
      if (norm_kind == 1 && bias != nullptr) bb.load(bias + c);
    }
    Pack<float, VEC> o;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float f = to_float(x[p].v[j]);
      float y = f;
      if (norm_kind == 1) {
        y = (f - mean) * rstd * to_float(w.v[j]);
        if (bias != nullptr) y += to_float(bb.v[j]);
      } else if (norm_kind == 2) {
        y = (f * rstd) * (to_float(w.v[j]) + offset);
      }
      o.v[j] = y;
    }
    o.store(orow + c);
  }
}

template <typename T, typename W, int VEC, int PACKS>
void launch_pooled_norm_rows(uintptr_t hidden, int64_t h_stride, uintptr_t residual,
                             int64_t r_stride, uintptr_t cu_seqlens, int64_t batch, int pooling,
                             int norm_kind, uintptr_t weight, uintptr_t bias, float eps,
                             float offset, uintptr_t out, int64_t hidden_size, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(batch, kPnWarps))), block(32, kPnWarps);
  auto args = [&](auto kernel) {
    kernel<<<grid, block, 0, stream>>>(
        reinterpret_cast<const T*>(hidden), h_stride, reinterpret_cast<const T*>(residual),
        r_stride, reinterpret_cast<const int*>(cu_seqlens), batch, pooling, norm_kind,
        reinterpret_cast<const W*>(weight), reinterpret_cast<const W*>(bias), eps, offset,
        reinterpret_cast<float*>(out), static_cast<int>(hidden_size));
  };
  if (residual != 0) {
    if constexpr (PACKS <= kMaxPacksRes) args(pooled_norm_row_kernel<T, W, VEC, PACKS, true>);
  } else {
    args(pooled_norm_row_kernel<T, W, VEC, PACKS, false>);
  }
  check_launch("pooled_norm", "pooled_norm row kernel");
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
  // the kernel's static scratch counts against the same 48 KiB (H = 12288 needs the opt-in)
  if (smem + kBlockSumScratchBytes > 48 * 1024) {
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

// MODE as pooled_norm_mean_kernel's, lowered to 0 past 4 packs (where it would compile
// to the default kernel anyway); ahead: rows in flight per warp for MODE 2.
template <typename T, typename W, int VEC, int PACKS, int MODE = 0>
void launch_pooled_norm_mean(uintptr_t hidden, int64_t h_stride, uintptr_t residual,
                             int64_t r_stride, uintptr_t cu_seqlens, int64_t batch, int norm_kind,
                             uintptr_t weight, uintptr_t bias, float eps, float offset,
                             uintptr_t out, int64_t hidden_size, int device, cudaStream_t stream,
                             int ahead) {
  const char* op = "pooled_norm";
  constexpr int kMode = PACKS <= 4 ? MODE : 0;
  const dim3 grid(static_cast<unsigned>(batch)), block(32, kPnWarps);
  const int stages_ahead = kMode == 2 ? ahead : 0;
  const size_t smem = kMode == 2 ? static_cast<size_t>(kPnWarps) * (ahead + 1) * (residual != 0 ? 2 : 1) *
                                       PACKS * 32 * sizeof(uint4)
                                 : 0;
  // the kernel's static shared memory (its epilogue's red) counts against the same limit
  const size_t total = smem + sizeof(float) * kPnWarps * 32 * VEC;
  auto args = [&](auto kernel) {
    if (smem > 0 && total > 48 * 1024) {
      int optin = 0;
      PYE_CUDA_CHECK(op, cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
      if (total > static_cast<size_t>(optin)) {
        throw_bad_arg(op, "config variant 'async' with rows_per_warp=" + std::to_string(ahead) + " needs " +
                              std::to_string(total) + " bytes of shared memory per block; this GPU allows " +
                              std::to_string(optin) + ": use fewer rows_per_warp");
      }
      PYE_CUDA_CHECK(op, cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                              static_cast<int>(smem)));
    }
    kernel<<<grid, block, smem, stream>>>(
        reinterpret_cast<const T*>(hidden), h_stride, reinterpret_cast<const T*>(residual),
        r_stride, reinterpret_cast<const int*>(cu_seqlens), norm_kind,
        reinterpret_cast<const W*>(weight), reinterpret_cast<const W*>(bias), eps, offset,
        reinterpret_cast<float*>(out), static_cast<int>(hidden_size), stages_ahead);
  };
  if (residual != 0) {
    if constexpr (PACKS <= kMaxPacksRes) args(pooled_norm_mean_kernel<T, W, VEC, PACKS, true, kMode>);
  } else {
    args(pooled_norm_mean_kernel<T, W, VEC, PACKS, false, kMode>);
  }
  check_launch(op, "pooled_norm mean kernel");
}

template <typename X>
constexpr int dtype_code_of() {
  if constexpr (std::is_same<X, __half>::value) return kFloat16;
  else if constexpr (std::is_same<X, __nv_bfloat16>::value) return kBFloat16;
  else return kFloat32;
}

// f(std::integral_constant<int, P>{}) for the smallest compiled pack count P (1, 2, 4, 8,
// kMaxPacks) that holds `packs`: the warp kernels' one instantiation ladder.
template <typename F>
void with_packs(int64_t packs, F&& f) {
  if (packs <= 1) f(std::integral_constant<int, 1>{});
  else if (packs <= 2) f(std::integral_constant<int, 2>{});
  else if (packs <= 4) f(std::integral_constant<int, 4>{});
  else if (packs <= 8) f(std::integral_constant<int, 8>{});
  else f(std::integral_constant<int, kMaxPacks>{});
}

template <typename T, typename W>
void launch_pooled_norm_vec(uintptr_t hidden, int64_t h_stride, uintptr_t residual,
                            int64_t r_stride, uintptr_t cu_seqlens, int64_t batch, int pooling,
                            int norm_kind, uintptr_t weight, uintptr_t bias, float eps,
                            float offset, uintptr_t out, int64_t hidden_size, int device,
                            cudaStream_t stream, const PooledNormConfig& cfg) {
  constexpr int V = 16 / sizeof(T);
  constexpr int AT = pack_align<T, V>();
  constexpr int AW = pack_align<W, V>();
  constexpr int AO = pack_align<float, V>();
  bool vec = hidden_size % V == 0 && aligned(hidden, AT) && (h_stride * sizeof(T)) % AT == 0 &&
             aligned(out, AO) && (weight == 0 || aligned(weight, AW)) &&
             (bias == 0 || aligned(bias, AW));
  if (residual != 0) vec = vec && aligned(residual, AT) && (r_stride * sizeof(T)) % AT == 0;
  const int64_t packs = ceil_div(hidden_size, 32 * V);  // per lane, for the mean kernel
  const int64_t max_packs = residual != 0 ? kMaxPacksRes : kMaxPacks;
  if (vec && pooling == 2 && packs <= max_packs && cfg.variant == 1) {
    PnSliceArgs a{};
    a.hidden = hidden; a.residual = residual; a.cu_seqlens = cu_seqlens;
    a.weight = weight; a.bias = bias; a.out = out;
    a.h_stride = h_stride; a.r_stride = r_stride; a.batch = batch; a.hidden_size = hidden_size;
    a.dtype = dtype_code_of<T>(); a.norm_kind = norm_kind; a.wcode = dtype_code_of<W>();
    a.device = device;
    a.eps = eps; a.offset = offset; a.stream = stream;
    launch_pooled_norm_slices(a, cfg, packs);
  } else if (vec && pooling == 2 && packs <= max_packs) {
    with_packs(packs, [&](auto P) {
      constexpr int kP = decltype(P)::value;
      auto go = [&](auto mode) {
        launch_pooled_norm_mean<T, W, V, kP, decltype(mode)::value>(
            hidden, h_stride, residual, r_stride, cu_seqlens, batch, norm_kind, weight, bias, eps, offset, out,
            hidden_size, device, stream, cfg.rows_per_warp);
      };
      if (cfg.variant == 2) go(std::integral_constant<int, 1>{});
      else if (cfg.variant == 3) go(std::integral_constant<int, 2>{});
      else go(std::integral_constant<int, 0>{});
    });
  } else if (vec && pooling != 2 && packs <= max_packs) {
    with_packs(packs, [&](auto P) {
      launch_pooled_norm_rows<T, W, V, decltype(P)::value>(hidden, h_stride, residual, r_stride, cu_seqlens,
                                                batch, pooling, norm_kind, weight, bias, eps,
                                                offset, out, hidden_size, stream);
    });
  } else if (vec) {
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
                        uintptr_t stream, const PooledNormConfig& config) {
  const char* op = "pooled_norm";
  if (pooling < 0 || pooling > 2) throw_bad_arg(op, "pooling code must be 0, 1 or 2");
  if (norm_kind < 0 || norm_kind > 2) throw_bad_arg(op, "norm code must be 0, 1 or 2");
  if (norm_kind != 0 && weight == 0) throw_bad_arg(op, "a norm needs its weight");
  if (hidden_size <= 0 || hidden_size > 0x7fffffff) throw_bad_arg(op, "bad hidden size");
  if (batch > 0x7fffffff) throw_bad_arg(op, "more than 2^31-1 sequences");
  if (config.variant < 0 || config.variant > 3) {
    throw_bad_arg(op, "config variant must be 0 (default), 1 (sliced), 2 (early affine) or 3 (async), got " +
                          std::to_string(config.variant));
  }
  // rows_per_warp: the sliced variant's rows per warp, the async variant's rows ahead
  if ((config.variant == 1 || config.variant == 3) && config.rows_per_warp != 1 && config.rows_per_warp != 2 &&
      config.rows_per_warp != 4) {
    throw_bad_arg(op, "config rows_per_warp must be 1, 2 or 4, got " + std::to_string(config.rows_per_warp));
  }
  if (config.variant == 1) {
    if (config.slice_rows < 0) throw_bad_arg(op, "config slice_rows must be >= 0");
    if (config.warps < 1 || config.warps > kSlMaxWarps) {
      throw_bad_arg(op, "config warps must be in [1, " + std::to_string(kSlMaxWarps) + "], got " +
                            std::to_string(config.warps));
    }
    if (config.blocks_per_sm < 0 || config.blocks_per_sm > 64) {
      throw_bad_arg(op, "config blocks_per_sm must be in [0, 64]");
    }
    // T bounds the slices; left unset (-1), the kernel would take every sequence for a
    // partial one and write through the absent workspace
    if (config.tokens < 0) throw_bad_arg(op, "variant 'slices' needs tokens = T, the packed rows of hidden (>= 0)");
  }
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
                               norm_kind, weight, bias, feps, foff, out, hidden_size, device,   \
                               s, config)
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
