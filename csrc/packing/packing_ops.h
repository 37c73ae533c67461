// Tensor-level entry points of the packing family, bound in csrc/bindings.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

namespace docqa_fast {

// lengths: 1-D int64 CPU tensor. strategy: 0 greedy, 1 ffd, 2 bfd.
// Returns [item_sample, item_start, item_length, bin_offsets, bin_items] (int64 CPU tensors).
std::vector<at::Tensor> plan_packing(const at::Tensor& lengths, int64_t max_tokens, int64_t strategy,
                                     bool split_long);

// M-RoPE position ids on the CPU (one pass per row). mm_token_type_ids (B, T) int32/int64,
// attention_mask (B, T) bool/int32/int64 (non-zero = real token), grids (n, 3) int64, video_steps (n_videos,) float64 holding
// tokens_per_second * seconds (computed in float32 when steps_are_f32).
// Returns [position_ids (3, B, T) int64, deltas (B,) int64, status (7,) int64: images seen,
// videos seen, runs whose length differs from their grid, then row, column, length and
// expected length of the first such run].
std::vector<at::Tensor> mrope_position_ids(const at::Tensor& mm_token_type_ids, const at::Tensor& attention_mask,
                                           const at::Tensor& image_grid_thw, const at::Tensor& video_grid_thw,
                                           const at::Tensor& video_steps, bool steps_are_f32,
                                           int64_t spatial_merge_size);

// Visual-token merge (see merge_visual.h). embeds/out (N, H), visual (V, H): contiguous, one
// dtype; slot (N,) int64 = placeholder number or -1. Writes out.
void merge_visual_forward(const at::Tensor& embeds, const at::Tensor& visual, const at::Tensor& slot,
                          const at::Tensor& out);
// grad/grad_inputs (N, H), grad_visual (V, H) zero-filled by the caller; writes both gradients.
void merge_visual_backward(const at::Tensor& grad, const at::Tensor& slot, const at::Tensor& grad_inputs,
                           const at::Tensor& grad_visual);

}  // namespace docqa_fast
