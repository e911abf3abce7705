// Helpers shared by the CUDA kernels: conversion to and from the accumulation
// type, warp reductions, the write epilogue, the shared-memory opt-in, and
// dispatch from DType to a template.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "slot_bank_cuda.h"

namespace memkernels::cuda {

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_acc(float x) { return static_cast<T>(x); }
template <> __device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) {
  return __float2bfloat16(x);
}
template <typename T> __device__ __forceinline__ T from_acc(double x) { return static_cast<T>(x); }

template <typename Acc> __device__ __forceinline__ Acc warp_max(Acc v) {
  for (int o = 16; o > 0; o >>= 1) v = max_keep_nan(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
template <typename Acc> __device__ __forceinline__ Acc warp_sum(Acc v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// The forward kernels' write epilogue: new_mem = gate_blend(mem, upd, forget, input) for
// channel d of row `row` of group g (gates [G, M, gate_dim], mem/new_mem [G, M, D]).
template <typename T, typename Acc>
__device__ __forceinline__ void store_gate_blend(const GateBlend& blend, int64_t g, int64_t M,
                                                 int64_t row, int d, int D, Acc upd) {
  const int64_t e = (g * M + row) * D + d;
  const int64_t gi = (g * M + row) * blend.gate_dim + (blend.gate_dim == 1 ? 0 : d);
  const Acc mem = to_acc(static_cast<const T*>(blend.mem)[e]);
  const Acc f = to_acc(static_cast<const T*>(blend.forget_logit)[gi]);
  const Acc in = to_acc(static_cast<const T*>(blend.input_logit)[gi]);
  static_cast<T*>(blend.new_mem)[e] = from_acc<T>(gate_blend(mem, upd, f, in));
}

// Lets `kernel` take `bytes` of dynamic shared memory (above 48 KB needs the opt-in).
template <typename Kernel>
cudaError_t allow_smem(Kernel kernel, size_t bytes) {
  if (bytes <= (48u << 10)) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
}

// Calls fn(T{}) with T the C++ type of `dtype`.
template <typename Fn>
cudaError_t dispatch_dtype(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32: return fn(float{});
    case DType::kFloat64: return fn(double{});
    case DType::kFloat16: return fn(__half{});
    case DType::kBFloat16: return fn(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace memkernels::cuda
