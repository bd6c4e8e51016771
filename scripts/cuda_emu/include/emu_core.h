// CPU emulation of the CUDA subset pyengine's kernels use: blocks run one after another,
// each block's threads as std::threads; __shared__ becomes a function-local static.
#pragma once
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <map>
#include <vector>
#include <cstdio>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 { unsigned x, y, z; dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {} };
struct uint4 { unsigned x, y, z, w; };
struct uint2 { unsigned x, y; };

namespace emu {
inline thread_local dim3 t_threadIdx, t_blockIdx;
inline dim3 g_blockDim, g_gridDim;
inline std::barrier<>* g_block_barrier = nullptr;
inline std::vector<std::unique_ptr<std::barrier<>>> g_warp_barriers;
inline float g_warp_buf[32][32];
alignas(16) inline char g_dyn_smem[256 * 1024];
inline thread_local int t_lin;
inline long g_launches = 0;
// Launch limits as the driver applies them: dynamic shared memory past 48 KiB less the
// kernel's static shared memory needs the cudaFuncSetAttribute opt-in (the static part is
// taken as 128 B, the block-sum scratch of the block kernels; a kernel holding more is
// checked less strictly than a GPU would), and grid.y, grid.z at most 65535. A refused
// launch runs nothing; the next cudaGetLastError reports it, as on a GPU.
constexpr long kStaticSmem = 128;
inline std::map<const void*, int> g_max_dyn_smem;  // kernel -> its opted-in bytes
inline bool g_launch_refused = false;

template <class K>
struct Launcher {
  K kernel; dim3 grid, block; size_t smem;
  template <class... A>
  void operator()(A... args) {
    ++g_launches;
    const auto key = reinterpret_cast<const void*>(kernel);
    const long limit = g_max_dyn_smem.count(key) ? g_max_dyn_smem[key] : 48 * 1024 - kStaticSmem;
    if (static_cast<long>(smem) > limit || grid.y > 65535 || grid.z > 65535) {
      std::fprintf(stderr, "EMU launch refused: grid (%u, %u, %u), %zu B dynamic shared memory, limit %ld\n",
                   grid.x, grid.y, grid.z, smem, limit);
      g_launch_refused = true;
      return;
    }
    g_blockDim = block; g_gridDim = grid;
    const unsigned nt = block.x * block.y * block.z;
    if (nt == 0 || nt > 1024 || smem > sizeof(g_dyn_smem)) { std::fprintf(stderr, "EMU bad launch nt=%u smem=%zu\n", nt, smem); std::abort(); }
    for (unsigned bz = 0; bz < grid.z; ++bz)
      for (unsigned by = 0; by < grid.y; ++by)
        for (unsigned bx = 0; bx < grid.x; ++bx) {
          std::memset(g_dyn_smem, 0xff, smem);  // poison shared memory
          std::barrier<> bar(nt);
          g_block_barrier = &bar;
          g_warp_barriers.clear();
          for (unsigned w = 0; w < (nt + 31) / 32; ++w) g_warp_barriers.emplace_back(new std::barrier<>(std::min(32u, nt - 32 * w)));
          std::vector<std::thread> ts;
          for (unsigned t = 0; t < nt; ++t) {
            ts.emplace_back([=, this]() {
              t_lin = t;
              t_threadIdx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
              t_blockIdx = dim3(bx, by, bz);
              kernel(args...);
            });
          }
          for (auto& th : ts) th.join();
        }
  }
};
template <class K>
Launcher<K> launch(K k, dim3 g, dim3 b, size_t smem = 0, void* = nullptr) { return Launcher<K>{k, g, b, smem}; }

inline void syncthreads() { g_block_barrier->arrive_and_wait(); }
inline float shfl_xor(float v, int o) {
  const int lane = t_lin & 31, w = t_lin >> 5;
  g_warp_buf[w][lane] = v;
  g_warp_barriers[w]->arrive_and_wait();
  float r = g_warp_buf[w][lane ^ o];
  g_warp_barriers[w]->arrive_and_wait();
  return r;
}
}  // namespace emu

#define threadIdx (emu::t_threadIdx)
#define blockIdx (emu::t_blockIdx)
#define blockDim (emu::g_blockDim)
#define gridDim (emu::g_gridDim)
#define __syncthreads() emu::syncthreads()
#define __shfl_xor_sync(mask, v, o) emu::shfl_xor((v), (o))
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
#include <math.h>
