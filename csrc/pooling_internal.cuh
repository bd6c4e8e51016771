// What pooling.cu and pooled_norm_slices.cu share: the row widths pooled_norm's mean
// kernels hold in registers, and the launch of the sliced mean variant (config variant 1),
// which has a translation unit of its own so that its many instantiations compile beside
// pooling.cu's rather than after them.
#pragma once

#include "common.cuh"
#include "ops.h"

namespace pyengine {

// The most packs of a row a lane holds in the mean kernels (warp-per-row and sliced; a
// pack index covers 32 * VEC columns across the warp): wider rows take the block kernel.
constexpr int kMaxPacks = 16;
// A residual doubles the packed row a lane holds; past 8 packs that no longer fits beside
// the running sums without spilling (ptxas, sm_90), so those rows take the block kernel.
constexpr int kMaxPacksRes = 8;
// Upper bound of PooledNormConfig::warps: the sliced kernel's shared memory is sized by it.
constexpr int kSlMaxWarps = 8;

// What the sliced launch needs beyond the config: pooled_norm's arguments, with the dtype
// codes of hidden (dtype) and of weight / bias (wcode).
struct PnSliceArgs {
  uintptr_t hidden, residual, cu_seqlens, weight, bias, out;
  int64_t h_stride, r_stride, batch, hidden_size;
  int dtype, norm_kind, wcode, device;
  float eps, offset;
  cudaStream_t stream;
};

// Takes the place of the launch_pooled_norm_mean call in launch_pooled_norm_vec (same
// conditions: vectorisable, packs <= kMaxPacks, or kMaxPacksRes with a residual), with
// packs = ceil(H / (32 * VEC)) and VEC = 16 bytes of hidden's dtype.
void launch_pooled_norm_slices(const PnSliceArgs& args, const PooledNormConfig& cfg,
                               int64_t packs);

}  // namespace pyengine
