// Shared helpers for pyengine's CUDA kernels: dtype codes and conversions, aligned
// vector loads/stores, warp/block reductions, error checking and the device guard.
// Kernels trust their launchers; launchers (and pyengine/cuda_ops.py before them)
// validate shapes, dtypes, strides and alignment.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>

namespace pyengine {

// dtype codes shared with pyengine/cuda_ops.py (_DTYPE_CODE).
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

inline const char* dtype_name(int code) {
  switch (code) {
    case kFloat32: return "float32";
    case kFloat16: return "float16";
    case kBFloat16: return "bfloat16";
    default: return "unknown";
  }
}

// ---------------------------------------------------------------------------------------
// errors
// ---------------------------------------------------------------------------------------

[[noreturn]] inline void throw_cuda_error(const char* op, const char* what, cudaError_t err) {
  throw std::runtime_error(std::string("pyengine._C.") + op + ": CUDA error " +
                           cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ") in " +
                           what);
}

[[noreturn]] inline void throw_bad_arg(const char* op, const std::string& msg) {
  throw std::invalid_argument(std::string("pyengine._C.") + op + ": " + msg);
}

#define PYE_CUDA_CHECK(op, call)                                 \
  do {                                                           \
    cudaError_t pye_err_ = (call);                               \
    if (pye_err_ != cudaSuccess) {                               \
      cudaGetLastError(); /* reset, so later checks do not see it */       \
      ::pyengine::throw_cuda_error(op, #call, pye_err_);         \
    }                                                            \
  } while (0)

// After every <<<>>> launch: a bad configuration shows up here, not at the next sync.
inline void check_launch(const char* op, const char* kernel) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw_cuda_error(op, (std::string("launch of ") + kernel).c_str(), err);
}

// Makes `device` current for the launch (the caller's tensors live there) and restores
// the previous device afterwards. Cheap when it is already current.
class DeviceGuard {
 public:
  DeviceGuard(const char* op, int device) {
    int cur = -1;
    PYE_CUDA_CHECK(op, cudaGetDevice(&cur));
    if (cur != device) {
      PYE_CUDA_CHECK(op, cudaSetDevice(device));
      prev_ = cur;
    }
  }
  ~DeviceGuard() {
    if (prev_ >= 0) cudaSetDevice(prev_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = -1;
};

inline bool aligned(uintptr_t p, int bytes) { return p % static_cast<uintptr_t>(bytes) == 0; }
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int round_up32(int64_t n) { return static_cast<int>(ceil_div(n, 32) * 32); }

// ---------------------------------------------------------------------------------------
// conversions (round to nearest even, as torch's .to(dtype))
// ---------------------------------------------------------------------------------------

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// ---------------------------------------------------------------------------------------
// aligned packs: N elements moved in chunks of up to 16 bytes (128-bit accesses)
// ---------------------------------------------------------------------------------------

template <int BYTES>
struct ChunkType;
template <>
struct ChunkType<16> { using type = uint4; };
template <>
struct ChunkType<8> { using type = uint2; };
template <>
struct ChunkType<4> { using type = unsigned int; };
template <>
struct ChunkType<2> { using type = unsigned short; };

template <typename T, int N>
struct PackInfo {
  static constexpr int kBytes = N * static_cast<int>(sizeof(T));
  static constexpr int kChunk = kBytes >= 16 ? 16 : kBytes;
  static_assert(kBytes % kChunk == 0, "pack size must be a power of two bytes or a multiple of 16");
};

// The pointer given to load/store must be aligned to PackInfo<T, N>::kChunk bytes.
template <typename T, int N>
struct alignas(PackInfo<T, N>::kChunk) Pack {
  T v[N];
  using Chunk = typename ChunkType<PackInfo<T, N>::kChunk>::type;
  static constexpr int kChunks = PackInfo<T, N>::kBytes / PackInfo<T, N>::kChunk;

  __device__ __forceinline__ void load(const T* p) {
    const Chunk* src = reinterpret_cast<const Chunk*>(p);
    Chunk* dst = reinterpret_cast<Chunk*>(v);
#pragma unroll
    for (int c = 0; c < kChunks; ++c) dst[c] = src[c];
  }
  __device__ __forceinline__ void store(T* p) const {
    const Chunk* src = reinterpret_cast<const Chunk*>(v);
    Chunk* dst = reinterpret_cast<Chunk*>(p);
#pragma unroll
    for (int c = 0; c < kChunks; ++c) dst[c] = src[c];
  }
};

// Alignment (bytes) a pointer/stride needs for Pack<T, N>.
template <typename T, int N>
constexpr int pack_align() { return PackInfo<T, N>::kChunk; }

// ---------------------------------------------------------------------------------------
// 16-byte copies from global to shared memory that do not wait (cp.async, sm_80 and up):
// the bytes land while the thread goes on; committed groups complete in order, and
// cp_async_wait_pending(n) returns once at most n of this thread's groups are pending.
// Elsewhere (an older GPU, the CPU emulation) a plain copy, complete at once.
// ---------------------------------------------------------------------------------------

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem) : "memory");
#else
  *reinterpret_cast<uint4*>(smem) = *reinterpret_cast<const uint4*>(gmem);
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// n: 0 to 4 (the wait takes an immediate).
__device__ __forceinline__ void cp_async_wait_pending(int n) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  switch (n) {
    case 0: asm volatile("cp.async.wait_group 0;\n" ::: "memory"); break;
    case 1: asm volatile("cp.async.wait_group 1;\n" ::: "memory"); break;
    case 2: asm volatile("cp.async.wait_group 2;\n" ::: "memory"); break;
    case 3: asm volatile("cp.async.wait_group 3;\n" ::: "memory"); break;
    default: asm volatile("cp.async.wait_group 4;\n" ::: "memory"); break;
  }
#endif
}

// ---------------------------------------------------------------------------------------
// reductions (blockDim.x a multiple of 32)
// ---------------------------------------------------------------------------------------

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Bytes of the static __shared__ scratch that kernels calling block_sum hold: the driver
// counts them against the 48 KiB a block may use without the opt-in.
constexpr size_t kBlockSumScratchBytes = 32 * sizeof(float);

// Sum over the whole (1-D) block; every thread gets the result. `scratch` holds 32 floats.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int nwarps = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < nwarps ? scratch[lane] : 0.f;
  return warp_sum(v);
}

// rsqrt(biased variance + eps) of a row staged in fp32 at srow[j * nvec + i] (element
// i*VEC + j), two-pass about `mean` (inv_h = 1 / H). Each thread reads only the elements
// it wrote itself, so no sync is needed before the call; every thread gets the result.
template <int VEC>
__device__ __forceinline__ float layer_norm_rstd(const float* srow, int nvec, float mean,
                                                 float inv_h, float eps, float* scratch) {
  float sq = 0.f;
  for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float d = srow[j * nvec + i] - mean;
      sq += d * d;
    }
  }
  return rsqrtf(block_sum(sq, scratch) * inv_h + eps);
}

}  // namespace pyengine

// Dispatch on a dtype code: defines `scalar_t` inside the body.
#define PYE_DISPATCH_DTYPE(op, code, ...)                                              \
  switch (code) {                                                                      \
    case ::pyengine::kFloat32: {                                                       \
      using scalar_t = float;                                                          \
      __VA_ARGS__;                                                                     \
      break;                                                                           \
    }                                                                                  \
    case ::pyengine::kFloat16: {                                                       \
      using scalar_t = __half;                                                         \
      __VA_ARGS__;                                                                     \
      break;                                                                           \
    }                                                                                  \
    case ::pyengine::kBFloat16: {                                                      \
      using scalar_t = __nv_bfloat16;                                                  \
      __VA_ARGS__;                                                                     \
      break;                                                                           \
    }                                                                                  \
    default:                                                                           \
      ::pyengine::throw_bad_arg(op, "unsupported dtype code " + std::to_string(code)); \
  }
