// M-RoPE position ids: argument checks, the CPU paths, and dispatch to the CUDA kernels.
// On CPU tensors each row is walked once (mrope_rows_one_pass: the data loader's path) or,
// with `chunked`, by the twin of the CUDA kernels: the row cut into their chunks and the same
// functions of mrope.h run (summarise, scan with combine, walk), so testing it on CPU tests
// the kernels' logic.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include "messages.h"

#include <type_traits>
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

// A row's delta and status from its whole span and its chunks' walks (in column order), as
// the CUDA walk kernel's block reduction does: largest position, bad runs and the first one.
void finish_row(const mr::RopeArgs& a, const int64_t row_runs[2], const Span& row, const mr::ChunkResult* results,
                int64_t n_results, int64_t T, int64_t* delta, int64_t* s) {
  int64_t max_pos = -1, bad = 0, col = -1, length = 0, expected = 0;
  for (int64_t i = 0; i < n_results; ++i) {
    const mr::ChunkResult& r = results[i];
    max_pos = std::max(max_pos, r.max_pos);
    if (r.bad_runs && bad == 0) {
      col = r.bad_col;
      length = r.bad_length;
      expected = r.bad_expected;
    }
    bad += r.bad_runs;
  }
  int64_t l, e;
  if (mr::run_ends(a, row_runs, row, mr::kNone, &l, &e) && l != e && bad++ == 0) {  // the row's last run
    col = T;
    length = l;
    expected = e;
  }
  *delta = max_pos + 1 - row.n_real;
  s[mr::kImageRuns] = row.starts[0];
  s[mr::kVideoRuns] = row.starts[1];
  s[mr::kBadRuns] = bad;
  s[mr::kBadCol] = col;
  s[mr::kBadLength] = length;
  s[mr::kBadExpected] = expected;
}

// The CUDA kernels' algorithm on the CPU (chunked=true): kept so the CPU tests pin the
// kernels' scan logic. Two passes over the tokens.
template <typename TypeT, typename MaskT>
void mrope_rows_chunked(const TypeT* ty, const MaskT* kp, int64_t B, int64_t T, const mr::RopeArgs& a, int64_t* pos,
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
      Span prefix = i == 0 ? mr::empty_span(true) : incl[c - 1];
      results[c] = mr::walk(a, row_runs.data() + 2 * b, prefix, ty + b * T, kp + b * T, begin, end, pos + b * T,
                            pos + (B + b) * T, pos + (2 * B + b) * T);
    }
  });
  for (int64_t b = 0; b < B; ++b)
    finish_row(a, row_runs.data() + 2 * b, incl[b * K + K - 1], results.data() + b * K, K, T, delta + b,
               st + b * mr::kStatusCols);
}

// The data loader's path: each row walked once, in order, the runs it started telling the
// next row which grid its first run takes. The tokens are read once and the positions written
// once; the chunked form's second pass and its parallel bookkeeping cost more than they save
// for a single document (0.13 vs 0.06 ms at 15K tokens on one core).
template <typename TypeT, typename MaskT>
void mrope_rows_one_pass(const TypeT* ty, const MaskT* kp, int64_t B, int64_t T, const mr::RopeArgs& a,
                         int64_t* pos, int64_t* delta, int64_t* st) {
  int64_t row_runs[2] = {0, 0};
  for (int64_t b = 0; b < B; ++b) {
    Span row = mr::empty_span(true);
    const mr::ChunkResult r = mr::walk(a, row_runs, row, ty + b * T, kp + b * T, 0, T, pos + b * T,
                                       pos + (B + b) * T, pos + (2 * B + b) * T);
    finish_row(a, row_runs, row, &r, 1, T, delta + b, st + b * mr::kStatusCols);
    row_runs[0] += row.starts[0];
    row_runs[1] += row.starts[1];
  }
}

// (n + 1,) prefix sums of each CPU grid's position advance (contiguous (n, 3) int64 grids): a
// plain loop, where five ATen calls cost more than a 12-page document's whole walk. (The CUDA
// kernels compute theirs in the first launch.)
at::Tensor cumulative_advance(const at::Tensor& grid, int64_t merge) {
  const int64_t n = grid.size(0);
  at::Tensor out = at::empty({n + 1}, grid.options());
  const int64_t* thw = grid.data_ptr<int64_t>();
  int64_t* cum = out.data_ptr<int64_t>();
  cum[0] = 0;
  for (int64_t i = 0; i < n; ++i) cum[i + 1] = cum[i] + packing::mrope::grid_advance(thw + 3 * i, merge);
  return out;
}

}  // namespace

std::vector<at::Tensor> mrope_position_ids(const at::Tensor& mm_token_type_ids, const at::Tensor& attention_mask,
                                           const at::Tensor& image_grid_thw, const at::Tensor& video_grid_thw,
                                           const at::Tensor& video_steps, bool steps_are_f32,
                                           int64_t spatial_merge_size, bool chunked) {
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
  // The advances' prefix sums (cum_advance) are filled in below on CPU, by the first kernel on CUDA.
  args.grids[0] = {images.data_ptr<int64_t>(), nullptr, nullptr, images.size(0)};
  args.grids[1] = {videos.data_ptr<int64_t>(), nullptr, steps.data_ptr<double>(), videos.size(0)};
  args.merge = spatial_merge_size;
  args.steps_are_f32 = steps_are_f32;
#if defined(DOCQA_FAST_WITH_CUDA)
  if (device.is_cuda()) {
    packing::mrope_position_ids_cuda(types, keep, args, positions, deltas, status);
    return {positions, deltas, status};
  }
#endif
  const at::Tensor image_adv = cumulative_advance(images, spatial_merge_size);
  const at::Tensor video_adv = cumulative_advance(videos, spatial_merge_size);
  args.grids[0].cum_advance = image_adv.data_ptr<int64_t>();
  args.grids[1].cum_advance = video_adv.data_ptr<int64_t>();
  int64_t* pos = positions.data_ptr<int64_t>();
  int64_t* delta = deltas.data_ptr<int64_t>();
  int64_t* st = status.data_ptr<int64_t>();
  // The caller's int32 / int64 type ids and bool / int32 / int64 masks are read in place.
  auto run = [&](auto type_tag) {
    using TypeT = decltype(type_tag);
    const TypeT* ty = types.data_ptr<TypeT>();
    auto rows = [&](auto* kp) {
      using MaskT = std::remove_const_t<std::remove_pointer_t<decltype(kp)>>;
      if (chunked) return mrope_rows_chunked<TypeT, MaskT>(ty, kp, B, T, args, pos, delta, st);
      return mrope_rows_one_pass<TypeT, MaskT>(ty, kp, B, T, args, pos, delta, st);
    };
    if (mask_dtype == at::kBool) return rows(keep.data_ptr<bool>());
    if (mask_dtype == at::kInt) return rows(keep.data_ptr<int32_t>());
    return rows(keep.data_ptr<int64_t>());
  };
  if (type_dtype == at::kInt) {
    run(int32_t{});
  } else {
    run(int64_t{});
  }
  return {positions, deltas, status};
}

}  // namespace docqa_fast
