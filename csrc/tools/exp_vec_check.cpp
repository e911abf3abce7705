// The softmax rows' vector exp (csrc/cpu/softmax_rows_body.inc: exp_vec)
// against double exp over the float line: on the AVX2 body and the AVX-512
// body where the CPU runs them, and on the AVX-512 body's arithmetic emulated
// lane by lane (its 2^n product as p * 2^n), which runs on any x86 CPU, so CI
// hosts without AVX-512 still check that body's math; where the CPU has
// AVX-512 the native body must agree with the emulation bit for bit, and the
// AVX2 body too (its lanes run the same arithmetic)
// (tests/ops/test_cpu_isa_paths.py builds and runs this check).
//
//   g++ -O2 -std=c++17 -Icsrc csrc/tools/exp_vec_check.cpp -o /tmp/exp_vec_check
//   /tmp/exp_vec_check [stride]      (every stride-th float; default 16, ~2 min)
//
// Prints a line per body: its largest relative error on [kMin, 0] (below0,
// the softmax's range) and on (0, kMax] (above0), and how many inputs break
// the contract (check below); the native bodies' lines also count the inputs
// where they differ from the emulation (differ).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "slot_math.h"

namespace memkernels::cpu {
namespace emulated_avx512 {
struct Vec {
  struct R { float v[16]; };
  static constexpr int kWidth = 16;
  static R set1(float x) { R r; std::fill(r.v, r.v + 16, x); return r; }
  static R zero() { return set1(0.0f); }
  static R load(const float* x) { R r; std::memcpy(r.v, x, sizeof r.v); return r; }
  static void store(float* x, R a) { std::memcpy(x, a.v, sizeof a.v); }
  static void stream(float* x, R a) { store(x, a); }
  static void stream_fence() {}
#define MK_LANES(expr) R r; for (int i = 0; i < 16; ++i) r.v[i] = (expr); return r;
  static R add(R a, R b) { MK_LANES(a.v[i] + b.v[i]) }
  static R sub(R a, R b) { MK_LANES(a.v[i] - b.v[i]) }
  static R mul(R a, R b) { MK_LANES(a.v[i] * b.v[i]) }
  static R fma(R a, R b, R c) { MK_LANES(std::fma(a.v[i], b.v[i], c.v[i])) }
  static R fms(R a, R b, R c) { MK_LANES(std::fma(a.v[i], b.v[i], -c.v[i])) }
  // vminps(hi, vmaxps(lo, x)): each returns its second operand (x) on NaN
  static R clamp(R x, float lo, float hi) {
    MK_LANES(hi < (lo > x.v[i] ? lo : x.v[i]) ? hi : (lo > x.v[i] ? lo : x.v[i]))
  }
  // p * 2^n for integral n in [-126, 127]: one rounding, as the native mul_ps
  // by an exact 2^n; NaN kept
  static float times_pow2(float p, float n) {
    return std::isnan(p) || std::isnan(n) ? NAN : std::ldexp(p, static_cast<int>(n));
  }
  // the native bodies' bit arithmetic: 0 for n = -127
  static R pow2_mul_or_zero(R p, R /*t*/, R n) {
    MK_LANES(n.v[i] < -126.5f ? 0.0f : times_pow2(p.v[i], n.v[i]))
  }
  static float reduce1(R a) { float s = 0; for (float x : a.v) s += x; return s; }
#undef MK_LANES
};
#include "cpu/for_index_body.inc"  // softmax_rows_body.inc's exp_vecs indexes through it
#include "cpu/softmax_rows_body.inc"
}  // namespace emulated_avx512
}  // namespace memkernels::cpu

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include "cpu/simd.h"
namespace memkernels::cpu {
MK_BEGIN_AVX2
namespace isa_avx2 {
#include "cpu/softmax_rows_body.inc"
float exp1(float x) { return _mm256_cvtss_f32(exp_vec(Vec::set1(x))); }
}  // namespace isa_avx2
MK_END_ISA
MK_BEGIN_AVX512
namespace isa_avx512 {
#include "cpu/softmax_rows_body.inc"
float exp1(float x) { return _mm512_cvtss_f32(exp_vec(Vec::set1(x))); }
}  // namespace isa_avx512
MK_END_ISA
}  // namespace memkernels::cpu
#define MK_CHECK_NATIVE 1
#endif

struct Errors { double below0 = 0, above0 = 0; long long contract = 0, differ = 0; };

// One input: its relative error against double exp (exp(kMax) above kMax) on
// [kMin, 0] or above 0; a result that is not a positive finite float there, not
// exactly 0 below -87.7 (kMinVec's n = -127), not exp(x) to within 3e-7 of it
// plus the spacing of subnormals between -87.68 and kMin (~1e-38, subnormal
// below ~-87.34; 0 allowed from -87.7 to -87.68, where n may be -127), or not
// NaN for a NaN breaks the contract.
inline void check(Errors& e, float x, float y) {
  using namespace memkernels::exp_poly;
  if (std::isnan(x)) { e.contract += !std::isnan(y); return; }
  if (x < -87.7f) { e.contract += !(y == 0.0f && !std::signbit(y)); return; }
  if (x < kMin) {
    const double want = std::exp(static_cast<double>(x));
    const bool near = std::fabs(y - want) <= 0x1p-149 + 3e-7 * want;
    e.contract += !(y >= 0.0f && !std::signbit(y) && (near || (y == 0.0f && x < -87.68f)));
    return;
  }
  if (!(y > 0.0f) || !std::isfinite(y)) { ++e.contract; return; }
  const double want = std::exp(static_cast<double>(std::min(x, kMax)));
  const double rel = std::fabs(y - want) / want;
  double& worst = x <= 0.0f ? e.below0 : e.above0;
  worst = std::max(worst, rel);
}

float emulated_exp1(float x) {
  using namespace memkernels::cpu;
  return emulated_avx512::exp_vec(emulated_avx512::Vec::set1(x)).v[0];
}

// The two results' bits differ (every NaN counts as one value).
inline bool bits_differ(float a, float b) {
  if (std::isnan(a) || std::isnan(b)) return std::isnan(a) != std::isnan(b);
  return std::memcmp(&a, &b, sizeof a) != 0;
}

// Every stride-th float, and the edges a stride would skip; with `twin`, the
// inputs where exp1 and twin disagree are counted too.
template <typename Exp>
Errors sweep(Exp exp1, uint64_t stride, float (*twin)(float) = nullptr) {
  using namespace memkernels::exp_poly;
  Errors e;
  const auto one = [&](float x) {
    const float y = exp1(x);
    check(e, x, y);
    if (twin != nullptr) e.differ += bits_differ(y, twin(x));
  };
  for (uint64_t b = 0; b <= 0xFFFFFFFFull; b += stride) {
    const uint32_t u = static_cast<uint32_t>(b);
    float x;
    std::memcpy(&x, &u, sizeof x);
    one(x);
  }
  const float edges[] = {0.0f, -0.0f, kMin, kMax, std::nextafter(kMin, -1e9f),
                         std::nextafter(kMin, 0.0f), std::nextafter(kMax, 0.0f),
                         std::nextafter(kMax, 1e9f), -87.68f, -103.0f, -264.8f, -1e30f,
                         1e30f, 3.4e38f, -3.4e38f, 1e-45f, -1e-45f, 1e-38f, -1e-38f,
                         INFINITY, -INFINITY, -0.34657359f, 0.34657359f, kMinVec,
                         std::nextafter(kMinVec, 0.0f), -87.6832f, -87.683f, -87.682f, -87.33f};
  for (const float x : edges) one(x);
  for (const uint32_t nan_bits :
       {0x7FC00000u, 0xFFC00000u, 0x7FC001FFu, 0x7F800001u, 0xFFFFFFFFu}) {
    float x;
    std::memcpy(&x, &nan_bits, sizeof x);
    one(x);
  }
  return e;
}

int main(int argc, char** argv) {
  using namespace memkernels::cpu;
  const uint64_t stride = argc > 1 ? std::strtoull(argv[1], nullptr, 10) : 16;
  const auto report = [](const char* body, Errors e, bool twin = false) {
    std::printf("%s below0=%.3g above0=%.3g broken=%lld", body, e.below0, e.above0, e.contract);
    if (twin) std::printf(" differ=%lld", e.differ);
    std::printf("\n");
  };
  report("avx512-emulated", sweep(emulated_exp1, stride));
#ifdef MK_CHECK_NATIVE
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    report("avx2", sweep(isa_avx2::exp1, stride, emulated_exp1), true);
  // the set simd.h's best_isa() asks before it runs the AVX-512 bodies
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("fma"))
    report("avx512", sweep(isa_avx512::exp1, stride, emulated_exp1), true);
#endif
}
