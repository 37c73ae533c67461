// CPU twin of the attention-state merge: the same per-row code as the CUDA kernel
// (merge_attention.h), run over rows with at::parallel_for.
#include <ATen/Parallel.h>

#include <algorithm>

#include "merge_attention/merge_attention_ops.h"

namespace docqa_fast {
namespace merge_attention {
namespace {

// Columns per slice: a fixed width the compiler can keep in registers and vectorise.
constexpr int kSlice = 16;

template <typename T, class Parts>
void merge_rows(const Parts& parts, const MergeShape& shape, int64_t n_parts, T* out, float* lse_out) {
  const int64_t D = shape.D, S = shape.S, H = shape.H;
  // About 64K elements read per task, so small merges stay on one thread.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, D * n_parts));
  at::parallel_for(0, shape.rows(), grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const RowCoord r = row_coord(row, S, H);
      const auto part_row = parts.row(r);
      const RowStats st = row_stats(part_row);
      T* dst = out + out_row_offset(row, D);
      for (int64_t col = 0; col < D; col += kSlice) {
        const int width = static_cast<int>(std::min<int64_t>(kSlice, D - col));
        float acc[kSlice];
        merge_row_slice<T, kSlice, false>(part_row, st, col, width, acc);
        store_slice<T, kSlice, false>(dst + col, width, acc);
      }
      lse_out[lse_out_offset(r, S, H)] = merged_lse(st);
    }
  });
}

}  // namespace

void merge_pair_cpu(const at::Tensor& out_a, const at::Tensor& lse_a, const at::Tensor& out_b,
                    const at::Tensor& lse_b, const at::Tensor& out, const at::Tensor& lse_out) {
  const MergeShape shape = merge_shape(out);
  DOCQA_DISPATCH_MERGE_TYPES(out.scalar_type(), "merge_attention_states_cpu", [&] {
    merge_rows<scalar_t>(make_pair_parts<scalar_t>(out_a, lse_a, out_b, lse_b), shape, 2,
                         out.mutable_data_ptr<scalar_t>(), lse_out.mutable_data_ptr<float>());
  });
}

void merge_stacked_cpu(const at::Tensor& outs, const at::Tensor& lses, const at::Tensor& out,
                       const at::Tensor& lse_out) {
  const MergeShape shape = merge_shape(out);
  DOCQA_DISPATCH_MERGE_TYPES(out.scalar_type(), "merge_stacked_attention_states_cpu", [&] {
    merge_rows<scalar_t>(make_stacked_parts<scalar_t>(outs, lses), shape, outs.size(0),
                         out.mutable_data_ptr<scalar_t>(), lse_out.mutable_data_ptr<float>());
  });
}

}  // namespace merge_attention
}  // namespace docqa_fast
