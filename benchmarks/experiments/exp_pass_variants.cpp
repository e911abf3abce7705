// The tile forward's softmax pass (each row's max, then exp(s - max) and the
// row sum: mask_and_max then exp_row) over one score tile, 256 rows x 512 keys
// (512 KiB: the tile as the score product leaves it, in L2 or just past it),
// with the exp in several forms, AVX2, one thread: TSC ticks a vector of 8,
// the best of 400 passes each, three rounds. Not a test: the record of what
// kernels v46 chose (docs/log.md, kernels v46).
//
//   g++ -O3 -mavx2 -mfma -fopenmp-simd -o /tmp/exp_pass_variants
//       benchmarks/experiments/exp_pass_variants.cpp && /tmp/exp_pass_variants
//
// The forms (the polynomial and 2^n's bits as csrc/cpu/softmax_rows_body.inc):
//   v45        clamp to [-87, 88], then a compare and mask zero x < -87
//   v46        clamp to [-88, 88]: n reaches -127, whose 2^n bits are +0.0 (shipped)
//   v46 low    clamp below only (x <= 0 for a max-subtracted score)
//   base2      the scores times log2 e beforehand (as if folded into K's scale):
//              f = c - n, no FMAs for the reduction; clamp below at -127 only
//   base2 both the same clamped above too
//   v46 max given  v46 with each row's max known (as a max fused into the score
//              product's epilogue would leave it): the exp pass alone
// Also prints each form's largest relative error against double exp on
// [-87, 0]; base2's includes the rounding of x * log2 e (its real cost: one
// more rounding of every score).
#include <immintrin.h>
#include <x86intrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

namespace {

constexpr float kLog2e = 1.44269504088896341f, kLog2eLo = 1.925963033500011e-08f;
constexpr float kQ0 = 0.6931470036506653f, kQ1 = 0.24022242426872253f,
                kQ2 = 0.05550733581185341f, kQ3 = 0.009671512991189957f,
                kQ4 = 0.001326472731307149f;
constexpr float kShifter = 12582912.0f;

enum Form { kV45, kV46, kV46Low, kBase2, kBase2Both, kV46MaxGiven, kForms };
const char* kNames[kForms] = {"v45", "v46", "v46 low", "base2", "base2 both", "v46 max given"};

__m256 set1(float x) { return _mm256_set1_ps(x); }

__m256 poly(__m256 f) {  // 2^f on [-1/2, 1/2]
  __m256 q = _mm256_fmadd_ps(set1(kQ4), f, set1(kQ3));
  q = _mm256_fmadd_ps(q, f, set1(kQ2));
  q = _mm256_fmadd_ps(q, f, set1(kQ1));
  q = _mm256_fmadd_ps(q, f, set1(kQ0));
  return _mm256_fmadd_ps(q, f, set1(1.0f));
}

__m256 pow2_mul(__m256 p, __m256 t) {  // p * 2^n, n = t - kShifter; 0 for n = -127
  const __m256i e = _mm256_add_epi32(_mm256_slli_epi32(_mm256_castps_si256(t), 23),
                                     _mm256_set1_epi32(127 << 23));
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

__m256 reduce_e(__m256 c) {  // exp(c) for c clamped: the two-FMA reduction
  const __m256 t = _mm256_fmadd_ps(c, set1(kLog2e), set1(kShifter));
  const __m256 n = _mm256_sub_ps(t, set1(kShifter));
  __m256 f = _mm256_fmsub_ps(c, set1(kLog2e), n);
  f = _mm256_fmadd_ps(c, set1(kLog2eLo), f);
  return pow2_mul(poly(f), t);
}

__m256 reduce_2(__m256 c) {  // 2^c for c clamped: one subtraction
  const __m256 t = _mm256_add_ps(c, set1(kShifter));
  const __m256 n = _mm256_sub_ps(t, set1(kShifter));
  return pow2_mul(poly(_mm256_sub_ps(c, n)), t);
}

template <Form F>
__m256 exp_form(__m256 x) {
  if constexpr (F == kV45) {
    const __m256 c = _mm256_min_ps(set1(88.0f), _mm256_max_ps(set1(-87.0f), x));
    return _mm256_andnot_ps(_mm256_cmp_ps(x, set1(-87.0f), _CMP_LT_OQ), reduce_e(c));
  } else if constexpr (F == kV46 || F == kV46MaxGiven) {
    return reduce_e(_mm256_min_ps(set1(88.0f), _mm256_max_ps(set1(-88.0f), x)));
  } else if constexpr (F == kV46Low) {
    return reduce_e(_mm256_max_ps(set1(-88.0f), x));
  } else if constexpr (F == kBase2) {
    return reduce_2(_mm256_max_ps(set1(-127.0f), x));
  } else {
    return reduce_2(_mm256_min_ps(set1(127.0f), _mm256_max_ps(set1(-127.0f), x)));
  }
}

float row_max(const float* s, int64_t n) {
  float m = -INFINITY;
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = s[j] > m ? s[j] : m;
  return m;
}

template <Form F>
float exp_row(float* s, int64_t n, float max) {  // two vectors a step, as exp_row
  const __m256 m = set1(max);
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __m256 e0 = exp_form<F>(_mm256_sub_ps(_mm256_loadu_ps(s + j), m));
    const __m256 e1 = exp_form<F>(_mm256_sub_ps(_mm256_loadu_ps(s + j + 8), m));
    _mm256_storeu_ps(s + j, e0);
    _mm256_storeu_ps(s + j + 8, e1);
    s0 = _mm256_add_ps(s0, e0);
    s1 = _mm256_add_ps(s1, e1);
  }
  float lanes[8];
  _mm256_storeu_ps(lanes, _mm256_add_ps(s0, s1));
  float sum = 0.0f;
  for (float x : lanes) sum += x;
  return sum;
}

template <Form F>
double worst_error() {  // on [-87, 0], base 2 through x * log2 e rounded to a float
  double worst = 0.0;
  for (int i = 0; i <= 200000; ++i) {
    const float x = -87.0f * float(i) / 200000.0f;
    const bool base2 = F == kBase2 || F == kBase2Both;
    float y[8];
    _mm256_storeu_ps(y, exp_form<F>(set1(base2 ? x * kLog2e : x)));
    const double want = std::exp(double(x));
    worst = std::max(worst, std::fabs(y[0] - want) / want);
  }
  return worst;
}

template <Form F>
double ticks_a_vector(const std::vector<float>& src, int rows, int keys) {
  const bool base2 = F == kBase2 || F == kBase2Both;
  std::vector<float> scores(src), tile(src.size());
  if (base2)
    for (float& x : scores) x *= kLog2e;
  std::vector<float> maxes(rows);
  for (int r = 0; r < rows; ++r) maxes[r] = row_max(scores.data() + r * keys, keys);
  uint64_t best = ~uint64_t(0);
  volatile float sink = 0.0f;
  for (int rep = 0; rep < 400; ++rep) {
    std::copy(scores.begin(), scores.end(), tile.begin());  // the tile as a product leaves it
    const uint64_t t0 = __rdtsc();
    float sum = 0.0f;
    for (int r = 0; r < rows; ++r) {
      float* row = tile.data() + r * keys;
      sum += exp_row<F>(row, keys, F == kV46MaxGiven ? maxes[r] : row_max(row, keys));
    }
    best = std::min<uint64_t>(best, __rdtsc() - t0);
    sink = sink + sum;
  }
  return double(best) / (double(rows) * keys / 8);
}

template <Form F>
void report(const std::vector<float>& src, int rows, int keys, int round) {
  std::printf("round %d  %-14s %5.2f ticks a vector   max rel err on [-87, 0] %.3g\n", round,
              kNames[F], ticks_a_vector<F>(src, rows, keys), worst_error<F>());
}

}  // namespace

int main() {
  const int rows = 256, keys = 512;
  std::vector<float> src(size_t(rows) * keys);
  std::mt19937 gen(1);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  for (float& x : src) x = normal(gen);
  for (int round = 0; round < 3; ++round) {
    report<kV45>(src, rows, keys, round);
    report<kV46>(src, rows, keys, round);
    report<kV46Low>(src, rows, keys, round);
    report<kBase2>(src, rows, keys, round);
    report<kBase2Both>(src, rows, keys, round);
    report<kV46MaxGiven>(src, rows, keys, round);
  }
}
