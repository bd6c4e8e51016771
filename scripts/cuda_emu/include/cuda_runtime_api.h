#pragma once
#include "emu_core.h"
typedef void* cudaStream_t;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
#define CUDART_VERSION 13000
inline cudaError_t g_last = cudaSuccess;
inline const char* cudaGetErrorName(cudaError_t) { return "cudaErrorEmu"; }
inline const char* cudaGetErrorString(cudaError_t) { return "emulated error"; }
inline cudaError_t cudaGetLastError() {
  auto e = emu::g_launch_refused ? cudaErrorInvalidValue : g_last;
  g_last = cudaSuccess;
  emu::g_launch_refused = false;
  return e;
}
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
inline cudaError_t cudaSetDevice(int) { return cudaSuccess; }
inline cudaError_t cudaDriverGetVersion(int* v) { *v = 0; return cudaSuccess; }
template <class F> cudaError_t cudaFuncSetAttribute(F f, cudaFuncAttribute, int v) {
  emu::g_max_dyn_smem[reinterpret_cast<const void*>(f)] = v;  // the only attribute the launchers set
  return cudaSuccess;
}
