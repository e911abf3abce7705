// AVX2 passes of the single-query read (a decode step) for CPUs without
// AVX-512 (AMD Zen 2/3, older Intel): float queries and float, bf16 or int8
// keys/values, head dims 8, 16, ..., 64. The same scheme as
// single_row_avx512.h at half the width; kept as its own plain copy because
// GCC cannot inline one template body into functions of two target ISAs.
//
// Why by hand: the generic loops (attention_cpu.h) ran a decode read of a
// bf16 bank at 8.8 GB/s and an int8 bank at 4.4 GB/s on a Zen CPU: the
// widening and the per-key reductions, not DRAM, bounded them.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__)
#define MK_HAVE_AVX2_SINGLE_ROW 1
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>

namespace memkernels::cpu::avx2 {

#define MK_AVX2 __attribute__((target("avx2,fma")))

// MEMKERNELS_CPU_GENERIC=1 (read once) takes the generic loops instead.
inline bool supported() {
  static const bool yes = [] {
    const char* generic = std::getenv("MEMKERNELS_CPU_GENERIC");
    if (generic != nullptr && generic[0] == '1') return false;
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return yes;
}

// 8 consecutive keys/values as floats (int8: the integer; its scale is applied outside).
MK_AVX2 inline __m256 load8(const float* x) { return _mm256_loadu_ps(x); }
MK_AVX2 inline __m256 load8(const bf16* x) {  // bf16 is the high half of a float
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}
MK_AVX2 inline __m256 load8(const int8_t* x) {
  const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(x));
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw));
}

// Horizontal sums of a0..a3, as the four lanes of an __m128.
MK_AVX2 inline __m128 reduce4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
  // per 128-bit half: [sum a0, sum a1, sum a2, sum a3] over that half's lanes
  const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
}

MK_AVX2 inline float reduce1(__m256 a) {
  const __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  const __m128 d = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(d, _mm_movehdup_ps(d)));
}

// scores[j] = scale * <q, k_j>, j < N; D = 8 * NV.
template <int NV, typename KV>
MK_AVX2 void scores(const float* q, const KV* k, int64_t N, float scale, float* out,
                    int64_t prefetch_keys) {
  constexpr int64_t D = 8 * NV;
  __m256 qv[NV];
  for (int i = 0; i < NV; ++i) qv[i] = _mm256_loadu_ps(q + 8 * i);
  const __m128 scale4 = _mm_set1_ps(scale);
  int64_t j = 0;
  for (; j + 4 <= N; j += 4) {
    const KV* kj = k + j * D;
    for (int64_t u = 0; u < 4; ++u)
      _mm_prefetch(reinterpret_cast<const char*>(k + std::min(j + u + prefetch_keys, N - 1) * D),
                   _MM_HINT_T0);
    __m256 acc[4];
    for (int u = 0; u < 4; ++u) {
      acc[u] = _mm256_mul_ps(qv[0], load8(kj + u * D));
      for (int i = 1; i < NV; ++i) acc[u] = _mm256_fmadd_ps(qv[i], load8(kj + u * D + 8 * i), acc[u]);
    }
    _mm_storeu_ps(out + j, _mm_mul_ps(scale4, reduce4(acc[0], acc[1], acc[2], acc[3])));
  }
  for (; j < N; ++j) {
    __m256 acc = _mm256_mul_ps(qv[0], load8(k + j * D));
    for (int i = 1; i < NV; ++i) acc = _mm256_fmadd_ps(qv[i], load8(k + j * D + 8 * i), acc);
    out[j] = scale * reduce1(acc);
  }
}

// out[d] = sum_j p[j] * v_j[d], j < N; D = 8 * NV. Two keys per step into
// two sets of accumulators (independent FMA chains), summed at the end.
template <int NV, typename KV>
MK_AVX2 void values(const float* p, const KV* v, int64_t N, float* out, int64_t prefetch_keys) {
  constexpr int64_t D = 8 * NV;
  __m256 acc0[NV], acc1[NV];
  for (int i = 0; i < NV; ++i) acc0[i] = acc1[i] = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 2 <= N; j += 2) {
    _mm_prefetch(reinterpret_cast<const char*>(v + std::min(j + prefetch_keys, N - 1) * D),
                 _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(v + std::min(j + 1 + prefetch_keys, N - 1) * D),
                 _MM_HINT_T0);
    const __m256 p0 = _mm256_set1_ps(p[j]), p1 = _mm256_set1_ps(p[j + 1]);
    for (int i = 0; i < NV; ++i) {
      acc0[i] = _mm256_fmadd_ps(p0, load8(v + j * D + 8 * i), acc0[i]);
      acc1[i] = _mm256_fmadd_ps(p1, load8(v + (j + 1) * D + 8 * i), acc1[i]);
    }
  }
  if (j < N) {
    const __m256 p0 = _mm256_set1_ps(p[j]);
    for (int i = 0; i < NV; ++i) acc0[i] = _mm256_fmadd_ps(p0, load8(v + j * D + 8 * i), acc0[i]);
  }
  for (int i = 0; i < NV; ++i) _mm256_storeu_ps(out + 8 * i, _mm256_add_ps(acc0[i], acc1[i]));
}

// Dispatch on D = 8 * NV; false when the CPU or D does not allow (the caller
// then runs the generic loops).
inline bool usable(int64_t D) { return D % 8 == 0 && D <= 64 && supported(); }

#define MK_DISPATCH_NV(D, CALL) \
  switch ((D) / 8) {            \
    case 1: CALL(1); break;     \
    case 2: CALL(2); break;     \
    case 3: CALL(3); break;     \
    case 4: CALL(4); break;     \
    case 5: CALL(5); break;     \
    case 6: CALL(6); break;     \
    case 7: CALL(7); break;     \
    default: CALL(8); break;    \
  }

template <typename KV>
bool try_scores(const float* q, const KV* k, int64_t N, int64_t D, float scale, float* out,
                int64_t prefetch_keys) {
  if (!usable(D)) return false;
#define MK_CALL(NV) scores<NV>(q, k, N, scale, out, prefetch_keys)
  MK_DISPATCH_NV(D, MK_CALL)
#undef MK_CALL
  return true;
}

template <typename KV>
bool try_values(const float* p, const KV* v, int64_t N, int64_t D, float* out,
                int64_t prefetch_keys) {
  if (!usable(D)) return false;
#define MK_CALL(NV) values<NV>(p, v, N, out, prefetch_keys)
  MK_DISPATCH_NV(D, MK_CALL)
#undef MK_CALL
  return true;
}
#undef MK_DISPATCH_NV

}  // namespace memkernels::cpu::avx2
#endif
