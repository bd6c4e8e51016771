// pooled_norm mean, sliced: config variant 1 of launch_pooled_norm (ops.h
// PooledNormConfig), a candidate, not the default, in place of pooling.cu's warp-per-row
// pooled_norm_mean_kernel on the same inputs.
//   pooled_norm_slices_kernel: blockDim (32, warps), a block per slice of at most S rows of
//     one sequence, U rows' loads in flight per warp; it finishes a sequence of at most S
//     rows, and writes a longer one's slice column sums (fp32) to the workspace.
//   pooled_norm_slices_finish_kernel: a block per sequence, adding a longer sequence's
//     slice sums in slice order.
//
// What it changes against pooled_norm_mean_kernel, which gives each sequence one block of
// 8 warps, each warp walking its rows one at a time with one row prefetched:
// - A 512-row sequence there is a chain of 64 dependent row loads per warp inside one
//   block; one that starts in the last wave of a ragged batch runs on nearly alone at the
//   end. Here a block takes a slice of at most S rows of one sequence, so every block's
//   chain is bounded and the long sequences are spread over many SMs.
// - Each warp here has U rows' loads in flight at once (independent loads, and U
//   independent shuffle reductions), not one.
// - At 106 registers (bf16, H = 1024) two of those blocks fit an SM: 16 rows, 32 KB in
//   flight per SM, about what the memory latency needs with no slack, and less whenever
//   a short sequence's block leaves warps idle at its epilogue barrier. Here, at U = 2,
//   two blocks of 8 warps fit in 128 registers: 32 rows, 64 KB in flight per SM.
//
// Slices start at the sequence's first row and every S rows after it. Block j < n_anchor
// takes the slice that holds row j * S (its sequence found by a warp-wide search of
// cu_seqlens); block n_anchor + b takes sequence b's last slice when that slice holds no
// multiple of S (only a last slice can be shorter than S, so no other slice lacks an
// anchor), and an empty sequence. Every slice gets exactly one block. A sequence of at
// most S rows is finished by its block; a longer one leaves each slice's fp32 column sums
// in partial[block], and pooled_norm_slices_finish_kernel adds them in slice order. Every
// sum runs in an order fixed by the sequence's length alone (rows within a warp, warps,
// slices), so a result is bitwise reproducible and independent of its batch-mates.
// Without splitting (S >= T: n_anchor = 0) each sequence is one slice of its tail block.
#include "pooling_internal.cuh"

namespace pyengine {
namespace {

// A column's weight / bias element as fp32; code: float32 or the input's dtype.
__device__ __forceinline__ float load_param(const void* p, int code, int c) {
  if (code == kFloat16) return to_float(static_cast<const __half*>(p)[c]);
  if (code == kBFloat16) return to_float(static_cast<const __nv_bfloat16*>(p)[c]);
  return static_cast<const float*>(p)[c];
}

// The norm's affine part on a column's mean of normalised rows (as the warp kernel's
// epilogue: it is the same for every row, so it is applied once after averaging).
__device__ __forceinline__ float pn_affine(float y, int norm_kind, const void* weight,
                                           const void* bias, int wcode, float offset, int c) {
  if (norm_kind == 1) {
    y *= load_param(weight, wcode, c);
    if (bias != nullptr) y += load_param(bias, wcode, c);
  } else if (norm_kind == 2) {
    y *= load_param(weight, wcode, c) + offset;
  }
  return y;
}

// Largest b in [0, batch] with cu[b] <= g (cu non-decreasing, cu[0] = 0 <= g), by the
// whole warp: 32 probes a round, so three dependent loads for up to 32k sequences where a
// binary search by one thread would chain eleven or more.
__device__ __forceinline__ int64_t pn_find_seq(const int* cu, int64_t batch, int64_t g,
                                               int lane) {
  int64_t lo = 0, hi = batch;
  while (lo < hi) {
    const int64_t step = (hi - lo) / 32 + 1;  // 32 probes cover [lo, hi]
    const int64_t idx = lo + lane * step;
    // True for a prefix of the lanes (lane 0 always): the answer lies at or after the
    // last true probe and before the next one.
    const bool le = idx <= hi && cu[idx] <= g;
    int last = le ? lane : 0;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const int other = __shfl_xor_sync(0xffffffffu, last, o);
      last = other > last ? other : last;
    }
    const int64_t next_hi = lo + (last + 1) * step - 1;
    hi = next_hi < hi ? next_hi : hi;
    lo += last * step;
  }
  return lo;
}

// 32-bit words a lane holds for its packed rows in flight and its running sums. ptxas
// (sm_90) fits 64 words in 128 registers without spilling (two blocks of 256 threads an
// SM); past that, capping at 128 spills (the rows are converted to fp32 once and kept),
// so those instantiations take one block's worth of registers.
template <int VEC, int PACKS, bool RES, int U>
constexpr int pn_slice_words() { return PACKS * U * (RES ? 2 : 1) * 4 + PACKS * VEC; }

// hidden / residual / cu_seqlens / out as pooled_norm_mean_kernel; weight, bias: (H,) in
// wcode's dtype (bias may be null); partial: fp32 (n_anchor + batch, H), written only for
// sequences longer than S. blockDim (32, warps <= kSlMaxWarps); any grid size (blocks
// loop over the n_anchor + batch slice slots).
template <typename T, int VEC, int PACKS, bool RES, int U>
__global__ void __launch_bounds__(32 * kSlMaxWarps,
                                  pn_slice_words<VEC, PACKS, RES, U>() <= 64 ? 2 : 1)
pooled_norm_slices_kernel(const T* __restrict__ hidden, int64_t h_stride,
                          const T* __restrict__ residual, int64_t r_stride,
                          const int* __restrict__ cu_seqlens, int64_t batch, int64_t n_anchor,
                          int64_t S, int norm_kind, const void* weight, const void* bias,
                          int wcode, float eps, float offset, float* __restrict__ out,
                          float* __restrict__ partial, int hidden_size) {
  constexpr int kChunk = 32 * VEC;
  __shared__ float red[kSlMaxWarps][kChunk];

  const int lane = threadIdx.x, warp = threadIdx.y;
  const int nw = blockDim.y;
  const int H = hidden_size;
  const float inv_h = 1.f / static_cast<float>(H);

  bool ok[PACKS];
#pragma unroll
  for (int p = 0; p < PACKS; ++p) ok[p] = p * kChunk + lane * VEC < H;

  const int64_t slots = n_anchor + batch;
  for (int64_t slot = blockIdx.x; slot < slots; slot += gridDim.x) {
    // Every warp finds the same slice, so the skips below are uniform across the block.
    int64_t b, s0, s1;
    if (slot < n_anchor) {
      const int64_t g = slot * S;
      b = pn_find_seq(cu_seqlens, batch, g, lane);
      if (b >= batch) continue;  // rows past cu_seqlens[batch]
      const int64_t start = cu_seqlens[b], end = cu_seqlens[b + 1];
      s0 = start + (g - start) / S * S;
      s1 = s0 + S < end ? s0 + S : end;
    } else {
      b = slot - n_anchor;
      const int64_t start = cu_seqlens[b], end = cu_seqlens[b + 1];
      s0 = start;
      s1 = end;
      if (end > start) {
        s0 = start + (end - start - 1) / S * S;
        const int64_t m = (s0 + S - 1) / S;  // the first multiple of S at or after s0
        if (m < n_anchor && m * S < s1) continue;  // anchor block m has this slice
      }
    }
    const int64_t start = cu_seqlens[b], end = cu_seqlens[b + 1];

    float acc[PACKS][VEC];
#pragma unroll
    for (int p = 0; p < PACKS; ++p) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) acc[p][j] = 0.f;
    }

    // Warp w takes rows s0 + (w + i * nw) * U + u, u < U: U adjacent rows a step.
    for (int64_t r = s0 + static_cast<int64_t>(warp) * U; r < s1;
         r += static_cast<int64_t>(nw) * U) {
      Pack<T, VEC> x[U][PACKS];
      Pack<T, VEC> rs[RES ? U : 1][PACKS];
      bool live[U];
      // All U rows' loads are issued before any is used. A row past the slice loads as
      // zeros (finite statistics) and is not added.
#pragma unroll
      for (int u = 0; u < U; ++u) {
        live[u] = r + u < s1;
#pragma unroll
        for (int p = 0; p < PACKS; ++p) {
          if (live[u] && ok[p]) {
            x[u][p].load(hidden + (r + u) * h_stride + p * kChunk + lane * VEC);
            if constexpr (RES) {
              rs[u][p].load(residual + (r + u) * r_stride + p * kChunk + lane * VEC);
            }
          } else {
#pragma unroll
            for (int j = 0; j < VEC; ++j) x[u][p].v[j] = from_float<T>(0.f);
          }
        }
      }
      if constexpr (RES) {
        // Added in hidden's dtype, as the reference; zero packs stay zero.
#pragma unroll
        for (int u = 0; u < U; ++u) {
#pragma unroll
          for (int p = 0; p < PACKS; ++p) {
            if (!(live[u] && ok[p])) continue;
#pragma unroll
            for (int j = 0; j < VEC; ++j) {
              x[u][p].v[j] =
                  from_float<T>(to_float(x[u][p].v[j]) + to_float(rs[u][p].v[j]));
            }
          }
        }
      }
      float part[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        part[u] = 0.f;
#pragma unroll
        for (int p = 0; p < PACKS; ++p) {
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            const float f = to_float(x[u][p].v[j]);
            part[u] += norm_kind == 2 ? f * f : f;
          }
        }
      }
      // Rows are added in ascending order; the U reductions are independent, so their
      // shuffles interleave.
      // Each row is added as (s - shift) * scale: layer (mean, rstd), rms (0, rstd), none
      // (0, 1); a zero shift and a unit scale change no bit of the sum.
      float shift[U], scale[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        shift[u] = 0.f;
        scale[u] = 1.f;
      }
      if (norm_kind == 1) {
#pragma unroll
        for (int u = 0; u < U; ++u) shift[u] = warp_sum(part[u]) * inv_h;
        // Two passes: the variance of (s - mean), as the reference.
#pragma unroll
        for (int u = 0; u < U; ++u) {
          float sq = 0.f;
#pragma unroll
          for (int p = 0; p < PACKS; ++p) {
            if (!ok[p]) continue;
#pragma unroll
            for (int j = 0; j < VEC; ++j) {
              const float d = to_float(x[u][p].v[j]) - shift[u];
              sq += d * d;
            }
          }
          part[u] = sq;
        }
      }
      if (norm_kind != 0) {
#pragma unroll
        for (int u = 0; u < U; ++u) scale[u] = rsqrtf(warp_sum(part[u]) * inv_h + eps);
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (!live[u]) continue;
#pragma unroll
        for (int p = 0; p < PACKS; ++p) {
#pragma unroll
          for (int j = 0; j < VEC; ++j) acc[p][j] += (to_float(x[u][p].v[j]) - shift[u]) * scale[u];
        }
      }
    }

    // Epilogue as the warp kernel's (warps added in order, coalesced columns), writing
    // either the finished row or this slice's column sums. An empty sequence gives
    // 0 / 0 = NaN, as the reference does.
    const bool whole = end - start <= S;
    const float len = static_cast<float>(end - start);
    const int tid = warp * 32 + lane;
#pragma unroll
    for (int p = 0; p < PACKS; ++p) {
      if (p * kChunk >= H) break;  // uniform across the block
      if (p > 0) __syncthreads();  // the previous chunk has been read
#pragma unroll
      for (int j = 0; j < VEC; ++j) red[warp][lane * VEC + j] = acc[p][j];
      __syncthreads();
      for (int t = tid; t < kChunk; t += 32 * nw) {
        const int c = p * kChunk + t;
        if (c >= H) break;
        float sum = 0.f;
        for (int w = 0; w < nw; ++w) sum += red[w][t];
        if (whole) {
          out[b * H + c] = pn_affine(sum / len, norm_kind, weight, bias, wcode, offset, c);
        } else {
          partial[slot * H + c] = sum;
        }
      }
    }
    __syncthreads();  // red is rewritten by this block's next slice
  }
}

// Finishes the sequences longer than S: sums their slices' partial rows in slice order.
// Grid (B,); any block size (a multiple of 32).
__global__ void __launch_bounds__(256)
pooled_norm_slices_finish_kernel(const float* __restrict__ partial,
                                 const int* __restrict__ cu_seqlens, int64_t n_anchor, int64_t S,
                                 int norm_kind, const void* weight, const void* bias, int wcode,
                                 float offset, float* __restrict__ out, int hidden_size) {
  // kCols columns a thread times kSlots slices a step: 16 independent loads in flight.
  constexpr int kCols = 4, kSlots = 4;
  const int64_t b = blockIdx.x;
  const int64_t start = cu_seqlens[b], end = cu_seqlens[b + 1];
  if (end - start <= S) return;  // finished by its only slice's block
  const int64_t nslices = (end - start + S - 1) / S;
  const int H = hidden_size;
  const int nt = blockDim.x;
  const float len = static_cast<float>(end - start);
  for (int c0 = threadIdx.x; c0 < H; c0 += kCols * nt) {
    float acc[kCols];
#pragma unroll
    for (int i = 0; i < kCols; ++i) acc[i] = 0.f;
    for (int64_t k0 = 0; k0 < nslices; k0 += kSlots) {
      float v[kSlots][kCols];
#pragma unroll
      for (int kk = 0; kk < kSlots; ++kk) {
        const int64_t k = k0 + kk;
        // Slice k's block, by the rule pooled_norm_slices_kernel assigns them.
        int64_t slot = -1;
        if (k < nslices) {
          const int64_t s0 = start + k * S;
          const int64_t s1 = s0 + S < end ? s0 + S : end;
          const int64_t m = (s0 + S - 1) / S;
          slot = m < n_anchor && m * S < s1 ? m : n_anchor + b;
        }
#pragma unroll
        for (int i = 0; i < kCols; ++i) {
          const int c = c0 + i * nt;
          v[kk][i] = slot >= 0 && c < H ? partial[slot * H + c] : 0.f;
        }
      }
#pragma unroll
      for (int kk = 0; kk < kSlots; ++kk) {
        if (k0 + kk >= nslices) break;
#pragma unroll
        for (int i = 0; i < kCols; ++i) acc[i] += v[kk][i];
      }
    }
#pragma unroll
    for (int i = 0; i < kCols; ++i) {
      const int c = c0 + i * nt;
      if (c < H) out[b * H + c] = pn_affine(acc[i] / len, norm_kind, weight, bias, wcode, offset, c);
    }
  }
}

// The launch: the arguments, and what launch_pn_slices_vec derives from the config.
struct PnSliceLaunch : PnSliceArgs {
  int64_t S, n_anchor, grid;
  int warps;
  uintptr_t workspace;
};

template <typename T, int VEC, int PACKS, bool RES, int U>
void launch_pn_slices_kernel(const PnSliceLaunch& a) {
  auto kernel = pooled_norm_slices_kernel<T, VEC, PACKS, RES, U>;
  kernel<<<static_cast<unsigned>(a.grid), dim3(32, a.warps), 0, a.stream>>>(
      reinterpret_cast<const T*>(a.hidden), a.h_stride, reinterpret_cast<const T*>(a.residual),
      a.r_stride, reinterpret_cast<const int*>(a.cu_seqlens), a.batch, a.n_anchor, a.S,
      a.norm_kind, reinterpret_cast<const void*>(a.weight), reinterpret_cast<const void*>(a.bias),
      a.wcode, a.eps, a.offset, reinterpret_cast<float*>(a.out),
      reinterpret_cast<float*>(a.workspace), static_cast<int>(a.hidden_size));
  check_launch("pooled_norm", "pooled_norm slices kernel");
}

// rows_per_warp is an upper bound: a lane holds at most 16 packs of rows (64 registers),
// so wide or residual rows take fewer at once.
template <typename T, int VEC, int PACKS, bool RES>
void launch_pn_slices_u(const PnSliceLaunch& a, int rows_per_warp) {
  constexpr int kMaxU = 16 / (PACKS * (RES ? 2 : 1));
  if constexpr (kMaxU >= 4) {
    if (rows_per_warp >= 4) return launch_pn_slices_kernel<T, VEC, PACKS, RES, 4>(a);
  }
  if constexpr (kMaxU >= 2) {
    if (rows_per_warp >= 2) return launch_pn_slices_kernel<T, VEC, PACKS, RES, 2>(a);
  }
  launch_pn_slices_kernel<T, VEC, PACKS, RES, 1>(a);
}

template <typename T, int VEC, int PACKS>
void launch_pn_slices_res(const PnSliceLaunch& a, int rows_per_warp) {
  if (a.residual != 0) {
    if constexpr (PACKS <= kMaxPacksRes) launch_pn_slices_u<T, VEC, PACKS, true>(a, rows_per_warp);
  } else {
    launch_pn_slices_u<T, VEC, PACKS, false>(a, rows_per_warp);
  }
}

template <typename T, int VEC>
void launch_pn_slices_vec(const PnSliceArgs& args, const PooledNormConfig& cfg, int64_t packs) {
  const char* op = "pooled_norm";
  PnSliceLaunch a{args};
  const int64_t T_rows = cfg.tokens;
  const bool split = cfg.slice_rows > 0 && cfg.slice_rows < T_rows;
  a.S = split ? cfg.slice_rows : std::max<int64_t>(T_rows, 1);
  a.n_anchor = split ? ceil_div(T_rows, a.S) : 0;
  a.warps = cfg.warps;
  a.workspace = cfg.workspace;
  const int64_t slots = a.n_anchor + a.batch;
  if (split && (cfg.workspace == 0 || cfg.workspace_rows < slots)) {
    throw_bad_arg(op, "slice_rows=" + std::to_string(cfg.slice_rows) +
                          " needs a float32 workspace of ceil(T / slice_rows) + B = " +
                          std::to_string(slots) + " rows, got " +
                          std::to_string(cfg.workspace_rows));
  }
  a.grid = slots;
  if (cfg.blocks_per_sm > 0) {
    int sms = 0;
    PYE_CUDA_CHECK(op, cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, a.device));
    a.grid = std::min<int64_t>(slots, static_cast<int64_t>(std::max(sms, 1)) * cfg.blocks_per_sm);
  }
  if (a.grid > 0x7fffffff) throw_bad_arg(op, "more than 2^31-1 slices; raise slice_rows");
  const int u = cfg.rows_per_warp;
  if (packs <= 1) {
    launch_pn_slices_res<T, VEC, 1>(a, u);
  } else if (packs <= 2) {
    launch_pn_slices_res<T, VEC, 2>(a, u);
  } else if (packs <= 4) {
    launch_pn_slices_res<T, VEC, 4>(a, u);
  } else if (packs <= 8) {
    launch_pn_slices_res<T, VEC, 8>(a, u);
  } else {
    launch_pn_slices_res<T, VEC, kMaxPacks>(a, u);
  }
  if (split) {
    pooled_norm_slices_finish_kernel<<<static_cast<unsigned>(a.batch), 256, 0, a.stream>>>(
        reinterpret_cast<const float*>(a.workspace), reinterpret_cast<const int*>(a.cu_seqlens),
        a.n_anchor, a.S, a.norm_kind, reinterpret_cast<const void*>(a.weight),
        reinterpret_cast<const void*>(a.bias), a.wcode, a.offset, reinterpret_cast<float*>(a.out),
        static_cast<int>(a.hidden_size));
    check_launch(op, "pooled_norm slices finish kernel");
  }
}

}  // namespace

void launch_pooled_norm_slices(const PnSliceArgs& args, const PooledNormConfig& cfg,
                               int64_t packs) {
  PYE_DISPATCH_DTYPE("pooled_norm", args.dtype,
                     launch_pn_slices_vec<scalar_t, 16 / sizeof(scalar_t)>(args, cfg, packs));
}

}  // namespace pyengine
