// M-RoPE position ids of Qwen2-VL / Qwen2.5-VL as a scan, shared by the CUDA kernels
// (mrope_cuda.cu) and the CPU twin (mrope_cpu.cpp).
//
// transformers walks each row in order: padding is dropped, text tokens advance the running
// position p by 1, and each maximal run of image (video) tokens takes the next image (video)
// grid in batch order, gives its token at offset o the positions
// (p + floor(t * step), p + h, p + w) for (t, h, w) = o in the run's (t, h/merge, w/merge)
// grid, then advances p by max(h, w) / merge. Everything a token needs from the tokens
// before it is a handful of counts (a `Span`): real and text tokens, runs started per
// modality, where the last run started, and the last real token's kind. Spans combine
// associatively, so a row is cut into kChunks chunks, each chunk summarised, the summaries
// scanned, and each chunk then walked with its exact prefix. A run's start position needs
// the advances of every earlier run: with the prefix sums of the grids' advances
// (`cum_advance`) that is two lookups, so no pass has to wait for earlier runs' grids.
//
// The CUDA kernels give a row one block with a thread per chunk; the CPU twin cuts rows into
// the same chunks and runs the same functions, so the CPU tests exercise the scan's combine.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define DOCQA_PACK_HD __host__ __device__
#else
#define DOCQA_PACK_HD
#endif

namespace docqa_fast {
namespace packing {
namespace mrope {

// Token kinds: mm_token_type_ids values 1 (image) and 2 (video); anything else is text.
constexpr int kNone = -1, kText = 0, kImage = 1, kVideo = 2, kPad = 3;
// Chunks per row: the CUDA kernels' threads per block (one thread per chunk).
constexpr int kChunks = 256;

DOCQA_PACK_HD inline bool is_vision(int kind) { return kind == kImage || kind == kVideo; }

DOCQA_PACK_HD inline int token_kind(int64_t type, bool real) {
  if (!real) return kPad;  // padding (left, right or inside) is skipped, as transformers drops it
  return (type == kImage || type == kVideo) ? static_cast<int>(type) : kText;
}

// Tokens [begin, end) of chunk i of a row of T tokens (empty chunks past the end).
DOCQA_PACK_HD inline void chunk_range(int64_t T, int64_t i, int64_t* begin, int64_t* end) {
  const int64_t per = (T + kChunks - 1) / kChunks;
  *begin = i * per < T ? i * per : T;
  *end = *begin + per < T ? *begin + per : T;
}

// What a stretch of a row contributes to the tokens after it.
struct Span {
  int64_t n_real;      // non-padding tokens
  int64_t n_text;      // text tokens among them
  int64_t starts[2];   // image / video runs that start inside the span for certain
  int64_t last_start;  // index among the span's real tokens of the last such start, -1 if none
  int32_t first_kind;  // kind of the first / last real token, kNone when there is none
  int32_t last_kind;
  // The span begins at the row's first column. A span that does not cannot tell whether its
  // first real token starts a run (it does unless the token before it has the same kind):
  // that start is left pending and settled by combine().
  int32_t at_row_start;
  int32_t unused_;  // explicit padding: the struct is copied as raw bytes between passes
};

DOCQA_PACK_HD inline Span empty_span(bool at_row_start) {
  Span s;
  s.n_real = s.n_text = 0;
  s.starts[0] = s.starts[1] = 0;
  s.last_start = -1;
  s.first_kind = s.last_kind = kNone;
  s.at_row_start = at_row_start ? 1 : 0;
  s.unused_ = 0;
  return s;
}

// A real token of `kind` appended to span s certainly starts a run.
DOCQA_PACK_HD inline bool starts_run(const Span& s, int kind) {
  return is_vision(kind) && (s.n_real > 0 ? s.last_kind != kind : s.at_row_start != 0);
}

// Appends one token (the sequential step; a chunk summary is a chunk's tokens pushed in order).
DOCQA_PACK_HD inline void push(Span& s, int kind) {
  if (kind == kPad) return;
  if (starts_run(s, kind)) {
    ++s.starts[kind - 1];
    s.last_start = s.n_real;
  }
  if (s.n_real == 0) s.first_kind = kind;
  s.last_kind = kind;
  s.n_text += kind == kText;
  ++s.n_real;
}

// The span a then b (a immediately before b; only the leftmost span may be at_row_start).
DOCQA_PACK_HD inline Span combine(const Span& a, const Span& b) {
  // b's pending first start is settled when a has a real token or begins the row.
  const bool settled_start = b.n_real > 0 && is_vision(b.first_kind) &&
                             (a.n_real > 0 ? a.last_kind != b.first_kind : a.at_row_start != 0);
  Span r = a;
  r.starts[0] = a.starts[0] + b.starts[0] + (settled_start && b.first_kind == kImage);
  r.starts[1] = a.starts[1] + b.starts[1] + (settled_start && b.first_kind == kVideo);
  r.last_start = b.last_start >= 0 ? a.n_real + b.last_start : (settled_start ? a.n_real : a.last_start);
  r.first_kind = a.n_real > 0 ? a.first_kind : b.first_kind;
  r.last_kind = b.n_real > 0 ? b.last_kind : a.last_kind;
  r.n_real = a.n_real + b.n_real;
  r.n_text = a.n_text + b.n_text;
  return r;
}

// The grids of one modality.
struct Grids {
  const int64_t* thw;          // (n, 3) ViT patch grids
  const int64_t* cum_advance;  // (n + 1,) prefix sums of max(h, w) / merge
  const double* step;          // (n,) time step per video (tokens_per_second * seconds); nullptr for images
  int64_t n;
};

struct RopeArgs {
  Grids grids[2];  // image, video
  int64_t merge;   // spatial_merge_size
  bool steps_are_f32;  // transformers multiplies in float32 when the seconds are float32
};

// A grid's position advance max(h, w) / merge, floored as at::floor_divide floors (a negative
// grid is bad input: wrong positions, never a crash).
DOCQA_PACK_HD inline int64_t grid_advance(const int64_t* thw, int64_t merge) {
  const int64_t m = thw[1] > thw[2] ? thw[1] : thw[2];
  return m >= 0 ? m / merge : -((-m + merge - 1) / merge);
}

// LLM grid of one run: ViT patches divided by the merge size.
struct RunGrid {
  int64_t t, h, w;
  double step;
  bool step_is_f32;

  DOCQA_PACK_HD int64_t tokens() const { return t * h * w; }
};

// Grid of run r (batch order) of modality m. A run past the last grid (unchecked bad input)
// reuses the last one, and no grid at all gives an empty one: never an out-of-bounds read.
DOCQA_PACK_HD inline RunGrid run_grid(const RopeArgs& a, int m, int64_t r) {
  const Grids& g = a.grids[m];
  if (g.n <= 0) return RunGrid{0, 0, 0, 1.0, false};
  const int64_t row = r < g.n ? (r < 0 ? 0 : r) : g.n - 1;
  const int64_t* thw = g.thw + 3 * row;
  const bool video = g.step != nullptr;
  return RunGrid{thw[0], thw[1] / a.merge, thw[2] / a.merge, video ? g.step[row] : 1.0, video && a.steps_are_f32};
}

// Sum of the position advances of runs 0 .. r-1 of modality m (runs past the last grid reuse it).
DOCQA_PACK_HD inline int64_t advance_before(const RopeArgs& a, int m, int64_t r) {
  const Grids& g = a.grids[m];
  if (g.n <= 0 || r <= 0) return 0;
  if (r <= g.n) return g.cum_advance[r];
  return g.cum_advance[g.n] + (r - g.n) * (g.cum_advance[g.n] - g.cum_advance[g.n - 1]);
}

// (arange(t) * step).long() of transformers: truncation of the product in the seconds' precision.
DOCQA_PACK_HD inline int64_t scaled_time(const RunGrid& g, int64_t ti) {
  return g.step_is_f32 ? static_cast<int64_t>(static_cast<float>(ti) * static_cast<float>(g.step))
                       : static_cast<int64_t>(static_cast<double>(ti) * g.step);
}

// Running position after `text` text tokens and runs[m] runs of each modality in this row,
// the row's first runs being run number row_runs[m] of the batch.
DOCQA_PACK_HD inline int64_t running_position(const RopeArgs& a, const int64_t row_runs[2], int64_t text,
                                              const int64_t runs0, const int64_t runs1) {
  return text + advance_before(a, 0, row_runs[0] + runs0) - advance_before(a, 0, row_runs[0]) +
         advance_before(a, 1, row_runs[1] + runs1) - advance_before(a, 1, row_runs[1]);
}

// Position in a run's grid: w fastest, then h, then t.
struct GridCoord {
  int64_t t, h, w;
};

// Divisors of a run's grid, clamped to 1: an empty grid (bad input) must not divide by zero.
DOCQA_PACK_HD inline int64_t clamped(int64_t n) { return n > 0 ? n : 1; }

// Coordinate of offset o in the run (three divisions: used once per run and chunk).
DOCQA_PACK_HD inline GridCoord coord_of(const RunGrid& g, int64_t o) {
  const int64_t gw = clamped(g.w), gh = clamped(g.h);
  return GridCoord{o / (gh * gw), (o / gw) % gh, o % gw};
}

// The next offset's coordinate without dividing (64-bit divisions would dominate the walk).
DOCQA_PACK_HD inline void next_coord(const RunGrid& g, GridCoord& c) {
  if (++c.w < clamped(g.w)) return;
  c.w = 0;
  if (++c.h < clamped(g.h)) return;
  c.h = 0;
  ++c.t;
}

// A vision run as the walk sees it: its grid, its start position, the coordinate reached.
struct RunState {
  RunGrid grid;
  int64_t start_pos;
  GridCoord coord;
};

// The run a real vision token of `kind` belongs to, entered at that token (row prefix c).
DOCQA_PACK_HD inline RunState enter_run(const RopeArgs& a, const int64_t row_runs[2], const Span& c, int kind) {
  const int m = kind - 1;
  const bool start = starts_run(c, kind);
  // Runs of each modality started before this token's run (its own is counted in c unless it starts here).
  int64_t before[2] = {c.starts[0], c.starts[1]};
  if (!start) before[m] -= 1;
  RunState r;
  r.start_pos = running_position(a, row_runs, c.n_text, before[0], before[1]);
  r.grid = run_grid(a, m, row_runs[m] + before[m]);
  r.coord = start ? GridCoord{0, 0, 0} : coord_of(r.grid, c.n_real - c.last_start);  // mid-run: from the offset
  return r;
}

// Whether the vision run before a token of `kind` (kNone: the row's end) ends there; if so
// its length and the token count its grid asks for.
DOCQA_PACK_HD inline bool run_ends(const RopeArgs& a, const int64_t row_runs[2], const Span& c, int kind,
                                   int64_t* length, int64_t* expected) {
  if (c.n_real == 0 || !is_vision(c.last_kind) || kind == c.last_kind) return false;
  const int m = c.last_kind - 1;
  *length = c.n_real - c.last_start;
  *expected = run_grid(a, m, row_runs[m] + c.starts[m] - 1).tokens();
  return true;
}

// Summary of tokens [begin, end) of a row (chunk 0 begins the row).
template <typename TypeT, typename MaskT>
DOCQA_PACK_HD inline Span summarize(const TypeT* types, const MaskT* keep, int64_t begin, int64_t end) {
  Span s = empty_span(begin == 0);
  for (int64_t j = begin; j < end; ++j) push(s, token_kind(static_cast<int64_t>(types[j]), keep[j] != 0));
  return s;
}

// What walking a chunk found: the largest position, and the chunk's vision runs whose token
// count differs from their grid (how many, and the first one: the column where it ended).
struct ChunkResult {
  int64_t max_pos;
  int64_t bad_runs;
  int64_t bad_col, bad_length, bad_expected;
};

// Writes the positions of tokens [begin, end) of a row, given the prefix c before `begin`
// (on return c is the prefix after `end`: one call over a whole row is the one-pass walk).
// out_t/out_h/out_w point at the row in each of the three planes. Text tokens read their
// position from c (the runs' advances looked up again only after a run); a vision run is
// entered once per chunk (enter_run) and then followed token by token, so its grid, start
// position and coordinate are not recomputed for every token.
template <typename TypeT, typename MaskT>
DOCQA_PACK_HD inline ChunkResult walk(const RopeArgs& a, const int64_t row_runs[2], Span& c, const TypeT* types,
                                      const MaskT* keep, int64_t begin, int64_t end, int64_t* out_t,
                                      int64_t* out_h, int64_t* out_w) {
  ChunkResult res{-1, 0, -1, 0, 0};
  RunState run{};
  bool in_run = false;  // `run` is the run of the last real token walked in this chunk
  // Advances of the runs before the current text stretch, for the run counts they were read at.
  int64_t advance_runs[2] = {-1, -1}, advance = 0;
  for (int64_t j = begin; j < end; ++j) {
    const int kind = token_kind(static_cast<int64_t>(types[j]), keep[j] != 0);
    if (kind == kPad) {  // padding keeps position 0
      out_t[j] = out_h[j] = out_w[j] = 0;
      continue;
    }
    int64_t length, expected;
    if (run_ends(a, row_runs, c, kind, &length, &expected) && length != expected && res.bad_runs++ == 0) {
      res.bad_col = j;
      res.bad_length = length;
      res.bad_expected = expected;
    }
    int64_t pos[3];
    if (!is_vision(kind)) {
      in_run = false;
      if (c.starts[0] != advance_runs[0] || c.starts[1] != advance_runs[1]) {
        advance_runs[0] = c.starts[0];
        advance_runs[1] = c.starts[1];
        advance = running_position(a, row_runs, 0, c.starts[0], c.starts[1]);
      }
      pos[0] = pos[1] = pos[2] = advance + c.n_text;
    } else {
      if (!in_run || starts_run(c, kind)) {
        run = enter_run(a, row_runs, c, kind);
        in_run = true;
      } else {
        next_coord(run.grid, run.coord);
      }
      pos[0] = run.start_pos + scaled_time(run.grid, run.coord.t);
      pos[1] = run.start_pos + run.coord.h;
      pos[2] = run.start_pos + run.coord.w;
    }
    out_t[j] = pos[0];
    out_h[j] = pos[1];
    out_w[j] = pos[2];
    const int64_t top = pos[0] > pos[1] ? (pos[0] > pos[2] ? pos[0] : pos[2]) : (pos[1] > pos[2] ? pos[1] : pos[2]);
    if (top > res.max_pos) res.max_pos = top;
    push(c, kind);
  }
  return res;
}

// Per-row status columns written by both implementations (see packing_ops.h).
enum RowStatus { kImageRuns = 0, kVideoRuns, kBadRuns, kBadCol, kBadLength, kBadExpected, kStatusCols };

}  // namespace mrope
}  // namespace packing
}  // namespace docqa_fast
