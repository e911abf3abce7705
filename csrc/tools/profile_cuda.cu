// Profiling driver for the CUDA kernels, no Python in the way. Runs each op
// at the benchmark shapes on random bf16 data inside NVTX ranges:
//   nsys profile -o decode ./build/memkernels_profile
//   ncu --nvtx --nvtx-include "read_fwd_decode/" --set full ./build/memkernels_profile
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <nvtx3/nvToolsExt.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "cuda/slot_bank_cuda.h"

namespace mc = memkernels::cuda;

#define CHECK(x)                                                                    \
  do {                                                                              \
    cudaError_t e_ = (x);                                                           \
    if (e_ != cudaSuccess) {                                                        \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      std::exit(1);                                                                 \
    }                                                                               \
  } while (0)

void* random_bf16(size_t n, std::mt19937& rng) {
  std::normal_distribution<float> normal;
  std::vector<__nv_bfloat16> host(n);
  for (auto& x : host) x = __float2bfloat16(normal(rng));
  void* dev = nullptr;
  CHECK(cudaMalloc(&dev, n * sizeof(__nv_bfloat16)));
  CHECK(cudaMemcpy(dev, host.data(), n * sizeof(__nv_bfloat16), cudaMemcpyHostToDevice));
  return dev;
}

void* scratch(size_t bytes) {
  void* p = nullptr;
  CHECK(cudaMalloc(&p, bytes));
  return p;
}

// A shared-bank read: G = H groups of B*T rows against S slots.
void read_case(const char* name, int64_t B, int64_t H, int64_t T, int64_t S, int64_t D, int reps,
               std::mt19937& rng) {
  const int64_t G = H, M = B * T;
  void* q = random_bf16(G * M * D, rng);
  void* k = random_bf16(G * S * D, rng);
  void* v = random_bf16(G * S * D, rng);
  mc::Attention p{G, M, S, D, q, k, v, {}, 1.0 / std::sqrt(double(D)), mc::DType::kBFloat16};
  int sms = 0;
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  const int splits = mc::forward_splits(p, sms);
  void* out = scratch(G * M * D * 2);
  void* lse = scratch(G * M * 4);
  void* part = scratch(size_t(splits) * G * M * D * 4);
  void* part_lse = scratch(size_t(splits) * G * M * 4);
  cudaEvent_t a, b;
  CHECK(cudaEventCreate(&a));
  CHECK(cudaEventCreate(&b));
  char range[64];
  std::snprintf(range, sizeof range, "read_fwd_%s", name);
  CHECK(mc::attention_forward(p, splits, out, lse, part, part_lse, nullptr, 0));  // warm-up
  nvtxRangePushA(range);
  CHECK(cudaEventRecord(a));
  for (int i = 0; i < reps; ++i) CHECK(mc::attention_forward(p, splits, out, lse, part, part_lse, nullptr, 0));
  CHECK(cudaEventRecord(b));
  CHECK(cudaEventSynchronize(b));
  nvtxRangePop();
  float ms = 0;
  CHECK(cudaEventElapsedTime(&ms, a, b));
  const double t = ms / reps * 1e-3, bytes = 2.0 * 2 * G * S * D, flops = 4.0 * G * M * S * D;
  std::printf("%-10s B=%ld H=%ld T=%ld S=%ld D=%ld splits=%d: %.1f us, %.0f GB/s (bank), %.1f TFLOP/s\n",
              name, long(B), long(H), long(T), long(S), long(D), splits, t * 1e6, bytes / t / 1e9,
              flops / t / 1e12);
  for (void* x : {q, k, v, out, lse, part, part_lse}) CHECK(cudaFree(x));
}

int main() {
  std::mt19937 rng(0);
  read_case("decode", 8, 16, 1, 8192, 64, 100, rng);
  read_case("prefill", 4, 16, 1024, 4096, 64, 5, rng);
  return 0;
}
