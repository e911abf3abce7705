// Where the few-row read's time goes when its rows take the chunked pass
// (the shared-bank decode's 8 rows a head; any group past the one pass's
// kOnePassRows): that pass, hot, on one thread, each step of a chunk timed on
// its own (TSC ticks): the score pass (S = Q K^T for each row block, and each
// row's max), the softmax rows (rescale, exp) and the value pass (O += P V).
// The score and value passes' FLOPs a tick sit beside the FMA units' rate
// measured in the same run (fma_burst, the same ISA), so their share of that
// rate needs no clock speed. The steps run as
// few_rows_forward runs them (no mask, float K and V, no prefetching: the
// bank is hot), in the pass it takes for these rows (the key-major pass where
// it applies: key_major_vectors), and the output is checked against
// few_rows_read's. MEMKERNELS_CPU_ISA=avx2 picks the AVX2 body,
// MEMKERNELS_CPU_KEY_MAJOR=0|1 the layout.
//   ./memkernels_few_rows_phases [rows [keys [dim [reps]]]]
#include <omp.h>
#include <x86intrin.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "cpu/slot_bank_cpu.h"  // before few_rows.h: the row kernels its body calls
#include "cpu/few_rows.h"
#include "cpu/tile_gemm.h"

#ifdef MK_HAVE_SIMD_VEC
namespace {

using namespace memkernels::cpu;

enum Step { kScores, kSoftmax, kValues, kSteps };
const char* const kNames[kSteps] = {"scores S = Q K^T", "softmax rows", "values O += P V"};

// few_rows_forward's chunked pass (few_rows_body.inc) for one body, with TSC
// ticks added into ticks[step].
template <bool kWide>
void chunked_pass(const float* q, const float* k, const float* v, int64_t M, int64_t N,
                  int64_t D, float scale, float* out, double* ticks) {
  const int64_t kc = few_rows_chunk_keys(M, D);
  std::vector<float> qs(M * D), s(M * kc), row_max(M, -INFINITY), row_sum(M, 0.0f), chunk_max(M);
  for (int64_t e = 0; e < M * D; ++e) qs[e] = q[e] * scale, out[e] = 0.0f;
  for (int64_t n0 = 0; n0 < N; n0 += kc) {
    const int64_t nb = std::min(kc, N - n0);
    const uint64_t t0 = __rdtsc();
    const auto scores = [&](auto rb, int64_t r0) {
      constexpr int RB = decltype(rb)::value;
      if constexpr (kWide)
        isa_avx512::score_block<RB>(qs.data() + r0 * D, k + n0 * D, nb, D, s.data() + r0 * kc,
                                    kc, {}, chunk_max.data() + r0);
      else
        isa_avx2::score_block<RB>(qs.data() + r0 * D, k + n0 * D, nb, D, s.data() + r0 * kc,
                                  kc, {}, chunk_max.data() + r0);
    };
    if constexpr (kWide)
      isa_avx512::for_row_blocks(M, scores);
    else
      isa_avx2::for_row_blocks(M, scores);
    const uint64_t t1 = __rdtsc();
    for (int64_t r = 0; r < M; ++r) {
      float* sr = s.data() + r * kc;
      float correction;
      const float block_max = chunk_max[r] != -INFINITY
                                  ? chunk_max[r]
                                  : mask_and_max(sr, static_cast<const bool*>(nullptr), nb);
      const float new_max =
          memkernels::online_softmax_rescale_if_risen(row_max[r], block_max, &correction);
      row_sum[r] = row_sum[r] * correction + exp_row(sr, nb, new_max);
      row_max[r] = new_max;
      if (correction != 1.0f)
        for (int64_t d = 0; d < D; ++d) out[r * D + d] *= correction;
    }
    const uint64_t t2 = __rdtsc();
    const auto values = [&](auto rb, int64_t r0) {
      constexpr int RB = decltype(rb)::value;
      if constexpr (kWide)
        isa_avx512::value_block<RB>(s.data() + r0 * kc, kc, 1, v + n0 * D, D, nb, D, out + r0 * D,
                                    D, {});
      else
        isa_avx2::value_block<RB>(s.data() + r0 * kc, kc, 1, v + n0 * D, D, nb, D, out + r0 * D, D,
                                  {});
    };
    if constexpr (kWide)
      isa_avx512::for_row_blocks<isa_avx512::kValueRows>(M, values);
    else
      isa_avx2::for_row_blocks<isa_avx2::kValueRows>(M, values);
    const uint64_t t3 = __rdtsc();
    ticks[kScores] += double(t1 - t0), ticks[kSoftmax] += double(t2 - t1);
    ticks[kValues] += double(t3 - t2);
  }
  for (int64_t r = 0; r < M; ++r)
    for (int64_t d = 0; d < D; ++d) out[r * D + d] /= row_sum[r];
}

// few_rows_forward's key-major pass (few_rows_body.inc), timed the same way.
template <bool kWide, int RV>
void key_major_pass(const float* q, const float* k, const float* v, int64_t M, int64_t N,
                    int64_t D, float scale, float* out, double* ticks) {
  constexpr int LW = RV * (kWide ? 16 : 8);
  const int64_t kc = few_rows_chunk_keys(M, D);
  std::vector<float> qt(D * LW, 0.0f), st(kc * LW), row_max(LW, -INFINITY), row_sum(LW, 0.0f);
  alignas(64) float lane_max[LW];
  if constexpr (kWide)
    isa_avx512::key_major_queries<RV>(q, M, D, scale, qt.data());
  else
    isa_avx2::key_major_queries<RV>(q, M, D, scale, qt.data());
  for (int64_t e = 0; e < M * D; ++e) out[e] = 0.0f;
  for (int64_t n0 = 0; n0 < N; n0 += kc) {
    const int64_t nb = std::min(kc, N - n0);
    const uint64_t t0 = __rdtsc();
    if constexpr (kWide)
      isa_avx512::key_major_scores_chunk<RV>(qt.data(), k + n0 * D, nb, D, st.data(), lane_max,
                                             {});
    else
      isa_avx2::key_major_scores_chunk<RV>(qt.data(), k + n0 * D, nb, D, st.data(), lane_max, {});
    const uint64_t t1 = __rdtsc();
    if constexpr (kWide)
      isa_avx512::key_major_softmax_chunk<RV>(st.data(), nb, M, D, lane_max, row_max.data(),
                                              row_sum.data(), out);
    else
      isa_avx2::key_major_softmax_chunk<RV>(st.data(), nb, M, D, lane_max, row_max.data(),
                                            row_sum.data(), out);
    const uint64_t t2 = __rdtsc();
    if constexpr (kWide)
      isa_avx512::key_major_values_chunk<RV, float>(st.data(), nb, M, v + n0 * D, D, out,
                                                    nullptr, nullptr, 0);
    else
      isa_avx2::key_major_values_chunk<RV, float>(st.data(), nb, M, v + n0 * D, D, out, nullptr,
                                                  nullptr, 0);
    ticks[kScores] += double(t1 - t0), ticks[kSoftmax] += double(t2 - t1);
    ticks[kValues] += double(__rdtsc() - t2);
  }
  for (int64_t r = 0; r < M; ++r)
    for (int64_t d = 0; d < D; ++d) out[r * D + d] /= row_sum[r];
}

}  // namespace

int main(int argc, char** argv) {
  const int64_t M = argc > 1 ? atoll(argv[1]) : 8, N = argc > 2 ? atoll(argv[2]) : 1024,
                D = argc > 3 ? atoll(argv[3]) : 64;
  const int reps = argc > 4 ? atoi(argv[4]) : 300;
  if (M < 1 || M > kFewRowsMax || N < 1 || D < 1 || reps < 1) {
    std::printf("rows must be 1..%ld; keys, dim and reps positive\n", long(kFewRowsMax));
    return 2;
  }
  const Isa isa = best_isa();
  if (isa == Isa::generic || D % vector_width(isa) != 0) {
    std::printf("no few-row body for dim=%ld on this CPU\n", long(D));
    return 2;
  }
  omp_set_num_threads(1);
  std::mt19937 rng(0);
  std::normal_distribution<float> normal;
  std::vector<float> q(M * D), k(N * D), v(N * D), out(M * D);
  for (auto* x : {&q, &k, &v})
    for (auto& e : *x) e = normal(rng);
  const float scale = 1.0f / std::sqrt(float(D));
  // the key-major pass's vectors a key (0: the row-major chunked pass)
  const int key_major = isa == Isa::avx512 ? isa_avx512::key_major_vectors(M)
                                           : isa_avx2::key_major_vectors(M);
  double best[kSteps];
  std::fill(best, best + kSteps, 1e300);
  for (int rep = 0; rep <= reps; ++rep) {  // the first warms up and is dropped
    double t[kSteps] = {};
    if (isa == Isa::avx512 && key_major == 1)
      key_major_pass<true, 1>(q.data(), k.data(), v.data(), M, N, D, scale, out.data(), t);
    else if (isa == Isa::avx512)
      chunked_pass<true>(q.data(), k.data(), v.data(), M, N, D, scale, out.data(), t);
    else if (key_major == 1)
      key_major_pass<false, 1>(q.data(), k.data(), v.data(), M, N, D, scale, out.data(), t);
    else if (key_major == 2)
      key_major_pass<false, 2>(q.data(), k.data(), v.data(), M, N, D, scale, out.data(), t);
    else
      chunked_pass<false>(q.data(), k.data(), v.data(), M, N, D, scale, out.data(), t);
    if (rep > 0)
      for (int i = 0; i < kSteps; ++i) best[i] = std::min(best[i], t[i]);
  }
  // the whole kernel, as the library runs it (for rows the one pass takes: that body)
  AttentionProblem<float> p{1, M, N, D, q.data(), k.data(), v.data(), {}, scale};
  std::vector<float> want(M * D), lse(M), scratch;
  double kernel = 1e300;
  for (int rep = 0; rep <= reps; ++rep) {
    const uint64_t t0 = __rdtsc();
    few_rows_read(p, 0, want.data(), lse.data(), scratch);
    if (rep > 0) kernel = std::min(kernel, double(__rdtsc() - t0));
  }
  double fma_rate = 0;  // FLOPs a TSC tick on this thread at the kernels' ISA
  for (int i = 0; i < 5; ++i) {
    const uint64_t t0 = __rdtsc();
    const double flops = fma_burst_all_threads(int64_t(1) << 22);
    fma_rate = std::max(fma_rate, flops / double(__rdtsc() - t0));
  }
  double max_diff = 0;
  for (int64_t e = 0; e < M * D; ++e) {
    const double d = std::abs(double(out[e]) - want[e]);
    max_diff = d > max_diff || d != d ? d : max_diff;
  }
  double total = 0;
  for (double t : best) total += t;
  const double pass_flops = 2.0 * double(M) * double(N) * double(D);
  std::printf("few-row read, %s pass, rows=%ld keys=%ld dim=%ld (%s, one thread, hot, best "
              "of %d): %.1f TSC ticks a key (the kernel as run: %.1f); FMA units %.1f FLOPs a "
              "tick\n",
              key_major > 0 ? "key-major" : "chunked", long(M), long(N), long(D),
              isa == Isa::avx512 ? "avx512" : "avx2", reps,
              total / N, kernel / N, fma_rate);
  for (int i = 0; i < kSteps; ++i) {
    std::printf("  %-18s %6.1f ticks a key", kNames[i], best[i] / N);
    if (i != kSoftmax)
      std::printf(", %.0f%% of the FMA rate", 100.0 * pass_flops / best[i] / fma_rate);
    std::printf("\n");
  }
  std::printf("  both passes' FLOPs over all three steps: %.0f%% of the FMA rate\n",
              100.0 * 2.0 * pass_flops / total / fma_rate);
  std::printf("output against few_rows_read's: max |difference| %.2e\n", max_diff);
  return max_diff <= 1e-5 ? 0 : 1;  // false for NaN
}
#else
int main() {
  std::printf("no few-row vector body in this build (GCC on x86-64 builds them)\n");
  return 2;
}
#endif
