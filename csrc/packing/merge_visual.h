// Per-row logic of the visual-token merge (masked_scatter of features into token embeddings),
// shared by the CPU twin (merge_visual_cpu.cpp) and the CUDA kernels (merge_visual_cuda.cu).
//
// Rows are taken in tiles of kTileRows tokens. A token is a placeholder when its id is one of
// token_ids; slot[i] = (placeholders among tokens 0..i) - 1 for a placeholder, -1 otherwise.
// A tile's slots are its prefix (placeholders in earlier tiles) plus the count inside the tile,
// so both implementations count per tile, scan the tile counts (the CUDA kernel with a
// decoupled look-back in the same launch, the CPU twin in a loop), and copy rows per tile.
// Forward: a placeholder row copies feature row slot[i], any other row copies its embedding.
// Backward: a placeholder row's gradient goes to feature row slot[i] and its embedding gradient
// is 0; other rows pass the gradient through; feature rows no placeholder reached get 0.
// Feature indices are clamped / bounds-checked against n_visual, so a count mismatch that was
// not checked can never read or write out of bounds.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define DOCQA_MERGE_HD __host__ __device__
#else
#define DOCQA_MERGE_HD
#endif

namespace docqa_fast {
namespace packing {

// Rows per tile: one warp ballot counts a tile's placeholders on the GPU.
constexpr int64_t kMergeTileRows = 32;

DOCQA_MERGE_HD inline bool is_placeholder(int64_t id, const int64_t* token_ids, int64_t n_token_ids) {
  for (int64_t k = 0; k < n_token_ids; ++k)
    if (id == token_ids[k]) return true;
  return false;
}

// Slot of a token from its tile's prefix and the placeholders before it inside the tile.
DOCQA_MERGE_HD inline int64_t token_slot(bool placeholder, int64_t tile_prefix, int64_t before_in_tile) {
  return placeholder ? tile_prefix + before_in_tile : -1;
}

// Row of visual_embeds the forward copies into token row i, or -1 to keep the embedding.
// Surplus placeholders (slot >= n_visual) repeat the last feature row, as documented.
DOCQA_MERGE_HD inline int64_t forward_source_row(int64_t slot, int64_t n_visual) {
  if (slot < 0 || n_visual <= 0) return -1;
  return slot < n_visual ? slot : n_visual - 1;
}

// Row of grad_visual that receives token row i's gradient, or -1 (not a placeholder, or a
// surplus placeholder: its gradient is dropped, as the PyTorch path does).
DOCQA_MERGE_HD inline int64_t backward_target_row(int64_t slot, int64_t n_visual) {
  return slot >= 0 && slot < n_visual ? slot : -1;
}

// First feature row the backward must zero: rows [placeholders, n_visual) get no gradient.
DOCQA_MERGE_HD inline int64_t first_unreached_row(int64_t placeholders, int64_t n_visual) {
  return placeholders < n_visual ? placeholders : n_visual;
}

}  // namespace packing
}  // namespace docqa_fast
