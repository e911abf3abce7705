// Where the read backward's time goes on this CPU: one group of the bench's
// prefill shape (1,024 query rows, the batch folded, over 4,096 keys of Dh
// 64; rows, keys and head dim are arguments), hot, on one thread, each phase
// of attention_backward_group timed on its own (TSC ticks): the K and V
// blocks into panels, the five products (S = Q K^T, dP = dO V^T, dV += P^T
// dO, dQ += dS K, dK += dS^T Q) and the softmax gradient rows (and, where the
// kernel copies the row-major right-hand sides of dV, dQ and dK into panels,
// those copies with the K and V blocks'). Each product's FLOPs a tick beside
// the FMA units' rate measured in the same run (fma_burst, the same ISA), so
// the products' share of that rate needs no clock speed. The phases are run
// as the kernel runs them, and their dQ, dK, dV checked against
// read_backward's.
// With `kept` 1 the same backward also runs as it would with the forward's
// probabilities kept for any number of key blocks (the write keeps them for one
// block only), in turns with the recomputing one: P = exp(S - lse) read from a
// copy laid out a key block at a time ([keys / 512][rows][512]: each tile one
// run, as the write's kept P is), one of four rotated so that it comes from
// memory as a training step's would, dS in the dP product's epilogue, no S =
// Q K^T and no softmax gradient rows. What keeping P in the read would save,
// before building it.
//   ./memkernels_backward_phases [rows [keys [reps [head_dim [kept]]]]]
#include <omp.h>
#include <x86intrin.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "cpu/simd.h"
#include "cpu/slot_bank_cpu.h"

namespace {

using namespace memkernels::cpu;

enum Phase { kPanels, kScores, kDProbs, kSoftmaxGrad, kDV, kDQ, kDK, kPhases };
const char* const kNames[kPhases] = {"K, V blocks into panels", "S = Q K^T", "dP = dO V^T",
                                     "softmax gradient rows", "dV += P^T dO", "dQ += dS K",
                                     "dK += dS^T Q"};
bool is_product(int p) { return p != kPanels && p != kSoftmaxGrad; }

// The loop of attention_backward_group (attention_cpu.h) on its tile GEMMs,
// with TSC ticks added into ticks[phase]. kept (nullable): P a key block at a time,
// [ceil(N / kBlockN)][M][kept_ld], read in place of S = Q K^T and the softmax
// gradient rows, as the write's kept P is.
void backward_phases(const AttentionProblem<float>& p, const float* dout, const float* lse,
                     const float* delta, float* dq, float* dk, float* dv, double* ticks,
                     const float* kept = nullptr, int64_t kept_ld = 0) {
  const int64_t M = p.rows, N = p.keys, D = p.dim, ld = score_tile_ld(N);
  std::vector<float> probs(kBlockM * ld), dprobs(kBlockM * ld), k_t(D * ld), v_t(D * ld);
  const bool in_panels = tile_gemm_wants_panels(D);
  std::vector<float> k_panels(kBlockN * D), dout_panels(kBlockM * D), q_panels(kBlockM * D);
  for (int64_t n0 = 0; n0 < N; n0 += kBlockN) {
    const int64_t nb = std::min(kBlockN, N - n0), nbp = tile_gemm_ld(nb);
    uint64_t t0 = __rdtsc();
    tile_transpose_panels(p.k + n0 * D, nb, D, p.scale, k_t.data(), nbp);
    tile_transpose_panels(p.v + n0 * D, nb, D, 1.0f, v_t.data(), nbp);
    if (in_panels) tile_to_panels(p.k + n0 * D, nb, D, D, k_panels.data());
    ticks[kPanels] += double(__rdtsc() - t0);
    for (int64_t r0 = 0; r0 < M; r0 += kBlockM) {
      const int64_t mr = std::min(kBlockM, M - r0);
      uint64_t t[kPhases];
      // P: the kept one's tile in place, else this block's, recomputed
      const float* pt = kept ? kept + (n0 / kBlockN * M + r0) * kept_ld : probs.data();
      const int64_t pld = kept ? kept_ld : ld;
      t[0] = __rdtsc();
      if (!kept)
        tile_gemm_panels(mr, nbp, D, p.q + r0 * D, D, 1, k_t.data(), probs.data(), ld, false);
      t[1] = __rdtsc();
      if (kept)
        tile_gemm_panels_probs_grad(mr, nbp, D, dout + r0 * D, D, 1, v_t.data(), dprobs.data(),
                                    ld, {pt, pld, delta + r0, p.scale});
      else
        tile_gemm_panels(mr, nbp, D, dout + r0 * D, D, 1, v_t.data(), dprobs.data(), ld, false);
      t[2] = __rdtsc();
      if (!kept)
        for (int64_t r = 0; r < mr; ++r)
          softmax_grad_row(probs.data() + r * ld, dprobs.data() + r * ld, nb, lse[r0 + r],
                           delta[r0 + r], p.scale);
      if (in_panels) {
        const uint64_t c0 = __rdtsc();
        tile_to_panels(dout + r0 * D, mr, D, D, dout_panels.data());
        tile_to_panels(p.q + r0 * D, mr, D, D, q_panels.data());
        ticks[kPanels] += double(__rdtsc() - c0);
      }
      t[3] = __rdtsc();
      if (in_panels)
        tile_gemm_panels(nb, D, mr, pt, 1, pld, dout_panels.data(), dv + n0 * D, D, r0 > 0);
      else
        tile_product(true, nb, D, mr, pt, 1, pld, dout + r0 * D, D, dv + n0 * D, D, r0 > 0);
      t[4] = __rdtsc();
      if (in_panels)
        tile_gemm_panels(mr, D, nb, dprobs.data(), ld, 1, k_panels.data(), dq + r0 * D, D,
                         n0 > 0);
      else
        tile_product(true, mr, D, nb, dprobs.data(), ld, 1, p.k + n0 * D, D, dq + r0 * D, D,
                     n0 > 0);
      t[5] = __rdtsc();
      if (in_panels)
        tile_gemm_panels(nb, D, mr, dprobs.data(), 1, ld, q_panels.data(), dk + n0 * D, D,
                         r0 > 0);
      else
        tile_product(true, nb, D, mr, dprobs.data(), 1, ld, p.q + r0 * D, D, dk + n0 * D, D,
                     r0 > 0);
      t[6] = __rdtsc();
      for (int i = 0; i < 6; ++i) {
        const int phase = kScores + i;
        if (kept && (phase == kScores || phase == kSoftmaxGrad)) continue;  // not run
        ticks[phase] += double(t[i + 1] - t[i]);
      }
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  const int64_t M = argc > 1 ? atoll(argv[1]) : 1024, N = argc > 2 ? atoll(argv[2]) : 4096;
  const int reps = argc > 3 ? atoi(argv[3]) : 5;
  const int64_t D = argc > 4 ? atoll(argv[4]) : 64;
  const bool with_kept = argc > 5 && atoi(argv[5]) != 0;
  if (M < 1 || N < 1 || reps < 1 || D < 1) {
    std::printf("rows, keys, reps and head_dim must be positive\n");
    return 2;
  }
  if (!tile_gemm_applies(D)) {  // the phases are the tile GEMMs' (no AVX2, or the BLAS asked)
    std::printf("the tile GEMMs do not run here (no AVX2, MEMKERNELS_CPU_GEMM=blas, "
                "or a head_dim not a multiple of 8)\n");
    return 2;
  }
  omp_set_num_threads(1);
  std::mt19937 rng(7);
  std::normal_distribution<float> normal;
  std::vector<float> q(M * D), k(N * D), v(N * D), dout(M * D);
  for (auto* x : {&q, &k, &v, &dout})
    for (float& e : *x) e = normal(rng);
  const AttentionProblem<float> p{1, M, N, D, q.data(), k.data(), v.data(), memkernels::MaskIndex{},
                                  1.0f / std::sqrt(float(D))};
  std::vector<float> out(M * D), lse(M), delta(M);
  read_forward(p, out.data(), lse.data());
  for (int64_t r = 0; r < M; ++r) {  // rowsum(dO * O), as the kernel (which may reorder it)
    float acc = 0;
    for (int64_t d = 0; d < D; ++d) acc += dout[r * D + d] * out[r * D + d];
    delta[r] = acc;
  }
  // the kept P: exp(scale q.k - lse) a key block at a time, its padding columns 0, four
  // copies rotated
  constexpr int kCopies = 4;
  const int64_t kept_ld = saved_probs_ld(std::min(N, kBlockN));
  const int64_t blocks = (N + kBlockN - 1) / kBlockN;
  std::vector<std::vector<float>> kept(with_kept ? kCopies : 0);
  if (with_kept) {
    kept[0].assign(blocks * M * kept_ld, 0.0f);
    for (int64_t r = 0; r < M; ++r)
      for (int64_t j = 0; j < N; ++j) {
        double s = 0;
        for (int64_t d = 0; d < D; ++d) s += double(q[r * D + d]) * double(k[j * D + d]);
        kept[0][(j / kBlockN * M + r) * kept_ld + j % kBlockN] =
            float(std::exp(double(p.scale) * s - double(lse[r])));
      }
    for (int c = 1; c < kCopies; ++c) kept[c] = kept[0];  // only where they live differs
  }
  std::vector<float> dq(M * D), dk(N * D), dv(N * D);
  std::vector<float> kept_dq(M * D), kept_dk(N * D), kept_dv(N * D);
  double ticks[kPhases] = {}, kept_ticks[kPhases] = {};
  for (int rep = 0; rep <= reps; ++rep) {  // the first warms up and is dropped; kept in turns
    double t[kPhases] = {};
    backward_phases(p, dout.data(), lse.data(), delta.data(), dq.data(), dk.data(), dv.data(), t);
    if (rep > 0)
      for (int i = 0; i < kPhases; ++i) ticks[i] += t[i] / reps;
    if (!with_kept) continue;
    double tk[kPhases] = {};
    backward_phases(p, dout.data(), lse.data(), delta.data(), kept_dq.data(), kept_dk.data(),
                    kept_dv.data(), tk, kept[rep % kCopies].data(), kept_ld);
    if (rep > 0)
      for (int i = 0; i < kPhases; ++i) kept_ticks[i] += tk[i] / reps;
  }
  // the FMA units' rate on this thread, in FLOPs a TSC tick, at the kernels' ISA
  double fma_rate = 0;
  for (int i = 0; i < 5; ++i) {
    const uint64_t t0 = __rdtsc();
    const double flops = fma_burst_all_threads(int64_t(1) << 22);
    fma_rate = std::max(fma_rate, flops / double(__rdtsc() - t0));
  }
  // the kernel's own backward on the same inputs
  std::vector<float> want_dq(M * D), want_dk(N * D), want_dv(N * D);
  read_backward(p, out.data(), dout.data(), lse.data(), want_dq.data(), want_dk.data(),
                want_dv.data());
  const auto max_diff = [&](const std::vector<float>& gq, const std::vector<float>& gk,
                            const std::vector<float>& gv) {
    double worst = 0;
    for (auto [got, want] : {std::pair{&gq, &want_dq}, {&gk, &want_dk}, {&gv, &want_dv}})
      for (size_t i = 0; i < got->size(); ++i) {
        const double e = std::abs(double((*got)[i]) - (*want)[i]) / (1.0 + std::abs((*want)[i]));
        worst = e > worst || e != e ? e : worst;
      }
    return worst;
  };
  const double product_flops = 2.0 * double(M) * double(N) * double(D);
  const auto report = [&](const char* what, const double* tk) {
    double total = 0;
    for (int i = 0; i < kPhases; ++i) total += tk[i];
    std::printf("read backward%s, one group of %ld rows over %ld keys, Dh %ld (%s, one thread, "
                "hot): %.2f M TSC ticks; FMA units %.1f FLOPs a tick\n",
                what, long(M), long(N), long(D), best_isa() == Isa::avx512 ? "avx512" : "avx2",
                total / 1e6, fma_rate);
    for (int i = 0; i < kPhases; ++i) {
      if (tk[i] == 0.0) continue;  // a phase the kept P skips
      std::printf("  %-24s %5.1f%% of the time", kNames[i], 100.0 * tk[i] / total);
      if (is_product(i))
        std::printf(", %.1f FLOPs a tick, %.0f%% of the FMA rate", product_flops / tk[i],
                    100.0 * product_flops / tk[i] / fma_rate);
      std::printf("\n");
    }
    return total;
  };
  const double recomputing = report("", ticks);
  const double diff = max_diff(dq, dk, dv);
  std::printf("dQ, dK, dV against read_backward's: max |difference| / (1 + |theirs|) %.2e\n",
              diff);
  if (!with_kept) return diff <= 1e-4 ? 0 : 1;  // false for NaN
  const double keeping = report(" with P kept (in turns with the above; P from memory)",
                                kept_ticks);
  const double kept_diff = max_diff(kept_dq, kept_dk, kept_dv);
  std::printf("with P kept: dQ, dK, dV against read_backward's: max |difference| / "
              "(1 + |theirs|) %.2e; %.3fx the recomputing backward's ticks\n",
              kept_diff, keeping / recomputing);
  return diff <= 1e-4 && kept_diff <= 1e-4 ? 0 : 1;
}
