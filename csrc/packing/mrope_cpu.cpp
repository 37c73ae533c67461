// M-RoPE position ids on the CPU: one pass over each row, as transformers' loop defines them
// but without Python or host syncs (see docqa_fast/packing/rope.py for the semantics).
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>

#include "packing/mrope.h"
#include "packing/packing_ops.h"

namespace docqa_fast {
namespace {

constexpr int64_t kImage = 1, kVideo = 2;  // mm_token_type_ids values; anything else is text

struct Grids {
  const int64_t* thw;  // (n, 3) contiguous
  int64_t n;
};

struct RowsArgs {
  int64_t B, T, spatial_merge_size;
  const Grids* grids;  // indexed by modality (1 image, 2 video)
  const double* step;
  bool steps_are_f32;
  int64_t* pos;
  int64_t* delta;
  int64_t* st;
};

// The row loop, templated on the stored types of mm_token_type_ids and attention_mask so
// the caller's int32 / bool / int64 tensors are read in place (no conversion copies).
template <typename TypeT, typename MaskT>
void mrope_rows(const TypeT* ty, const MaskT* kp, const RowsArgs& a) {
  const int64_t B = a.B, T = a.T, spatial_merge_size = a.spatial_merge_size;
  const Grids* grids = a.grids;
  const double* step = a.step;
  const bool steps_are_f32 = a.steps_are_f32;
  int64_t* pos = a.pos;
  int64_t* delta = a.delta;
  int64_t* st = a.st;
  int64_t seen[3] = {0, 0, 0};
  int64_t bad_runs = 0;

  for (int64_t b = 0; b < B; ++b) {
    int64_t* out_t = pos + (0 * B + b) * T;  // the three planes of row b
    int64_t* out_h = pos + (1 * B + b) * T;
    int64_t* out_w = pos + (2 * B + b) * T;
    const TypeT* row_types = ty + b * T;
    const MaskT* row_keep = kp + b * T;
    int64_t p = 0, max_pos = -1, n_real = 0;
    int64_t j = 0;
    while (j < T) {
      if (!row_keep[j]) {  // padding keeps position 0 (and is skipped when grouping, as in transformers)
        out_t[j] = out_h[j] = out_w[j] = 0;
        ++j;
        continue;
      }
      const int64_t kind = static_cast<int64_t>(row_types[j]);
      if (kind != kImage && kind != kVideo) {  // a text token (unknown types count as text)
        out_t[j] = out_h[j] = out_w[j] = p;
        max_pos = std::max(max_pos, p);
        ++p;
        ++n_real;
        ++j;
        continue;
      }
      // A vision run starts: it takes the next grid of its modality.
      const Grids& gs = grids[kind];
      const int64_t k = seen[kind]++;
      const int64_t grid_row = gs.n ? std::min(k, gs.n - 1) : -1;  // clamped: a missing grid is reported, never read
      const int64_t* thw = grid_row >= 0 ? gs.thw + 3 * grid_row : nullptr;
      packing::RunGrid g{thw ? thw[0] : 0, thw ? thw[1] / spatial_merge_size : 0,
                         thw ? thw[2] / spatial_merge_size : 0,
                         kind == kVideo && grid_row >= 0 ? step[grid_row] : 1.0, kind == kVideo && steps_are_f32};
      const int64_t run_start = p, run_col = j;
      int64_t run_tokens = 0;
      packing::GridCoord coord{0, 0, 0};
      // Tight loop over the run's tokens (padding inside a run is skipped, not a boundary).
      for (; j < T; ++j) {
        if (!row_keep[j]) {
          out_t[j] = out_h[j] = out_w[j] = 0;
          continue;
        }
        if (static_cast<int64_t>(row_types[j]) != kind) break;
        int64_t out[3];
        packing::vision_position(g, run_start, coord, out);
        out_t[j] = out[0];
        out_h[j] = out[1];
        out_w[j] = out[2];
        max_pos = std::max(max_pos, std::max(out[0], std::max(out[1], out[2])));
        packing::next_coord(g, coord);
        ++run_tokens;
      }
      n_real += run_tokens;
      p = run_start + g.advance();
      if (run_tokens != g.tokens() && bad_runs++ == 0) {
        st[3] = b;
        st[4] = run_col;
        st[5] = run_tokens;
        st[6] = g.tokens();
      }
    }
    delta[b] = max_pos + 1 - n_real;
  }
  st[0] = seen[kImage];
  st[1] = seen[kVideo];
  st[2] = bad_runs;
}

}  // namespace

std::vector<at::Tensor> mrope_position_ids(const at::Tensor& mm_token_type_ids, const at::Tensor& attention_mask,
                                           const at::Tensor& image_grid_thw, const at::Tensor& video_grid_thw,
                                           const at::Tensor& video_steps, bool steps_are_f32,
                                           int64_t spatial_merge_size) {
  constexpr const char* op = "mrope_position_ids";
  const auto type_dtype = mm_token_type_ids.scalar_type(), mask_dtype = attention_mask.scalar_type();
  TORCH_CHECK_VALUE(mm_token_type_ids.dim() == 2 && mm_token_type_ids.device().is_cpu() &&
                        (type_dtype == at::kLong || type_dtype == at::kInt),
                    op, ": expected mm_token_type_ids as a 2-D int32 or int64 CPU tensor");
  TORCH_CHECK_VALUE(attention_mask.sizes() == mm_token_type_ids.sizes() && attention_mask.device().is_cpu() &&
                        (mask_dtype == at::kBool || mask_dtype == at::kLong || mask_dtype == at::kInt),
                    op, ": expected a bool, int32 or int64 attention_mask shaped like mm_token_type_ids");
  for (const at::Tensor* g : {&image_grid_thw, &video_grid_thw})
    TORCH_CHECK_VALUE(g->dim() == 2 && g->size(1) == 3 && g->scalar_type() == at::kLong && g->device().is_cpu(), op,
                      ": expected grids as (n, 3) int64 CPU tensors");
  TORCH_CHECK_VALUE(video_steps.dim() == 1 && video_steps.scalar_type() == at::kDouble &&
                        video_steps.size(0) >= video_grid_thw.size(0),
                    op, ": expected video_steps as float64 with one entry per video grid");
  TORCH_CHECK_VALUE(spatial_merge_size >= 1, op, ": expected spatial_merge_size >= 1");
  const at::Tensor types = mm_token_type_ids.contiguous();
  const at::Tensor keep = attention_mask.contiguous();
  const at::Tensor images = image_grid_thw.contiguous(), videos = video_grid_thw.contiguous();
  const at::Tensor steps = video_steps.contiguous();
  const int64_t B = types.size(0), T = types.size(1);
  at::Tensor positions = at::empty({3, B, T}, at::kLong);  // every entry is written below
  at::Tensor deltas = at::empty({B}, at::kLong);
  // status: images seen, videos seen, bad runs, then the first bad run's row, column, length, expected.
  at::Tensor status = at::full({7}, -1, at::kLong);
  int64_t* pos = positions.data_ptr<int64_t>();
  int64_t* delta = deltas.data_ptr<int64_t>();
  const Grids grids[3] = {{nullptr, 0}, {images.data_ptr<int64_t>(), images.size(0)},
                          {videos.data_ptr<int64_t>(), videos.size(0)}};
  const double* step = steps.data_ptr<double>();
  int64_t* st = status.data_ptr<int64_t>();

  const RowsArgs args{B, T, spatial_merge_size, grids, step, steps_are_f32, pos, delta, st};
  // A real token is one whose mask is non-zero, whatever the mask's dtype.
  auto run = [&](auto type_tag) {
    using TypeT = decltype(type_tag);
    const TypeT* ty = types.data_ptr<TypeT>();
    if (mask_dtype == at::kBool) return mrope_rows(ty, keep.data_ptr<bool>(), args);
    if (mask_dtype == at::kInt) return mrope_rows(ty, keep.data_ptr<int32_t>(), args);
    return mrope_rows(ty, keep.data_ptr<int64_t>(), args);
  };
  if (type_dtype == at::kInt) {
    run(int32_t{});
  } else {
    run(int64_t{});
  }
  return {positions, deltas, status};
}

}  // namespace docqa_fast
