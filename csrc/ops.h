// Host launchers of pyengine's CUDA kernels. Pointers are raw device addresses
// (torch's tensor.data_ptr()), strides are in elements, `stream` is a cudaStream_t
// (torch.cuda.current_stream().cuda_stream) and `device` the CUDA device index.
// Launchers throw std::invalid_argument on bad arguments and std::runtime_error on
// CUDA errors (pybind11 turns them into ValueError and RuntimeError).
#pragma once

#include <cstdint>

namespace pyengine {

// out = norm(x + residual) * weight (+ bias); summed = x + residual (in x's dtype).
// rms: RMSNorm with (weight + offset); else LayerNorm (bias may be 0 = none).
// residual / summed may be 0: then the norm is of x alone and nothing is summed.
void launch_add_norm(const char* op, bool rms, int dtype, int wdtype, uintptr_t x,
                     int64_t x_stride, uintptr_t residual, int64_t res_stride, uintptr_t weight,
                     uintptr_t bias, uintptr_t out, uintptr_t summed, int64_t rows, int64_t hidden,
                     double eps, double offset, int device, uintptr_t stream);

// In place on q (T, Hq, D) and k (T, Hk, D) (last dim contiguous, any token/head
// stride); positions (T,) int64; cos_sin (max_pos, R) fp32 contiguous.
void launch_rotary(int dtype, uintptr_t q, int64_t q_tok_stride, int64_t q_head_stride,
                   int64_t q_heads, uintptr_t k, int64_t k_tok_stride, int64_t k_head_stride,
                   int64_t k_heads, uintptr_t positions, uintptr_t cos_sin, int64_t tokens,
                   int64_t rot_dim, bool neox, int device, uintptr_t stream);

// pooling: 0 cls, 1 last, 2 mean. hidden (T, H) with row stride; cu_seqlens (B+1,)
// int32; out (B, H) contiguous in hidden's dtype.
void launch_gather_pooled(int dtype, uintptr_t hidden, int64_t row_stride,
                          int64_t hidden_size, uintptr_t cu_seqlens, int64_t batch, int pooling,
                          uintptr_t out, int device, uintptr_t stream);

// Which kernel pooled_norm's "mean" path takes where the warp-per-row kernel applies
// (16-byte aligned rows, H within its register budget); other cases ignore it. The
// default value is that kernel; variant 1 is the sliced one (csrc/pooled_norm_slices.cu), a
// candidate timed by the kernel benchmark's sweep (pyengine/cuda_ops.py SWEEP_CONFIGS).
struct PooledNormConfig {
  int variant = 0;            // 0: pooled_norm_mean_kernel; 1: sliced; 2: 0 with the affine
                              //    part's loads at the start (the other fields unused); 3: 2
                              //    with rows staged by cp.async, rows_per_warp of them ahead
  int64_t slice_rows = 0;     // rows per slice; 0: a slice is a whole sequence
  int warps = 8;              // warps per block, 1..8
  int rows_per_warp = 1;      // 1, 2 or 4 rows' loads in flight per warp (an upper bound)
  int blocks_per_sm = 0;      // 0: one block per slice; k: k * SM-count blocks loop over them
  int64_t tokens = -1;        // hidden's rows T (variant 1 needs it)
  uintptr_t workspace = 0;    // float32 (workspace_rows, H), needed when 0 < slice_rows < T
  int64_t workspace_rows = 0; // at least ceil(T / slice_rows) + B
};

// pooling as above; norm_kind: 0 none, 1 layer, 2 rms (weight + offset). s = hidden
// (+ residual, rounded to hidden's dtype); each pooled row normed in fp32, mean averages
// the normed rows. out (B, H) float32 contiguous. residual / bias may be 0; weight may be
// 0 when norm_kind is 0; wdtype: float32 or hidden's dtype.
void launch_pooled_norm(int dtype, int wdtype, uintptr_t hidden, int64_t h_stride,
                        uintptr_t residual, int64_t r_stride, uintptr_t cu_seqlens, int64_t batch,
                        int pooling, int norm_kind, uintptr_t weight, uintptr_t bias, double eps,
                        double offset, uintptr_t out, int64_t hidden_size, int device,
                        uintptr_t stream, const PooledNormConfig& config = PooledNormConfig());

// kind: 0 softmax, 1 sigmoid, 2 identity; x = (logits - bias) * scale, where bias / scale
// are per-label fp32 (L,) vectors when bias_vec / scale_vec are not 0, else the scalars.
// out (B, L) float32 contiguous.
void launch_activation(int dtype, uintptr_t logits, int64_t row_stride, int64_t batch,
                       int64_t labels, int kind, double bias, double scale, uintptr_t bias_vec,
                       uintptr_t scale_vec, uintptr_t out, int device, uintptr_t stream);

}  // namespace pyengine
