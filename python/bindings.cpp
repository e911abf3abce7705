// pybind11 layer: torch tensors in, csrc/ kernels called, torch tensors out.
// Builds into memkernels._C. It re-checks everything the kernels rely on
// (TORCH_CHECK raises a Python RuntimeError), so a direct call with bad
// tensors never reaches a kernel.
#include <torch/extension.h>

#include <optional>
#include <tuple>

#include "../csrc/cpu/slot_bank_cpu.h"
#include "cuda_entry.h"

namespace mk = memkernels::cpu;
using at::Tensor;
using OptTensor = std::optional<Tensor>;

namespace {

void check_float(const Tensor& t, const char* name) {
  TORCH_CHECK(t.is_floating_point(), name, " must be a floating-point tensor, got ", t.scalar_type());
}

void check_shape(const Tensor& t, const char* name, at::IntArrayRef expected) {
  TORCH_CHECK(t.sizes() == expected, name, " must have shape ", expected, ", got ", t.sizes());
}

void check_same(const Tensor& t, const Tensor& ref, const char* name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, " must have dtype ", ref.scalar_type(),
              ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), name, " must be on ", ref.device(), ", got ", t.device());
}

void check_mask(const OptTensor& m, const char* name, const Tensor& ref) {
  if (!m) return;
  TORCH_CHECK(m->scalar_type() == at::kBool, name, " must be a bool tensor, got ", m->scalar_type());
  TORCH_CHECK(m->device() == ref.device(), name, " must be on ", ref.device());
}

// The kernels compute in float or double; bf16/fp16 are upcast once.
at::ScalarType compute_type(const Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

Tensor prep(const Tensor& t, at::ScalarType ct) { return t.to(ct).contiguous(); }

// Shape of memory_read's problem, and the map between [B, H, T, X] tensors
// and the kernel's group layout [G, M, X]. A shared bank makes one group per
// head holding all B*T queries, so each slot block is read once per head.
struct ReadLayout {
  int64_t B, H, T, S, D;
  bool shared;
  int64_t groups() const { return shared ? H : B * H; }
  int64_t rows() const { return shared ? B * T : T; }

  Tensor to_groups(const Tensor& x) const {  // [B, H, T, ...] -> [G, M, ...]
    auto sizes = x.sizes().vec();
    sizes.erase(sizes.begin(), sizes.begin() + 3);
    sizes.insert(sizes.begin(), {groups(), rows()});
    return (shared ? x.transpose(0, 1) : x).contiguous().reshape(sizes);
  }
  Tensor from_groups(const Tensor& x) const {  // [G, M, ...] -> [B, H, T, ...]
    auto rest = x.sizes().vec();
    rest.erase(rest.begin(), rest.begin() + 2);
    std::vector<int64_t> sizes = shared ? std::vector<int64_t>{H, B, T} : std::vector<int64_t>{B, H, T};
    sizes.insert(sizes.end(), rest.begin(), rest.end());
    auto y = x.reshape(sizes);
    return shared ? y.transpose(0, 1).contiguous() : y;
  }
  Tensor bank_groups(const Tensor& x) const { return x.reshape({groups(), S, D}); }

  mk::MaskIndex mask_index(const OptTensor& m) const {
    mk::MaskIndex idx;
    if (!m) return idx;
    idx.mask = m->data_ptr<bool>();
    if (m->dim() == 2) {  // [B, S]: per-sequence mask rows
      if (shared) { idx.row_div = T; idx.row_stride = S; }
      else { idx.group_div = H; idx.group_stride = S; }
    }
    return idx;
  }
};

ReadLayout read_layout(const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& mask) {
  TORCH_CHECK(q.dim() == 4, "q must be [B, H, T, Dh], got ", q.sizes());
  check_float(q, "q");
  check_same(k, q, "k");
  check_same(v, q, "v");
  ReadLayout L{q.size(0), q.size(1), q.size(2), 0, q.size(3), k.dim() == 3};
  TORCH_CHECK(k.dim() == 3 || k.dim() == 4, "k must be [H, S, Dh] or [B, H, S, Dh], got ", k.sizes());
  L.S = k.size(-2);
  TORCH_CHECK(L.S > 0, "k must have at least one slot");
  if (L.shared) check_shape(k, "k", {L.H, L.S, L.D});
  else check_shape(k, "k", {L.B, L.H, L.S, L.D});
  check_shape(v, "v", k.sizes());
  check_mask(mask, "slot_mask", q);
  if (mask) {
    TORCH_CHECK((mask->dim() == 1 && mask->size(0) == L.S) ||
                (mask->dim() == 2 && mask->size(0) == L.B && mask->size(1) == L.S),
                "slot_mask must be [S] or [B, S] = [", L.B, ", ", L.S, "], got ", mask->sizes());
  }
  return L;
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
  TORCH_CHECK(q.device().is_cpu(), "memkernels._C.read_fwd: tensors must be on the CPU");
  const auto ct = compute_type(q);
  const OptTensor mask = slot_mask ? OptTensor(slot_mask->contiguous()) : std::nullopt;
  Tensor qg = L.to_groups(q.to(ct)), kg = L.bank_groups(prep(k, ct)), vg = L.bank_groups(prep(v, ct));
  Tensor out = at::empty({L.groups(), L.rows(), L.D}, qg.options());
  Tensor lse = at::empty({L.groups(), L.rows()}, qg.options());
  AT_DISPATCH_FLOATING_TYPES(ct, "read_fwd", [&] {
    mk::read_forward<scalar_t>(read_problem<scalar_t>(L, qg, kg, vg, mask, scale),
                               out.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>());
  });
  // lse stays in the compute type: float64 gradients need a float64 lse.
  return {L.from_groups(out).to(q.scalar_type()), L.from_groups(lse)};
}

std::tuple<Tensor, Tensor, Tensor> read_bwd(const Tensor& dout, const Tensor& q, const Tensor& k,
                                            const Tensor& v, const Tensor& out, const Tensor& lse,
                                            const OptTensor& slot_mask, double scale) {
  const ReadLayout L = read_layout(q, k, v, slot_mask);
  TORCH_CHECK(q.device().is_cpu(), "memkernels._C.read_bwd: tensors must be on the CPU");
  check_shape(dout, "dout", q.sizes());
  check_shape(out, "out", q.sizes());
  check_shape(lse, "lse", {L.B, L.H, L.T});
  const auto ct = compute_type(q);
  const OptTensor mask = slot_mask ? OptTensor(slot_mask->contiguous()) : std::nullopt;
  Tensor qg = L.to_groups(q.to(ct)), kg = L.bank_groups(prep(k, ct)), vg = L.bank_groups(prep(v, ct));
  Tensor og = L.to_groups(out.to(ct)), dog = L.to_groups(dout.to(ct)), lg = L.to_groups(lse.to(ct));
  Tensor dq = at::empty_like(qg), dk = at::empty_like(kg), dv = at::empty_like(vg);
  AT_DISPATCH_FLOATING_TYPES(ct, "read_bwd", [&] {
    mk::read_backward<scalar_t>(read_problem<scalar_t>(L, qg, kg, vg, mask, scale),
                                og.data_ptr<scalar_t>(), dog.data_ptr<scalar_t>(),
                                lg.data_ptr<scalar_t>(), dq.data_ptr<scalar_t>(),
                                dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>());
  });
  const auto dt = q.scalar_type();
  return {L.from_groups(dq).to(dt), dk.reshape(k.sizes()).to(dt), dv.reshape(v.sizes()).to(dt)};
}

// memory_write: all tensors [B, H, ...]; groups are (b, h) pairs.
struct WriteShape {
  int64_t B, H, S, T, D, gate_dim;
};

WriteShape write_shape(const Tensor& mem, const Tensor& qs, const Tensor& k, const Tensor& v,
                       const Tensor& f, const Tensor& i, const OptTensor& token_mask) {
  TORCH_CHECK(mem.dim() == 4, "mem must be [B, H, S, Dh], got ", mem.sizes());
  check_float(mem, "mem");
  for (auto [t, n] : {std::pair{&qs, "q_slots"}, {&k, "k_tok"}, {&v, "v_tok"},
                      {&f, "forget_logit"}, {&i, "input_logit"}})
    check_same(*t, mem, n);
  WriteShape W{mem.size(0), mem.size(1), mem.size(2), k.dim() == 4 ? k.size(2) : -1, mem.size(3), 0};
  TORCH_CHECK(W.S > 0, "mem must have at least one slot");
  check_shape(qs, "q_slots", mem.sizes());
  TORCH_CHECK(k.dim() == 4 && W.T > 0, "k_tok must be [B, H, T, Dh] with T >= 1, got ", k.sizes());
  check_shape(k, "k_tok", {W.B, W.H, W.T, W.D});
  check_shape(v, "v_tok", k.sizes());
  TORCH_CHECK(f.dim() == 4 && (f.size(3) == 1 || f.size(3) == W.D),
              "forget_logit must be [B, H, S, 1] or [B, H, S, Dh], got ", f.sizes());
  W.gate_dim = f.size(3);
  check_shape(f, "forget_logit", {W.B, W.H, W.S, W.gate_dim});
  check_shape(i, "input_logit", f.sizes());
  check_mask(token_mask, "token_mask", mem);
  if (token_mask) check_shape(*token_mask, "token_mask", {W.B, W.T});
  return W;
}

template <typename T>
mk::WriteProblem<T> write_problem(const WriteShape& W, const Tensor& mem, const Tensor& qs,
                                  const Tensor& k, const Tensor& v, const Tensor& f,
                                  const Tensor& i, const OptTensor& mask, double scale) {
  mk::MaskIndex idx;
  if (mask) { idx.mask = mask->data_ptr<bool>(); idx.group_div = W.H; idx.group_stride = W.T; }
  mk::AttentionProblem<T> p{W.B * W.H, W.S, W.T, W.D, qs.data_ptr<T>(), k.data_ptr<T>(),
                            v.data_ptr<T>(), idx, static_cast<T>(scale)};
  return {p, mem.data_ptr<T>(), f.data_ptr<T>(), i.data_ptr<T>(), W.gate_dim};
}

std::tuple<Tensor, Tensor, Tensor> write_fwd(const Tensor& mem, const Tensor& q_slots,
                                             const Tensor& k_tok, const Tensor& v_tok,
                                             const Tensor& forget_logit, const Tensor& input_logit,
                                             const OptTensor& token_mask, double scale) {
  const WriteShape W = write_shape(mem, q_slots, k_tok, v_tok, forget_logit, input_logit, token_mask);
  TORCH_CHECK(mem.device().is_cpu(), "memkernels._C.write_fwd: tensors must be on the CPU");
  const auto ct = compute_type(mem);
  const OptTensor mask = token_mask ? OptTensor(token_mask->contiguous()) : std::nullopt;
  Tensor m = prep(mem, ct), qs = prep(q_slots, ct), k = prep(k_tok, ct), v = prep(v_tok, ct);
  Tensor f = prep(forget_logit, ct), i = prep(input_logit, ct);
  Tensor new_mem = at::empty_like(m), upd = at::empty_like(m);
  Tensor lse = at::empty({W.B, W.H, W.S}, m.options());
  AT_DISPATCH_FLOATING_TYPES(ct, "write_fwd", [&] {
    mk::write_forward<scalar_t>(write_problem<scalar_t>(W, m, qs, k, v, f, i, mask, scale),
                                new_mem.data_ptr<scalar_t>(), upd.data_ptr<scalar_t>(),
                                lse.data_ptr<scalar_t>());
  });
  return {new_mem.to(mem.scalar_type()), upd, lse};  // upd, lse: compute type, saved for backward
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> write_bwd(
    const Tensor& dnew, const Tensor& mem, const Tensor& q_slots, const Tensor& k_tok,
    const Tensor& v_tok, const Tensor& forget_logit, const Tensor& input_logit,
    const OptTensor& token_mask, const Tensor& upd, const Tensor& lse, double scale) {
  const WriteShape W = write_shape(mem, q_slots, k_tok, v_tok, forget_logit, input_logit, token_mask);
  TORCH_CHECK(mem.device().is_cpu(), "memkernels._C.write_bwd: tensors must be on the CPU");
  check_shape(dnew, "dnew", mem.sizes());
  check_shape(upd, "upd", mem.sizes());
  check_shape(lse, "lse", {W.B, W.H, W.S});
  const auto ct = compute_type(mem);
  const OptTensor mask = token_mask ? OptTensor(token_mask->contiguous()) : std::nullopt;
  Tensor m = prep(mem, ct), qs = prep(q_slots, ct), k = prep(k_tok, ct), v = prep(v_tok, ct);
  Tensor f = prep(forget_logit, ct), i = prep(input_logit, ct);
  Tensor g = prep(dnew, ct), u = prep(upd, ct), l = prep(lse, ct);
  Tensor dmem = at::empty_like(m), dqs = at::empty_like(qs), dk = at::empty_like(k),
         dv = at::empty_like(v), df = at::empty_like(f), di = at::empty_like(i);
  AT_DISPATCH_FLOATING_TYPES(ct, "write_bwd", [&] {
    mk::write_backward<scalar_t>(write_problem<scalar_t>(W, m, qs, k, v, f, i, mask, scale),
                                 u.data_ptr<scalar_t>(), l.data_ptr<scalar_t>(),
                                 g.data_ptr<scalar_t>(), dmem.data_ptr<scalar_t>(),
                                 dqs.data_ptr<scalar_t>(), dk.data_ptr<scalar_t>(),
                                 dv.data_ptr<scalar_t>(), df.data_ptr<scalar_t>(),
                                 di.data_ptr<scalar_t>());
  });
  const auto dt = mem.scalar_type();
  return {dmem.to(dt), dqs.to(dt), dk.to(dt), dv.to(dt), df.to(dt), di.to(dt)};
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "memkernels fused slot-bank kernels (CPU; CUDA when built with it)";
  m.def("read_fwd", &read_fwd, "memory_read forward (CPU) -> (out, lse)", py::arg("q"), py::arg("k"),
        py::arg("v"), py::arg("slot_mask"), py::arg("scale"));
  m.def("read_bwd", &read_bwd, "memory_read backward (CPU) -> (dq, dk, dv)");
  m.def("write_fwd", &write_fwd, "memory_write forward (CPU) -> (new_mem, upd, lse)");
  m.def("write_bwd", &write_bwd, "memory_write backward (CPU) -> (dmem, dq, dk, dv, df, di)");
  m.def("has_vendor_blas", &mk::have_vendor_blas, "True when the CPU kernels use the vendor GEMM");
  m.attr("with_cuda") = py::bool_(memkernels::with_cuda());
  memkernels::register_cuda_bindings(m);
}
