// Tensor-core kernels for float16/bfloat16 on sm_80+: FlashAttention-2's forward and
// backward on wmma 16x16x16 tiles (fp32 accumulation). Opt-in for now
// (MEMKERNELS_CUDA_TENSOR_CORES=1, see attention_mma.cuh): they then take every
// float16/bfloat16 problem with D a multiple of 16 up to 128, except one-row decode
// groups, which keep attention.cu's decode kernel.
//
// Forward: a CTA of 4 warps owns 64 query rows of one group (16 per warp) and one split of the
// keys; the keys stream through shared memory 64 at a time with 16-byte loads. Per key
// tile, each warp:
//   1. S = Q K^T on tensor cores, stored to its shared score tile;
//   2. the online softmax on S, two lanes per row (masking, running max and sum), P in
//      the input type to shared memory, and O rescaled by the max's correction;
//   3. O += P V on tensor cores.
// O lives in shared memory (fp32) between tiles: wmma does not say which accumulator
// element holds which row, and step 2 rescales O by row.
#include <mma.h>

#include <cstdlib>
#include <type_traits>

#include "attention_mma.cuh"
#include "dtype.cuh"

namespace memkernels::cuda {
namespace {

namespace wmma = nvcuda::wmma;

constexpr int kWarps = 4, kThreads = 32 * kWarps;
constexpr int kWarpRows = kMmaRows / kWarps;  // 16: one wmma tile of rows per warp
constexpr int kKeys = 64;                     // keys per shared tile
constexpr int kMaxDim = 128;
// Row pitches of the shared tiles, in elements. The padding shifts consecutive rows by 4
// banks (no conflicts on wmma loads) and keeps every 16-row x 16-column fragment 32-byte
// aligned, as wmma requires (pitches: multiples of 8 halves or 4 floats).
constexpr int kScorePitch = kKeys + 4;  // float S [16][68]
constexpr int kProbPitch = kKeys + 8;   // T P [16][72]
__host__ __device__ constexpr int tile_pitch(int D) { return D + 8; }  // T Q/K/V rows
__host__ __device__ constexpr int out_pitch(int D) { return D + 4; }   // float O rows

// Per-warp scratch, in floats: S, P (2-byte elements), O.
__host__ __device__ constexpr int warp_floats(int D) {
  return kWarpRows * kScorePitch + kWarpRows * kProbPitch / 2 + kWarpRows * out_pitch(D);
}

size_t mma_smem_bytes(int D) {
  return size_t(kMmaRows + 2 * kKeys) * tile_pitch(D) * 2 + size_t(kWarps) * warp_floats(D) * 4;
}

// Rows [r0, r0 + rows) of a contiguous [*, D] tensor of 2-byte elements into a shared tile
// of pitch tile_pitch(D), 16 bytes per load; rows at or past `limit` are zeros.
template <typename T>
__device__ void load_tile_16b(T* dst, const T* src, int64_t r0, int rows, int64_t limit, int D) {
  const int chunks = D / 8;
  for (int i = threadIdx.x; i < rows * chunks; i += kThreads) {
    const int r = i / chunks, c = (i % chunks) * 8;
    uint4 val = make_uint4(0, 0, 0, 0);
    if (r0 + r < limit) val = __ldg(reinterpret_cast<const uint4*>(src + (r0 + r) * D + c));
    *reinterpret_cast<uint4*>(dst + r * tile_pitch(D) + c) = val;
  }
}

template <typename T, typename OutT, bool kBlend, int kTiles>
__global__ void __launch_bounds__(kThreads)
attention_forward_mma_kernel(Attention p, int64_t keys_per_split, OutT* out, float* lse,
                             GateBlend blend) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  extern __shared__ __align__(128) unsigned char mma_smem[];
  const int D = int(p.dim), Dp = tile_pitch(D), Do = out_pitch(D), dim_tiles = D / 16;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t M = p.rows, N = p.keys, G = p.groups;
  const int64_t g = blockIdx.y, split = blockIdx.z, r0 = int64_t(blockIdx.x) * kMmaRows;
  T* sq = reinterpret_cast<T*>(mma_smem);
  T* sk = sq + kMmaRows * Dp;
  T* sv = sk + kKeys * Dp;
  float* ss = reinterpret_cast<float*>(sv + kKeys * Dp) + warp * warp_floats(D);
  T* sp = reinterpret_cast<T*>(ss + kWarpRows * kScorePitch);
  float* so = ss + kWarpRows * kScorePitch + kWarpRows * kProbPitch / 2;
  const T* q = static_cast<const T*>(p.q) + g * M * D;
  const T* k = static_cast<const T*>(p.k) + g * N * D;
  const T* v = static_cast<const T*>(p.v) + g * N * D;

  // The softmax's lanes: 2r and 2r+1 hold row r's statistics and take the even / odd keys
  // and output columns (interleaved, so a warp's accesses hit 16 banks, not 8).
  const int row = lane / 2, half = lane % 2;
  const int64_t qrow = r0 + warp * kWarpRows + row;
  const bool row_ok = qrow < M;
  const bool* mask_row = p.mask.mask != nullptr && row_ok ? p.mask.row(g, qrow) : nullptr;
  const float scale = float(p.scale);
  float m = neg_inf<float>(), l = 0.f;

  load_tile_16b(sq, q, r0, kMmaRows, M, D);
  for (int i = lane; i < kWarpRows * Do; i += 32) so[i] = 0.f;
  __syncthreads();
  wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> qf[kTiles];
#pragma unroll
  for (int kk = 0; kk < kTiles; ++kk)
    if (kk < dim_tiles) wmma::load_matrix_sync(qf[kk], sq + warp * kWarpRows * Dp + kk * 16, Dp);

  const int64_t n_start = split * keys_per_split;
  const int64_t n_end = N < n_start + keys_per_split ? N : n_start + keys_per_split;
  for (int64_t n0 = n_start; n0 < n_end; n0 += kKeys) {
    __syncthreads();  // every warp is done with the previous K/V tile
    load_tile_16b(sk, k, n0, kKeys, n_end, D);
    load_tile_16b(sv, v, n0, kKeys, n_end, D);
    __syncthreads();

    // 1. S = Q K^T (K's rows read as the columns of a col-major K^T)
#pragma unroll
    for (int nj = 0; nj < kKeys / 16; ++nj) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> sf;
      wmma::fill_fragment(sf, 0.f);
#pragma unroll
      for (int kk = 0; kk < kTiles; ++kk) {
        if (kk < dim_tiles) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> kf;
          wmma::load_matrix_sync(kf, sk + nj * 16 * Dp + kk * 16, Dp);
          wmma::mma_sync(sf, qf[kk], kf, sf);
        }
      }
      wmma::store_matrix_sync(ss + nj * 16, sf, kScorePitch, wmma::mem_row_major);
    }
    __syncwarp();

    // 2. online softmax over this tile (masked keys and keys past the split: -inf)
    float* srow = ss + row * kScorePitch;
    float tile_max = neg_inf<float>();
    for (int j = half; j < kKeys; j += 2) {
      const int64_t key = n0 + j;
      const bool ok = row_ok && key < n_end && (mask_row == nullptr || mask_row[key]);
      const float s = ok ? srow[j] * scale : neg_inf<float>();
      srow[j] = s;
      tile_max = max_keep_nan(tile_max, s);
    }
    tile_max = max_keep_nan(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
    float corr;
    const float new_max = online_softmax_rescale(m, tile_max, &corr);
    float sum = 0.f;
    for (int j = half; j < kKeys; j += 2) {
      const float prob = exp_shifted(srow[j], new_max);
      sum += prob;
      sp[row * kProbPitch + j] = from_acc<T>(prob);
    }
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    l = l * corr + sum;
    m = new_max;
    for (int d = half; d < D; d += 2) so[row * Do + d] *= corr;
    __syncwarp();

    // 3. O += P V
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> pf[kKeys / 16];
#pragma unroll
    for (int kk = 0; kk < kKeys / 16; ++kk) wmma::load_matrix_sync(pf[kk], sp + kk * 16, kProbPitch);
#pragma unroll
    for (int nd = 0; nd < kTiles; ++nd) {
      if (nd < dim_tiles) {
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> of;
        wmma::load_matrix_sync(of, so + nd * 16, Do, wmma::mem_row_major);
#pragma unroll
        for (int kk = 0; kk < kKeys / 16; ++kk) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> vf;
          wmma::load_matrix_sync(vf, sv + kk * 16 * Dp + nd * 16, Dp);
          wmma::mma_sync(of, pf[kk], vf, of);
        }
        wmma::store_matrix_sync(so + nd * 16, of, Do, wmma::mem_row_major);
      }
    }
    __syncwarp();
  }

  if (!row_ok) return;
  const int64_t base = (split * G + g) * M;
  const float inv = safe_inverse(l);
  for (int d = half; d < D; d += 2) {
    const float o = so[row * Do + d] * inv;
    out[(base + qrow) * D + d] = from_acc<OutT>(o);
    if constexpr (kBlend) store_gate_blend<T>(blend, g, M, qrow, d, D, o);
  }
  if (half == 0) lse[base + qrow] = log_sum_exp(m, l);
#else
  __trap();  // never launched: mma_fits requires an sm_80+ device
#endif
}

// --- backward ---------------------------------------------------------------------
// FlashAttention-2's two kernels on 16x16 wmma tiles, from the saved lse (P needs no
// online rescaling, so the dQ/dK/dV accumulators stay in fragments). Each warp works on
// 16x16 blocks of (rows, keys) at a time: scores and dP to its shared scratch, then P and
// dS (elementwise, by lanes that know each entry's row and key) back in the input type
// for the next tensor-core product.
constexpr int kChunkPitch = 16 + 4;    // float [16][20]
constexpr int kChunkPitchT = 16 + 8;   // T [16][24]

// Per-warp scratch of the backward kernels, in floats: two float chunks, two T chunks,
// and a [16][D] float tile through which the accumulators are written out.
__host__ __device__ constexpr int bwd_warp_floats(int D) {
  return 2 * 16 * kChunkPitch + 2 * 16 * kChunkPitchT / 2 + 16 * out_pitch(D);
}

size_t mma_bwd_smem_bytes(int D) {
  return size_t(4 * 64) * tile_pitch(D) * 2 + 2 * 64 * 4 + size_t(kWarps) * bwd_warp_floats(D) * 4;
}

// The backward kernels' shared memory: four 64-row tiles (Q, dO, K, V), the row
// statistics of the row tile, and each warp's scratch.
template <typename T>
struct BwdShared {
  T *q, *dout, *k, *v;  // [64][tile_pitch(D)]
  float *lse, *delta;   // [64]
  float *s, *dp;        // this warp's 16x16 float chunks: S (or S^T), dP (or dP^T)
  T *p, *ds;            // this warp's 16x16 chunks in T: P^T, dS (or dS^T)
  float* out;           // this warp's [16][out_pitch(D)] tile for writing the accumulators
};

template <typename T>
__device__ BwdShared<T> carve_bwd_shared(unsigned char* smem, int D) {
  BwdShared<T> b;
  const int tile = 64 * tile_pitch(D);
  b.q = reinterpret_cast<T*>(smem);
  b.dout = b.q + tile;
  b.k = b.dout + tile;
  b.v = b.k + tile;
  b.lse = reinterpret_cast<float*>(b.v + tile);
  b.delta = b.lse + 64;
  float* w = b.delta + 64 + (threadIdx.x / 32) * bwd_warp_floats(D);
  b.s = w;
  b.dp = w + 16 * kChunkPitch;
  b.p = reinterpret_cast<T*>(w + 2 * 16 * kChunkPitch);
  b.ds = reinterpret_cast<T*>(w + 2 * 16 * kChunkPitch + 16 * kChunkPitchT / 2);
  b.out = w + 2 * 16 * kChunkPitch + 2 * 16 * kChunkPitchT / 2;
  return b;
}

// lse and delta of rows [r0, r0 + 64) of group g into shared memory (-inf and 0 past M).
__device__ void load_row_stats(const float* lse, const float* delta, int64_t g, int64_t r0,
                               int64_t M, float* slse, float* sdelta) {
  for (int i = threadIdx.x; i < 64; i += kThreads) {
    const bool ok = r0 + i < M;
    slse[i] = ok ? lse[g * M + r0 + i] : neg_inf<float>();
    sdelta[i] = ok ? delta[g * M + r0 + i] : 0.f;
  }
}

// Writes accumulator fragments (a warp's 16 x D block) as T rows row0.. of `dst` (row
// stride D), skipping rows at or past `limit`, through the warp's float tile.
template <typename T, int kTiles>
__device__ void store_rows(wmma::fragment<wmma::accumulator, 16, 16, 16, float> (&acc)[kTiles],
                           float* tile, T* dst, int64_t row0, int64_t limit, int D) {
  const int Do = out_pitch(D);
#pragma unroll
  for (int nd = 0; nd < kTiles; ++nd)
    if (nd < D / 16) wmma::store_matrix_sync(tile + nd * 16, acc[nd], Do, wmma::mem_row_major);
  __syncwarp();
  for (int e = threadIdx.x % 32; e < 16 * D; e += 32) {
    const int r = e / D, d = e % D;
    if (row0 + r < limit) dst[(row0 + r) * D + d] = from_acc<T>(tile[r * Do + d]);
  }
  __syncwarp();
}

// The warp's two 16x16 score-like blocks: s = A1 B1^T and dp = A2 B2^T, each operand 16
// rows of a shared tile (pitch tile_pitch(D)), summed over D; stored to the warp's float
// chunks (pitch kChunkPitch).
template <typename T, int kTiles>
__device__ void chunk_products(const T* a1, const T* b1, const T* a2, const T* b2, int D,
                               float* s, float* dp) {
  const int Dp = tile_pitch(D);
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> s_acc, dp_acc;
  wmma::fill_fragment(s_acc, 0.f);
  wmma::fill_fragment(dp_acc, 0.f);
#pragma unroll
  for (int kk = 0; kk < kTiles; ++kk) {
    if (kk < D / 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a1f, a2f;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b1f, b2f;  // rows as B^T
      wmma::load_matrix_sync(a1f, a1 + kk * 16, Dp);
      wmma::load_matrix_sync(b1f, b1 + kk * 16, Dp);
      wmma::load_matrix_sync(a2f, a2 + kk * 16, Dp);
      wmma::load_matrix_sync(b2f, b2 + kk * 16, Dp);
      wmma::mma_sync(s_acc, a1f, b1f, s_acc);
      wmma::mma_sync(dp_acc, a2f, b2f, dp_acc);
    }
  }
  wmma::store_matrix_sync(s, s_acc, kChunkPitch, wmma::mem_row_major);
  wmma::store_matrix_sync(dp, dp_acc, kChunkPitch, wmma::mem_row_major);
  __syncwarp();
}

// acc (16 x D) += chunk (16x16, T, pitch kChunkPitchT) times 16 rows of a shared tile.
template <typename T, int kTiles>
__device__ void accumulate_product(wmma::fragment<wmma::accumulator, 16, 16, 16, float> (&acc)[kTiles],
                                   const T* chunk, const T* rows, int D) {
  wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> cf;
  wmma::load_matrix_sync(cf, chunk, kChunkPitchT);
#pragma unroll
  for (int nd = 0; nd < kTiles; ++nd) {
    if (nd < D / 16) {
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> rf;
      wmma::load_matrix_sync(rf, rows + nd * 16, tile_pitch(D));
      wmma::mma_sync(acc[nd], cf, rf, acc[nd]);
    }
  }
}

// One CTA owns 64 keys of one group (16 per warp) and loops over all the group's rows, so
// dK/dV (summed over the batch for a shared bank) need no atomics.
template <typename T, int kTiles>
__global__ void __launch_bounds__(kThreads)
attention_dkdv_mma_kernel(Attention p, const T* dout, const float* lse, const float* delta, T* dk,
                          T* dv) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  extern __shared__ __align__(128) unsigned char mma_smem[];
  const int D = int(p.dim), Dp = tile_pitch(D);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t M = p.rows, N = p.keys, g = blockIdx.y, n0 = int64_t(blockIdx.x) * 64;
  const int64_t key0 = n0 + warp * 16;  // this warp's 16 keys
  const BwdShared<T> b = carve_bwd_shared<T>(mma_smem, D);
  T *sq = b.q, *sdo = b.dout, *sk = b.k, *sv = b.v, *spt = b.p, *sdst = b.ds;
  float *slse = b.lse, *sdelta = b.delta;
  const float scale = float(p.scale);
  const T* q = static_cast<const T*>(p.q) + g * M * D;
  const T* dout_g = dout + g * M * D;

  load_tile_16b(sk, static_cast<const T*>(p.k) + g * N * D, n0, 64, N, D);
  load_tile_16b(sv, static_cast<const T*>(p.v) + g * N * D, n0, 64, N, D);
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> dk_acc[kTiles], dv_acc[kTiles];
#pragma unroll
  for (int nd = 0; nd < kTiles; ++nd) {
    wmma::fill_fragment(dk_acc[nd], 0.f);
    wmma::fill_fragment(dv_acc[nd], 0.f);
  }
  for (int64_t r0 = 0; r0 < M; r0 += 64) {
    __syncthreads();  // every warp is done with the previous row tile
    load_tile_16b(sq, q, r0, 64, M, D);
    load_tile_16b(sdo, dout_g, r0, 64, M, D);
    load_row_stats(lse, delta, g, r0, M, slse, sdelta);
    __syncthreads();
    for (int c = 0; c < 4; ++c) {  // 16-row chunks of the tile
      if (r0 + c * 16 >= M) break;  // warp-uniform
      // S^T = K_w Q_c^T and dP^T = V_w dO_c^T (16 keys x 16 rows)
      chunk_products<T, kTiles>(sk + warp * 16 * Dp, sq + c * 16 * Dp, sv + warp * 16 * Dp,
                                sdo + c * 16 * Dp, D, b.s, b.dp);
      for (int e = lane; e < 256; e += 32) {  // entry (key j, row r)
        const int j = e / 16, r = e % 16, rt = c * 16 + r;
        const int64_t key = key0 + j, row = r0 + rt;
        float prob = 0.f, ds = 0.f;
        if (key < N && row < M && p.mask.valid(g, row, key)) {
          prob = prob_from_lse(b.s[j * kChunkPitch + r] * scale, slse[rt]);
          ds = prob * (b.dp[j * kChunkPitch + r] - sdelta[rt]) * scale;
        }
        spt[j * kChunkPitchT + r] = from_acc<T>(prob);
        sdst[j * kChunkPitchT + r] = from_acc<T>(ds);
      }
      __syncwarp();
      // dV_w += P^T dO_c, dK_w += dS^T Q_c
      accumulate_product<T, kTiles>(dv_acc, spt, sdo + c * 16 * Dp, D);
      accumulate_product<T, kTiles>(dk_acc, sdst, sq + c * 16 * Dp, D);
      __syncwarp();  // the scratch is rewritten by the next chunk
    }
  }
  store_rows<T>(dk_acc, b.out, dk + g * N * D, key0, N, D);
  store_rows<T>(dv_acc, b.out, dv + g * N * D, key0, N, D);
#else
  __trap();
#endif
}

// One CTA owns 64 rows of one group (16 per warp) and loops over all the group's keys.
template <typename T, int kTiles>
__global__ void __launch_bounds__(kThreads)
attention_dq_mma_kernel(Attention p, const T* dout, const float* lse, const float* delta, T* dq) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  extern __shared__ __align__(128) unsigned char mma_smem[];
  const int D = int(p.dim), Dp = tile_pitch(D);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t M = p.rows, N = p.keys, g = blockIdx.y, r0 = int64_t(blockIdx.x) * 64;
  const int64_t row0 = r0 + warp * 16;  // this warp's 16 rows
  const BwdShared<T> b = carve_bwd_shared<T>(mma_smem, D);
  T *sq = b.q, *sdo = b.dout, *sk = b.k, *sv = b.v, *sds = b.ds;
  float *slse = b.lse, *sdelta = b.delta;
  const float scale = float(p.scale);
  const T* k = static_cast<const T*>(p.k) + g * N * D;
  const T* v = static_cast<const T*>(p.v) + g * N * D;

  load_tile_16b(sq, static_cast<const T*>(p.q) + g * M * D, r0, 64, M, D);
  load_tile_16b(sdo, dout + g * M * D, r0, 64, M, D);
  load_row_stats(lse, delta, g, r0, M, slse, sdelta);
  __syncthreads();
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> dq_acc[kTiles];
#pragma unroll
  for (int kk = 0; kk < kTiles; ++kk) wmma::fill_fragment(dq_acc[kk], 0.f);
  for (int64_t n0 = 0; n0 < N; n0 += 64) {
    __syncthreads();  // every warp is done with the previous K/V tile
    load_tile_16b(sk, k, n0, 64, N, D);
    load_tile_16b(sv, v, n0, 64, N, D);
    __syncthreads();
    for (int c = 0; c < 4; ++c) {  // 16-key chunks of the tile
      if (n0 + c * 16 >= N) break;  // warp-uniform
      // S = Q_w K_c^T and dP = dO_w V_c^T (16 rows x 16 keys)
      chunk_products<T, kTiles>(sq + warp * 16 * Dp, sk + c * 16 * Dp, sdo + warp * 16 * Dp,
                                sv + c * 16 * Dp, D, b.s, b.dp);
      for (int e = lane; e < 256; e += 32) {  // entry (row r, key j)
        const int r = e / 16, j = e % 16, rt = warp * 16 + r;
        const int64_t row = r0 + rt, key = n0 + c * 16 + j;
        float ds = 0.f;
        if (key < N && row < M && p.mask.valid(g, row, key)) {
          const float prob = prob_from_lse(b.s[r * kChunkPitch + j] * scale, slse[rt]);
          ds = prob * (b.dp[r * kChunkPitch + j] - sdelta[rt]) * scale;
        }
        sds[r * kChunkPitchT + j] = from_acc<T>(ds);
      }
      __syncwarp();
      // dQ_w += dS K_c
      accumulate_product<T, kTiles>(dq_acc, sds, sk + c * 16 * Dp, D);
      __syncwarp();  // the scratch is rewritten by the next chunk
    }
  }
  store_rows<T>(dq_acc, b.out, dq + g * M * D, row0, M, D);
#else
  __trap();
#endif
}

// Calls fn(std::integral_constant<int, kTiles>{}): the kernels are compiled for 2, 4 and 8
// column tiles of 16 (D up to 32, 64, 128) and skip the tiles past D / 16 at run time.
template <typename Fn>
cudaError_t dispatch_tiles(int64_t D, Fn&& fn) {
  if (D <= 32) return fn(std::integral_constant<int, 2>{});
  if (D <= 64) return fn(std::integral_constant<int, 4>{});
  return fn(std::integral_constant<int, 8>{});
}

template <typename T, typename OutT, bool kBlend>
cudaError_t launch(const Attention& p, int64_t keys_per_split, int splits, void* out, void* lse,
                   const GateBlend& blend, cudaStream_t stream) {
  return dispatch_tiles(p.dim, [&](auto tiles) -> cudaError_t {
    auto kernel = attention_forward_mma_kernel<T, OutT, kBlend, decltype(tiles)::value>;
    const size_t smem = mma_smem_bytes(int(p.dim));
    if (auto e = allow_smem(kernel, smem); e != cudaSuccess) return e;
    const dim3 grid(unsigned((p.rows + kMmaRows - 1) / kMmaRows), unsigned(p.groups),
                    unsigned(splits));
    kernel<<<grid, kThreads, smem, stream>>>(p, keys_per_split, static_cast<OutT*>(out),
                                             static_cast<float*>(lse), blend);
    return cudaGetLastError();
  });
}

template <typename T>
cudaError_t launch_for(const Attention& p, int64_t keys_per_split, int splits, void* out,
                       void* lse, const GateBlend* blend, cudaStream_t stream) {
  if (blend != nullptr) return launch<T, float, true>(p, keys_per_split, 1, out, lse, *blend, stream);
  if (splits > 1) return launch<T, float, false>(p, keys_per_split, splits, out, lse, {}, stream);
  return launch<T, T, false>(p, keys_per_split, 1, out, lse, {}, stream);
}

template <typename T>
cudaError_t launch_backward(const Attention& p, const void* dout, const void* lse,
                            const void* delta, void* dq, void* dk, void* dv, cudaStream_t stream) {
  return dispatch_tiles(p.dim, [&](auto tiles) -> cudaError_t {
    constexpr int kTiles = decltype(tiles)::value;
    const size_t smem = mma_bwd_smem_bytes(int(p.dim));
    auto dkdv = attention_dkdv_mma_kernel<T, kTiles>;
    if (auto e = allow_smem(dkdv, smem); e != cudaSuccess) return e;
    dkdv<<<dim3(unsigned((p.keys + 63) / 64), unsigned(p.groups)), kThreads, smem, stream>>>(
        p, static_cast<const T*>(dout), static_cast<const float*>(lse),
        static_cast<const float*>(delta), static_cast<T*>(dk), static_cast<T*>(dv));
    if (auto e = cudaGetLastError(); e != cudaSuccess) return e;
    auto dq_kernel = attention_dq_mma_kernel<T, kTiles>;
    if (auto e = allow_smem(dq_kernel, smem); e != cudaSuccess) return e;
    dq_kernel<<<dim3(unsigned((p.rows + 63) / 64), unsigned(p.groups)), kThreads, smem, stream>>>(
        p, static_cast<const T*>(dout), static_cast<const float*>(lse),
        static_cast<const float*>(delta), static_cast<T*>(dq));
    return cudaGetLastError();
  });
}

bool requested_by_env() {
  static const bool on = [] {
    const char* e = std::getenv("MEMKERNELS_CUDA_TENSOR_CORES");
    return e != nullptr && e[0] == '1';
  }();
  return on;
}

}  // namespace

bool mma_fits(const Attention& p) {
  if (!requested_by_env()) return false;
  if (p.dtype != DType::kFloat16 && p.dtype != DType::kBFloat16) return false;
  const auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  if (p.dim % 16 != 0 || p.dim > kMaxDim || !aligned(p.q) || !aligned(p.k) || !aligned(p.v))
    return false;
  int dev = 0, major = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess)
    return false;
  return major >= 8;
}

cudaError_t launch_forward_mma(const Attention& p, int64_t keys_per_split, int splits, void* out,
                               void* lse, const GateBlend* blend, cudaStream_t stream) {
  if (keys_per_split % kKeys != 0 || (blend != nullptr && splits != 1))
    return cudaErrorInvalidValue;
  if (p.dtype == DType::kBFloat16)
    return launch_for<__nv_bfloat16>(p, keys_per_split, splits, out, lse, blend, stream);
  if (p.dtype == DType::kFloat16)
    return launch_for<__half>(p, keys_per_split, splits, out, lse, blend, stream);
  return cudaErrorInvalidValue;
}

cudaError_t launch_backward_mma(const Attention& p, const void* dout, const void* lse,
                                const void* delta, void* dq, void* dk, void* dv,
                                cudaStream_t stream) {
  if (p.dtype == DType::kBFloat16)
    return launch_backward<__nv_bfloat16>(p, dout, lse, delta, dq, dk, dv, stream);
  if (p.dtype == DType::kFloat16)
    return launch_backward<__half>(p, dout, lse, delta, dq, dk, dv, stream);
  return cudaErrorInvalidValue;
}

}  // namespace memkernels::cuda
