// CUDA kernel entry points for the slot-bank ops. Plain pointers, sizes and a
// stream: each .cu file compiles with nvcc alone (no torch headers).
//
// Layout as on the CPU (csrc/cpu/attention_cpu.h): G groups, each with M query
// rows and N keys; q [G, M, D], k/v [G, N, D] contiguous, elements of `dtype`.
// "acc" below is the accumulation type: double for kFloat64, float otherwise.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../slot_math.h"

namespace memkernels::cuda {

enum class DType { kFloat32, kFloat16, kBFloat16, kFloat64 };

struct Attention {
  int64_t groups, rows, keys, dim;
  const void* q;
  const void* k;
  const void* v;
  MaskIndex mask;
  double scale;
  DType dtype;
};

// memory_write's gate blend, fused into the forward's epilogue:
// new_mem = sigmoid(forget) * mem + sigmoid(input) * tanh(upd); gates [G, M, gate_dim].
struct GateBlend {
  const void* mem;
  const void* forget_logit;
  const void* input_logit;
  int64_t gate_dim;
  void* new_mem;
};

// How many programs split the keys of a group (flash-decoding): enough that
// groups * row tiles * splits fills the GPU's SMs about once; 1 when the rows
// alone fill it.
int forward_splits(const Attention& p, int sm_count);

// Forward. splits == 1: writes out [G, M, D] (dtype, or acc when blend is
// set: that out is memory_write's upd) and lse [G, M] (acc) directly.
// splits > 1 (blend must be null): partial results go to part [splits, G, M, D]
// and part_lse [splits, G, M] (acc), then a combine kernel writes out/lse.
cudaError_t attention_forward(const Attention& p, int splits, void* out, void* lse, void* part,
                              void* part_lse, const GateBlend* blend, cudaStream_t stream);

// Backward (FlashAttention-2, no atomics: deterministic). dout/dq/dk/dv in
// dtype; lse and delta = rowsum(dout * out) in acc.
cudaError_t attention_backward(const Attention& p, const void* dout, const void* lse,
                               const void* delta, void* dq, void* dk, void* dv,
                               cudaStream_t stream);

// Gradients of the gate blend for R = G * M rows of D channels: dmem, dupd
// (dtype, dupd feeds attention_backward), dforget/dinput ([R, gate_dim],
// dtype; summed over D when gate_dim == 1). upd is in acc.
cudaError_t gate_backward(DType dtype, int64_t rows, int64_t dim, int64_t gate_dim,
                          const void* dnew, const void* mem, const void* upd,
                          const void* forget_logit, const void* input_logit, void* dmem,
                          void* dupd, void* dforget, void* dinput, cudaStream_t stream);

}  // namespace memkernels::cuda
