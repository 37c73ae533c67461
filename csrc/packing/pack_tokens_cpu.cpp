// Packing copy: argument checks, the CPU twin and dispatch to the CUDA kernel. Both write every
// token through pack_token() and every joined output's bytes through copy_tile() of
// pack_tokens.h, over the same tiles and lanes.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include "messages.h"

#include <cstdint>
#include <vector>

#include "packing/pack_tokens.h"
#include "packing/packing_ops.h"

namespace docqa_fast {

#if defined(DOCQA_FAST_WITH_CUDA)
namespace packing {
void pack_tokens_cuda(const std::vector<DocSource>& docs, const PackedRow& row,
                      const std::vector<CopySegment>& segments, int64_t tiles, const at::Tensor& like);
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

// joined[f] must be torch.cat(parts[f]): its parts' dtype, trailing shape and summed rows. Adds
// one segment per non-empty part; returns the number of tiles so far.
int64_t add_segments(const std::vector<at::Tensor>& parts, const at::Tensor& joined, size_t f,
                     const at::Device& device, int64_t tiles, std::vector<packing::CopySegment>& segments) {
  DOCQA_CHECK_VALUE(joined.dim() >= 1 && joined.is_contiguous(), "pack_tokens: expected joined[", f,
                    "] as a contiguous tensor of at least one dimension, got shape ", joined.sizes());
  DOCQA_CHECK_VALUE(joined.device() == device, "pack_tokens: expected joined[", f, "] on ", device,
                    " (the packed row's device), got ", joined.device());
  const at::IntArrayRef trailing = joined.sizes().slice(1);
  int64_t rows = 0;
  for (size_t k = 0; k < parts.size(); ++k) {
    const at::Tensor& part = parts[k];
    DOCQA_CHECK_TYPE(part.scalar_type() == joined.scalar_type(), "pack_tokens: expected parts[", f, "][", k,
                     "] of dtype ", joined.scalar_type(), " (the dtype of joined[", f, "]), got ",
                     part.scalar_type());
    DOCQA_CHECK_VALUE(part.device() == device, "pack_tokens: expected parts[", f, "][", k, "] on ", device,
                      " (the packed row's device), got ", part.device());
    DOCQA_CHECK_VALUE(part.dim() == joined.dim() && part.sizes().slice(1) == trailing && part.is_contiguous(),
                      "pack_tokens: expected parts[", f, "][", k, "] as a contiguous tensor of shape (rows, ",
                      trailing, ") (joined[", f, "]'s trailing shape), got ", part.sizes());
    const int64_t first_row = rows;
    rows += part.size(0);
    const int64_t bytes = part.numel() * static_cast<int64_t>(part.element_size());
    if (bytes == 0) continue;
    const auto* src = static_cast<const unsigned char*>(part.data_ptr());
    // Written only after every check has passed (the rows' total included).
    auto* dst = static_cast<unsigned char*>(joined.data_ptr()) + first_row * (bytes / part.size(0));
    segments.push_back({src, dst, bytes, tiles, packing::widest_word(src, dst)});
    tiles += packing::segment_tiles(bytes);
  }
  DOCQA_CHECK_VALUE(rows == joined.size(0), "pack_tokens: expected joined[", f, "] of ", rows,
                    " rows (its parts' rows), got shape ", joined.sizes());
  return tiles;
}

}  // namespace

void pack_tokens(const std::vector<at::Tensor>& ids, const std::vector<at::Tensor>& labels,
                 const std::vector<at::Tensor>& types, const std::vector<at::Tensor>& mrope, int64_t ignore_index,
                 const at::Tensor& ids_out, const at::Tensor& labels_out, const at::Tensor& types_out,
                 const at::Tensor& positions_out, const std::vector<std::vector<at::Tensor>>& parts,
                 const std::vector<at::Tensor>& joined) {
  const size_t n = ids.size();
  DOCQA_CHECK_VALUE(n >= 1, "pack_tokens: expected at least one document");
  DOCQA_CHECK_VALUE(labels.size() == n && types.size() == n && mrope.size() == n, "pack_tokens: expected ", n,
                    " labels, types and mrope tensors (one per document), got ", labels.size(), ", ", types.size(),
                    " and ", mrope.size());
  DOCQA_CHECK_VALUE(parts.size() == joined.size(), "pack_tokens: expected one list of parts per joined output, got ",
                    parts.size(), " lists for ", joined.size(), " outputs");
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
  std::vector<packing::CopySegment> segments;
  int64_t tiles = 0;
  for (size_t f = 0; f < joined.size(); ++f) tiles = add_segments(parts[f], joined[f], f, device, tiles, segments);
  if (total == 0 && tiles == 0) return;
  const packing::PackedRow row{ids_out.data_ptr<int64_t>(), labels_out.data_ptr<int64_t>(),
                               types_out.data_ptr<int32_t>(), positions_out.data_ptr<int64_t>(), total, ignore_index};
#if defined(DOCQA_FAST_WITH_CUDA)
  if (device.is_cuda()) {
    const int64_t blocks = (total + packing::kCopyLanes - 1) / packing::kCopyLanes + tiles;
    DOCQA_CHECK_VALUE(blocks <= INT32_MAX, "pack_tokens: the row needs ", blocks,
                      " CUDA blocks (256 tokens or 16 KiB of joined bytes each), more than a launch takes");
    return packing::pack_tokens_cuda(docs, row, segments, tiles, ids_out);
  }
#endif
  at::parallel_for(0, static_cast<int64_t>(n), 1, [&](int64_t d0, int64_t d1) {
    for (int64_t d = d0; d < d1; ++d)
      for (int64_t i = 0; i < docs[d].length; ++i) packing::pack_token(docs[d], i, row);
  });
  // The kernel's copy blocks: tile t of all segments' tiles, found by the same search, each
  // lane's share of it (a tile is 16 KiB: its lanes' strides stay in the core's cache).
  const int64_t n_segments = static_cast<int64_t>(segments.size());
  at::parallel_for(0, tiles, 8, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const packing::CopySegment& s = segments[packing::find_item(segments.data(), n_segments, t)];
      for (int64_t lane = 0; lane < packing::kCopyLanes; ++lane) packing::copy_tile(s, t - s.offset, lane,
                                                                                    packing::kCopyLanes);
    }
  });
}

}  // namespace docqa_fast
