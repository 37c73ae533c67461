// Per-row logic of the visual-token merge (masked_scatter of features into token embeddings),
// shared by the CPU loop (merge_visual_cpu.cpp) and the CUDA kernels (merge_visual_cuda.cu).
//
// slot[i] = (number of placeholders in tokens 0..i) - 1 for a placeholder token, -1 otherwise
// (the prefix sum is computed on the device before the launch). Forward: a placeholder row
// copies feature row slot[i], any other row copies its embedding. Backward: a placeholder
// row's gradient goes to feature row slot[i] and its embedding gradient is 0; other rows pass
// the gradient through. Feature indices are clamped / bounds-checked against n_visual, so a
// count mismatch that was not checked can never read or write out of bounds.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define DOCQA_MERGE_HD __host__ __device__
#else
#define DOCQA_MERGE_HD
#endif

namespace docqa_fast {
namespace packing {

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

}  // namespace packing
}  // namespace docqa_fast
