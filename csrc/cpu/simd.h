// The vector operations the hand-blocked CPU kernels are written in, once per
// ISA: `isa_avx512::Vec` (16 floats) and `isa_avx2::Vec` (8 floats). A kernel
// body written against `Vec` is compiled once per ISA by including it inside
// that ISA's namespace under its target pragma (per_isa.h), so there is one
// body and no hand copy per ISA; the ISA is picked at run time.
//
// Each Vec also says how many rows a register block may hold (kRows): the
// score step keeps 4 keys x kRows rows of partial sums in registers, which
// fits AVX-512's 32 registers at 4 rows and AVX2's 16 at 2.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <type_traits>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)  // GCC's target pragmas
#define MK_HAVE_SIMD_VEC 1
#include <cpuid.h>
#include <immintrin.h>
#endif

namespace memkernels::cpu {

struct bf16;  // attention_cpu.h: the raw 16 bits of a bfloat16

// MEMKERNELS_CPU_ISA=avx2 caps the hand-blocked kernels at AVX2 (tests run the
// AVX2 body on an AVX-512 machine); =generic turns them off (the portable loops).
// MEMKERNELS_CPU_GENERIC=1 is the older spelling of =generic.
enum class Isa { generic = 0, avx2 = 1, avx512 = 2 };

inline Isa isa_cap_from_env() {
  const char* generic = std::getenv("MEMKERNELS_CPU_GENERIC");
  if (generic != nullptr && generic[0] == '1') return Isa::generic;
  const char* cap = std::getenv("MEMKERNELS_CPU_ISA");
  if (cap == nullptr || cap[0] == '\0') return Isa::avx512;
  const auto is = [&](const char* name) {
    const char *a = cap, *b = name;
    while (*a && *a == *b) ++a, ++b;
    return *a == '\0' && *b == '\0';
  };
  if (is("avx2")) return Isa::avx2;
  if (is("generic")) return Isa::generic;
  return Isa::avx512;
}

// The widest ISA this CPU runs and the environment allows (read once).
inline Isa best_isa() {
#ifndef MK_HAVE_SIMD_VEC
  return Isa::generic;
#else
  static const Isa isa = [] {
    const Isa cap = isa_cap_from_env();
    if (cap == Isa::avx512 && __builtin_cpu_supports("avx512f") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma"))
      return Isa::avx512;
    if (cap != Isa::generic && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
      return Isa::avx2;
    return Isa::generic;
  }();
  return isa;
#endif
}

// Whether this CPU runs AVX-512 on 256-bit units: AMD family 0x19 with
// AVX-512 (Zen 4; Zen 3, the same family, has none). There a 512-bit FMA
// issues as two halves, so an AVX-512 body at the FMA rate asks half the
// bytes a cycle that it asks of a full-width core (Zen 5, Intel's server
// cores), and L2 keeps up with reads that elsewhere want L1 (few_rows.h, the
// read's chunk).
inline bool avx512_on_half_width_units() {
#ifndef MK_HAVE_SIMD_VEC
  return false;
#else
  static const bool half = [] {
    unsigned a, b, c, d;
    if (!__get_cpuid(0, &a, &b, &c, &d)) return false;
    const bool amd = b == 0x68747541 && d == 0x69746e65 && c == 0x444d4163;  // "AuthenticAMD"
    if (!amd || !__get_cpuid(1, &a, &b, &c, &d)) return false;
    const unsigned family = ((a >> 8) & 0xF) + ((a >> 20) & 0xFF);
    return family == 0x19 && __builtin_cpu_supports("avx512f");
  }();
  return half;
#endif
}

#ifdef MK_HAVE_SIMD_VEC

// Code between MK_BEGIN_AVX512 (or MK_BEGIN_AVX2) and MK_END_ISA is compiled
// for that ISA: the one place the target strings live. GCC 12 flags the
// deliberately undefined upper lanes inside its own AVX-512 intrinsics
// (_mm512_undefined_ps) as maybe-uninitialized: a false positive, silenced there.
#define MK_BEGIN_ISA_(TARGET)                                                             \
  _Pragma("GCC diagnostic push") _Pragma("GCC diagnostic ignored \"-Wmaybe-uninitialized\"") \
      _Pragma("GCC push_options") _Pragma(TARGET)
#define MK_BEGIN_AVX512 MK_BEGIN_ISA_("GCC target(\"avx512f,avx512bw,avx512vl,avx512dq,fma\")")
#define MK_BEGIN_AVX2 MK_BEGIN_ISA_("GCC target(\"avx2,fma\")")
#define MK_END_ISA _Pragma("GCC pop_options") _Pragma("GCC diagnostic pop")

MK_BEGIN_AVX512
namespace isa_avx512 {
struct Vec {
  using R = __m512;
  static constexpr int kWidth = 16;
  static constexpr int kRows = 4;
  static constexpr int kRegisters = 32;  // vector registers: what a register block may hold
  static R zero() { return _mm512_setzero_ps(); }
  static R set1(float x) { return _mm512_set1_ps(x); }
  static R load(const float* x) { return _mm512_loadu_ps(x); }
  static R load(const bf16* x) {  // bf16 is the high half of a float
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
  }
  static R load(const int8_t* x) {  // the integer; its scale is applied outside
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x));
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(raw));
  }
  // x, kept in a register: GCC otherwise folds a vector loaded once and used
  // by several FMAs into each FMA as a memory operand, so the loads double
  // and the load ports, not the FMAs, bound the few-row loops.
  static R in_register(R x) {
    asm("" : "+v"(x));  // "v": any of the 32 zmm registers
    return x;
  }
  static void store(float* x, R a) { _mm512_storeu_ps(x, a); }
  // past the caches; x aligned to a vector; stream_fence() before another thread reads
  static void stream(float* x, R a) { _mm512_stream_ps(x, a); }
  static void stream_fence() { _mm_sfence(); }
  static R fma(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
  static R mul(R a, R b) { return _mm512_mul_ps(a, b); }
  static R add(R a, R b) { return _mm512_add_ps(a, b); }
  static R sub(R a, R b) { return _mm512_sub_ps(a, b); }
  static R fms(R a, R b, R c) { return _mm512_fmsub_ps(a, b, c); }  // a * b - c
  // x clamped to [lo, hi]; NaN stays NaN (max/min return their second operand on NaN)
  static R clamp(R x, float lo, float hi) {
    return _mm512_min_ps(set1(hi), _mm512_max_ps(set1(lo), x));
  }
  // p * 2^n for integral n = t - kRoundShifter in [-126, 127], 0 for n = -127:
  // 2^n built from t's low bits as on AVX2 (the bias's sum leaves +0.0's bits
  // for n = -127), not vscalefps, which would make 2^-127 p a subnormal in
  // every masked (-inf) score's lane (a microcode assist on some Intel cores).
  // A NaN p stays NaN.
  static R pow2_mul_or_zero(R p, R t, R /*n*/) {
    const __m512i e = _mm512_add_epi32(_mm512_slli_epi32(_mm512_castps_si512(t), 23),
                                       _mm512_set1_epi32(127 << 23));
    return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
  }
  // The horizontal sums of a0..a3 as the 4 lanes of an __m128; the shuffles
  // are shared by the four.
  static __m128 reduce4(R a0, R a1, R a2, R a3) {
    const R b01 = _mm512_add_ps(_mm512_shuffle_f32x4(a0, a1, 0x44),
                                _mm512_shuffle_f32x4(a0, a1, 0xEE));
    const R b23 = _mm512_add_ps(_mm512_shuffle_f32x4(a2, a3, 0x44),
                                _mm512_shuffle_f32x4(a2, a3, 0xEE));
    const R c = _mm512_add_ps(_mm512_shuffle_f32x4(b01, b23, 0x88),
                              _mm512_shuffle_f32x4(b01, b23, 0xDD));
    const R d = _mm512_add_ps(c, _mm512_permute_ps(c, 0xB1));
    const R e = _mm512_add_ps(d, _mm512_permute_ps(d, 0x4E));
    const __m512i lanes = _mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 12, 8, 4, 0);
    return _mm512_castps512_ps128(_mm512_permutexvar_ps(lanes, e));
  }
  // Lane r * 4 + u: the horizontal sum of a[r][u] (a row block's scores of 4
  // keys). Each step halves the lanes of two vectors into one, so the block
  // takes 22 shuffles where four reduce4 calls take 36: the 8-row score pass
  // ran 10% faster hot on Zen 4 (docs/log.md, kernels v30). The first step
  // blends where a second shuffle would do: faster still, shuffles share a
  // pipe with the FMAs there.
  static R sum_halves(R x, R y) {  // [x's two 256-bit halves summed | y's]
    return _mm512_add_ps(_mm512_mask_blend_ps(0xFF00, x, y), _mm512_shuffle_f32x4(x, y, 0x4E));
  }
  static R reduce_block(const R (&a)[kRows][4]) {
    R c[4];  // c[u]: lane group r holds a[r][u] summed to 4 lanes
    for (int u = 0; u < 4; ++u) {
      const R b0 = sum_halves(a[0][u], a[1][u]), b1 = sum_halves(a[2][u], a[3][u]);
      c[u] = _mm512_add_ps(_mm512_shuffle_f32x4(b0, b1, 0x88), _mm512_shuffle_f32x4(b0, b1, 0xDD));
    }
    const R p = _mm512_add_ps(_mm512_shuffle_ps(c[0], c[1], 0x88), _mm512_shuffle_ps(c[0], c[1], 0xDD));
    const R q = _mm512_add_ps(_mm512_shuffle_ps(c[2], c[3], 0x88), _mm512_shuffle_ps(c[2], c[3], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_ps(p, q, 0x88), _mm512_shuffle_ps(p, q, 0xDD));
  }
  static float reduce1(R a) { return _mm512_reduce_add_ps(a); }
  // v with its I-th group of 4 lanes set to x
  template <int I>
  static R insert4(R v, __m128 x) { return _mm512_insertf32x4(v, x, I); }
  // the I-th group of 4 lanes of v
  template <int I>
  static __m128 extract4(R v) { return _mm512_extractf32x4_ps(v, I); }
  // x[0..3] in every group of 4 lanes
  static R broadcast4(const float* x) { return _mm512_broadcast_f32x4(_mm_loadu_ps(x)); }
  // v where the byte of `flags` (lane i: byte i of the 128 bits) is nonzero, else fill
  static R keep_flagged(R v, __m128i flags, float fill) {
    const __m512i f = _mm512_cvtepu8_epi32(flags);
    return _mm512_mask_mov_ps(set1(fill), _mm512_test_epi32_mask(f, f), v);
  }
  // lane i of x in every lane
  static R lane(R x, int i) { return _mm512_permutexvar_ps(_mm512_set1_epi32(i), x); }
  // max(x, m) lane by lane, m where x is NaN (NaN skipped, as mask_and_max skips it)
  static R max_skip_nan(R x, R m) { return _mm512_max_ps(x, m); }
  // whether !(x <= y) in any lane: x above y, or either NaN
  static bool any_nan_or_above(R x, R y) { return _mm512_cmp_ps_mask(x, y, _CMP_NLE_UQ) != 0; }
};
}  // namespace isa_avx512
MK_END_ISA

MK_BEGIN_AVX2
namespace isa_avx2 {
struct Vec {
  using R = __m256;
  static constexpr int kWidth = 8;
  static constexpr int kRows = 2;
  static constexpr int kRegisters = 16;  // vector registers: what a register block may hold
  static R zero() { return _mm256_setzero_ps(); }
  static R set1(float x) { return _mm256_set1_ps(x); }
  static R load(const float* x) { return _mm256_loadu_ps(x); }
  static R load(const bf16* x) {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
  }
  static R load(const int8_t* x) {
    const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(x));
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw));
  }
  // x, kept in a register: GCC otherwise folds a vector loaded once and used
  // by several FMAs into each FMA as a memory operand, so the loads double
  // and the load ports, not the FMAs, bound the few-row loops.
  static R in_register(R x) {
    asm("" : "+x"(x));
    return x;
  }
  static void store(float* x, R a) { _mm256_storeu_ps(x, a); }
  static void stream(float* x, R a) { _mm256_stream_ps(x, a); }
  static void stream_fence() { _mm_sfence(); }
  static R fma(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }
  static R mul(R a, R b) { return _mm256_mul_ps(a, b); }
  static R add(R a, R b) { return _mm256_add_ps(a, b); }
  static R sub(R a, R b) { return _mm256_sub_ps(a, b); }
  static R fms(R a, R b, R c) { return _mm256_fmsub_ps(a, b, c); }  // a * b - c
  static R clamp(R x, float lo, float hi) {
    return _mm256_min_ps(set1(hi), _mm256_max_ps(set1(lo), x));
  }
  // p * 2^n for integral n = t - kRoundShifter in [-126, 127], 0 for n = -127:
  // t's low 9 bits are n's, so shifting them into the exponent field and
  // adding the bias builds 2^n in two integer operations, and for n = -127
  // the sum carries out of the 32 bits and leaves +0.0's. A NaN p stays NaN.
  static R pow2_mul_or_zero(R p, R t, R /*n*/) {
    const __m256i e = _mm256_add_epi32(_mm256_slli_epi32(_mm256_castps_si256(t), 23),
                                       _mm256_set1_epi32(127 << 23));
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  }
  static __m128 reduce4(R a0, R a1, R a2, R a3) {
    // per 128-bit half: [sum a0, sum a1, sum a2, sum a3] over that half's lanes
    const R s = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  }
  static float reduce1(R a) {
    const __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    const __m128 d = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(d, _mm_movehdup_ps(d)));
  }
  static R reduce_block(const R (&a)[kRows][4]) {
    const R s0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0][0], a[0][1]), _mm256_hadd_ps(a[0][2], a[0][3]));
    const R s1 = _mm256_hadd_ps(_mm256_hadd_ps(a[1][0], a[1][1]), _mm256_hadd_ps(a[1][2], a[1][3]));
    return _mm256_add_ps(_mm256_permute2f128_ps(s0, s1, 0x20), _mm256_permute2f128_ps(s0, s1, 0x31));
  }
  template <int I>
  static R insert4(R v, __m128 x) { return _mm256_insertf128_ps(v, x, I); }
  template <int I>
  static __m128 extract4(R v) {
    if constexpr (I == 0) return _mm256_castps256_ps128(v);
    return _mm256_extractf128_ps(v, 1);
  }
  static R broadcast4(const float* x) {
    const __m128 v = _mm_loadu_ps(x);
    return _mm256_set_m128(v, v);
  }
  // lanes 0-7 from bytes 0-7 of flags
  static R keep_flagged(R v, __m128i flags, float fill) {
    const __m256i unset = _mm256_cmpeq_epi32(_mm256_cvtepu8_epi32(flags), _mm256_setzero_si256());
    return _mm256_blendv_ps(v, set1(fill), _mm256_castsi256_ps(unset));
  }
  static R lane(R x, int i) { return _mm256_permutevar8x32_ps(x, _mm256_set1_epi32(i)); }
  // [x[0], x[1]] in every lane pair: one 8-byte broadcast load
  static R broadcast2(const float* x) {
    return _mm256_castpd_ps(_mm256_broadcast_sd(reinterpret_cast<const double*>(x)));
  }
  // lanes 0-3: a's lane pairs summed (a0 + a1, ..., a6 + a7); lanes 4-7: b's
  static R add_pairs(R a, R b) {
    const __m256d s = _mm256_castps_pd(_mm256_hadd_ps(a, b));  // a01 a23 b01 b23 | a45 ...
    return _mm256_castpd_ps(_mm256_permute4x64_pd(s, 0xD8));
  }
  static R max_skip_nan(R x, R m) { return _mm256_max_ps(x, m); }
  static bool any_nan_or_above(R x, R y) {
    return _mm256_movemask_ps(_mm256_cmp_ps(x, y, _CMP_NLE_UQ)) != 0;
  }
};
}  // namespace isa_avx2
MK_END_ISA

#endif  // MK_HAVE_SIMD_VEC

// for_index<N>(f), in each ISA's namespace
#define MK_ISA_BODY "for_index_body.inc"
#include "per_isa.h"

}  // namespace memkernels::cpu
