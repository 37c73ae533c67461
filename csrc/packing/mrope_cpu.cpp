// M-RoPE position ids: argument checks, the CPU twin, and dispatch to the CUDA kernels.
// The twin cuts each row into the CUDA kernels' chunks and runs the same functions of
// mrope.h (summarise, scan with combine, walk), so testing it on CPU tests the kernels' logic.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include "messages.h"

#include <vector>

#include "packing/mrope.h"
#include "packing/packing_ops.h"

namespace docqa_fast {

#if defined(DOCQA_FAST_WITH_CUDA)
namespace packing {
void mrope_position_ids_cuda(const at::Tensor& types, const at::Tensor& keep, const mrope::RopeArgs& args,
                             const at::Tensor& positions, const at::Tensor& deltas, const at::Tensor& status);
}  // namespace packing
#endif

namespace {

using packing::mrope::Span;
namespace mr = packing::mrope;

template <typename TypeT, typename MaskT>
void mrope_rows_cpu(const TypeT* ty, const MaskT* kp, int64_t B, int64_t T, const mr::RopeArgs& a, int64_t* pos,
                    int64_t* delta, int64_t* st) {
  constexpr int64_t K = mr::kChunks;
  // Pass 1 (the first kernel): every chunk's summary (chunks of all rows in parallel, as the
  // kernel's threads), then each row's summaries scanned in order.
  std::vector<Span> incl(static_cast<size_t>(B * K));
  at::parallel_for(0, B * K, 16, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t b = c / K;
      int64_t begin, end;
      mr::chunk_range(T, c % K, &begin, &end);
      incl[c] = mr::summarize(ty + b * T, kp + b * T, begin, end);
    }
  });
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 1; i < K; ++i) incl[b * K + i] = mr::combine(incl[b * K + i - 1], incl[b * K + i]);
  // Runs of each modality in the rows before each row: which grid a row's first run takes.
  std::vector<int64_t> row_runs(static_cast<size_t>(2 * B));
  int64_t runs[2] = {0, 0};
  for (int64_t b = 0; b < B; ++b) {
    row_runs[2 * b] = runs[0];
    row_runs[2 * b + 1] = runs[1];
    runs[0] += incl[b * K + K - 1].starts[0];
    runs[1] += incl[b * K + K - 1].starts[1];
  }
  // Pass 2 (the second kernel): walk every chunk from its scanned prefix, chunks in parallel.
  std::vector<mr::ChunkResult> results(static_cast<size_t>(B * K));
  at::parallel_for(0, B * K, 16, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t b = c / K, i = c % K;
      int64_t begin, end;
      mr::chunk_range(T, i, &begin, &end);
      const Span prefix = i == 0 ? mr::empty_span(true) : incl[c - 1];
      results[c] = mr::walk(a, row_runs.data() + 2 * b, prefix, ty + b * T, kp + b * T, begin, end, pos + b * T,
                            pos + (B + b) * T, pos + (2 * B + b) * T);
    }
  });
  // Per row, as the kernel's block reduction does: largest position, bad runs and the first one.
  for (int64_t b = 0; b < B; ++b) {
    const int64_t* rr = row_runs.data() + 2 * b;
    int64_t max_pos = -1, bad = 0, col = -1, length = 0, expected = 0;
    for (int64_t i = 0; i < K; ++i) {
      const mr::ChunkResult& r = results[b * K + i];
      max_pos = std::max(max_pos, r.max_pos);
      if (r.bad_runs && bad == 0) {
        col = r.bad_col;
        length = r.bad_length;
        expected = r.bad_expected;
      }
      bad += r.bad_runs;
    }
    const Span& row = incl[b * K + K - 1];
    int64_t l, e;
    if (mr::run_ends(a, rr, row, mr::kNone, &l, &e) && l != e && bad++ == 0) {  // the row's last run
      col = T;
      length = l;
      expected = e;
    }
    delta[b] = max_pos + 1 - row.n_real;
    int64_t* s = st + b * mr::kStatusCols;
    s[mr::kImageRuns] = row.starts[0];
    s[mr::kVideoRuns] = row.starts[1];
    s[mr::kBadRuns] = bad;
    s[mr::kBadCol] = col;
    s[mr::kBadLength] = length;
    s[mr::kBadExpected] = expected;
  }
}

// (n + 1,) prefix sums of each grid's position advance max(h, w) / merge, on the grid's device.
at::Tensor cumulative_advance(const at::Tensor& grid, int64_t merge) {
  const at::Tensor advance = at::floor_divide(at::maximum(grid.select(1, 1), grid.select(1, 2)), merge);
  return at::cat({at::zeros({1}, grid.options()), at::cumsum(advance, 0)});
}

}  // namespace

std::vector<at::Tensor> mrope_position_ids(const at::Tensor& mm_token_type_ids, const at::Tensor& attention_mask,
                                           const at::Tensor& image_grid_thw, const at::Tensor& video_grid_thw,
                                           const at::Tensor& video_steps, bool steps_are_f32,
                                           int64_t spatial_merge_size) {
  constexpr const char* op = "mrope_position_ids";
  const auto type_dtype = mm_token_type_ids.scalar_type(), mask_dtype = attention_mask.scalar_type();
  const auto device = mm_token_type_ids.device();
  DOCQA_CHECK_VALUE(mm_token_type_ids.dim() == 2 && (type_dtype == at::kLong || type_dtype == at::kInt), op,
                    ": expected mm_token_type_ids as a 2-D int32 or int64 tensor");
  DOCQA_CHECK_VALUE(attention_mask.sizes() == mm_token_type_ids.sizes() &&
                        (mask_dtype == at::kBool || mask_dtype == at::kLong || mask_dtype == at::kInt),
                    op, ": expected a bool, int32 or int64 attention_mask shaped like mm_token_type_ids");
  for (const at::Tensor* g : {&image_grid_thw, &video_grid_thw})
    DOCQA_CHECK_VALUE(g->dim() == 2 && g->size(1) == 3 && g->scalar_type() == at::kLong, op,
                      ": expected grids as (n, 3) int64 tensors");
  DOCQA_CHECK_VALUE(video_steps.dim() == 1 && video_steps.scalar_type() == at::kDouble &&
                        video_steps.size(0) >= video_grid_thw.size(0),
                    op, ": expected video_steps as float64 with one entry per video grid");
  for (const at::Tensor* t : {&attention_mask, &image_grid_thw, &video_grid_thw, &video_steps})
    DOCQA_CHECK_VALUE(t->device() == device, op, ": expected every tensor on ", device, ", got one on ", t->device());
  DOCQA_CHECK_VALUE(device.is_cpu() || device.is_cuda(), op, ": expected CPU or CUDA tensors, got ", device);
#if !defined(DOCQA_FAST_WITH_CUDA)
  DOCQA_CHECK_VALUE(device.is_cpu(), op, ": docqa_fast._C was built without CUDA kernels");
#endif
  DOCQA_CHECK_VALUE(spatial_merge_size >= 1, op, ": expected spatial_merge_size >= 1");
  const at::Tensor types = mm_token_type_ids.contiguous();
  const at::Tensor keep = attention_mask.contiguous();
  const at::Tensor images = image_grid_thw.contiguous(), videos = video_grid_thw.contiguous();
  const at::Tensor steps = video_steps.contiguous();
  const at::Tensor image_adv = cumulative_advance(images, spatial_merge_size);
  const at::Tensor video_adv = cumulative_advance(videos, spatial_merge_size);
  const int64_t B = types.size(0), T = types.size(1);
  const auto long_opts = types.options().dtype(at::kLong);
  at::Tensor positions = at::empty({3, B, T}, long_opts);  // every entry is written below
  at::Tensor deltas = at::empty({B}, long_opts);
  at::Tensor status = at::empty({B, packing::mrope::kStatusCols}, long_opts);
  if (B == 0) return {positions, deltas, status};
  if (T == 0) {  // rows without tokens: no positions, delta 0, nothing to check
    deltas.zero_();
    status.zero_();
    status.select(1, packing::mrope::kBadCol).fill_(-1);
    return {positions, deltas, status};
  }

  packing::mrope::RopeArgs args;
  args.grids[0] = {images.data_ptr<int64_t>(), image_adv.data_ptr<int64_t>(), nullptr, images.size(0)};
  args.grids[1] = {videos.data_ptr<int64_t>(), video_adv.data_ptr<int64_t>(), steps.data_ptr<double>(),
                   videos.size(0)};
  args.merge = spatial_merge_size;
  args.steps_are_f32 = steps_are_f32;
#if defined(DOCQA_FAST_WITH_CUDA)
  if (device.is_cuda()) {
    packing::mrope_position_ids_cuda(types, keep, args, positions, deltas, status);
    return {positions, deltas, status};
  }
#endif
  int64_t* pos = positions.data_ptr<int64_t>();
  int64_t* delta = deltas.data_ptr<int64_t>();
  int64_t* st = status.data_ptr<int64_t>();
  // The caller's int32 / int64 type ids and bool / int32 / int64 masks are read in place.
  auto run = [&](auto type_tag) {
    using TypeT = decltype(type_tag);
    const TypeT* ty = types.data_ptr<TypeT>();
    if (mask_dtype == at::kBool) return mrope_rows_cpu(ty, keep.data_ptr<bool>(), B, T, args, pos, delta, st);
    if (mask_dtype == at::kInt) return mrope_rows_cpu(ty, keep.data_ptr<int32_t>(), B, T, args, pos, delta, st);
    return mrope_rows_cpu(ty, keep.data_ptr<int64_t>(), B, T, args, pos, delta, st);
  };
  if (type_dtype == at::kInt) {
    run(int32_t{});
  } else {
    run(int64_t{});
  }
  return {positions, deltas, status};
}

}  // namespace docqa_fast
