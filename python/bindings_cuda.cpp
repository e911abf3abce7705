// pybind11 layer for the CUDA kernels: the submodule memkernels._C.cuda with
// the same four entry points as the CPU ones. Arguments are checked here
// (python/common.h) before any launch; every launch's error is checked.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <tuple>

#include "../csrc/cuda/slot_bank_cuda.h"
#include "common.h"
#include "cuda_entry.h"

namespace mc = memkernels::cuda;
using namespace memkernels::binding;

namespace {

mc::DType dtype_of(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return mc::DType::kFloat32;
    case at::kDouble: return mc::DType::kFloat64;
    case at::kHalf: return mc::DType::kFloat16;
    case at::kBFloat16: return mc::DType::kBFloat16;
    default: MK_CHECK(false, "memkernels CUDA kernels take float16, bfloat16, float32 or float64, got ",
                      t.scalar_type());
  }
}

void check_launch(cudaError_t e, const char* what) {
  MK_CHECK(e == cudaSuccess, "memkernels CUDA ", what, " failed: ", cudaGetErrorString(e));
}

void check_cuda_device(const Tensor& t) {
  MK_CHECK(t.is_cuda(), "memkernels._C.cuda: tensors must be on a CUDA device, got ", t.device());
}

OptTensor contiguous_mask(const OptTensor& m) {
  return m ? OptTensor(m->contiguous()) : std::nullopt;
}

// Runs the forward; out in `out_type`, lse in the accumulation type.
std::tuple<Tensor, Tensor> forward(const mc::Attention& p, const Tensor& like,
                                   at::ScalarType out_type, const mc::GateBlend* blend) {
  const auto acc = compute_type(like);
  auto opts = like.options();
  Tensor out = at::empty({p.groups, p.rows, p.dim}, opts.dtype(out_type));
  Tensor lse = at::empty({p.groups, p.rows}, opts.dtype(acc));
  int sms = 0;
  check_launch(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, like.get_device()),
               "device query");
  const int splits = blend ? 1 : mc::forward_splits(p, sms);
  Tensor part, part_lse;
  if (splits > 1) {
    part = at::empty({splits, p.groups, p.rows, p.dim}, opts.dtype(acc));
    part_lse = at::empty({splits, p.groups, p.rows}, opts.dtype(acc));
  }
  check_launch(mc::attention_forward(p, splits, out.data_ptr(), lse.data_ptr(),
                                     splits > 1 ? part.data_ptr() : nullptr,
                                     splits > 1 ? part_lse.data_ptr() : nullptr, blend,
                                     c10::cuda::getCurrentCUDAStream()),
               "attention forward");
  return {out, lse};
}

// dq, dk, dv for a problem whose forward output was `out` (any float dtype).
std::tuple<Tensor, Tensor, Tensor> backward(const mc::Attention& p, const Tensor& q,
                                            const Tensor& k, const Tensor& v, const Tensor& out,
                                            const Tensor& dout, const Tensor& lse) {
  const auto acc = compute_type(q);
  Tensor delta = (dout.to(acc) * out.to(acc)).sum(-1).contiguous();  // rowsum(dO * O)
  Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  check_launch(mc::attention_backward(p, dout.data_ptr(), lse.to(acc).contiguous().data_ptr(),
                                      delta.data_ptr(), dq.data_ptr(), dk.data_ptr(), dv.data_ptr(),
                                      c10::cuda::getCurrentCUDAStream()),
               "attention backward");
  return {dq, dk, dv};
}

mc::Attention problem(int64_t G, int64_t M, int64_t N, int64_t D, const Tensor& q, const Tensor& k,
                      const Tensor& v, memkernels::MaskIndex mask, double scale) {
  return {G, M, N, D, q.data_ptr(), k.data_ptr(), v.data_ptr(), mask, scale, dtype_of(q)};
}

std::tuple<Tensor, Tensor> read_fwd(const Tensor& q, const Tensor& k, const Tensor& v,
                                    const OptTensor& slot_mask, double scale) {
  const ReadLayout L = read_layout(q, k, v, slot_mask);
  check_cuda_device(q);
  if (L.empty()) return {at::empty_like(q), at::empty({L.B, L.H, L.T}, q.options().dtype(compute_type(q)))};
  const c10::cuda::CUDAGuard guard(q.device());
  const OptTensor mask = contiguous_mask(slot_mask);
  Tensor qg = L.to_groups(q), kg = L.bank_groups(k.contiguous()), vg = L.bank_groups(v.contiguous());
  auto [out, lse] = forward(problem(L.groups(), L.rows(), L.S, L.D, qg, kg, vg, L.mask_index(mask), scale),
                            q, q.scalar_type(), nullptr);
  return {L.from_groups(out), L.from_groups(lse)};
}

std::tuple<Tensor, Tensor, Tensor> read_bwd(const Tensor& dout, const Tensor& q, const Tensor& k,
                                            const Tensor& v, const Tensor& out, const Tensor& lse,
                                            const OptTensor& slot_mask, double scale) {
  const ReadLayout L = read_layout(q, k, v, slot_mask);
  check_cuda_device(q);
  check_saved(q, {{dout, "dout", q.sizes().vec()}, {out, "out", q.sizes().vec()},
                  {lse, "lse", {L.B, L.H, L.T}}});
  if (L.empty()) return {at::zeros_like(q), at::zeros_like(k), at::zeros_like(v)};
  const c10::cuda::CUDAGuard guard(q.device());
  const OptTensor mask = contiguous_mask(slot_mask);
  Tensor qg = L.to_groups(q), kg = L.bank_groups(k.contiguous()), vg = L.bank_groups(v.contiguous());
  Tensor dog = L.to_groups(dout.to(q.scalar_type()));
  auto [dq, dk, dv] = backward(problem(L.groups(), L.rows(), L.S, L.D, qg, kg, vg, L.mask_index(mask), scale),
                               qg, kg, vg, L.to_groups(out), dog, L.to_groups(lse));
  return {L.from_groups(dq), dk.reshape(k.sizes()), dv.reshape(v.sizes())};
}

std::tuple<Tensor, Tensor, Tensor> write_fwd(const Tensor& mem, const Tensor& q_slots,
                                             const Tensor& k_tok, const Tensor& v_tok,
                                             const Tensor& forget_logit, const Tensor& input_logit,
                                             const OptTensor& token_mask, double scale) {
  const WriteShape W = write_shape(mem, q_slots, k_tok, v_tok, forget_logit, input_logit, token_mask);
  check_cuda_device(mem);
  if (W.empty())
    return {at::empty_like(mem), at::empty_like(mem, mem.options().dtype(compute_type(mem))),
            at::empty({W.B, W.H, W.S}, mem.options().dtype(compute_type(mem)))};
  const c10::cuda::CUDAGuard guard(mem.device());
  const OptTensor mask = contiguous_mask(token_mask);
  Tensor m = mem.contiguous(), qs = q_slots.contiguous(), k = k_tok.contiguous(), v = v_tok.contiguous();
  Tensor f = forget_logit.contiguous(), i = input_logit.contiguous();
  Tensor new_mem = at::empty_like(m);
  const mc::GateBlend blend{m.data_ptr(), f.data_ptr(), i.data_ptr(), W.gate_dim, new_mem.data_ptr()};
  auto [upd, lse] = forward(problem(W.B * W.H, W.S, W.T, W.D, qs, k, v, write_mask_index(W, mask), scale),
                            m, compute_type(m), &blend);
  return {new_mem, upd.reshape(mem.sizes()), lse.reshape({W.B, W.H, W.S})};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> write_bwd(
    const Tensor& dnew, const Tensor& mem, const Tensor& q_slots, const Tensor& k_tok,
    const Tensor& v_tok, const Tensor& forget_logit, const Tensor& input_logit,
    const OptTensor& token_mask, const Tensor& upd, const Tensor& lse, double scale) {
  const WriteShape W = write_shape(mem, q_slots, k_tok, v_tok, forget_logit, input_logit, token_mask);
  check_cuda_device(mem);
  check_saved(mem, {{dnew, "dnew", mem.sizes().vec()}, {upd, "upd", mem.sizes().vec()},
                    {lse, "lse", {W.B, W.H, W.S}}});
  if (W.empty())
    return {at::zeros_like(mem), at::zeros_like(q_slots), at::zeros_like(k_tok),
            at::zeros_like(v_tok), at::zeros_like(forget_logit), at::zeros_like(input_logit)};
  const c10::cuda::CUDAGuard guard(mem.device());
  const OptTensor mask = contiguous_mask(token_mask);
  const auto acc = compute_type(mem);
  Tensor m = mem.contiguous(), qs = q_slots.contiguous(), k = k_tok.contiguous(), v = v_tok.contiguous();
  Tensor f = forget_logit.contiguous(), i = input_logit.contiguous();
  Tensor g = dnew.to(mem.scalar_type()).contiguous(), u = upd.to(acc).contiguous();
  Tensor dmem = at::empty_like(m), dupd = at::empty_like(m), df = at::empty_like(f), di = at::empty_like(i);
  check_launch(mc::gate_backward(dtype_of(m), W.B * W.H * W.S, W.D, W.gate_dim, g.data_ptr(),
                                 m.data_ptr(), u.data_ptr(), f.data_ptr(), i.data_ptr(),
                                 dmem.data_ptr(), dupd.data_ptr(), df.data_ptr(), di.data_ptr(),
                                 c10::cuda::getCurrentCUDAStream()),
               "gate backward");
  const int64_t G = W.B * W.H;
  auto [dq, dk, dv] = backward(problem(G, W.S, W.T, W.D, qs, k, v, write_mask_index(W, mask), scale),
                               qs, k, v, u, dupd, lse);
  return {dmem, dq, dk, dv, df, di};
}

}  // namespace

namespace memkernels {
void register_cuda_bindings(pybind11::module_& m) {
  auto cuda = m.def_submodule("cuda", "memkernels CUDA kernels (same entry points as the CPU ones)");
  cuda.def("read_fwd", &read_fwd, "memory_read forward (CUDA) -> (out, lse)");
  cuda.def("read_bwd", &read_bwd, "memory_read backward (CUDA) -> (dq, dk, dv)");
  cuda.def("write_fwd", &write_fwd, "memory_write forward (CUDA) -> (new_mem, upd, lse)");
  cuda.def("write_bwd", &write_bwd, "memory_write backward (CUDA) -> (dmem, dq, dk, dv, df, di)");
}
}  // namespace memkernels
