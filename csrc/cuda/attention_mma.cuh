// The tensor-core kernels (attention_mma.cu): which problems they take, and their
// launchers. attention_forward/attention_backward (attention.cu) try them before the SIMT
// tile kernels.
#pragma once

#include "slot_bank_cuda.h"

namespace memkernels::cuda {

// Query rows per CTA of the tensor-core forward (forward_splits sizes the grid with it).
constexpr int kMmaRows = 64;

// True when the tensor-core kernels take `p`: float16/bfloat16, D a multiple of 16 up to
// 128, q/k/v 16-byte aligned, an sm_80+ device, and MEMKERNELS_CUDA_TENSOR_CORES=1 in the
// environment (read once). Opt-in because these kernels have only been compile-checked: no
// GPU has run them yet (docs/log.md, CUDA "v3").
bool mma_fits(const Attention& p);

// Same contract as attention_forward: splits == 1 writes out/lse (out in the input dtype,
// or float when blend is set), splits > 1 writes the float parts [splits, G, M, *] for the
// combine kernel. keys_per_split must be a multiple of 64.
cudaError_t launch_forward_mma(const Attention& p, int64_t keys_per_split, int splits, void* out,
                               void* lse, const GateBlend* blend, cudaStream_t stream);

// Same contract as attention_backward; dout must be 16-byte aligned too.
cudaError_t launch_backward_mma(const Attention& p, const void* dout, const void* lse,
                                const void* delta, void* dq, void* dk, void* dv,
                                cudaStream_t stream);

}  // namespace memkernels::cuda
