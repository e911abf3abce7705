// CPU kernel entry points for the slot-bank ops (plain pointers, contiguous).
// Instantiated for float and double; see attention_cpu.h for the layout.
#pragma once

#include <cstdint>

#include "attention_cpu.h"

namespace memkernels::cpu {

// memory_read: queries attend over slots. out [G, M, D], lse [G, M].
// Instantiated with KV = T, and with bf16 or int8 (scaled per key) keys/values
// for float.
template <typename T, typename KV = T>
void read_forward(const AttentionProblem<T, KV>& p, T* out, T* lse);

// The read that keeps its probabilities for the backward (training): out and
// lse as read_forward, and per group each key block's unnormalized
// probabilities, probs [G, read_probs_blocks(N), M, read_probs_ld(N)], with the
// rows' running max after each block, probs_max [G, blocks, M] (KeptProbs,
// attention_cpu.h). No decode fast path: the row tiles for every shape.
template <typename T>
void read_forward_keeping_probs(const AttentionProblem<T>& p, T* out, T* lse, T* probs,
                                T* probs_max);

// probs/probs_max (nullable, both or neither): read_forward_keeping_probs's, read
// in place of recomputing S = Q K^T and its exp.
template <typename T>
void read_backward(const AttentionProblem<T>& p, const T* out, const T* dout, const T* lse,
                   T* dq, T* dk, T* dv, const T* probs = nullptr, const T* probs_max = nullptr);

// memory_write: slots (queries, M = S) attend over tokens (keys, N = T), then
// new = sigmoid(f) * mem + sigmoid(i) * tanh(upd). Gates are [G, M, gate_dim]
// with gate_dim 1 (one gate per slot) or D (one per channel).
template <typename T>
struct WriteProblem {
  AttentionProblem<T> attn;
  const T* mem;
  const T* forget_logit;
  const T* input_logit;
  int64_t gate_dim;
};

// probs (nullable; ignored unless write_probs_savable(N)): the forward also leaves
// its attention probabilities there, [G, M, saved_probs_ld(N)] (the columns
// past N are scratch), and the backward given them skips recomputing S = Q K^T
// and its exp: one product of seven in a training step, for G M N floats kept
// between the passes (docs/design.md, "The write keeps its probabilities").
inline bool write_probs_savable(int64_t keys) { return keys <= kBlockN; }
inline int64_t saved_probs_ld(int64_t keys) {
  return (keys + kSavedProbsColumnMultiple - 1) / kSavedProbsColumnMultiple * kSavedProbsColumnMultiple;
}
// The read's kept probabilities (read_forward_keeping_probs): key blocks and row stride.
inline int64_t read_probs_blocks(int64_t keys) { return (keys + kBlockN - 1) / kBlockN; }
inline int64_t read_probs_ld(int64_t keys) {
  return saved_probs_ld(keys < kBlockN ? keys : kBlockN);
}

template <typename T>
void write_forward(const WriteProblem<T>& w, T* new_mem, T* upd, T* lse, T* probs = nullptr);

template <typename T>
void write_backward(const WriteProblem<T>& w, const T* upd, const T* lse, const T* dnew,
                    T* dmem, T* dq, T* dk, T* dv, T* dforget, T* dinput,
                    const T* probs = nullptr);

// One reading layer at inference (see reader_cpu.cpp): hidden [B*T, C],
// query_w [H*Dh, C] (norm weight folded in), keys/values [Hk, S, Dh] (shared)
// or [B, Hk, S, Dh], out_w [H*Dh, C] (gate folded in). out [B*T, C].
// Query head h reads kv head h % Hk (Hk = kv_heads, 0 = H). With mlp_hidden
// M > 0 the query is an MLP: gelu(x @ mlp_w^T + mlp_b) @ query_w^T, mlp_w
// [M, C] (norm weight folded in), query_w [H*Dh, M]; query_b (optional) is
// added last, and unit_queries scales each head's query to unit length.
template <typename T, typename KV = T>
struct ReaderProblem {
  int64_t batch, tokens, hidden, heads, head_dim, slots;
  bool shared;
  const T* hidden_states;
  const T* query_w;
  const KV* keys;  // T, or bf16 / int8 with T = float
  const KV* values;
  const T* out_w;
  T eps, scale;
  const float* key_scale = nullptr;  // int8: one scale per slot, [Hk, S] or [B, Hk, S]
  const float* value_scale = nullptr;
  int64_t kv_heads = 0;
  int64_t mlp_hidden = 0;
  const T* mlp_w = nullptr;
  const T* mlp_b = nullptr;
  // with an MLP query: the context beside the normed hidden state
  // (MemoryConfig.context_decay), [B * T, C], and its first-layer columns [M, C]
  const T* context = nullptr;
  const T* context_w = nullptr;
  // an inverted-file index of a shared bank (probes > 0): keys sorted by
  // cluster within each kv head, centroids [Hk, clusters, Dh] (unit length),
  // cluster_starts [Hk, clusters + 1]; a query row reads its `probes` clusters
  // of highest centroid score only
  const T* centroids = nullptr;
  const int64_t* cluster_starts = nullptr;
  int64_t clusters = 0, probes = 0;
  const T* query_b = nullptr;
  bool unit_queries = false;
};

template <typename T, typename KV = T>
void reader_forward(const ReaderProblem<T, KV>& r, T* out);

// The copy rule's mixture at inference (copy_mix_cpu.cpp; the math is
// memkernels.ops.reference.copy_mix): per row r of hidden/logits/read
// [rows, C] / [rows, V] / [rows, C], units [V, C] (the LM head's rows) and
// unit_scale [V] (1 / their lengths; null: all 1), gate_w [C] (the gate's
// weight with the RMS norm's weight folded in):
//   g = gate_bias + gate_confidence |read_r|^2 + rms_norm(hidden_r) . gate_w
//   m_r = sharpness (read_r @ units^T) * unit_scale
//   out_r = logaddexp(logsigmoid(g) + log_softmax(m_r),
//                     logsigmoid(-g) + log_softmax(logits_r))     [rows, V]
template <typename T>
struct CopyMixProblem {
  int64_t rows, hidden, vocab;
  const T* hidden_states;
  const T* logits;
  const T* read;
  const T* units;
  const T* gate_w;
  T eps, sharpness, gate_bias, gate_confidence;
  const T* unit_scale = nullptr;
};

template <typename T>
void copy_mix_forward(const CopyMixProblem<T>& p, T* out);

// The texts of highest summed posting score over an inverted index
// (postings_cpu.cpp; the math is memkernels.ops.reference.postings_top): term
// t's postings are [starts[t], starts[t + 1]), each a text and its score;
// a text's score is the sum over `terms` (repeats count again, in order) of
// its postings' scores. Writes into `out` (room for min(k, num_texts)) the
// texts scoring > 0 and >= min_score_ratio x the best, best first (equal
// scores: lower text first), at most k; returns how many, or, touching
// nothing else, one of the negative codes below.
struct PostingsProblem {
  int64_t num_texts, num_terms, num_postings;
  const int64_t* starts;      // [num_terms + 1]
  const int64_t* post_text;   // [num_postings]
  const double* post_score;   // [num_postings]
  const int64_t* query;       // [query_len]: term indices
  int64_t query_len, k;
  double min_score_ratio;
};

constexpr int64_t kPostingsBadTerm = -1;   // a query term outside [0, num_terms)
constexpr int64_t kPostingsBadRange = -2;  // a term's [starts[t], starts[t + 1]) outside [0, P]
constexpr int64_t kPostingsBadText = -3;   // a posting's text outside [0, num_texts)

int64_t postings_top(const PostingsProblem& p, int64_t* out);

}  // namespace memkernels::cpu
