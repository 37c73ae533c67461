// Tensor-level entry points of the packing family, bound in csrc/bindings.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

namespace docqa_fast {

// lengths: 1-D int64 CPU tensor. strategy: 0 greedy, 1 ffd, 2 bfd.
// Returns [item_sample, item_start, item_length, bin_offsets, bin_items] (int64 CPU tensors).
std::vector<at::Tensor> plan_packing(const at::Tensor& lengths, int64_t max_tokens, int64_t strategy,
                                     bool split_long);

// M-RoPE position ids (mrope.h), CPU twin or CUDA kernels by the tensors' device; no host
// sync. mm_token_type_ids (B, T) int32/int64, attention_mask (B, T) bool/int32/int64
// (non-zero = real token), grids (n, 3) int64, video_steps (n_videos,) float64 holding
// tokens_per_second * seconds (computed in float32 when steps_are_f32), all on one device.
// Returns [position_ids (3, B, T) int64, deltas (B,) int64, status (B, 6) int64 per row:
// image runs, video runs, runs whose length differs from their grid, then the column where
// the first such run ended (T: at the row's end; -1: none), its length and expected length].
// CPU tensors: one pass per row, or with `chunked` the CUDA kernels' chunked scan (for tests).
std::vector<at::Tensor> mrope_position_ids(const at::Tensor& mm_token_type_ids, const at::Tensor& attention_mask,
                                           const at::Tensor& image_grid_thw, const at::Tensor& video_grid_thw,
                                           const at::Tensor& video_steps, bool steps_are_f32,
                                           int64_t spatial_merge_size, bool chunked = false);

// Visual-token merge (merge_visual.h), one launch with the placeholder prefix sum inside.
// embeds/out (N, H), visual (V, H): contiguous, one dtype; ids (N,) int32/int64 token ids;
// token_ids (k,) int64 placeholder ids. Writes out.
void merge_visual_forward(const at::Tensor& embeds, const at::Tensor& ids, const at::Tensor& token_ids,
                          const at::Tensor& visual, const at::Tensor& out);
// grad/grad_inputs (N, H), grad_visual (V, H) (any contents: every row is written).
void merge_visual_backward(const at::Tensor& grad, const at::Tensor& ids, const at::Tensor& token_ids,
                           const at::Tensor& grad_inputs, const at::Tensor& grad_visual);

// Packing copy (pack_tokens.h): document d's ids[d], labels[d] (L_d,) int64, types[d] (L_d,)
// int32 and mrope[d] (3, L_d) int64 into ids_out / labels_out (1, T) int64, types_out (1, T)
// int32 and positions_out (4, 1, T) int64 (row 0: positions restarting per document), with
// ignore_index as each document's first label; and joined[f] = torch.cat(parts[f]) for every f
// (any dtype: the parts' bytes one after another; contiguous, one dtype and trailing shape per
// f). One launch on CUDA tensors, no host sync; all tensors on one device.
void pack_tokens(const std::vector<at::Tensor>& ids, const std::vector<at::Tensor>& labels,
                 const std::vector<at::Tensor>& types, const std::vector<at::Tensor>& mrope, int64_t ignore_index,
                 const at::Tensor& ids_out, const at::Tensor& labels_out, const at::Tensor& types_out,
                 const at::Tensor& positions_out, const std::vector<std::vector<at::Tensor>>& parts,
                 const std::vector<at::Tensor>& joined);

}  // namespace docqa_fast
