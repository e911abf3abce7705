// AVX-512 passes of the single-query read (a decode step), float queries and
// float, bf16 or int8 keys/values, head dims 16, 32, 48, 64.
//
// Why by hand: GCC's vectorisation of the generic loops (attention_cpu.h)
// used 256-bit registers and separate multiply/add even in the avx512f clone,
// and re-zeroed the partial sums through the stack for every four keys: a hot
// decode read ran at 11 GFLOP/s per core. Here the dot products of four keys
// are reduced together (shuffles shared by the four), and the value sum stays
// in registers for the whole pass.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__)
#define MK_HAVE_AVX512_SINGLE_ROW 1
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>

namespace memkernels::cpu::avx512 {

#define MK_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))

// MEMKERNELS_CPU_GENERIC=1 (read once) takes the generic loops instead: the
// tests check both paths on an AVX-512 machine.
inline bool supported() {
  static const bool yes = [] {
    const char* generic = std::getenv("MEMKERNELS_CPU_GENERIC");
    if (generic != nullptr && generic[0] == '1') return false;
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  }();
  return yes;
}

// 16 consecutive keys/values as floats.
MK_AVX512 inline __m512 load16(const float* x) { return _mm512_loadu_ps(x); }
MK_AVX512 inline __m512 load16(const bf16* x) {  // bf16 is the high half of a float
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

MK_AVX512 inline __m512 load16(const int8_t* x) {  // the int8 value; its scale is applied outside
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x));
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(raw));
}

// Horizontal sums of a0..a3, as the four lanes of an __m128.
MK_AVX512 inline __m128 reduce4(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
  // 256-bit halves: [a0.lo + a0.hi, a1.lo + a1.hi] (8 lanes each)
  const __m512 b01 = _mm512_add_ps(_mm512_shuffle_f32x4(a0, a1, 0x44),
                                   _mm512_shuffle_f32x4(a0, a1, 0xEE));
  const __m512 b23 = _mm512_add_ps(_mm512_shuffle_f32x4(a2, a3, 0x44),
                                   _mm512_shuffle_f32x4(a2, a3, 0xEE));
  // 128-bit quarters: 4 lanes per key, keys in order 0, 1, 2, 3
  const __m512 c = _mm512_add_ps(_mm512_shuffle_f32x4(b01, b23, 0x88),
                                 _mm512_shuffle_f32x4(b01, b23, 0xDD));
  // within each quarter: 4 -> 1
  const __m512 d = _mm512_add_ps(c, _mm512_permute_ps(c, 0xB1));
  const __m512 e = _mm512_add_ps(d, _mm512_permute_ps(d, 0x4E));
  const __m512i lanes = _mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 12, 8, 4, 0);
  return _mm512_castps512_ps128(_mm512_permutexvar_ps(lanes, e));
}

// scores[j] = scale * <q, k_j>, j < N; D = 16 * NV.
template <int NV, typename KV>
MK_AVX512 void scores(const float* q, const KV* k, int64_t N, float scale, float* out,
                      int64_t prefetch_keys) {
  constexpr int64_t D = 16 * NV;
  __m512 qv[NV];
  for (int i = 0; i < NV; ++i) qv[i] = _mm512_loadu_ps(q + 16 * i);
  const __m128 scale4 = _mm_set1_ps(scale);
  int64_t j = 0;
  for (; j + 4 <= N; j += 4) {
    const KV* kj = k + j * D;
    for (int64_t u = 0; u < 4; ++u)
      _mm_prefetch(reinterpret_cast<const char*>(k + std::min(j + u + prefetch_keys, N - 1) * D),
                   _MM_HINT_T0);
    __m512 acc[4];
    for (int u = 0; u < 4; ++u) {
      acc[u] = _mm512_mul_ps(qv[0], load16(kj + u * D));
      for (int i = 1; i < NV; ++i) acc[u] = _mm512_fmadd_ps(qv[i], load16(kj + u * D + 16 * i), acc[u]);
    }
    _mm_storeu_ps(out + j, _mm_mul_ps(scale4, reduce4(acc[0], acc[1], acc[2], acc[3])));
  }
  for (; j < N; ++j) {
    __m512 acc = _mm512_mul_ps(qv[0], load16(k + j * D));
    for (int i = 1; i < NV; ++i) acc = _mm512_fmadd_ps(qv[i], load16(k + j * D + 16 * i), acc);
    out[j] = scale * _mm512_reduce_add_ps(acc);
  }
}

// out[d] = sum_j p[j] * v_j[d], j < N; D = 16 * NV. Two keys per step into
// two sets of accumulators (independent FMA chains), summed at the end.
template <int NV, typename KV>
MK_AVX512 void values(const float* p, const KV* v, int64_t N, float* out, int64_t prefetch_keys) {
  constexpr int64_t D = 16 * NV;
  __m512 acc0[NV], acc1[NV];
  for (int i = 0; i < NV; ++i) acc0[i] = acc1[i] = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 2 <= N; j += 2) {
    _mm_prefetch(reinterpret_cast<const char*>(v + std::min(j + prefetch_keys, N - 1) * D),
                 _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(v + std::min(j + 1 + prefetch_keys, N - 1) * D),
                 _MM_HINT_T0);
    const __m512 p0 = _mm512_set1_ps(p[j]), p1 = _mm512_set1_ps(p[j + 1]);
    for (int i = 0; i < NV; ++i) {
      acc0[i] = _mm512_fmadd_ps(p0, load16(v + j * D + 16 * i), acc0[i]);
      acc1[i] = _mm512_fmadd_ps(p1, load16(v + (j + 1) * D + 16 * i), acc1[i]);
    }
  }
  if (j < N) {
    const __m512 p0 = _mm512_set1_ps(p[j]);
    for (int i = 0; i < NV; ++i) acc0[i] = _mm512_fmadd_ps(p0, load16(v + j * D + 16 * i), acc0[i]);
  }
  for (int i = 0; i < NV; ++i) _mm512_storeu_ps(out + 16 * i, _mm512_add_ps(acc0[i], acc1[i]));
}

// Dispatch on D = 16 * NV; false when the CPU or D does not allow (the caller
// then runs the generic loops).
inline bool usable(int64_t D) { return D % 16 == 0 && D <= 64 && supported(); }

#define MK_DISPATCH_NV(D, CALL) \
  switch ((D) / 16) {           \
    case 1: CALL(1); break;     \
    case 2: CALL(2); break;     \
    case 3: CALL(3); break;     \
    default: CALL(4); break;    \
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

}  // namespace memkernels::cpu::avx512
#endif
