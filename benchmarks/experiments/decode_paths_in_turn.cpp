// The shared-bank decode's two measures side by side, for
// decode_paths_in_turn.py: memkernels_few_rows_cold's whole program
// (csrc/tools/few_rows_cold.cpp, its `main` renamed tool_main) and its loop's
// pieces as C entry points, so one Python process can run the tool, the tool's
// loop on banks it is given (torch's or its own) and the extension's decode
// in turns, at the same minutes. Built as a shared library against the CMake
// build's memkernels_cpu:
//   g++ -O3 -std=c++17 -fPIC -shared -fopenmp -fno-trapping-math -DNDEBUG -Icsrc \
//       benchmarks/experiments/decode_paths_in_turn.cpp BUILD/libmemkernels_cpu.a \
//       -o /tmp/decode_paths_in_turn.so
#define main tool_main
#include "tools/few_rows_cold.cpp"
#undef main

extern "C" {

int run_tool(int argc, char** argv) { return tool_main(argc, argv); }

// One decode call over H groups of M rows (q [H, M, D]), the tool's loop:
// the groups split statically over the OpenMP threads.
void run_decode(const float* q, const float* k, const float* v, float* out, float* lse,
                int64_t H, int64_t M, int64_t S, int64_t D) {
  using namespace memkernels::cpu;
  const AttentionProblem<float> p{H, M, S, D, q, k, v, {}, 1.0f / std::sqrt(float(D))};
#pragma omp parallel
  {
    std::vector<float> scratch;
#pragma omp for schedule(static)
    for (int64_t g = 0; g < H; ++g) few_rows_read(p, g, out + g * M * D, lse + g * M, scratch);
  }
}

// The tool's plain read of a bank: K's and V's heads, 2H slabs of S*D floats.
double tool_sum(const float* k, const float* v, int64_t H, int64_t SD) {
  double s = 0;
#pragma omp parallel for reduction(+ : s) schedule(static)
  for (int64_t g = 0; g < 2 * H; ++g) s += cold_read::sum_of((g < H ? k : v) + (g % H) * SD, SD);
  return s;
}

// n floats the tool's way (new[]) and with its values, first touched on all
// threads: its K, x[i] = sin(0.011 (i + b)), or (values) its V, cos(0.013 (i + b)).
float* new_bank(int64_t n, int64_t b, int values) {
  const double f = values ? 0.013 : 0.011;
  float* x = new float[n];
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const double a = f * double(i + b);
    x[i] = float(values ? std::cos(a) : std::sin(a));
  }
  return x;
}

// `calls` decode calls on banks c % nb, each followed by the tool's read of
// bank (c + nb / 2) % nb, both timed; their medians (seconds) out.
void decode_and_read(const float* q, const float* const* ks, const float* const* vs, int64_t nb,
                     float* out, float* lse, int64_t H, int64_t M, int64_t S, int64_t D,
                     int64_t calls, double* decode_median, double* read_median) {
  std::vector<double> td, tr;
  double sink = 0;
  for (int64_t c = 0; c < calls; ++c) {
    const double t0 = cold_read::seconds();
    run_decode(q, ks[c % nb], vs[c % nb], out, lse, H, M, S, D);
    const double t1 = cold_read::seconds();
    sink += tool_sum(ks[(c + nb / 2) % nb], vs[(c + nb / 2) % nb], H, S * D);
    const double t2 = cold_read::seconds();
    td.push_back(t1 - t0), tr.push_back(t2 - t1);
  }
  *decode_median = cold_read::median(td);
  *read_median = cold_read::median(tr) + (sink == 1.0 ? 1e-30 : 0.0);  // keeps the sums
}

}  // extern "C"
