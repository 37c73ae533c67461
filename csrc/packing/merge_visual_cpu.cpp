// Visual-token merge: argument checks, the CPU twin (one memcpy per row, tiles in parallel),
// and dispatch to the CUDA kernels. The twin counts placeholders per tile, scans the counts,
// then copies each tile's rows: the CUDA kernels' steps, with the same functions (merge_visual.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include "messages.h"

#include <cstring>
#include <vector>

#include "packing/merge_visual.h"
#include "packing/packing_ops.h"

namespace docqa_fast {

#if defined(DOCQA_FAST_WITH_CUDA)
namespace packing {
void merge_visual_forward_cuda(const at::Tensor& embeds, const at::Tensor& ids, const at::Tensor& token_ids,
                               const at::Tensor& visual, const at::Tensor& out);
void merge_visual_backward_cuda(const at::Tensor& grad, const at::Tensor& ids, const at::Tensor& token_ids,
                                const at::Tensor& grad_inputs, const at::Tensor& grad_visual);
}  // namespace packing
#endif

namespace {

void check_merge_args(const char* op, const at::Tensor& rows_in, const at::Tensor& ids, const at::Tensor& token_ids,
                      const at::Tensor& visual, const at::Tensor& rows_out) {
  DOCQA_CHECK_VALUE(rows_in.dim() == 2 && rows_in.is_contiguous(), op, ": expected contiguous (N, H) rows");
  DOCQA_CHECK_VALUE(visual.dim() == 2 && visual.is_contiguous() && visual.size(1) == rows_in.size(1), op,
                    ": expected contiguous (V, H) visual rows with H = ", rows_in.size(1));
  DOCQA_CHECK_TYPE(visual.scalar_type() == rows_in.scalar_type(), op, ": expected one dtype for all rows");
  // The CUDA kernel copies rows in 16-, 4- or 2-byte words: 1- and 8-byte elements would not fit them.
  const auto dtype = rows_in.scalar_type();
  DOCQA_CHECK_TYPE(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat, op,
                   ": expected float16, bfloat16 or float32 rows, got ", dtype);
  DOCQA_CHECK_TYPE(ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt, op,
                   ": expected input_ids of dtype int32 or int64, got ", ids.scalar_type());
  DOCQA_CHECK_VALUE(ids.dim() == 1 && ids.size(0) == rows_in.size(0) && ids.is_contiguous(), op,
                    ": expected input_ids as a contiguous (N,) tensor with N = ", rows_in.size(0));
  DOCQA_CHECK_TYPE(token_ids.scalar_type() == at::kLong, op, ": expected token_ids of dtype int64");
  DOCQA_CHECK_VALUE(token_ids.dim() == 1 && token_ids.numel() >= 1 && token_ids.is_contiguous(), op,
                    ": expected token_ids as a non-empty contiguous 1-D tensor");
  DOCQA_CHECK_VALUE(rows_out.sizes() == rows_in.sizes() && rows_out.is_contiguous() &&
                        rows_out.scalar_type() == rows_in.scalar_type(),
                    op, ": expected a contiguous output shaped like the input rows");
  for (const at::Tensor* t : {&ids, &token_ids, &visual, &rows_out})
    DOCQA_CHECK_VALUE(t->device() == rows_in.device(), op, ": expected every tensor on ", rows_in.device());
  DOCQA_CHECK_VALUE(rows_in.device().is_cpu() || rows_in.device().is_cuda(), op, ": expected CPU or CUDA tensors");
#if !defined(DOCQA_FAST_WITH_CUDA)
  DOCQA_CHECK_VALUE(!rows_in.is_cuda(), op, ": docqa_fast._C was built without CUDA kernels");
#endif
}

// Calls row(i, slot) for every token row, tiles in parallel; returns the placeholder count.
template <typename IdT, typename Row>
int64_t for_each_slot(const IdT* ids, int64_t N, const int64_t* token_ids, int64_t n_token_ids, Row&& row) {
  const int64_t n_tiles = (N + packing::kMergeTileRows - 1) / packing::kMergeTileRows;
  std::vector<int64_t> prefix(static_cast<size_t>(n_tiles) + 1, 0);
  at::parallel_for(0, n_tiles, 64, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t end = std::min(N, (t + 1) * packing::kMergeTileRows);
      int64_t count = 0;
      for (int64_t i = t * packing::kMergeTileRows; i < end; ++i)
        count += packing::is_placeholder(static_cast<int64_t>(ids[i]), token_ids, n_token_ids);
      prefix[t + 1] = count;
    }
  });
  for (int64_t t = 0; t < n_tiles; ++t) prefix[t + 1] += prefix[t];  // the look-back, sequentially
  at::parallel_for(0, n_tiles, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t end = std::min(N, (t + 1) * packing::kMergeTileRows);
      int64_t before = 0;
      for (int64_t i = t * packing::kMergeTileRows; i < end; ++i) {
        const bool ph = packing::is_placeholder(static_cast<int64_t>(ids[i]), token_ids, n_token_ids);
        row(i, packing::token_slot(ph, prefix[t], before));
        before += ph;
      }
    }
  });
  return prefix[n_tiles];
}

template <typename Row>
int64_t dispatch_ids(const at::Tensor& ids, const at::Tensor& token_ids, Row&& row) {
  const int64_t N = ids.size(0), n_tok = token_ids.numel();
  const int64_t* tok = token_ids.data_ptr<int64_t>();
  if (ids.scalar_type() == at::kInt) return for_each_slot(ids.data_ptr<int32_t>(), N, tok, n_tok, row);
  return for_each_slot(ids.data_ptr<int64_t>(), N, tok, n_tok, row);
}

}  // namespace

void merge_visual_forward(const at::Tensor& embeds, const at::Tensor& ids, const at::Tensor& token_ids,
                          const at::Tensor& visual, const at::Tensor& out) {
  check_merge_args("merge_visual_forward", embeds, ids, token_ids, visual, out);
  if (embeds.numel() == 0) return;
#if defined(DOCQA_FAST_WITH_CUDA)
  if (embeds.is_cuda()) return packing::merge_visual_forward_cuda(embeds, ids, token_ids, visual, out);
#endif
  const int64_t V = visual.size(0);
  const size_t row_bytes = static_cast<size_t>(embeds.size(1)) * embeds.element_size();
  const char* src_e = static_cast<const char*>(embeds.data_ptr());
  const char* src_v = static_cast<const char*>(visual.data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  dispatch_ids(ids, token_ids, [&](int64_t i, int64_t slot) {
    const int64_t v = packing::forward_source_row(slot, V);
    std::memcpy(dst + i * row_bytes, v >= 0 ? src_v + v * row_bytes : src_e + i * row_bytes, row_bytes);
  });
}

void merge_visual_backward(const at::Tensor& grad, const at::Tensor& ids, const at::Tensor& token_ids,
                           const at::Tensor& grad_inputs, const at::Tensor& grad_visual) {
  check_merge_args("merge_visual_backward", grad, ids, token_ids, grad_visual, grad_inputs);
  if (grad.size(0) == 0 || grad.size(1) == 0) {  // no token rows: no feature row receives anything
    grad_visual.zero_();
    return;
  }
#if defined(DOCQA_FAST_WITH_CUDA)
  if (grad.is_cuda()) return packing::merge_visual_backward_cuda(grad, ids, token_ids, grad_inputs, grad_visual);
#endif
  const int64_t V = grad_visual.size(0);
  const size_t row_bytes = static_cast<size_t>(grad.size(1)) * grad.element_size();
  const char* g = static_cast<const char*>(grad.data_ptr());
  char* gi = static_cast<char*>(grad_inputs.data_ptr());
  char* gv = static_cast<char*>(grad_visual.data_ptr());
  const int64_t placeholders = dispatch_ids(ids, token_ids, [&](int64_t i, int64_t slot) {
    const int64_t v = packing::backward_target_row(slot, V);
    if (v >= 0) std::memcpy(gv + v * row_bytes, g + i * row_bytes, row_bytes);  // slots are unique
    if (slot >= 0) {
      std::memset(gi + i * row_bytes, 0, row_bytes);  // +0.0 in fp16/bf16/fp32 is all-zero bits
    } else {
      std::memcpy(gi + i * row_bytes, g + i * row_bytes, row_bytes);
    }
  });
  const int64_t first = packing::first_unreached_row(placeholders, V);
  if (first < V) std::memset(gv + first * row_bytes, 0, static_cast<size_t>(V - first) * row_bytes);
}

}  // namespace docqa_fast
