// Shared by the CPU and CUDA bindings: argument checks and the map from the
// ops' [B, H, ...] tensors to the kernels' group layout [G, M, ...].
#pragma once

#include <torch/extension.h>

#include <cstdio>
#include <initializer_list>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "../csrc/slot_math.h"

namespace memkernels::binding {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// Error messages are built here, numbers through std::to_string / snprintf,
// and handed to TORCH_CHECK as one string: on torch 2.11 (the GPU image), an
// integer or a shape formatted through c10::str crashed the process where
// plain strings, dtypes and devices were fine. MK_CHECK is TORCH_CHECK with
// that formatting; the bindings use it for every check.
namespace detail {
inline std::string number_str(double x) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", x);
  return buf;
}
template <typename T>
void append(std::string& s, const T& x) {
  if constexpr (std::is_convertible_v<const T&, std::string_view>) {
    s += std::string_view(x);
  } else if constexpr (std::is_same_v<T, bool>) {
    s += x ? "true" : "false";
  } else if constexpr (std::is_integral_v<T>) {
    s += std::to_string(x);
  } else if constexpr (std::is_floating_point_v<T>) {
    s += number_str(double(x));
  } else {  // dtypes, devices
    static_assert(!std::is_enum_v<T> || std::is_same_v<T, c10::ScalarType>,
                  "MK_CHECK: pass this enum as a string (c10::str would format it as an integer)");
    s += c10::str(x);
  }
}
}  // namespace detail

template <typename... Args>
std::string message(const Args&... args) {
  std::string s;
  (detail::append(s, args), ...);
  return s;
}

#define MK_CHECK(cond, ...) TORCH_CHECK((cond), ::memkernels::binding::message(__VA_ARGS__))

inline std::string shape_str(at::IntArrayRef sizes) {
  std::string s = "[";
  for (size_t i = 0; i < sizes.size(); ++i) s += (i ? ", " : "") + std::to_string(sizes[i]);
  return s + "]";
}

inline void check_float(const Tensor& t, const char* name) {
  MK_CHECK(t.is_floating_point(), name, " must be a floating-point tensor, got ", t.scalar_type());
}

inline void check_shape(const Tensor& t, const char* name, at::IntArrayRef expected) {
  MK_CHECK(t.sizes() == expected, name, " must have shape ", shape_str(expected), ", got ",
           shape_str(t.sizes()));
}

inline void check_same(const Tensor& t, const Tensor& ref, const char* name) {
  MK_CHECK(t.scalar_type() == ref.scalar_type(), name, " must have dtype ", ref.scalar_type(),
           ", got ", t.scalar_type());
  MK_CHECK(t.device() == ref.device(), name, " must be on ", ref.device(), ", got ", t.device());
}

inline void check_device(const Tensor& t, const Tensor& ref, const char* name) {
  MK_CHECK(t.device() == ref.device(), name, " must be on ", ref.device(), ", got ", t.device());
}

// Head dims the kernels take (the public ops check the same range).
constexpr int64_t kMaxHeadDim = 256;

inline void check_head_dim(int64_t D, const char* name) {
  MK_CHECK(D >= 1 && D <= kMaxHeadDim, name, " must have a head dim Dh in 1..", kMaxHeadDim,
           ", got ", D);
}

inline void check_mask(const OptTensor& m, const char* name, const Tensor& ref) {
  if (!m) return;
  MK_CHECK(m->scalar_type() == at::kBool, name, " must be a bool tensor, got ", m->scalar_type());
  MK_CHECK(m->device() == ref.device(), name, " must be on ", ref.device());
}

// The kernels compute in float or double; bf16/fp16 are upcast once.
inline at::ScalarType compute_type(const Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline Tensor prep(const Tensor& t, at::ScalarType ct) { return t.to(ct).contiguous(); }

// Shape of memory_read's problem, and the map between [B, H, T, X] tensors
// and the kernel's group layout [G, M, X]. A shared bank makes one group per
// head holding all B*T queries, so each slot block is read once per head.
struct ReadLayout {
  int64_t B, H, T, S, D;
  bool shared;
  int64_t groups() const { return shared ? H : B * H; }
  bool empty() const { return B * H * T == 0; }  // no query: empty results, no kernel call
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

  memkernels::MaskIndex mask_index(const OptTensor& m) const {
    memkernels::MaskIndex idx;
    if (!m) return idx;
    idx.mask = m->data_ptr<bool>();
    if (m->dim() == 2) {  // [B, S]: per-sequence mask rows
      if (shared) { idx.row_div = T; idx.row_stride = S; }
      else { idx.group_div = H; idx.group_stride = S; }
    }
    return idx;
  }
};

inline ReadLayout read_layout(const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& mask) {
  MK_CHECK(q.dim() == 4, "q must be [B, H, T, Dh], got ", shape_str(q.sizes()));
  check_float(q, "q");
  check_same(k, q, "k");
  check_same(v, q, "v");
  ReadLayout L{q.size(0), q.size(1), q.size(2), 0, q.size(3), k.dim() == 3};
  check_head_dim(L.D, "q");
  MK_CHECK(k.dim() == 3 || k.dim() == 4, "k must be [H, S, Dh] or [B, H, S, Dh], got ", shape_str(k.sizes()));
  L.S = k.size(-2);
  MK_CHECK(L.S > 0, "k must have at least one slot");
  if (L.shared) check_shape(k, "k", {L.H, L.S, L.D});
  else check_shape(k, "k", {L.B, L.H, L.S, L.D});
  check_shape(v, "v", k.sizes());
  check_mask(mask, "slot_mask", q);
  if (mask) {
    MK_CHECK((mask->dim() == 1 && mask->size(0) == L.S) ||
             (mask->dim() == 2 && mask->size(0) == L.B && mask->size(1) == L.S),
             "slot_mask must be [S] or [B, S] = ", shape_str({L.B, L.S}), ", got ",
             shape_str(mask->sizes()));
  }
  return L;
}

// The saved forward results and the gradient a backward takes: each floating-point (it is
// converted to the compute type; an integer or complex tensor is a caller's mistake), shaped and
// placed as the forward made it.
struct Saved {
  const Tensor& t;
  const char* name;
  std::vector<int64_t> shape;
};
inline void check_saved(const Tensor& like, std::initializer_list<Saved> saved) {
  for (const Saved& s : saved) {
    check_float(s.t, s.name);
    check_shape(s.t, s.name, s.shape);
    check_device(s.t, like, s.name);
  }
}

// memory_write: all tensors [B, H, ...]; groups are (b, h) pairs.
struct WriteShape {
  int64_t B, H, S, T, D, gate_dim;
  bool empty() const { return B * H == 0; }  // no slot to write: empty results, no kernel call
};

inline WriteShape write_shape(const Tensor& mem, const Tensor& qs, const Tensor& k, const Tensor& v,
                       const Tensor& f, const Tensor& i, const OptTensor& token_mask) {
  MK_CHECK(mem.dim() == 4, "mem must be [B, H, S, Dh], got ", shape_str(mem.sizes()));
  check_float(mem, "mem");
  for (auto [t, n] : {std::pair{&qs, "q_slots"}, {&k, "k_tok"}, {&v, "v_tok"},
                      {&f, "forget_logit"}, {&i, "input_logit"}})
    check_same(*t, mem, n);
  WriteShape W{mem.size(0), mem.size(1), mem.size(2), k.dim() == 4 ? k.size(2) : -1, mem.size(3), 0};
  MK_CHECK(W.S > 0, "mem must have at least one slot");
  check_head_dim(W.D, "mem");
  check_shape(qs, "q_slots", mem.sizes());
  MK_CHECK(k.dim() == 4 && W.T > 0, "k_tok must be [B, H, T, Dh] with T >= 1, got ", shape_str(k.sizes()));
  check_shape(k, "k_tok", {W.B, W.H, W.T, W.D});
  check_shape(v, "v_tok", k.sizes());
  MK_CHECK(f.dim() == 4 && (f.size(3) == 1 || f.size(3) == W.D),
           "forget_logit must be [B, H, S, 1] or [B, H, S, Dh], got ", shape_str(f.sizes()));
  W.gate_dim = f.size(3);
  check_shape(f, "forget_logit", {W.B, W.H, W.S, W.gate_dim});
  check_shape(i, "input_logit", f.sizes());
  check_mask(token_mask, "token_mask", mem);
  if (token_mask) check_shape(*token_mask, "token_mask", {W.B, W.T});
  return W;
}

// token_mask [B, T] applies to group g = b * H + h.
inline MaskIndex write_mask_index(const WriteShape& W, const OptTensor& mask) {
  MaskIndex idx;
  if (mask) { idx.mask = mask->data_ptr<bool>(); idx.group_div = W.H; idx.group_stride = W.T; }
  return idx;
}

}  // namespace memkernels::binding
