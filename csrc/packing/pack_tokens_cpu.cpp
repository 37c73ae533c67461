// Packing copy: argument checks, the CPU twin (documents in parallel) and dispatch to the
// CUDA kernel; both write every token through pack_token() of pack_tokens.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include "messages.h"

#include <vector>

#include "packing/pack_tokens.h"
#include "packing/packing_ops.h"

namespace docqa_fast {

#if defined(DOCQA_FAST_WITH_CUDA)
namespace packing {
void pack_tokens_cuda(const std::vector<DocSource>& docs, const PackedRow& row, const at::Tensor& like);
}  // namespace packing
#endif

namespace {

void check_field(const at::Tensor& t, const char* name, size_t d, at::ScalarType dtype, int64_t length,
                 const at::Device& device) {
  DOCQA_CHECK_TYPE(t.scalar_type() == dtype, "pack_tokens: expected ", name, "[", d, "] of dtype ", dtype, ", got ",
                   t.scalar_type());
  DOCQA_CHECK_VALUE(t.dim() == 1 && t.size(0) == length && t.is_contiguous(), "pack_tokens: expected ", name, "[", d,
                    "] as a contiguous (", length, ",) tensor, got shape ", t.sizes());
  DOCQA_CHECK_VALUE(t.device() == device, "pack_tokens: expected ", name, "[", d, "] on ", device, ", got ",
                    t.device());
}

void check_output(const at::Tensor& t, const char* name, at::ScalarType dtype, at::IntArrayRef shape,
                  const at::Device& device) {
  DOCQA_CHECK_TYPE(t.scalar_type() == dtype, "pack_tokens: expected ", name, " of dtype ", dtype, ", got ",
                   t.scalar_type());
  DOCQA_CHECK_VALUE(t.sizes() == shape && t.is_contiguous(), "pack_tokens: expected a contiguous ", name,
                    " of shape ", shape, ", got ", t.sizes());
  DOCQA_CHECK_VALUE(t.device() == device, "pack_tokens: expected ", name, " on ", device, ", got ", t.device());
}

}  // namespace

void pack_tokens(const std::vector<at::Tensor>& ids, const std::vector<at::Tensor>& labels,
                 const std::vector<at::Tensor>& types, const std::vector<at::Tensor>& mrope, int64_t ignore_index,
                 const at::Tensor& ids_out, const at::Tensor& labels_out, const at::Tensor& types_out,
                 const at::Tensor& positions_out) {
  const size_t n = ids.size();
  DOCQA_CHECK_VALUE(n >= 1, "pack_tokens: expected at least one document");
  DOCQA_CHECK_VALUE(labels.size() == n && types.size() == n && mrope.size() == n, "pack_tokens: expected ", n,
                    " labels, types and mrope tensors (one per document), got ", labels.size(), ", ", types.size(),
                    " and ", mrope.size());
  const at::Device device = ids_out.device();
  DOCQA_CHECK_VALUE(device.is_cpu() || device.is_cuda(), "pack_tokens: expected CPU or CUDA tensors, got ", device);
#if !defined(DOCQA_FAST_WITH_CUDA)
  DOCQA_CHECK_VALUE(device.is_cpu(), "pack_tokens: docqa_fast._C was built without CUDA kernels");
#endif
  std::vector<packing::DocSource> docs(n);
  int64_t total = 0;
  for (size_t d = 0; d < n; ++d) {
    const int64_t L = ids[d].dim() == 1 ? ids[d].size(0) : -1;
    check_field(ids[d], "ids", d, at::kLong, L, device);
    check_field(labels[d], "labels", d, at::kLong, L, device);
    check_field(types[d], "types", d, at::kInt, L, device);
    DOCQA_CHECK_TYPE(mrope[d].scalar_type() == at::kLong, "pack_tokens: expected mrope[", d, "] of dtype int64");
    DOCQA_CHECK_VALUE(mrope[d].dim() == 2 && mrope[d].size(0) == 3 && mrope[d].size(1) == L &&
                          mrope[d].is_contiguous() && mrope[d].device() == device,
                      "pack_tokens: expected mrope[", d, "] as a contiguous (3, ", L, ") tensor on ", device,
                      ", got shape ", mrope[d].sizes());
    docs[d] = {ids[d].data_ptr<int64_t>(), labels[d].data_ptr<int64_t>(), types[d].data_ptr<int32_t>(),
               mrope[d].data_ptr<int64_t>(), L, total};
    total += L;
  }
  check_output(ids_out, "ids_out", at::kLong, {1, total}, device);
  check_output(labels_out, "labels_out", at::kLong, {1, total}, device);
  check_output(types_out, "types_out", at::kInt, {1, total}, device);
  check_output(positions_out, "positions_out", at::kLong, {4, 1, total}, device);
  if (total == 0) return;
  const packing::PackedRow row{ids_out.data_ptr<int64_t>(), labels_out.data_ptr<int64_t>(),
                               types_out.data_ptr<int32_t>(), positions_out.data_ptr<int64_t>(), total, ignore_index};
#if defined(DOCQA_FAST_WITH_CUDA)
  if (device.is_cuda()) return packing::pack_tokens_cuda(docs, row, ids_out);
#endif
  at::parallel_for(0, static_cast<int64_t>(n), 1, [&](int64_t d0, int64_t d1) {
    for (int64_t d = d0; d < d1; ++d)
      for (int64_t i = 0; i < docs[d].length; ++i) packing::pack_token(docs[d], i, row);
  });
}

}  // namespace docqa_fast
