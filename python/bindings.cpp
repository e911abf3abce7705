// pybind11 layer: torch tensors in, csrc/ kernels called, torch tensors out.
// Builds into memkernels._C. It re-checks everything the kernels rely on
// (TORCH_CHECK raises a Python RuntimeError), so a direct call with bad
// tensors never reaches a kernel.
#include <torch/extension.h>

#include <array>
#include <cmath>
#include <limits>
#include <optional>
#include <utility>
#include <string>
#include <tuple>
#include <type_traits>

#include "../csrc/cpu/read_probe.h"
#include "../csrc/cpu/slot_bank_cpu.h"
#include "common.h"
#include "host_buffer_pool.h"
#include "cuda_entry.h"

namespace mk = memkernels::cpu;
using namespace memkernels::binding;

namespace {

// A tensor the CPU kernels write all of: on the host buffer pool from its
// threshold up (host_buffer_pool.h), so a training step's outputs are not
// fresh pages each step.
Tensor kernel_output(at::IntArrayRef sizes, at::ScalarType dtype) {
  return HostBufferPool::instance().empty(sizes, dtype);
}

template <typename T>
mk::AttentionProblem<T> read_problem(const ReadLayout& L, const Tensor& q, const Tensor& k,
                                     const Tensor& v, const OptTensor& mask, double scale) {
  return {L.groups(), L.rows(), L.S, L.D, q.data_ptr<T>(), k.data_ptr<T>(), v.data_ptr<T>(),
          L.mask_index(mask), static_cast<T>(scale)};
}

std::tuple<Tensor, Tensor> read_fwd(const Tensor& q, const Tensor& k, const Tensor& v,
                                    const OptTensor& slot_mask, double scale) {
  const ReadLayout L = read_layout(q, k, v, slot_mask);
  MK_CHECK(q.device().is_cpu(), "memkernels._C.read_fwd: tensors must be on the CPU");
  const auto ct = compute_type(q);
  if (L.empty()) return {at::empty_like(q), at::empty({L.B, L.H, L.T}, q.options().dtype(ct))};
  const OptTensor mask = slot_mask ? OptTensor(slot_mask->contiguous()) : std::nullopt;
  Tensor qg = L.to_groups(q.to(ct)), kg = L.bank_groups(prep(k, ct)), vg = L.bank_groups(prep(v, ct));
  Tensor out = kernel_output({L.groups(), L.rows(), L.D}, ct);
  Tensor lse = kernel_output({L.groups(), L.rows()}, ct);
  AT_DISPATCH_FLOATING_TYPES(ct, "read_fwd", [&] {
    mk::read_forward<scalar_t>(read_problem<scalar_t>(L, qg, kg, vg, mask, scale),
                               out.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>());
  });
  // lse stays in the compute type: float64 gradients need a float64 lse.
  return {L.from_groups(out).to(q.scalar_type()), L.from_groups(lse)};
}

// The read's kept probabilities' shapes, [G, blocks, M, ld] and [G, blocks, M]
// (G, M: the kernels' groups and rows, ReadLayout); empty where there is no query
// or no slot.
std::pair<std::vector<int64_t>, std::vector<int64_t>> read_probs_shapes(const ReadLayout& L) {
  if (L.empty() || L.S == 0) return {{0}, {0}};
  const int64_t blocks = mk::read_probs_blocks(L.S);
  return {{L.groups(), blocks, L.rows(), mk::read_probs_ld(L.S)}, {L.groups(), blocks, L.rows()}};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> read_fwd_keeping_probs(
    const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& slot_mask, double scale) {
  const ReadLayout L = read_layout(q, k, v, slot_mask);
  MK_CHECK(q.device().is_cpu(), "memkernels._C.read_fwd_keeping_probs: tensors must be on the CPU");
  const auto ct = compute_type(q);
  const auto shapes = read_probs_shapes(L);
  const bool keeps = shapes.first.size() > 1;
  const auto none = [&] { return at::empty({0}, q.options().dtype(ct)); };
  Tensor probs = keeps ? kernel_output(shapes.first, ct) : none();
  Tensor probs_max = keeps ? kernel_output(shapes.second, ct) : none();
  if (L.empty())
    return {at::empty_like(q), at::empty({L.B, L.H, L.T}, q.options().dtype(ct)), probs, probs_max};
  const OptTensor mask = slot_mask ? OptTensor(slot_mask->contiguous()) : std::nullopt;
  Tensor qg = L.to_groups(q.to(ct)), kg = L.bank_groups(prep(k, ct)), vg = L.bank_groups(prep(v, ct));
  Tensor out = kernel_output({L.groups(), L.rows(), L.D}, ct);
  Tensor lse = kernel_output({L.groups(), L.rows()}, ct);
  AT_DISPATCH_FLOATING_TYPES(ct, "read_fwd_keeping_probs", [&] {
    mk::read_forward_keeping_probs<scalar_t>(
        read_problem<scalar_t>(L, qg, kg, vg, mask, scale), out.data_ptr<scalar_t>(),
        lse.data_ptr<scalar_t>(), keeps ? probs.data_ptr<scalar_t>() : nullptr,
        keeps ? probs_max.data_ptr<scalar_t>() : nullptr);
  });
  return {L.from_groups(out).to(q.scalar_type()), L.from_groups(lse), probs, probs_max};
}

// probs / probs_max: read_fwd_keeping_probs's (both, of its shapes, dtype and device), or
// both None / empty to recompute the probabilities.
bool check_read_probs(const ReadLayout& L, const Tensor& q, const OptTensor& probs,
                      const OptTensor& probs_max) {
  const bool has_p = probs && probs->numel() > 0, has_m = probs_max && probs_max->numel() > 0;
  MK_CHECK(has_p == has_m, "probs and probs_max must be given together (read_fwd_keeping_probs's "
           "third and fourth outputs), got ", has_p ? "probs only" : "probs_max only");
  if (!has_p) return false;
  const auto shapes = read_probs_shapes(L);
  MK_CHECK(shapes.first.size() > 1, "probs must be empty for a read of no query or no slot, got "
           "shape ", shape_str(probs->sizes()));
  const std::tuple<const Tensor*, const char*, const std::vector<int64_t>*> kept[] = {
      {&*probs, "probs", &shapes.first}, {&*probs_max, "probs_max", &shapes.second}};
  for (const auto& [t, name, want_shape] : kept) {
    const auto& want = *want_shape;
    MK_CHECK(t->sizes() == at::IntArrayRef(want), name, " must have shape ", shape_str(want),
             " (read_fwd_keeping_probs's), got ", shape_str(t->sizes()));
    MK_CHECK(t->scalar_type() == compute_type(q), name, " must have dtype ", compute_type(q),
             " (read_fwd_keeping_probs's), got ", t->scalar_type());
    MK_CHECK(t->device().is_cpu(), name, " must be on the CPU, got ", t->device());
  }
  return true;
}

std::tuple<Tensor, Tensor, Tensor> read_bwd(const Tensor& dout, const Tensor& q, const Tensor& k,
                                            const Tensor& v, const Tensor& out, const Tensor& lse,
                                            const OptTensor& slot_mask, double scale,
                                            const OptTensor& probs, const OptTensor& probs_max) {
  const ReadLayout L = read_layout(q, k, v, slot_mask);
  MK_CHECK(q.device().is_cpu(), "memkernels._C.read_bwd: tensors must be on the CPU");
  check_saved(q, {{dout, "dout", q.sizes().vec()}, {out, "out", q.sizes().vec()},
                  {lse, "lse", {L.B, L.H, L.T}}});
  const bool kept = check_read_probs(L, q, probs, probs_max);
  if (L.empty()) return {at::zeros_like(q), at::zeros_like(k), at::zeros_like(v)};
  const auto ct = compute_type(q);
  const OptTensor mask = slot_mask ? OptTensor(slot_mask->contiguous()) : std::nullopt;
  Tensor qg = L.to_groups(q.to(ct)), kg = L.bank_groups(prep(k, ct)), vg = L.bank_groups(prep(v, ct));
  Tensor og = L.to_groups(out.to(ct)), dog = L.to_groups(dout.to(ct)), lg = L.to_groups(lse.to(ct));
  Tensor dq = kernel_output(qg.sizes(), ct), dk = kernel_output(kg.sizes(), ct),
         dv = kernel_output(vg.sizes(), ct);
  Tensor pr = kept ? probs->contiguous() : Tensor(), pm = kept ? probs_max->contiguous() : Tensor();
  AT_DISPATCH_FLOATING_TYPES(ct, "read_bwd", [&] {
    mk::read_backward<scalar_t>(read_problem<scalar_t>(L, qg, kg, vg, mask, scale),
                                og.data_ptr<scalar_t>(), dog.data_ptr<scalar_t>(),
                                lg.data_ptr<scalar_t>(), dq.data_ptr<scalar_t>(),
                                dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>(),
                                kept ? pr.data_ptr<scalar_t>() : nullptr,
                                kept ? pm.data_ptr<scalar_t>() : nullptr);
  });
  const auto dt = q.scalar_type();
  return {L.from_groups(dq).to(dt), dk.reshape(k.sizes()).to(dt), dv.reshape(v.sizes()).to(dt)};
}


template <typename T>
mk::WriteProblem<T> write_problem(const WriteShape& W, const Tensor& mem, const Tensor& qs,
                                  const Tensor& k, const Tensor& v, const Tensor& f,
                                  const Tensor& i, const OptTensor& mask, double scale) {
  mk::AttentionProblem<T> p{W.B * W.H, W.S, W.T, W.D, qs.data_ptr<T>(), k.data_ptr<T>(),
                            v.data_ptr<T>(), write_mask_index(W, mask), static_cast<T>(scale)};
  return {p, mem.data_ptr<T>(), f.data_ptr<T>(), i.data_ptr<T>(), W.gate_dim};
}

// The saved probabilities' shape, [B, H, S, saved_probs_ld(T)], where the
// write keeps them (one key block); an empty shape where it does not.
std::vector<int64_t> saved_probs_shape(const WriteShape& W) {
  if (W.empty() || !mk::write_probs_savable(W.T)) return {0};
  return {W.B, W.H, W.S, mk::saved_probs_ld(W.T)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> write_fwd(
    const Tensor& mem, const Tensor& q_slots, const Tensor& k_tok, const Tensor& v_tok,
    const Tensor& forget_logit, const Tensor& input_logit, const OptTensor& token_mask,
    double scale, bool save_probs) {
  const WriteShape W = write_shape(mem, q_slots, k_tok, v_tok, forget_logit, input_logit, token_mask);
  MK_CHECK(mem.device().is_cpu(), "memkernels._C.write_fwd: tensors must be on the CPU");
  const auto ct = compute_type(mem);
  const auto probs_shape = save_probs ? saved_probs_shape(W) : std::vector<int64_t>{0};
  Tensor probs = probs_shape.size() > 1 ? kernel_output(probs_shape, ct)
                                        : at::empty({0}, mem.options().dtype(ct));
  if (W.empty())
    return {at::empty_like(mem), at::empty_like(mem, mem.options().dtype(ct)),
            at::empty({W.B, W.H, W.S}, mem.options().dtype(ct)), probs};
  const OptTensor mask = token_mask ? OptTensor(token_mask->contiguous()) : std::nullopt;
  Tensor m = prep(mem, ct), qs = prep(q_slots, ct), k = prep(k_tok, ct), v = prep(v_tok, ct);
  Tensor f = prep(forget_logit, ct), i = prep(input_logit, ct);
  Tensor new_mem = kernel_output(m.sizes(), ct), upd = kernel_output(m.sizes(), ct);
  Tensor lse = kernel_output({W.B, W.H, W.S}, ct);
  AT_DISPATCH_FLOATING_TYPES(ct, "write_fwd", [&] {
    mk::write_forward<scalar_t>(write_problem<scalar_t>(W, m, qs, k, v, f, i, mask, scale),
                                new_mem.data_ptr<scalar_t>(), upd.data_ptr<scalar_t>(),
                                lse.data_ptr<scalar_t>(),
                                probs.numel() ? probs.data_ptr<scalar_t>() : nullptr);
  });
  // upd, lse, probs: compute type, saved for backward
  return {new_mem.to(mem.scalar_type()), upd, lse, probs};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> write_bwd(
    const Tensor& dnew, const Tensor& mem, const Tensor& q_slots, const Tensor& k_tok,
    const Tensor& v_tok, const Tensor& forget_logit, const Tensor& input_logit,
    const OptTensor& token_mask, const Tensor& upd, const Tensor& lse, double scale,
    const OptTensor& probs) {
  const WriteShape W = write_shape(mem, q_slots, k_tok, v_tok, forget_logit, input_logit, token_mask);
  MK_CHECK(mem.device().is_cpu(), "memkernels._C.write_bwd: tensors must be on the CPU");
  check_saved(mem, {{dnew, "dnew", mem.sizes().vec()}, {upd, "upd", mem.sizes().vec()},
                    {lse, "lse", {W.B, W.H, W.S}}});
  // probs: write_fwd's, or None / empty to recompute them
  const bool saved = probs && probs->numel() > 0;
  if (saved) {
    const auto want = saved_probs_shape(W);
    MK_CHECK(!W.empty(), "probs must be empty for a write of no slot (B * H = 0), got shape ",
             shape_str(probs->sizes()));
    MK_CHECK(want.size() > 1, "probs must be empty for T = ", W.T, " tokens (write_fwd keeps ",
             "no probabilities past ", mk::kBlockN, "), got shape ", shape_str(probs->sizes()));
    MK_CHECK(probs->sizes() == at::IntArrayRef(want), "probs must have shape ", shape_str(want),
             " (write_fwd's), got ", shape_str(probs->sizes()));
    MK_CHECK(probs->scalar_type() == compute_type(mem), "probs must have dtype ",
             compute_type(mem), " (write_fwd's), got ", probs->scalar_type());
    MK_CHECK(probs->device().is_cpu(), "probs must be on the CPU, got ", probs->device());
  }
  if (W.empty())
    return {at::zeros_like(mem), at::zeros_like(q_slots), at::zeros_like(k_tok),
            at::zeros_like(v_tok), at::zeros_like(forget_logit), at::zeros_like(input_logit)};
  const auto ct = compute_type(mem);
  const OptTensor mask = token_mask ? OptTensor(token_mask->contiguous()) : std::nullopt;
  Tensor m = prep(mem, ct), qs = prep(q_slots, ct), k = prep(k_tok, ct), v = prep(v_tok, ct);
  Tensor f = prep(forget_logit, ct), i = prep(input_logit, ct);
  Tensor g = prep(dnew, ct), u = prep(upd, ct), l = prep(lse, ct);
  Tensor pr = saved ? probs->contiguous() : Tensor();
  Tensor dmem = kernel_output(m.sizes(), ct), dqs = kernel_output(qs.sizes(), ct),
         dk = kernel_output(k.sizes(), ct), dv = kernel_output(v.sizes(), ct),
         df = kernel_output(f.sizes(), ct), di = kernel_output(i.sizes(), ct);
  AT_DISPATCH_FLOATING_TYPES(ct, "write_bwd", [&] {
    mk::write_backward<scalar_t>(write_problem<scalar_t>(W, m, qs, k, v, f, i, mask, scale),
                                 u.data_ptr<scalar_t>(), l.data_ptr<scalar_t>(),
                                 g.data_ptr<scalar_t>(), dmem.data_ptr<scalar_t>(),
                                 dqs.data_ptr<scalar_t>(), dk.data_ptr<scalar_t>(),
                                 dv.data_ptr<scalar_t>(), df.data_ptr<scalar_t>(),
                                 di.data_ptr<scalar_t>(),
                                 saved ? pr.data_ptr<scalar_t>() : nullptr);
  });
  const auto dt = mem.scalar_type();
  return {dmem.to(dt), dqs.to(dt), dk.to(dt), dv.to(dt), df.to(dt), di.to(dt)};
}

// Whether t's elements lie within its storage: a storage shrunk under a tensor
// (untyped_storage().resize_(n)) leaves its sizes reaching past the memory it has.
bool within_storage(const Tensor& t) {
  if (t.numel() == 0) return true;
  int64_t last = t.storage_offset();
  for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
  return t.has_storage() && t.storage().data() != nullptr &&
         size_t(last + 1) * t.element_size() <= t.storage().nbytes();
}

void check_within_storage(const Tensor& t, const char* name) {
  MK_CHECK(within_storage(t), name, " reaches past its storage (",
           int64_t(t.has_storage() ? t.storage().nbytes() : 0),
           " bytes; resized under it?)");
}

// One reading layer at inference, fused (memkernels.reading_layer: the blend rule's BlendReader,
// and with mlp_w the append rule's AppendReader), as a plan: every operand but the hidden
// state (and its context) checked and made contiguous once, so a decode loop's call converts
// and checks one or two tensors, not eighteen (memkernels.reading_layer_plan; docs/design.md,
// "The decode hot path"). reader_fwd is a plan built and called once.
// keys/values may be bfloat16, or int8 with a float32 scale per slot, with
// float32 hidden states (the decode cache). Query heads (query_w rows / Dh)
// may be a multiple of the kv heads: head h reads kv head h % Hk.
class ReaderPlan {
 public:
  ReaderPlan(const Tensor& query_w, const Tensor& keys, const Tensor& values, const Tensor& out_w,
             double eps, double scale, const OptTensor& key_scale, const OptTensor& value_scale,
             const OptTensor& mlp_w, const OptTensor& mlp_b, const OptTensor& query_b,
             bool unit_queries, const OptTensor& context_w, const OptTensor& centroids,
             const OptTensor& cluster_starts, int64_t probes, bool own = true)
      : eps_(eps), scale_(scale), unit_queries_(unit_queries) {
    MK_CHECK(query_w.scalar_type() == at::kFloat || query_w.scalar_type() == at::kDouble,
             "query_w must be float32 or float64 (the hidden states' dtype), got ",
             query_w.scalar_type());
    MK_CHECK(query_w.device().is_cpu(), "query_w must be on the CPU, got ", query_w.device());
    dtype_ = query_w.scalar_type();
    // Narrow key/value storage (with float32 hidden states): bf16, or int8 with
    // one float32 scale per slot in key_scale/value_scale.
    narrow_ = dtype_ == at::kFloat &&
              (keys.scalar_type() == at::kBFloat16 || keys.scalar_type() == at::kChar);
    if (!narrow_) check_same(keys, query_w, "keys");
    check_same(values, keys, "values");
    MK_CHECK(keys.device().is_cpu(), "keys must be on the CPU, got ", keys.device());
    check_same(out_w, query_w, "out_w");
    MK_CHECK(keys.dim() == 3 || keys.dim() == 4, "keys must be [H, S, Dh] or [B, H, S, Dh], got ",
             shape_str(keys.sizes()));
    shared_ = keys.dim() == 3;
    bank_rows_ = shared_ ? 0 : keys.size(0);
    Hk_ = keys.size(-3), S_ = keys.size(-2), D_ = keys.size(-1);
    MK_CHECK(Hk_ > 0 && S_ > 0, "keys must hold at least one head and one slot, got ",
             shape_str(keys.sizes()));
    check_head_dim(D_, "keys");
    check_shape(values, "values", keys.sizes());
    MK_CHECK(query_w.dim() == 2 && query_w.size(0) > 0 && query_w.size(0) % (Hk_ * D_) == 0,
             "query_w must be [H * Dh, C] (or [H * Dh, M] after an MLP) with H a multiple of "
             "the keys' ", Hk_, " heads of Dh = ", D_, ", got ", shape_str(query_w.sizes()));
    H_ = query_w.size(0) / D_;
    MK_CHECK(out_w.dim() == 2 && out_w.size(0) == H_ * D_ && out_w.size(1) > 0,
             "out_w must be [H * Dh, C] = [", H_ * D_, ", C >= 1], got ",
             shape_str(out_w.sizes()));
    C_ = out_w.size(1);
    MK_CHECK(!mlp_w.has_value() || (mlp_w->dim() == 2 && mlp_w->size(0) > 0),
             "mlp_w must be [M, C] with M >= 1, got ", shape_str(mlp_w->sizes()));
    M_ = mlp_w.has_value() ? mlp_w->size(0) : 0;
    if (mlp_w.has_value()) {
      check_same(*mlp_w, query_w, "mlp_w");
      check_shape(*mlp_w, "mlp_w", {M_, C_});
      MK_CHECK(mlp_b.has_value(), "mlp_w needs mlp_b");
    } else {
      MK_CHECK(!mlp_b.has_value(), "mlp_b goes only with mlp_w");
    }
    if (mlp_b.has_value()) {
      check_same(*mlp_b, query_w, "mlp_b");
      check_shape(*mlp_b, "mlp_b", {M_});
    }
    // a context beside the normed hidden state, into the MLP's first layer: its columns here,
    // the context itself with each call
    if (context_w.has_value()) {
      MK_CHECK(M_ > 0, "context goes only with mlp_w (an MLP query): context_w given without it");
      check_same(*context_w, query_w, "context_w");
      check_shape(*context_w, "context_w", {M_, C_});
    }
    // an inverted-file index of a shared bank: keys sorted by cluster per kv head
    MK_CHECK(centroids.has_value() == cluster_starts.has_value() &&
                 centroids.has_value() == (probes > 0),
             "centroids, cluster_starts and probes > 0 go together (an index of the bank), got "
             "probes = ", probes);
    if (centroids.has_value()) {
      MK_CHECK(shared_, "an index (centroids) needs a bank shared by the batch: keys [H, S, Dh]");
      check_same(*centroids, query_w, "centroids");
      MK_CHECK(centroids->dim() == 3 && centroids->size(0) == Hk_ &&
                   centroids->size(2) == D_ && centroids->size(1) > 0,
               "centroids must be [", Hk_, ", clusters, ", D_, "], got ",
               shape_str(centroids->sizes()));
      clusters_ = centroids->size(1);
      probes_ = probes;
      MK_CHECK(cluster_starts->scalar_type() == at::kLong && cluster_starts->device().is_cpu(),
               "cluster_starts must be int64 on the CPU");
      check_shape(*cluster_starts, "cluster_starts", {Hk_, clusters_ + 1});
      check_within_storage(*cluster_starts, "cluster_starts");
      // a plan's own copy: the ranges checked here are the ranges read, whatever the caller's
      // tensor holds later (a range past the bank would read outside it)
      starts_ = own ? cluster_starts->clone(at::MemoryFormat::Contiguous)
                    : cluster_starts->contiguous();
      const int64_t* st = starts_.data_ptr<int64_t>();
      const int64_t n = clusters_ + 1;
      for (int64_t g = 0; g < Hk_; ++g) {  // ranges in order, covering [0, S)
        MK_CHECK(st[g * n] == 0 && st[g * n + clusters_] == S_, "cluster_starts[", g,
                 "] must run from 0 to the ", S_, " slots");
        for (int64_t j = 0; j < clusters_; ++j)
          MK_CHECK(st[g * n + j] <= st[g * n + j + 1], "cluster_starts[", g,
                   "] must not decrease");
      }
    }
    if (query_b.has_value()) {
      check_same(*query_b, query_w, "query_b");
      check_shape(*query_b, "query_b", {H_ * D_});
    }
    check_shape(query_w, "query_w", {H_ * D_, M_ > 0 ? M_ : C_});
    int8_kv_ = keys.scalar_type() == at::kChar;
    if (int8_kv_) {
      MK_CHECK(key_scale.has_value() && value_scale.has_value(),
               "int8 keys/values need key_scale and value_scale (float32, one per slot)");
      const at::IntArrayRef per_slot = keys.sizes().slice(0, keys.dim() - 1);
      auto check_scale = [&](const Tensor& t, const char* name) {
        MK_CHECK(t.scalar_type() == at::kFloat, name, " must have dtype Float, got ",
                 t.scalar_type());
        MK_CHECK(t.device().is_cpu(), name, " must be on the CPU, got ", t.device());
        check_shape(t, name, per_slot);
      };
      check_scale(*key_scale, "key_scale");
      check_scale(*value_scale, "value_scale");
    } else {
      MK_CHECK(!key_scale.has_value() && !value_scale.has_value(),
               "key_scale/value_scale go only with int8 keys/values");
    }
    // the operands gradients could flow to, as reading_layer counts them; read at each call
    // under grad mode, so a weight unfrozen after the plan was built is refused too
    for (const OptTensor& t : {OptTensor(query_w), OptTensor(keys), OptTensor(values),
                               OptTensor(out_w), mlp_w, mlp_b, query_b, context_w})
      if (t.has_value()) grad_sources_.push_back(*t);
    const Tensor absent;
    auto given = [&](const OptTensor& t) -> const Tensor& { return t ? *t : absent; };
    for (const auto& [name, t] : named_operands(query_w, keys, values, out_w, given(key_scale),
                                                given(value_scale), given(mlp_w), given(mlp_b),
                                                given(query_b), given(context_w),
                                                given(centroids)))
      if (t->defined()) check_within_storage(*t, name);
    // A plan's own handles are detached: on the caller's storage, so an in-place update shows
    // in the next call, while a `.data =` or `set_` on the caller's tensor does not reach them
    // (a non-contiguous operand is copied once, here). reader_fwd's one-shot plan borrows.
    auto hold = [own](const OptTensor& t) {
      if (!t.has_value()) return Tensor();
      return own ? t->detach().contiguous() : t->contiguous();
    };
    qw_ = hold(query_w), k_ = hold(keys), v_ = hold(values), ow_ = hold(out_w);
    ks_ = hold(key_scale), vs_ = hold(value_scale), w1_ = hold(mlp_w), b1_ = hold(mlp_b);
    bq_ = hold(query_b), wc_ = hold(context_w), cent_ = hold(centroids);
  }

  std::string describe() const {
    return message("memkernels._C.ReaderPlan(", dtype_, ", C=", C_, ", M=", M_, ", H=", H_,
                   ", Dh=", D_, ", kv heads=", Hk_, ", slots=", S_,
                   shared_ ? ", shared bank" : ", a bank per row",
                   int8_kv_ ? ", int8 kv" : (narrow_ ? ", bf16 kv" : ""),
                   probes_ > 0 ? ", indexed" : "", wc_.defined() ? ", context" : "", ")");
  }

  // hidden [B, T, C] (B = the bank's rows for a bank per row) + the layer's read, [B, T, C]
  Tensor operator()(const Tensor& hidden, const OptTensor& context) const {
    MK_CHECK(hidden.dim() == 3 && hidden.size(2) == C_, "hidden must be [B, T, C] with C = ", C_,
             " (out_w's columns), got ", shape_str(hidden.sizes()));
    MK_CHECK(hidden.scalar_type() == dtype_, "hidden must have dtype ", dtype_,
             " (query_w's), got ", hidden.scalar_type());
    MK_CHECK(hidden.device().is_cpu(), "hidden must be on the CPU, got ", hidden.device());
    const int64_t B = hidden.size(0), T = hidden.size(1);
    MK_CHECK(shared_ || B == bank_rows_, "keys must have shape [", B, ", ", Hk_, ", ", S_, ", ",
             D_, "] (a bank per row of hidden's batch of ", B, "), got [", bank_rows_, ", ", Hk_,
             ", ", S_, ", ", D_, "]");
    MK_CHECK(context.has_value() == wc_.defined(),
             "context and context_w go together (the context and its first-layer columns)");
    if (context.has_value()) {
      check_same(*context, hidden, "context");
      check_shape(*context, "context", hidden.sizes());
    }
    MK_CHECK(!at::GradMode::is_enabled() || !asks_for_gradients(hidden, context),
             "the reading layer is inference only (no backward): call it under "
             "torch.no_grad(), or compose memory_read for training");
    check_within_storage(hidden, "hidden");
    if (context.has_value()) check_within_storage(*context, "context");
    for (const auto& [name, t] : named_operands(qw_, k_, v_, ow_, ks_, vs_, w1_, b1_, bq_, wc_,
                                                cent_))
      if (t->defined()) MK_CHECK(within_storage(*t), "this reading-layer plan's ", name,
                                 " lost its storage (resized under it): build a new plan");
    if (B * T == 0) return kernel_output(hidden.sizes(), dtype_);  // no row to read
    const Tensor h = hidden.contiguous();
    const Tensor ctx = context.has_value() ? context->contiguous() : Tensor();
    Tensor out = kernel_output(h.sizes(), dtype_);
    if (narrow_) {
      static_assert(sizeof(mk::bf16) == sizeof(at::BFloat16), "bf16 must be 16 bits");
      if (int8_kv_) run<float, int8_t>(B, T, h, ctx, out);
      else run<float, mk::bf16>(B, T, h, ctx, out);
    } else if (dtype_ == at::kFloat) {
      run<float, float>(B, T, h, ctx, out);
    } else {
      run<double, double>(B, T, h, ctx, out);
    }
    return out;
  }

 private:
  template <typename T, typename KV>
  void run(int64_t B, int64_t rows, const Tensor& h, const Tensor& ctx, Tensor& out) const {
    mk::ReaderProblem<T, KV> r{B, rows, C_, H_, D_, S_, shared_, h.data_ptr<T>(),
                               qw_.data_ptr<T>(), static_cast<const KV*>(k_.data_ptr()),
                               static_cast<const KV*>(v_.data_ptr()), ow_.data_ptr<T>(),
                               static_cast<T>(eps_), static_cast<T>(scale_)};
    if (int8_kv_) {
      r.key_scale = ks_.data_ptr<float>();
      r.value_scale = vs_.data_ptr<float>();
    }
    r.kv_heads = Hk_;
    r.mlp_hidden = M_;
    r.mlp_w = M_ > 0 ? w1_.data_ptr<T>() : nullptr;
    r.mlp_b = M_ > 0 ? b1_.data_ptr<T>() : nullptr;
    r.query_b = bq_.defined() ? bq_.data_ptr<T>() : nullptr;
    r.context = ctx.defined() ? ctx.data_ptr<T>() : nullptr;
    r.context_w = wc_.defined() ? wc_.data_ptr<T>() : nullptr;
    if (cent_.defined()) {
      r.centroids = cent_.data_ptr<T>();
      r.cluster_starts = starts_.data_ptr<int64_t>();
      r.clusters = clusters_;
      r.probes = probes_;
    }
    r.unit_queries = unit_queries_;
    mk::reader_forward<T, KV>(r, out.data_ptr<T>());
  }

  bool asks_for_gradients(const Tensor& hidden, const OptTensor& context) const {
    if (hidden.requires_grad() || (context.has_value() && context->requires_grad())) return true;
    for (const Tensor& t : grad_sources_)
      if (t.requires_grad()) return true;
    return false;
  }

  // (name, tensor) of every operand a plan holds, in the constructor's order
  static std::array<std::pair<const char*, const Tensor*>, 11> named_operands(
      const Tensor& query_w, const Tensor& keys, const Tensor& values, const Tensor& out_w,
      const Tensor& key_scale, const Tensor& value_scale, const Tensor& mlp_w,
      const Tensor& mlp_b, const Tensor& query_b, const Tensor& context_w,
      const Tensor& centroids) {
    return {{{"query_w", &query_w}, {"keys", &keys}, {"values", &values}, {"out_w", &out_w},
             {"key_scale", &key_scale}, {"value_scale", &value_scale}, {"mlp_w", &mlp_w},
             {"mlp_b", &mlp_b}, {"query_b", &query_b}, {"context_w", &context_w},
             {"centroids", &centroids}}};
  }

  double eps_, scale_;
  bool unit_queries_, narrow_ = false, int8_kv_ = false, shared_ = true;
  at::ScalarType dtype_;
  int64_t bank_rows_ = 0, Hk_ = 0, S_ = 0, D_ = 0, H_ = 0, C_ = 0, M_ = 0;
  int64_t clusters_ = 0, probes_ = 0;
  Tensor qw_, k_, v_, ow_, ks_, vs_, w1_, b1_, bq_, wc_, cent_, starts_;
  std::vector<Tensor> grad_sources_;  // the caller's tensors themselves, for their flags
};

Tensor reader_fwd(const Tensor& hidden, const Tensor& query_w, const Tensor& keys,
                  const Tensor& values, const Tensor& out_w, double eps, double scale,
                  const OptTensor& key_scale, const OptTensor& value_scale,
                  const OptTensor& mlp_w, const OptTensor& mlp_b, const OptTensor& query_b,
                  bool unit_queries, const OptTensor& context, const OptTensor& context_w,
                  const OptTensor& centroids, const OptTensor& cluster_starts, int64_t probes) {
  MK_CHECK(hidden.dim() == 3, "hidden must be [B, T, C], got ", shape_str(hidden.sizes()));
  MK_CHECK(hidden.scalar_type() == at::kFloat || hidden.scalar_type() == at::kDouble,
           "memkernels._C.reader_fwd: hidden must be float32 or float64");
  MK_CHECK(hidden.device().is_cpu(), "memkernels._C.reader_fwd: tensors must be on the CPU");
  check_same(query_w, hidden, "query_w");
  MK_CHECK(context.has_value() == context_w.has_value(),
           "context and context_w go together (the context and its first-layer columns)");
  return ReaderPlan(query_w, keys, values, out_w, eps, scale, key_scale, value_scale, mlp_w,
                    mlp_b, query_b, unit_queries, context_w, centroids, cluster_starts, probes,
                    /*own=*/false)(hidden, context);
}

// The copy rule's mixture at inference, fused (memkernels.ops.copy_mix): log p
// [B, T, V] of the memory's and the LM's next-token distributions.
Tensor copy_mix_fwd(const Tensor& hidden, const Tensor& logits, const Tensor& read,
                    const Tensor& units, const Tensor& gate_w, double eps, double sharpness,
                    double gate_bias, double gate_confidence, const OptTensor& unit_scale) {
  MK_CHECK(hidden.dim() == 3, "hidden must be [B, T, C], got ", shape_str(hidden.sizes()));
  MK_CHECK(hidden.scalar_type() == at::kFloat || hidden.scalar_type() == at::kDouble,
           "memkernels._C.copy_mix_fwd: hidden must be float32 or float64, got ",
           hidden.scalar_type());
  MK_CHECK(hidden.device().is_cpu(), "memkernels._C.copy_mix_fwd: tensors must be on the CPU");
  const int64_t B = hidden.size(0), T = hidden.size(1), C = hidden.size(2);
  MK_CHECK(C > 0, "hidden must have a hidden size C >= 1, got ", shape_str(hidden.sizes()));
  check_same(logits, hidden, "logits");
  MK_CHECK(logits.dim() == 3 && logits.size(0) == B && logits.size(1) == T &&
               logits.size(2) > 0,
           "logits must be [B, T, V] = [", B, ", ", T, ", V >= 1], got ",
           shape_str(logits.sizes()));
  const int64_t V = logits.size(2);
  check_same(read, hidden, "read");
  check_shape(read, "read", hidden.sizes());
  check_same(units, hidden, "units");
  check_shape(units, "units", {V, C});
  check_same(gate_w, hidden, "gate_w");
  check_shape(gate_w, "gate_w", {C});
  if (unit_scale.has_value()) {
    check_same(*unit_scale, hidden, "unit_scale");
    check_shape(*unit_scale, "unit_scale", {V});
  }
  MK_CHECK(std::isfinite(eps) && eps >= 0, "eps must be finite and >= 0, got ", eps);
  // the scalars are cast to the tensors' dtype: finite there
  const double limit = hidden.scalar_type() == at::kFloat
                           ? static_cast<double>(std::numeric_limits<float>::max())
                           : std::numeric_limits<double>::max();
  for (const auto& [name, x] : {std::pair<const char*, double>{"eps", eps}, {"sharpness", sharpness},
                                {"gate_bias", gate_bias}, {"gate_confidence", gate_confidence}})
    MK_CHECK(std::isfinite(x) && std::abs(x) <= limit, name, " must be finite in ",
             hidden.scalar_type(), ", got ", x);
  Tensor out = at::empty({B, T, V}, hidden.options());
  if (B * T == 0) return out;
  Tensor h = hidden.contiguous(), l = logits.contiguous(), r = read.contiguous();
  Tensor u = units.contiguous(), g = gate_w.contiguous();
  const OptTensor us = unit_scale ? OptTensor(unit_scale->contiguous()) : std::nullopt;
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "copy_mix_fwd", [&] {
    mk::CopyMixProblem<scalar_t> p{B * T, C, V,
                                   h.data_ptr<scalar_t>(), l.data_ptr<scalar_t>(),
                                   r.data_ptr<scalar_t>(), u.data_ptr<scalar_t>(),
                                   g.data_ptr<scalar_t>(), static_cast<scalar_t>(eps),
                                   static_cast<scalar_t>(sharpness),
                                   static_cast<scalar_t>(gate_bias),
                                   static_cast<scalar_t>(gate_confidence),
                                   us ? us->data_ptr<scalar_t>() : nullptr};
    mk::copy_mix_forward<scalar_t>(p, out.data_ptr<scalar_t>());
  });
  return out;
}

// The lexical index's selection (memkernels.ops.postings_top): the texts of
// highest summed posting score for a question's terms, at most k, best first.
Tensor postings_top(const Tensor& starts, const Tensor& post_text, const Tensor& post_score,
                    int64_t num_texts, const Tensor& terms, int64_t k, double min_score_ratio) {
  constexpr const char* op = "memkernels._C.postings_top: ";
  for (const auto& [name, t, dtype] :
       {std::tuple<const char*, const Tensor*, at::ScalarType>{"starts", &starts, at::kLong},
        {"post_text", &post_text, at::kLong}, {"post_score", &post_score, at::kDouble},
        {"terms", &terms, at::kLong}})
    MK_CHECK(t->layout() == at::kStrided && t->dim() == 1 && t->scalar_type() == dtype &&
                 t->device().is_cpu(),
             op, name, " must be a 1-d ", dtype, " CPU tensor, got ", t->scalar_type(), " ",
             shape_str(t->sizes()), " on ", t->device());
  MK_CHECK(starts.numel() >= 1, op, "starts must be [num_terms + 1], got an empty tensor");
  MK_CHECK(post_score.numel() == post_text.numel(), op, "post_score must be [P] = [",
           post_text.numel(), "] as post_text, got ", shape_str(post_score.sizes()));
  // the totals are one float64 per text, zeroed per call: a bound keeps a
  // bad count from asking for more memory than any bank could need
  constexpr int64_t kMaxTexts = int64_t(1) << 28;
  MK_CHECK(num_texts >= 0 && num_texts <= kMaxTexts, op, "num_texts must be in [0, 2^28], got ",
           num_texts);
  MK_CHECK(k >= 1, op, "k must be >= 1, got ", k);
  MK_CHECK(std::isfinite(min_score_ratio) && min_score_ratio >= 0 && min_score_ratio <= 1,
           op, "min_score_ratio must be in [0, 1], got ", min_score_ratio);
  // the GIL stays held: these tensors are Python's, and a thread writing them
  // mid-call must not meet a half-checked index
  Tensor st = starts.contiguous(), pt = post_text.contiguous(), ps = post_score.contiguous();
  Tensor q = terms.contiguous();
  Tensor out = at::empty({std::min(k, num_texts)}, starts.options());
  const mk::PostingsProblem p{num_texts, st.numel() - 1, pt.numel(), st.data_ptr<int64_t>(),
                              pt.data_ptr<int64_t>(), ps.data_ptr<double>(),
                              q.data_ptr<int64_t>(), q.numel(), k, min_score_ratio};
  const int64_t n = mk::postings_top(p, out.data_ptr<int64_t>());
  MK_CHECK(n != mk::kPostingsBadTerm, op, "terms must be term indices in [0, ", st.numel() - 1,
           "), got one outside");
  MK_CHECK(n != mk::kPostingsBadRange, op, "starts must rise within [0, ", pt.numel(),
           "] (the number of postings) at the query's terms");
  MK_CHECK(n != mk::kPostingsBadText, op, "post_text must hold texts in [0, ", num_texts,
           ") at the query's terms' postings");
  return out.narrow(0, 0, n).clone();
}

// The bench's floor for a chain of dependent reads: each step's tensors
// summed on every thread, one step after another (read_probe.h); a step is
// the next steps[s] tensors (one tensor a step where steps is None).
double cpu_sum_in_turn(const std::vector<Tensor>& arrays,
                       const std::optional<std::vector<int64_t>>& steps) {
  std::vector<const float*> data;
  std::vector<int64_t> sizes;
  for (size_t i = 0; i < arrays.size(); ++i) {
    const Tensor& t = arrays[i];
    const std::string name = "arrays[" + std::to_string(i) + "]";
    MK_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
    MK_CHECK(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
    MK_CHECK(t.is_contiguous(), name, " must be contiguous");
    data.push_back(t.data_ptr<float>());
    sizes.push_back(t.numel());
  }
  int64_t count = int64_t(arrays.size());
  const int64_t* per_step = nullptr;
  if (steps.has_value()) {
    int64_t total = 0;
    for (size_t s = 0; s < steps->size(); ++s) {
      const int64_t n = (*steps)[s];
      MK_CHECK(n >= 1, "steps[", s, "] must be a positive count of arrays, got ", n);
      // compared before the add: no count, however large, overflows the total
      MK_CHECK(n <= count - total, "steps must add up to len(arrays) (", count, "), got more");
      total += n;
    }
    MK_CHECK(total == count, "steps must add up to len(arrays) (", count, "), got ", total);
    count = int64_t(steps->size());
    per_step = steps->data();
  }
  py::gil_scoped_release released;  // `arrays` holds the tensors until the sums return
  return mk::sum_in_turn(data.data(), sizes.data(), count, per_step);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "memkernels fused slot-bank kernels (CPU; CUDA when built with it)";
  m.def("read_fwd", &read_fwd, "memory_read forward (CPU) -> (out, lse)", py::arg("q"), py::arg("k"),
        py::arg("v"), py::arg("slot_mask"), py::arg("scale"));
  m.def("read_fwd_keeping_probs", &read_fwd_keeping_probs,
        "memory_read forward (CPU) for training -> (out, lse, probs, probs_max): also each key "
        "block's unnormalized attention probabilities and the rows' running max after it, for "
        "read_bwd (empty with no query or no slot)",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("slot_mask"), py::arg("scale"));
  m.def("read_bwd", &read_bwd,
        "memory_read backward (CPU) -> (dq, dk, dv); probs, probs_max: read_fwd_keeping_probs's, "
        "or None to recompute the probabilities",
        py::arg("dout"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"),
        py::arg("slot_mask"), py::arg("scale"), py::arg("probs") = py::none(),
        py::arg("probs_max") = py::none());
  m.def("write_fwd", &write_fwd,
        "memory_write forward (CPU) -> (new_mem, upd, lse, probs); probs are the attention "
        "probabilities kept for write_bwd when save_probs and T <= 512, else empty",
        py::arg("mem"), py::arg("q_slots"), py::arg("k_tok"), py::arg("v_tok"),
        py::arg("forget_logit"), py::arg("input_logit"), py::arg("token_mask"), py::arg("scale"),
        py::arg("save_probs") = false);
  m.def("write_bwd", &write_bwd,
        "memory_write backward (CPU) -> (dmem, dq, dk, dv, df, di); probs: write_fwd's, or "
        "None to recompute them",
        py::arg("dnew"), py::arg("mem"), py::arg("q_slots"), py::arg("k_tok"), py::arg("v_tok"),
        py::arg("forget_logit"), py::arg("input_logit"), py::arg("token_mask"), py::arg("upd"),
        py::arg("lse"), py::arg("scale"), py::arg("probs") = py::none());
  m.attr("WRITE_PROBS_MAX_TOKENS") = mk::kBlockN;
  m.attr("WRITE_PROBS_COLUMN_MULTIPLE") = mk::kSavedProbsColumnMultiple;
  m.attr("READ_PROBS_BLOCK_KEYS") = mk::kBlockN;
  m.def("cpu_empty_cache", [] { return HostBufferPool::instance().empty_cache(); },
        "unmaps the cached host buffers (the CPU ops' outputs and the write's saved "
        "probabilities, from 4 MiB); returns the bytes");
  m.def("cpu_cached_bytes", [] { return HostBufferPool::instance().cached_bytes(); },
        "bytes of host buffers cached for reuse");
  m.def("reader_fwd", &reader_fwd,
        "one reading layer at inference: hidden + read(query(rms_norm(hidden))) @ out_w, "
        "query(x) = x @ query_w^T, or with mlp_w gelu(x @ mlp_w^T + mlp_b "
        "[+ context @ context_w^T]) @ query_w^T; + query_b, then unit length per head with "
        "unit_queries; with centroids/cluster_starts/probes (a bank sorted by cluster) each "
        "query row reads its `probes` nearest clusters only",
        py::arg("hidden"), py::arg("query_w"), py::arg("keys"), py::arg("values"),
        py::arg("out_w"), py::arg("eps"), py::arg("scale"), py::arg("key_scale") = py::none(),
        py::arg("value_scale") = py::none(), py::arg("mlp_w") = py::none(),
        py::arg("mlp_b") = py::none(), py::arg("query_b") = py::none(),
        py::arg("unit_queries") = false, py::arg("context") = py::none(),
        py::arg("context_w") = py::none(), py::arg("centroids") = py::none(),
        py::arg("cluster_starts") = py::none(), py::arg("probes") = 0);
  py::class_<ReaderPlan>(m, "ReaderPlan",
                         "reader_fwd's operands but the hidden state (and its context) checked "
                         "and held once: plan(hidden, context=None) is reader_fwd(hidden, ...) "
                         "with them. It holds the tensors themselves (a non-contiguous one as a "
                         "contiguous copy made once): an in-place update shows in the next "
                         "call; the index's cluster_starts is copied. memkernels."
                         "reading_layer_plan builds one.")
      .def(py::init<const Tensor&, const Tensor&, const Tensor&, const Tensor&, double, double,
                    const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                    const OptTensor&, bool, const OptTensor&, const OptTensor&, const OptTensor&,
                    int64_t>(),
           py::arg("query_w"), py::arg("keys"), py::arg("values"), py::arg("out_w"),
           py::arg("eps"), py::arg("scale"), py::arg("key_scale") = py::none(),
           py::arg("value_scale") = py::none(), py::arg("mlp_w") = py::none(),
           py::arg("mlp_b") = py::none(), py::arg("query_b") = py::none(),
           py::arg("unit_queries") = false, py::arg("context_w") = py::none(),
           py::arg("centroids") = py::none(), py::arg("cluster_starts") = py::none(),
           py::arg("probes") = 0)
      .def("__call__", &ReaderPlan::operator(), py::arg("hidden"),
           py::arg("context") = py::none(),
           "hidden [B, T, C] + the layer's read of it (with context [B, T, C] where the plan "
           "has context_w)")
      .def("__repr__", &ReaderPlan::describe);
  m.def("copy_mix_fwd", &copy_mix_fwd,
        "the copy rule's mixture at inference: logaddexp(logsigmoid(g) + log_softmax(sharpness "
        "* (read @ units^T) * unit_scale), logsigmoid(-g) + log_softmax(logits)), g = gate_bias "
        "+ gate_confidence * |read|^2 + rms_norm(hidden, eps) . gate_w",
        py::arg("hidden"), py::arg("logits"), py::arg("read"), py::arg("units"),
        py::arg("gate_w"), py::arg("eps"), py::arg("sharpness"), py::arg("gate_bias"),
        py::arg("gate_confidence"), py::arg("unit_scale") = py::none());
  m.def("postings_top", &postings_top,
        "the texts of highest summed posting score for a query's terms (int64 [<= k], best "
        "first, ties by text): those scoring > 0 and >= min_score_ratio x the best",
        py::arg("starts"), py::arg("post_text"), py::arg("post_score"), py::arg("num_texts"),
        py::arg("terms"), py::arg("k"), py::arg("min_score_ratio"));
  m.def("has_vendor_blas", &mk::have_vendor_blas, "True when the CPU kernels use the vendor GEMM");
  m.def("cpu_isa", [] {
    switch (mk::best_isa()) {
      case mk::Isa::avx512: return "avx512";
      case mk::Isa::avx2: return "avx2";
      default: return "generic";
    }
  }, "The ISA of the hand-blocked CPU kernels in this process: avx512, avx2 or generic "
     "(the CPU's widest, capped by MEMKERNELS_CPU_ISA=avx2|generic)");
  m.def("cpu_few_rows_chunk", [](int64_t rows, int64_t dim) -> int64_t {
#ifdef MK_HAVE_SIMD_VEC
    if (mk::few_rows_projects(rows, dim)) return mk::few_rows_chunk_keys(rows, dim);
#endif
    (void)rows, (void)dim;
    return 0;
  }, "Keys a pass of the few-row read (the decode read) for `rows` query rows a group of head "
     "dim `dim`, float banks, in this process; 0 where no vector body takes them "
     "(MEMKERNELS_CPU_CHUNK=l1|l2 forces the short or the long chunk)",
     py::arg("rows"), py::arg("dim"));
  m.def("cpu_few_rows_key_major", [](int64_t rows, int64_t dim) -> int64_t {
#ifdef MK_HAVE_SIMD_VEC
    if (mk::few_rows_projects(rows, dim)) return mk::few_rows_key_major_vectors(rows, dim);
#endif
    (void)rows, (void)dim;
    return 0;
  }, "Vectors a key's scores take in the few-row read's key-major pass for `rows` query rows "
     "a group of head dim `dim` (float banks, no mask) in this process; 0 where the row-major "
     "pass, the one-pass body or no vector body takes them (MEMKERNELS_CPU_KEY_MAJOR=0|1 forces "
     "the layout)",
     py::arg("rows"), py::arg("dim"));
  m.def("cpu_tile_gemm", [] {
    switch (mk::tile_gemm_width()) {
      case 16: return "avx512";
      case 8: return "avx2";
      default: return mk::have_vendor_blas() ? "blas" : "loops";
    }
  }, "What runs the float tile GEMMs (prefill, backward, write) in this process: the "
     "register-blocked kernel on avx512 or avx2, or the vendor blas (MEMKERNELS_CPU_GEMM=blas, "
     "or no AVX2), or plain loops without a BLAS");
  m.def("cpu_fma_burst", &mk::fma_burst_all_threads, py::arg("steps"),
        "Independent vector FMAs on every OpenMP thread at the ISA the CPU kernels run (steps "
        "x 12 each); returns the FLOPs done (0 without AVX2 or for steps <= 0). The bench's "
        "FMA-peak probe.",
        py::call_guard<py::gil_scoped_release>());
  m.def("cpu_gemm_l1_burst", &mk::gemm_l1_burst_all_threads, py::arg("steps"),
        "A register-blocked product on operands in L1 on every OpenMP thread at the ISA the "
        "CPU kernels run (steps products of 64 steps each, the fewest loads a FMA the ISA's "
        "registers allow); returns the FLOPs done (0 without AVX2 or for steps <= 0). The "
        "bench's product probe: what a GEMM's inner loop reaches, its loads included.",
        py::call_guard<py::gil_scoped_release>());
  m.def("cpu_sum_in_turn", &cpu_sum_in_turn, py::arg("arrays"), py::arg("steps") = py::none(),
        "The sum of the float32 CPU tensors' elements on every OpenMP thread, step after step "
        "(one parallel region, a barrier between steps; each thread a share of each tensor); "
        "a step is the next steps[s] tensors, or one tensor where steps is None. Returns the "
        "total. The bench's floor for a chain of dependent reads (the reading layer's four "
        "steps).");
  m.attr("with_cuda") = py::bool_(memkernels::with_cuda());
  memkernels::register_cuda_bindings(m);
}
