// Fused attention core on CUDA: memory_read and memory_write's forward
// (online softmax over key tiles, optional key split + combine, optional gate
// epilogue) and backward (dK/dV and dQ kernels, no atomics).
//
// SIMT kernels over shared-memory tiles: a CTA of 4 warps holds kRows query
// rows and streams kt keys at a time (kt = 32, or 16/8 when D is large).
// Rows of a tile are padded to D + 1 so lanes walking keys hit distinct banks.
// Every dtype and head dim runs here; float16/bfloat16 with D a multiple of 16 can
// go to the tensor-core kernels of attention_mma.cu instead (opt-in for now).
#include <algorithm>

#include "attention_mma.cuh"
#include "dtype.cuh"

namespace memkernels::cuda {
namespace {

constexpr int kRows = 16;
constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;

__host__ __device__ __forceinline__ int64_t lmin(int64_t a, int64_t b) { return a < b ? a : b; }

template <typename Acc>
size_t forward_smem(int D, int kt) {
  const int Dp = D + 1;
  return sizeof(Acc) * (size_t(kRows + 2 * kt) * Dp + kRows * kt + kRows * D + 3 * kRows);
}

template <typename Acc>
size_t backward_smem(int D, int kt, bool dkdv) {
  const int Dp = D + 1;
  const size_t tiles = size_t(2 * kRows + 2 * kt) * Dp + 2 * kRows * kt + 2 * kRows;
  const size_t accum = dkdv ? size_t(2) * kt * D : size_t(kRows) * D;
  return sizeof(Acc) * (tiles + accum);
}

int max_smem() {
  int dev = 0, bytes = 48 << 10;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  return bytes;
}

// Largest key tile in {32, 16, 8} whose shared memory fits the device.
template <typename SmemFn>
int key_tile(SmemFn smem) {
  const size_t limit = max_smem();
  for (int kt : {32, 16, 8})
    if (smem(kt) <= limit) return kt;
  return 0;
}

// Copies rows [r0, r0 + n) of a [*, D] tensor into a padded smem tile (zeros past `limit`).
template <typename T, typename Acc>
__device__ void load_tile(Acc* dst, const T* src, int64_t r0, int n, int64_t limit, int D) {
  for (int i = threadIdx.x; i < n * D; i += kThreads) {
    const int r = i / D, d = i % D;
    dst[r * (D + 1) + d] = (r0 + r < limit) ? to_acc(src[(r0 + r) * D + d]) : Acc(0);
  }
}

template <typename Acc>
__device__ __forceinline__ Acc dot(const Acc* a, const Acc* b, int D) {
  Acc s = 0;
  for (int d = 0; d < D; ++d) s += a[d] * b[d];
  return s;
}

template <typename T, typename OutT, bool kBlend>
__global__ void __launch_bounds__(kThreads)
attention_forward_kernel(Attention p, int kt, int64_t keys_per_split, OutT* out,
                         typename AccOf<T>::type* lse, GateBlend blend) {
  using Acc = typename AccOf<T>::type;
  extern __shared__ unsigned char smem_raw[];
  const int D = int(p.dim), Dp = D + 1, tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int64_t M = p.rows, N = p.keys, G = p.groups;
  const int64_t g = blockIdx.y, split = blockIdx.z, r0 = int64_t(blockIdx.x) * kRows;
  Acc* sq = reinterpret_cast<Acc*>(smem_raw);
  Acc* sk = sq + kRows * Dp;
  Acc* sv = sk + kt * Dp;
  Acc* ss = sv + kt * Dp;          // scores, then probabilities [kRows][kt]
  Acc* sacc = ss + kRows * kt;     // unnormalised output [kRows][D]
  Acc* smax = sacc + kRows * D;
  Acc* ssum = smax + kRows;
  Acc* scorr = ssum + kRows;
  const T* q = static_cast<const T*>(p.q) + g * M * D;
  const T* k = static_cast<const T*>(p.k) + g * N * D;
  const T* v = static_cast<const T*>(p.v) + g * N * D;
  const Acc scale = Acc(p.scale);

  load_tile(sq, q, r0, kRows, M, D);
  for (int i = tid; i < kRows * D; i += kThreads) sacc[i] = 0;
  if (tid < kRows) { smax[tid] = neg_inf<Acc>(); ssum[tid] = 0; }
  const int64_t n_start = split * keys_per_split;
  const int64_t n_end = lmin(N, n_start + keys_per_split);
  for (int64_t n0 = n_start; n0 < n_end; n0 += kt) {
    const int nb = int(lmin(kt, n_end - n0));
    __syncthreads();  // previous tile fully consumed
    load_tile(sk, k, n0, nb, n_end, D);
    load_tile(sv, v, n0, nb, n_end, D);
    __syncthreads();
    for (int e = tid; e < kRows * kt; e += kThreads) {
      const int r = e / kt, j = e % kt;
      Acc s = neg_inf<Acc>();
      if (j < nb && r0 + r < M && p.mask.valid(g, r0 + r, n0 + j))
        s = dot(sq + r * Dp, sk + j * Dp, D) * scale;
      ss[e] = s;
    }
    __syncthreads();
    for (int r = warp; r < kRows; r += kWarps) {  // one warp per row, one lane per key
      const Acc s = lane < kt ? ss[r * kt + lane] : neg_inf<Acc>();
      Acc corr;
      const Acc new_max = online_softmax_rescale(smax[r], warp_max(s), &corr);
      const Acc prob = exp_shifted(s, new_max);
      const Acc sum = warp_sum(prob);
      if (lane < kt) ss[r * kt + lane] = prob;
      if (lane == 0) { ssum[r] = ssum[r] * corr + sum; smax[r] = new_max; scorr[r] = corr; }
    }
    __syncthreads();
    for (int i = tid; i < kRows * D; i += kThreads) {
      const int r = i / D, d = i % D;
      Acc a = sacc[i] * scorr[r];
      for (int j = 0; j < nb; ++j) a += ss[r * kt + j] * sv[j * Dp + d];
      sacc[i] = a;
    }
  }
  __syncthreads();
  const int64_t base = (split * G + g) * M;
  for (int i = tid; i < kRows * D; i += kThreads) {
    const int r = i / D, d = i % D;
    const int64_t row = r0 + r;
    if (row >= M) continue;
    const Acc o = sacc[i] * safe_inverse(ssum[r]);
    out[(base + row) * D + d] = from_acc<OutT>(o);
    if constexpr (kBlend) store_gate_blend<T>(blend, g, M, row, d, D, o);
  }
  if (tid < kRows && r0 + tid < M) lse[base + r0 + tid] = log_sum_exp(smax[tid], ssum[tid]);
}

// --- decode forward: few query rows per group ---------------------------------
// A step of generation asks for 1 row per group (bank per sequence) or B rows
// (shared bank): too few to fill a tile, so the generic kernel above idles on
// barriers. Here each CTA takes kDecodeRows rows and one split of the keys, and
// streams the keys with 16-byte loads: a key row of D elements is spread over
// D / VEC lanes ("a key group"), so a warp reads 32 / (D / VEC) keys per step
// and the CTA's bytes in flight scale with the grid, not with barriers. q rows,
// running max/sum and the output accumulators stay in registers; the key
// groups and warps merge their partial softmax states once, at the end.
constexpr int kDecodeRows = 8;

template <typename T>
__host__ __device__ constexpr int vec_of() { return int(16 / sizeof(T)); }  // per 16-byte load

template <typename T, typename Acc, int VEC>
__device__ __forceinline__ void load_vec(const T* src, Acc (&dst)[VEC]) {
  const uint4 raw = __ldg(reinterpret_cast<const uint4*>(src));
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < VEC; ++i) dst[i] = to_acc(e[i]);
}

// Merges the softmax state (m, l, acc) of another part into this one.
template <typename Acc, int VEC>
__device__ __forceinline__ void merge_state(Acc& m, Acc& l, Acc (&acc)[VEC], Acc m_o, Acc l_o,
                                            const Acc (&acc_o)[VEC]) {
  const Acc m_new = max_keep_nan(m, m_o);
  const Acc c = exp_shifted(m, m_new), c_o = exp_shifted(m_o, m_new);
  l = l * c + l_o * c_o;
#pragma unroll
  for (int i = 0; i < VEC; ++i) acc[i] = acc[i] * c + acc_o[i] * c_o;
  m = m_new;
}

template <typename T, typename OutT, int ROWS>
__global__ void __launch_bounds__(kThreads)
attention_decode_kernel(Attention p, int64_t keys_per_split, OutT* out,
                        typename AccOf<T>::type* lse) {
  using Acc = typename AccOf<T>::type;
  constexpr int VEC = vec_of<T>();
  extern __shared__ unsigned char smem_raw[];
  const int D = int(p.dim), lanes_per_key = D / VEC, keys_per_warp = 32 / lanes_per_key;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int key_in_step = lane / lanes_per_key, slice = lane % lanes_per_key;
  const int64_t M = p.rows, N = p.keys, G = p.groups;
  const int64_t g = blockIdx.y, split = blockIdx.z, r0 = int64_t(blockIdx.x) * ROWS;
  const int rows_here = int(lmin(ROWS, M - r0));
  const T* q = static_cast<const T*>(p.q) + (g * M + r0) * D + slice * VEC;
  const T* k = static_cast<const T*>(p.k) + g * N * D + slice * VEC;
  const T* v = static_cast<const T*>(p.v) + g * N * D + slice * VEC;
  const Acc scale = Acc(p.scale);

  Acc qr[ROWS][VEC], acc[ROWS][VEC], m[ROWS], l[ROWS];
  const bool* mask_row[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    if (r < rows_here) {
      load_vec<T, Acc, VEC>(q + int64_t(r) * D, qr[r]);
    } else {
#pragma unroll
      for (int i = 0; i < VEC; ++i) qr[r][i] = 0;
    }
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[r][i] = 0;
    m[r] = neg_inf<Acc>();
    l[r] = 0;
    mask_row[r] = p.mask.mask != nullptr && r < rows_here ? p.mask.row(g, r0 + r) : nullptr;
  }

  const int64_t n_start = split * keys_per_split, n_end = lmin(N, n_start + keys_per_split);
  const int keys_per_step = kWarps * keys_per_warp;
  // Loads the key and value slices of `key` (zeros past the split).
  auto load_kv = [&](int64_t key, Acc (&kv)[VEC], Acc (&vv)[VEC]) {
    if (key < n_end) {
      load_vec<T, Acc, VEC>(k + key * D, kv);
      load_vec<T, Acc, VEC>(v + key * D, vv);
    } else {
#pragma unroll
      for (int i = 0; i < VEC; ++i) kv[i] = vv[i] = 0;
    }
  };
  Acc kv[VEC], vv[VEC];
  load_kv(n_start + warp * keys_per_warp + key_in_step, kv, vv);
  // The loop bound is warp-uniform: every lane takes part in the shuffles.
  for (int64_t first = n_start + warp * keys_per_warp; first < n_end; first += keys_per_step) {
    const int64_t key = first + key_in_step;
    Acc kv_next[VEC], vv_next[VEC];  // the next step's loads go out before this step's math
    load_kv(key + keys_per_step, kv_next, vv_next);
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      Acc s = 0;
#pragma unroll
      for (int i = 0; i < VEC; ++i) s += qr[r][i] * kv[i];
      for (int o = lanes_per_key / 2; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
      const bool ok = key < n_end && r < rows_here && (mask_row[r] == nullptr || mask_row[r][key]);
      if (!ok) continue;
      s *= scale;
      if (s > m[r]) {  // new running max: rescale (rare after the first keys)
        const Acc c = exp_shifted(m[r], s);
        l[r] *= c;
#pragma unroll
        for (int i = 0; i < VEC; ++i) acc[r][i] *= c;
        m[r] = s;
      }
      // a -inf score weighs 0 (exp(-inf - -inf) would be NaN while m is still -inf)
      const Acc prob = s == neg_inf<Acc>() ? Acc(0) : mk_exp(s - m[r]);
      l[r] += prob;
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[r][i] += prob * vv[i];
    }
#pragma unroll
    for (int i = 0; i < VEC; ++i) { kv[i] = kv_next[i]; vv[i] = vv_next[i]; }
  }

  // Merge the key groups of each warp (lanes with the same slice), then the warps.
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    for (int o = lanes_per_key; o < 32; o <<= 1) {
      Acc acc_o[VEC];
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc_o[i] = __shfl_xor_sync(0xffffffffu, acc[r][i], o);
      const Acc m_o = __shfl_xor_sync(0xffffffffu, m[r], o);
      const Acc l_o = __shfl_xor_sync(0xffffffffu, l[r], o);
      merge_state<Acc, VEC>(m[r], l[r], acc[r], m_o, l_o, acc_o);
    }
  }
  Acc* s_acc = reinterpret_cast<Acc*>(smem_raw);  // [kWarps][ROWS][D]
  Acc* s_m = s_acc + kWarps * ROWS * D;           // [kWarps][ROWS]
  Acc* s_l = s_m + kWarps * ROWS;
  if (key_in_step == 0) {
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) s_acc[(warp * ROWS + r) * D + slice * VEC + i] = acc[r][i];
      if (slice == 0) { s_m[warp * ROWS + r] = m[r]; s_l[warp * ROWS + r] = l[r]; }
    }
  }
  __syncthreads();
  const int64_t base = (split * G + g) * M + r0;
  for (int e = threadIdx.x; e < rows_here * D; e += kThreads) {
    const int r = e / D, d = e % D;
    Acc m_all = neg_inf<Acc>();
    for (int w = 0; w < kWarps; ++w) m_all = max_keep_nan(m_all, s_m[w * ROWS + r]);
    Acc sum = 0, a = 0;
    for (int w = 0; w < kWarps; ++w) {
      const Acc c = exp_shifted(s_m[w * ROWS + r], m_all);
      sum += s_l[w * ROWS + r] * c;
      a += s_acc[(w * ROWS + r) * D + d] * c;
    }
    out[(base + r) * D + d] = from_acc<OutT>(a * safe_inverse(sum));
    if (d == 0) lse[base + r] = log_sum_exp(m_all, sum);
  }
}

int element_size(DType dtype) {
  switch (dtype) {
    case DType::kFloat16:
    case DType::kBFloat16: return 2;
    case DType::kFloat32: return 4;
    case DType::kFloat64: return 8;
  }
  return 0;
}

// The decode kernel takes the problem: few rows, and D a power-of-two number
// of 16-byte vectors, at most one per lane (the gate blend is the caller's test).
// With the tensor-core kernels on, groups of 2-16 rows go to them instead: the
// decode kernel spends ~8x the instructions per byte on 8 rows as on 1 (one
// shuffle reduction and softmax update per row and key), 8% of the H200's
// bandwidth for the shared-bank decode against 47% for one row.
bool decode_fits(const Attention& p) {
  const int vec = 16 / element_size(p.dtype);
  const int64_t lanes = p.dim / vec;
  const auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  return p.rows <= 2 * kDecodeRows && p.dim % vec == 0 && lanes >= 1 && lanes <= 32 &&
         (lanes & (lanes - 1)) == 0 && aligned(p.q) && aligned(p.k) && aligned(p.v) &&
         !(p.rows > 1 && mma_fits(p));
}

template <typename T, typename OutT>
cudaError_t launch_decode(const Attention& p, int64_t per_split, int splits, OutT* out,
                          typename AccOf<T>::type* lse, cudaStream_t stream) {
  using Acc = typename AccOf<T>::type;
  const bool one_row = p.rows == 1;
  const int rows = one_row ? 1 : kDecodeRows;
  const size_t smem = sizeof(Acc) * size_t(kWarps) * rows * (p.dim + 2);
  const dim3 grid(unsigned((p.rows + rows - 1) / rows), unsigned(p.groups), unsigned(splits));
  auto kernel = one_row ? attention_decode_kernel<T, OutT, 1>
                        : attention_decode_kernel<T, OutT, kDecodeRows>;
  if (auto e = allow_smem(kernel, smem); e != cudaSuccess) return e;
  kernel<<<grid, kThreads, smem, stream>>>(p, per_split, out, lse);
  return cudaGetLastError();
}

// Merges the per-split (out, lse) of one row (block) into the final result.
template <typename T>
__global__ void combine_kernel(const typename AccOf<T>::type* part,
                               const typename AccOf<T>::type* part_lse, T* out,
                               typename AccOf<T>::type* lse, int64_t GM, int D, int splits) {
  using Acc = typename AccOf<T>::type;
  const int64_t row = blockIdx.x;
  Acc m = neg_inf<Acc>();
  for (int s = 0; s < splits; ++s) m = max_keep_nan(m, part_lse[s * GM + row]);
  const Acc m_safe = m == neg_inf<Acc>() ? Acc(0) : m;
  Acc total = 0;
  for (int s = 0; s < splits; ++s) total += exp_shifted(part_lse[s * GM + row], m_safe);
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    Acc a = 0;
    for (int s = 0; s < splits; ++s)
      a += exp_shifted(part_lse[s * GM + row], m_safe) * part[(s * GM + row) * D + d];
    out[row * D + d] = from_acc<T>(a * safe_inverse(total));
  }
  if (threadIdx.x == 0) lse[row] = log_sum_exp(m_safe, total);
}

template <typename T>
cudaError_t launch_combine(const Attention& p, int splits, const void* part, const void* part_lse,
                           void* out, void* lse, cudaStream_t stream) {
  using Acc = typename AccOf<T>::type;
  const int64_t GM = p.groups * p.rows;
  combine_kernel<T><<<unsigned(GM), 64, 0, stream>>>(
      static_cast<const Acc*>(part), static_cast<const Acc*>(part_lse), static_cast<T*>(out),
      static_cast<Acc*>(lse), GM, int(p.dim), splits);
  return cudaGetLastError();
}

// Shared by both backward kernels: for the kRows x kt (row, key) pairs of the
// current tiles, P = exp(S - lse) (0 where masked) and dS = P * (dP - delta) * scale.
template <typename Acc>
__device__ void probs_and_dscores(const Attention& p, int64_t g, int64_t r0, int64_t n0, int nb,
                                  int kt, const Acc* sq, const Acc* sdo, const Acc* sk,
                                  const Acc* sv, const Acc* slse, const Acc* sdelta, Acc* sp,
                                  Acc* sds) {
  const int D = int(p.dim), Dp = D + 1;
  for (int e = threadIdx.x; e < kRows * kt; e += kThreads) {
    const int r = e / kt, j = e % kt;
    Acc prob = 0, ds = 0;
    if (j < nb && r0 + r < p.rows && p.mask.valid(g, r0 + r, n0 + j)) {
      prob = prob_from_lse(dot(sq + r * Dp, sk + j * Dp, D) * Acc(p.scale), slse[r]);
      ds = prob * (dot(sdo + r * Dp, sv + j * Dp, D) - sdelta[r]) * Acc(p.scale);
    }
    sp[e] = prob;
    sds[e] = ds;
  }
}

template <typename T>
__device__ void load_row_stats(const typename AccOf<T>::type* lse,
                               const typename AccOf<T>::type* delta, int64_t base, int64_t r0,
                               int64_t M, typename AccOf<T>::type* slse,
                               typename AccOf<T>::type* sdelta) {
  using Acc = typename AccOf<T>::type;
  if (threadIdx.x < kRows) {
    const int64_t row = r0 + threadIdx.x;
    slse[threadIdx.x] = row < M ? lse[base + row] : neg_inf<Acc>();
    sdelta[threadIdx.x] = row < M ? delta[base + row] : Acc(0);
  }
}

// One CTA owns kt keys of one group and loops over all its rows: dK/dV
// (summed over the batch for a shared bank) need no atomics.
template <typename T>
__global__ void __launch_bounds__(kThreads)
attention_dkdv_kernel(Attention p, int kt, const T* dout, const typename AccOf<T>::type* lse,
                      const typename AccOf<T>::type* delta, T* dk, T* dv) {
  using Acc = typename AccOf<T>::type;
  extern __shared__ unsigned char smem_raw[];
  const int D = int(p.dim), Dp = D + 1, tid = threadIdx.x;
  const int64_t M = p.rows, N = p.keys, g = blockIdx.y, n0 = int64_t(blockIdx.x) * kt;
  const int nb = int(lmin(kt, N - n0));
  Acc* sq = reinterpret_cast<Acc*>(smem_raw);
  Acc* sdo = sq + kRows * Dp;
  Acc* sk = sdo + kRows * Dp;
  Acc* sv = sk + kt * Dp;
  Acc* sp = sv + kt * Dp;
  Acc* sds = sp + kRows * kt;
  Acc* slse = sds + kRows * kt;
  Acc* sdelta = slse + kRows;
  Acc* sdk = sdelta + kRows;
  Acc* sdv = sdk + kt * D;
  const T* q = static_cast<const T*>(p.q) + g * M * D;
  const T* k = static_cast<const T*>(p.k) + g * N * D;
  const T* v = static_cast<const T*>(p.v) + g * N * D;
  const T* dout_g = dout + g * M * D;
  load_tile(sk, k, n0, nb, N, D);
  load_tile(sv, v, n0, nb, N, D);
  for (int i = tid; i < kt * D; i += kThreads) sdk[i] = sdv[i] = 0;
  for (int64_t r0 = 0; r0 < M; r0 += kRows) {
    __syncthreads();
    load_tile(sq, q, r0, kRows, M, D);
    load_tile(sdo, dout_g, r0, kRows, M, D);
    load_row_stats<T>(lse, delta, g * M, r0, M, slse, sdelta);
    __syncthreads();
    probs_and_dscores(p, g, r0, n0, nb, kt, sq, sdo, sk, sv, slse, sdelta, sp, sds);
    __syncthreads();
    for (int i = tid; i < nb * D; i += kThreads) {
      const int j = i / D, d = i % D;
      Acc a_v = 0, a_k = 0;
      for (int r = 0; r < kRows; ++r) {
        a_v += sp[r * kt + j] * sdo[r * Dp + d];
        a_k += sds[r * kt + j] * sq[r * Dp + d];
      }
      sdv[i] += a_v;
      sdk[i] += a_k;
    }
  }
  __syncthreads();
  for (int i = tid; i < nb * D; i += kThreads) {
    const int64_t e = (g * N + n0) * D + i;
    dk[e] = from_acc<T>(sdk[i]);
    dv[e] = from_acc<T>(sdv[i]);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
attention_dq_kernel(Attention p, int kt, const T* dout, const typename AccOf<T>::type* lse,
                    const typename AccOf<T>::type* delta, T* dq) {
  using Acc = typename AccOf<T>::type;
  extern __shared__ unsigned char smem_raw[];
  const int D = int(p.dim), Dp = D + 1, tid = threadIdx.x;
  const int64_t M = p.rows, N = p.keys, g = blockIdx.y, r0 = int64_t(blockIdx.x) * kRows;
  Acc* sq = reinterpret_cast<Acc*>(smem_raw);
  Acc* sdo = sq + kRows * Dp;
  Acc* sk = sdo + kRows * Dp;
  Acc* sv = sk + kt * Dp;
  Acc* sp = sv + kt * Dp;
  Acc* sds = sp + kRows * kt;
  Acc* slse = sds + kRows * kt;
  Acc* sdelta = slse + kRows;
  Acc* sdq = sdelta + kRows;
  const T* q = static_cast<const T*>(p.q) + g * M * D;
  const T* k = static_cast<const T*>(p.k) + g * N * D;
  const T* v = static_cast<const T*>(p.v) + g * N * D;
  load_tile(sq, q, r0, kRows, M, D);
  load_tile(sdo, dout + g * M * D, r0, kRows, M, D);
  load_row_stats<T>(lse, delta, g * M, r0, M, slse, sdelta);
  for (int i = tid; i < kRows * D; i += kThreads) sdq[i] = 0;
  for (int64_t n0 = 0; n0 < N; n0 += kt) {
    const int nb = int(lmin(kt, N - n0));
    __syncthreads();
    load_tile(sk, k, n0, nb, N, D);
    load_tile(sv, v, n0, nb, N, D);
    __syncthreads();
    probs_and_dscores(p, g, r0, n0, nb, kt, sq, sdo, sk, sv, slse, sdelta, sp, sds);
    __syncthreads();
    for (int i = tid; i < kRows * D; i += kThreads) {
      const int r = i / D, d = i % D;
      Acc a = 0;
      for (int j = 0; j < nb; ++j) a += sds[r * kt + j] * sk[j * Dp + d];
      sdq[i] += a;
    }
  }
  __syncthreads();
  for (int i = tid; i < kRows * D; i += kThreads) {
    const int64_t row = r0 + i / D;
    if (row < M) dq[(g * M + row) * D + i % D] = from_acc<T>(sdq[i]);
  }
}

}  // namespace

int forward_splits(const Attention& p, int sm_count) {
  if (decode_fits(p)) {  // about 4 CTAs per SM, each at least 64 keys
    const int64_t rows = p.rows == 1 ? 1 : kDecodeRows;
    const int64_t ctas = p.groups * ((p.rows + rows - 1) / rows);
    return int(std::max<int64_t>(1, lmin((4 * sm_count + ctas - 1) / ctas, (p.keys + 63) / 64)));
  }
  const bool mma = mma_fits(p);
  const int64_t rows_per_cta = mma ? kMmaRows : kRows;
  const int64_t ctas = p.groups * ((p.rows + rows_per_cta - 1) / rows_per_cta);
  // decode rows on tensor cores: ~4 CTAs per SM, as for the decode kernel, to keep
  // enough bytes in flight; otherwise one wave
  const int64_t target = mma && p.rows <= 2 * kDecodeRows ? 4 * int64_t(sm_count) : sm_count;
  if (ctas >= target) return 1;
  const int64_t key_tiles = (p.keys + 31) / 32;
  return int(std::max<int64_t>(1, lmin((target + ctas - 1) / ctas, key_tiles / 2)));
}

cudaError_t attention_forward(const Attention& p, int splits, void* out, void* lse, void* part,
                              void* part_lse, const GateBlend* blend, cudaStream_t stream) {
  if (blend != nullptr && splits != 1) return cudaErrorInvalidValue;
  return dispatch_dtype(p.dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    using Acc = typename AccOf<T>::type;
    if (blend == nullptr && decode_fits(p)) {
      const int64_t per_split = (p.keys + splits - 1) / splits;
      splits = int((p.keys + per_split - 1) / per_split);
      if (splits == 1)
        return launch_decode<T, T>(p, per_split, 1, static_cast<T*>(out), static_cast<Acc*>(lse),
                                   stream);
      if (auto e = launch_decode<T, Acc>(p, per_split, splits, static_cast<Acc*>(part),
                                         static_cast<Acc*>(part_lse), stream);
          e != cudaSuccess)
        return e;
      return launch_combine<T>(p, splits, part, part_lse, out, lse, stream);
    }
    if (mma_fits(p)) {  // tensor cores (float16/bfloat16, sm_80+, opt-in)
      const int64_t per_split = ((p.keys + splits - 1) / splits + 63) / 64 * 64;
      splits = int((p.keys + per_split - 1) / per_split);
      if (auto e = launch_forward_mma(p, per_split, splits, splits > 1 ? part : out,
                                      splits > 1 ? part_lse : lse, blend, stream);
          e != cudaSuccess || splits == 1)
        return e;
      return launch_combine<T>(p, splits, part, part_lse, out, lse, stream);
    }
    const int D = int(p.dim);
    const int kt = key_tile([&](int t) { return forward_smem<Acc>(D, t); });
    if (kt == 0) return cudaErrorInvalidConfiguration;
    const size_t smem = forward_smem<Acc>(D, kt);
    const int64_t per_split = ((p.keys + splits - 1) / splits + kt - 1) / kt * kt;
    splits = int((p.keys + per_split - 1) / per_split);
    const dim3 grid(unsigned((p.rows + kRows - 1) / kRows), unsigned(p.groups), unsigned(splits));
    if (blend != nullptr) {
      auto kernel = attention_forward_kernel<T, Acc, true>;
      if (auto e = allow_smem(kernel, smem); e != cudaSuccess) return e;
      kernel<<<grid, kThreads, smem, stream>>>(p, kt, per_split, static_cast<Acc*>(out),
                                               static_cast<Acc*>(lse), *blend);
    } else if (splits == 1) {
      auto kernel = attention_forward_kernel<T, T, false>;
      if (auto e = allow_smem(kernel, smem); e != cudaSuccess) return e;
      kernel<<<grid, kThreads, smem, stream>>>(p, kt, per_split, static_cast<T*>(out),
                                               static_cast<Acc*>(lse), GateBlend{});
    } else {
      auto kernel = attention_forward_kernel<T, Acc, false>;
      if (auto e = allow_smem(kernel, smem); e != cudaSuccess) return e;
      kernel<<<grid, kThreads, smem, stream>>>(p, kt, per_split, static_cast<Acc*>(part),
                                               static_cast<Acc*>(part_lse), GateBlend{});
      if (auto e = cudaGetLastError(); e != cudaSuccess) return e;
      return launch_combine<T>(p, splits, part, part_lse, out, lse, stream);
    }
    return cudaGetLastError();
  });
}

cudaError_t attention_backward(const Attention& p, const void* dout, const void* lse,
                               const void* delta, void* dq, void* dk, void* dv,
                               cudaStream_t stream) {
  if (mma_fits(p) && reinterpret_cast<uintptr_t>(dout) % 16 == 0)  // tensor cores (opt-in)
    return launch_backward_mma(p, dout, lse, delta, dq, dk, dv, stream);
  return dispatch_dtype(p.dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    using Acc = typename AccOf<T>::type;
    const int D = int(p.dim);
    const int kt_kv = key_tile([&](int t) { return backward_smem<Acc>(D, t, true); });
    const int kt_q = key_tile([&](int t) { return backward_smem<Acc>(D, t, false); });
    if (kt_kv == 0 || kt_q == 0) return cudaErrorInvalidConfiguration;
    auto dkdv = attention_dkdv_kernel<T>;
    const size_t smem_kv = backward_smem<Acc>(D, kt_kv, true);
    if (auto e = allow_smem(dkdv, smem_kv); e != cudaSuccess) return e;
    const dim3 grid_kv(unsigned((p.keys + kt_kv - 1) / kt_kv), unsigned(p.groups));
    dkdv<<<grid_kv, kThreads, smem_kv, stream>>>(p, kt_kv, static_cast<const T*>(dout),
                                                 static_cast<const Acc*>(lse),
                                                 static_cast<const Acc*>(delta),
                                                 static_cast<T*>(dk), static_cast<T*>(dv));
    if (auto e = cudaGetLastError(); e != cudaSuccess) return e;
    auto dqk = attention_dq_kernel<T>;
    const size_t smem_q = backward_smem<Acc>(D, kt_q, false);
    if (auto e = allow_smem(dqk, smem_q); e != cudaSuccess) return e;
    const dim3 grid_q(unsigned((p.rows + kRows - 1) / kRows), unsigned(p.groups));
    dqk<<<grid_q, kThreads, smem_q, stream>>>(p, kt_q, static_cast<const T*>(dout),
                                              static_cast<const Acc*>(lse),
                                              static_cast<const Acc*>(delta), static_cast<T*>(dq));
    return cudaGetLastError();
  });
}

}  // namespace memkernels::cuda
