// memory_write backward, first step: gradients of the gate blend
// new = sigmoid(f) * mem + sigmoid(i) * tanh(upd), one warp per slot row
// (a per-slot gate sums its gradient over the row's D channels).
#include "dtype.cuh"

namespace memkernels::cuda {
namespace {

template <typename T>
__global__ void gate_backward_kernel(int64_t rows, int D, int gate_dim, const T* dnew,
                                     const T* mem, const typename AccOf<T>::type* upd,
                                     const T* forget_logit, const T* input_logit, T* dmem,
                                     T* dupd, T* dforget, T* dinput) {
  using Acc = typename AccOf<T>::type;
  const int64_t row = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  Acc df_sum = 0, di_sum = 0;
  for (int d = lane; d < D; d += 32) {
    const int64_t e = row * D + d, gi = row * gate_dim + (gate_dim == 1 ? 0 : d);
    const GateGrads<Acc> gg = gate_blend_backward(to_acc(dnew[e]), to_acc(mem[e]), upd[e],
                                                  to_acc(forget_logit[gi]), to_acc(input_logit[gi]));
    dmem[e] = from_acc<T>(gg.d_mem);
    dupd[e] = from_acc<T>(gg.d_upd);
    if (gate_dim == 1) {
      df_sum += gg.d_forget;
      di_sum += gg.d_input;
    } else {
      dforget[gi] = from_acc<T>(gg.d_forget);
      dinput[gi] = from_acc<T>(gg.d_input);
    }
  }
  if (gate_dim == 1) {
    df_sum = warp_sum(df_sum);
    di_sum = warp_sum(di_sum);
    if (lane == 0) {
      dforget[row] = from_acc<T>(df_sum);
      dinput[row] = from_acc<T>(di_sum);
    }
  }
}

}  // namespace

cudaError_t gate_backward(DType dtype, int64_t rows, int64_t dim, int64_t gate_dim,
                          const void* dnew, const void* mem, const void* upd,
                          const void* forget_logit, const void* input_logit, void* dmem,
                          void* dupd, void* dforget, void* dinput, cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    using Acc = typename AccOf<T>::type;
    constexpr int kWarpsPerBlock = 4;
    const unsigned blocks = unsigned((rows + kWarpsPerBlock - 1) / kWarpsPerBlock);
    gate_backward_kernel<T><<<blocks, 32 * kWarpsPerBlock, 0, stream>>>(
        rows, int(dim), int(gate_dim), static_cast<const T*>(dnew), static_cast<const T*>(mem),
        static_cast<const Acc*>(upd), static_cast<const T*>(forget_logit),
        static_cast<const T*>(input_logit), static_cast<T*>(dmem), static_cast<T*>(dupd),
        static_cast<T*>(dforget), static_cast<T*>(dinput));
    return cudaGetLastError();
  });
}

}  // namespace memkernels::cuda
