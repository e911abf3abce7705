// The lexical index's question-time work (memkernels.memory.lexical; the
// math: memkernels.ops.reference.postings_top) in one call: sum the scores
// of the question's postings per text, then the best text and its near
// ties. In ATen that is an index_add_ per term, a max, a comparison over
// every text, a nonzero and a sort: 1.09 ms a question at 10^5 texts; here
// one pass over the postings (their streaming is the floor) and two over
// the totals: 0.62 ms (docs/log.md).
#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

#include "slot_bank_cpu.h"

namespace memkernels::cpu {

int64_t postings_top(const PostingsProblem& p, int64_t* out) {
  // every range checked, and kept, before any posting is read (the kernel
  // reads these ranges, never starts again)
  std::vector<std::pair<int64_t, int64_t>> ranges(static_cast<size_t>(p.query_len));
  for (int64_t i = 0; i < p.query_len; ++i) {
    const int64_t t = p.query[i];
    if (t < 0 || t >= p.num_terms) return kPostingsBadTerm;
    const int64_t lo = p.starts[t], hi = p.starts[t + 1];
    if (lo < 0 || hi < lo || hi > p.num_postings) return kPostingsBadRange;
    ranges[i] = {lo, hi};
  }
  std::vector<double> total(static_cast<size_t>(p.num_texts), 0.0);
  bool bad_text = false;
  for (const auto& [lo, hi] : ranges) {  // term by term: the reference's order of sums
    for (int64_t j = lo; j < hi; ++j) {
      const int64_t text = p.post_text[j];
      if (static_cast<uint64_t>(text) >= static_cast<uint64_t>(p.num_texts)) {
        bad_text = true;
        continue;
      }
      total[text] += p.post_score[j];
    }
  }
  if (bad_text) return kPostingsBadText;
  double best = 0.0;  // texts without a posting count as 0, as in the reference
  bool nan = false;
  for (double x : total) {
    nan |= std::isnan(x);
    best = std::max(best, x);
  }
  if (nan || !(best > 0.0) || p.k <= 0) return 0;  // a NaN score ranks nothing, as the reference
  const double floor = p.min_score_ratio * best;
  std::vector<int64_t> near;
  for (int64_t i = 0; i < p.num_texts; ++i)
    if (total[i] > 0.0 && total[i] >= floor) near.push_back(i);
  const auto better = [&](int64_t a, int64_t b) {
    return total[a] > total[b] || (total[a] == total[b] && a < b);
  };
  const int64_t n = std::min<int64_t>(p.k, static_cast<int64_t>(near.size()));
  std::partial_sort(near.begin(), near.begin() + n, near.end(), better);
  std::copy(near.begin(), near.begin() + n, out);
  return n;
}

}  // namespace memkernels::cpu
