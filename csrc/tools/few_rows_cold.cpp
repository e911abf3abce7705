// The shared-bank decode step as the kernel meets it: `rows` query rows a head
// over `heads` heads of `keys` keys (head dim 64), the heads split over the
// OpenMP threads, each call on the next of several banks so that none is in
// the caches (at the defaults each bank is 67 MB, the bench's decode shape;
// one bank read again call after call is not cold: a part of it stays in the
// L3, and on Zen 5 that read 1.4 ms where rotated banks read 1.9). Each call
// is timed in turns with a read of another bank's bytes (a sum on the same
// threads), so the two see the same minute of a machine whose memory speed
// moves; prints both medians and the kernel's share of the read: what the
// Python bench's decode row measures, without the dispatcher in the way, for
// A/B runs of the few-row read from DRAM. A third turn reads a third bank's
// bytes under the kernel's FMAs with nothing else between them (fma_stream: no
// reduction, no softmax; `ahead` bytes of software prefetch, 0 none): the
// time this machine needs for the kernel's bytes and arithmetic together, the
// ceiling the kernel's overlap of the two is put beside. Where the rows take
// the chunked pass, a fourth turn runs the same FMAs in that pass's order of
// reads and prefetches (fma_chunked): what the order costs apart from the
// kernel's own arithmetic. Checks one group against float64 (a NaN fails).
// MEMKERNELS_CPU_ISA=avx2 picks the AVX2 body (and the ceiling's ISA).
//   ./memkernels_few_rows_cold [rows [keys [heads [reps [ahead]]]]]
#include <omp.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <utility>
#include <vector>

#include "cpu/slot_bank_cpu.h"
#include "cpu/few_rows.h"
#include "cold_read.h"
#include "few_rows_check.h"

using cold_read::median;
using cold_read::seconds;
using cold_read::sum_of;

#ifdef MK_HAVE_SIMD_VEC
namespace memkernels::cpu {
#define MK_ISA_BODY "tools/fma_stream_body.inc"
#include "cpu/per_isa.h"
}  // namespace memkernels::cpu

namespace {

using Stream = float (*)(const float*, int64_t, int64_t);

// fma_stream<rows> for rows 1..16 at the ISA the kernel runs
template <int... I>
Stream stream_for(memkernels::cpu::Isa isa, int64_t rows, std::integer_sequence<int, I...>) {
  using namespace memkernels::cpu;
  constexpr std::array<Stream, sizeof...(I)> wide{&isa_avx512::fma_stream<I + 1>...};
  constexpr std::array<Stream, sizeof...(I)> narrow{&isa_avx2::fma_stream<I + 1>...};
  return (isa == Isa::avx512 ? wide : narrow)[rows - 1];
}

}  // namespace

int main(int argc, char** argv) {
  using namespace memkernels::cpu;
  const int64_t M = argc > 1 ? atoll(argv[1]) : 8, S = argc > 2 ? atoll(argv[2]) : 8192,
                H = argc > 3 ? atoll(argv[3]) : 16, D = 64;
  const int reps = argc > 4 ? atoi(argv[4]) : 41;
  const int64_t ahead = argc > 5 ? atoll(argv[5]) : 0;
  if (M < 1 || S < 1 || H < 1 || reps < 1 || ahead < 0) {
    std::printf("rows, keys, heads and reps must be positive, ahead not negative\n");
    return 2;
  }
  if (S > (int64_t(1) << 40) / (H * D)) {  // 2 * H * S * D floats a bank: below 8 TB
    std::printf("keys x heads too large\n");
    return 2;
  }
  // banks to rotate: 256 MB in all (several times any L3), at least 4 (the
  // turns of a call read the next banks in turn, so each bank is read again
  // only after three others), at most 16
  const int64_t bank_bytes = 2 * H * S * D * int64_t(sizeof(float));
  const int64_t banks = std::clamp<int64_t>((int64_t(256) << 20) / bank_bytes, 4, 16);
  std::vector<float> q(H * M * D), out(H * M * D), lse(H * M);
  std::vector<std::unique_ptr<float[]>> k(banks), v(banks);
  for (int64_t i = 0; i < H * M * D; ++i) q[i] = float(std::sin(0.37 * double(i)));
  for (int64_t b = 0; b < banks; ++b) {
    k[b].reset(new float[H * S * D]), v[b].reset(new float[H * S * D]);  // not yet touched
#pragma omp parallel for schedule(static)  // first touch on the threads that read it
    for (int64_t i = 0; i < H * S * D; ++i) {
      k[b][i] = float(std::sin(0.011 * double(i + b)));
      v[b][i] = float(std::cos(0.013 * double(i + b)));
    }
  }
  const float scale = 1.0f / std::sqrt(float(D));
  auto problem = [&](int64_t b) {
    return AttentionProblem<float>{H, M, S, D, q.data(), k[b].get(), v[b].get(), {}, scale};
  };
  if (!few_rows_applies(problem(0)) || M > 16) {
    std::printf("the few-row read does not apply to rows=%ld on this CPU\n", long(M));
    return 2;
  }
  const Isa isa = best_isa();
  const Stream stream = stream_for(isa, M, std::make_integer_sequence<int, 16>{});
  // the chunked pass's order, where the rows take it (not the one pass's 1-2 rows)
  const bool chunked = few_rows_chunked(M, D);
  const int64_t chunk = few_rows_chunk_keys(M, D), turns = chunked ? 4 : 3;
  std::vector<double> kernel_s, read_s, ceiling_s, order_s;
  double sink = 0;
  int64_t last = 0;
  for (int r = 0; r <= reps; ++r) {  // the first turn warms up and is dropped
    const int64_t b = (turns * r) % banks, other = (turns * r + 1) % banks,
                  third = (turns * r + 2) % banks, fourth = (turns * r + 3) % banks;
    const AttentionProblem<float> p = problem(b);
    const double t0 = seconds();
#pragma omp parallel
    {
      std::vector<float> scratch;
#pragma omp for schedule(static)
      for (int64_t g = 0; g < H; ++g)
        few_rows_read(p, g, out.data() + g * M * D, lse.data() + g * M, scratch);
    }
    const double t1 = seconds();
    double s = 0;  // another bank's bytes, as cold as the kernel's
#pragma omp parallel for reduction(+ : s) schedule(static)
    for (int64_t g = 0; g < 2 * H; ++g)
      s += sum_of((g < H ? k : v)[other].get() + (g % H) * S * D, S * D);
    const double t2 = seconds();
    float f = 0;  // a third bank's bytes with the kernel's FMAs on them
#pragma omp parallel for reduction(+ : f) schedule(static)
    for (int64_t g = 0; g < 2 * H; ++g)
      f += stream((g < H ? k : v)[third].get() + (g % H) * S * D, S * D,
                  std::min<int64_t>(ahead, S * D * int64_t(sizeof(float))));
    const double t3 = seconds();
    float o = 0;  // a fourth bank's, the same FMAs in the chunked pass's order
    if (chunked) {
#pragma omp parallel for reduction(+ : o) schedule(static)
      for (int64_t g = 0; g < H; ++g) {
        const float *kg = k[fourth].get() + g * S * D, *vg = v[fourth].get() + g * S * D;
        o += isa == Isa::avx512 ? isa_avx512::fma_chunked(kg, vg, S, D, M, chunk)
                                : isa_avx2::fma_chunked(kg, vg, S, D, M, chunk);
      }
    }
    const double t4 = seconds();
    sink += s + f + o;
    last = b;
    if (r > 0) {
      kernel_s.push_back(t1 - t0), read_s.push_back(t2 - t1), ceiling_s.push_back(t3 - t2);
      order_s.push_back(t4 - t3);
    }
  }
  // group 0 of the last call
  const double max_err = few_rows_max_error(q.data(), k[last].get(), v[last].get(), out.data(),
                                             lse.data(), M, S, D, scale);
  const double bytes = 2.0 * double(H * S * D) * sizeof(float);
  const double tk = median(kernel_s), tr = median(read_s), tc = median(ceiling_s);
  char order[160] = "";
  if (chunked)
    std::snprintf(order, sizeof order, "; in the chunked pass's order (%ld keys a chunk) %.3f ms",
                  long(chunk), median(order_s) * 1e3);
  std::printf("few-row read rows=%ld keys=%ld heads=%ld dim=%ld (%s, %d threads, %ld banks "
              "rotated): %.3f ms, %.1f GB/s; a read of as many bytes %.3f ms, %.1f GB/s; the "
              "same bytes and FMAs alone (prefetch %ld B ahead) %.3f ms, %.0f%% of the read%s; "
              "the kernel at %.0f%% of the read, %.0f%% of the FMA stream; max |err| %.2e%s\n",
              long(M), long(S), long(H), long(D), isa == Isa::avx512 ? "avx512" : "avx2",
              omp_get_max_threads(), long(banks), tk * 1e3, bytes / tk / 1e9, tr * 1e3,
              bytes / tr / 1e9, long(ahead), tc * 1e3, 100.0 * tr / tc, order, 100.0 * tr / tk,
              100.0 * tc / tk, max_err,
              sink == 1.0 ? " " : "");  // uses the sums, so the reads are not optimized away
  return max_err < 1e-4 ? 0 : 1;  // false for NaN
}
#else
int main() {
  std::printf("the few-row read does not apply on this CPU (no vector body in this build)\n");
  return 2;
}
#endif
