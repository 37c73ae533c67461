// CPU twin of the visual-token merge kernels: one memcpy per row, rows in parallel.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <cstring>

#include "packing/merge_visual.h"
#include "packing/packing_ops.h"

namespace docqa_fast {
namespace {

void check_merge_args(const char* op, const at::Tensor& rows_in, const at::Tensor& visual, const at::Tensor& slot,
                      const at::Tensor& rows_out) {
  TORCH_CHECK_VALUE(rows_in.dim() == 2 && rows_in.is_contiguous(), op, ": expected contiguous (N, H) rows");
  TORCH_CHECK_VALUE(visual.dim() == 2 && visual.is_contiguous() && visual.size(1) == rows_in.size(1), op,
                    ": expected contiguous (V, H) visual rows with H = ", rows_in.size(1));
  TORCH_CHECK_VALUE(visual.scalar_type() == rows_in.scalar_type(), op, ": expected one dtype for all rows");
  TORCH_CHECK_VALUE(slot.dim() == 1 && slot.size(0) == rows_in.size(0) && slot.scalar_type() == at::kLong &&
                        slot.is_contiguous(),
                    op, ": expected slot as a contiguous (N,) int64 tensor");
  TORCH_CHECK_VALUE(rows_out.sizes() == rows_in.sizes() && rows_out.is_contiguous() &&
                        rows_out.scalar_type() == rows_in.scalar_type(),
                    op, ": expected a contiguous output shaped like the input rows");
  for (const at::Tensor* t : {&visual, &slot, &rows_out})
    TORCH_CHECK_VALUE(t->device() == rows_in.device(), op, ": expected every tensor on ", rows_in.device());
#if !defined(DOCQA_FAST_WITH_CUDA)
  TORCH_CHECK(!rows_in.is_cuda(), op, ": docqa_fast._C was built without CUDA kernels");
#endif
}

}  // namespace

#if defined(DOCQA_FAST_WITH_CUDA)
namespace packing {
void merge_visual_forward_cuda(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&);
void merge_visual_backward_cuda(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&);
}  // namespace packing
#endif

void merge_visual_forward(const at::Tensor& embeds, const at::Tensor& visual, const at::Tensor& slot,
                          const at::Tensor& out) {
  check_merge_args("merge_visual_forward", embeds, visual, slot, out);
  if (embeds.numel() == 0) return;
#if defined(DOCQA_FAST_WITH_CUDA)
  if (embeds.is_cuda()) return packing::merge_visual_forward_cuda(embeds, visual, slot, out);
#endif
  const int64_t N = embeds.size(0), V = visual.size(0);
  const size_t row_bytes = static_cast<size_t>(embeds.size(1)) * embeds.element_size();
  const char* src_e = static_cast<const char*>(embeds.data_ptr());
  const char* src_v = static_cast<const char*>(visual.data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  const int64_t* s = slot.data_ptr<int64_t>();
  at::parallel_for(0, N, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t v = packing::forward_source_row(s[i], V);
      const char* src = v >= 0 ? src_v + v * row_bytes : src_e + i * row_bytes;
      std::memcpy(dst + i * row_bytes, src, row_bytes);
    }
  });
}

void merge_visual_backward(const at::Tensor& grad, const at::Tensor& slot, const at::Tensor& grad_inputs,
                           const at::Tensor& grad_visual) {
  check_merge_args("merge_visual_backward", grad, grad_visual, slot, grad_inputs);
  if (grad.numel() == 0) return;
#if defined(DOCQA_FAST_WITH_CUDA)
  if (grad.is_cuda()) return packing::merge_visual_backward_cuda(grad, slot, grad_inputs, grad_visual);
#endif
  const int64_t N = grad.size(0), V = grad_visual.size(0);
  const size_t row_bytes = static_cast<size_t>(grad.size(1)) * grad.element_size();
  const char* g = static_cast<const char*>(grad.data_ptr());
  char* gi = static_cast<char*>(grad_inputs.data_ptr());
  char* gv = static_cast<char*>(grad_visual.data_ptr());
  const int64_t* s = slot.data_ptr<int64_t>();
  at::parallel_for(0, N, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t v = packing::backward_target_row(s[i], V);
      if (v >= 0) std::memcpy(gv + v * row_bytes, g + i * row_bytes, row_bytes);  // slots are unique
      if (s[i] >= 0) {
        std::memset(gi + i * row_bytes, 0, row_bytes);  // +0.0 in fp16/bf16/fp32 is all-zero bits
      } else {
        std::memcpy(gi + i * row_bytes, g + i * row_bytes, row_bytes);
      }
    }
  });
}

}  // namespace docqa_fast
