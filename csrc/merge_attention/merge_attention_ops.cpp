// Entry points of the attention-state merge: light argument checks (Python validates first;
// these stop a direct caller short of an out-of-bounds access), then CPU or CUDA by device.
#include "messages.h"

#include <climits>
#include <initializer_list>

#include "merge_attention/merge_attention_ops.h"

namespace docqa_fast {
namespace {

bool is_merge_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

void check_part_out(const char* op, const char* name, const at::Tensor& t, int64_t ndim) {
  DOCQA_CHECK_VALUE(t.dim() == ndim, op, ": expected ", name, " with ", ndim, " dimensions, got ", t.dim());
  DOCQA_CHECK_TYPE(is_merge_dtype(t.scalar_type()), op, ": expected ", name,
              " of dtype float16, bfloat16 or float32, got ", t.scalar_type());
  DOCQA_CHECK_VALUE(t.size(-1) <= 1 || t.stride(-1) == 1, op, ": expected ", name,
              " with a contiguous last dimension (stride 1), got strides ", t.strides());
}

void check_lse(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef expected) {
  DOCQA_CHECK_TYPE(t.scalar_type() == at::kFloat, op, ": expected ", name, " of dtype float32, got ", t.scalar_type());
  DOCQA_CHECK_VALUE(t.sizes() == expected, op, ": expected ", name, " of shape ", expected, ", got ", t.sizes());
}

// out: contiguous (B, S, H, D) of the inputs' dtype; lse_out: contiguous fp32 (B, H, S).
void check_results(const char* op, const at::Tensor& part, const at::Tensor& out, const at::Tensor& lse_out) {
  const auto sizes = part.sizes().slice(part.dim() - 4);
  DOCQA_CHECK_VALUE(out.sizes() == sizes, op, ": expected out of shape ", sizes, ", got ", out.sizes());
  DOCQA_CHECK_TYPE(out.scalar_type() == part.scalar_type(), op, ": expected out of dtype ", part.scalar_type(),
              ", got ", out.scalar_type());
  DOCQA_CHECK_VALUE(out.is_contiguous(), op, ": expected a contiguous out");
  check_lse(op, "lse_out", lse_out, {sizes[0], sizes[2], sizes[1]});
  DOCQA_CHECK_VALUE(lse_out.is_contiguous(), op, ": expected a contiguous lse_out");
}

void check_same_device(const char* op, std::initializer_list<const at::Tensor*> tensors) {
  const at::Device device = (*tensors.begin())->device();
  for (const at::Tensor* t : tensors)
    DOCQA_CHECK_VALUE(t->device() == device, op, ": expected every tensor on ", device, ", got one on ", t->device());
  DOCQA_CHECK_VALUE(device.is_cpu() || device.is_cuda(), op, ": expected CPU or CUDA tensors, got ", device);
#if !defined(DOCQA_FAST_WITH_CUDA)
  DOCQA_CHECK_VALUE(!device.is_cuda(), op, ": got CUDA tensors, but docqa_fast._C was built without CUDA kernels "
              "(rebuild it where nvcc and a CUDA build of PyTorch are available, or use the Triton backend)");
#endif
}

}  // namespace

void merge_attention_states(const at::Tensor& out_a, const at::Tensor& lse_a, const at::Tensor& out_b,
                            const at::Tensor& lse_b, const at::Tensor& out, const at::Tensor& lse_out) {
  constexpr const char* op = "merge_attention_states";
  check_part_out(op, "out_a", out_a, 4);
  check_part_out(op, "out_b", out_b, 4);
  DOCQA_CHECK_VALUE(out_b.sizes() == out_a.sizes(), op, ": expected out_b of shape ", out_a.sizes(), ", got ",
              out_b.sizes());
  DOCQA_CHECK_TYPE(out_b.scalar_type() == out_a.scalar_type(), op, ": expected out_b of dtype ", out_a.scalar_type(),
              ", got ", out_b.scalar_type());
  const int64_t B = out_a.size(0), S = out_a.size(1), H = out_a.size(2);
  check_lse(op, "lse_a", lse_a, {B, H, S});
  check_lse(op, "lse_b", lse_b, {B, H, S});
  check_results(op, out_a, out, lse_out);
  check_same_device(op, {&out_a, &lse_a, &out_b, &lse_b, &out, &lse_out});
  if (B * S * H == 0) return;
#if defined(DOCQA_FAST_WITH_CUDA)
  if (out.is_cuda()) return merge_attention::merge_pair_cuda(out_a, lse_a, out_b, lse_b, out, lse_out);
#endif
  merge_attention::merge_pair_cpu(out_a, lse_a, out_b, lse_b, out, lse_out);
}

void merge_stacked_attention_states(const at::Tensor& outs, const at::Tensor& lses, const at::Tensor& out,
                                    const at::Tensor& lse_out) {
  constexpr const char* op = "merge_stacked_attention_states";
  check_part_out(op, "outs", outs, 5);
  const int64_t n = outs.size(0), B = outs.size(1), S = outs.size(2), H = outs.size(3);
  DOCQA_CHECK_VALUE(n >= 1 && n <= INT_MAX, op, ": expected outs with 1 to ", INT_MAX, " parts along dimension 0, got ",
              n);
  check_lse(op, "lses", lses, {n, B, H, S});
  check_results(op, outs, out, lse_out);
  check_same_device(op, {&outs, &lses, &out, &lse_out});
  if (B * S * H == 0) return;
#if defined(DOCQA_FAST_WITH_CUDA)
  if (out.is_cuda()) return merge_attention::merge_stacked_cuda(outs, lses, out, lse_out);
#endif
  merge_attention::merge_stacked_cpu(outs, lses, out, lse_out);
}

}  // namespace docqa_fast
