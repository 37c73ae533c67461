// Per-token M-RoPE logic of Qwen2-VL / Qwen2.5-VL position ids, shared by the CPU loop
// (mrope_cpu.cpp) and any device kernel: a token at `offset` inside a vision run whose run
// starts at running position `start` gets (start + floor(t * step), start + h, start + w).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define DOCQA_PACK_HD __host__ __device__
#else
#define DOCQA_PACK_HD
#endif

namespace docqa_fast {
namespace packing {

// LLM grid of one image / video run: ViT patches divided by the spatial merge size.
struct RunGrid {
  int64_t t, h, w;
  double step;        // temporal spacing: 1 for images, tokens_per_second * seconds for videos
  bool step_is_f32;   // transformers multiplies in float32 when the seconds are float32

  DOCQA_PACK_HD int64_t tokens() const { return t * h * w; }
  // The running position advances by max(h, w) after the run.
  DOCQA_PACK_HD int64_t advance() const { return h > w ? h : w; }
};

// (arange(t) * step).long() of transformers: truncation of the product in the seconds' precision.
DOCQA_PACK_HD inline int64_t scaled_time(const RunGrid& g, int64_t ti) {
  return g.step_is_f32 ? static_cast<int64_t>(static_cast<float>(ti) * static_cast<float>(g.step))
                       : static_cast<int64_t>(static_cast<double>(ti) * g.step);
}

// Grid coordinate of a token inside its run (w fastest, then h, then t); a device kernel
// gets it from the offset o as (o / (h*w), (o / w) % h, o % w), as the PyTorch path does.
struct GridCoord {
  int64_t t, h, w;
};

// Next coordinate in run order, without divisions (the CPU loop walks runs token by token).
DOCQA_PACK_HD inline void next_coord(const RunGrid& g, GridCoord& c) {
  if (++c.w < g.w) return;
  c.w = 0;
  if (++c.h < g.h) return;
  c.h = 0;
  ++c.t;
}

// (t, h, w) positions of a token at grid coordinate c of a run starting at position `start`.
DOCQA_PACK_HD inline void vision_position(const RunGrid& g, int64_t start, const GridCoord& c, int64_t out[3]) {
  out[0] = start + scaled_time(g, c.t);
  out[1] = start + c.h;
  out[2] = start + c.w;
}

}  // namespace packing
}  // namespace docqa_fast
