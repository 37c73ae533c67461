// Bin-packing planner for padding-free batches: which samples share one packed row.
//
// Semantics (docqa_fast/reference/packing.py is the readable twin; both give the same bins):
//   * items: every sample is one item, in sample order. With split_long, a sample longer
//     than max_tokens becomes floor(L / max_tokens) full pieces then one remainder piece
//     (when non-zero), consecutive items in piece order; without it such a sample is an error.
//   * "greedy" (next-fit, in order): items in order; an item that does not fit the open
//     bin closes it and opens a new one.
//   * "ffd": items by length descending (ties: item order), each into the lowest-numbered
//     bin with room, else a new bin.
//   * "bfd": the same order, each into the bin with the least room that still fits it
//     (ties: lowest-numbered bin), else a new bin.
//   * bins are numbered in the order they are opened; items in a bin keep insertion order.
// Cost: O(n log n) -- a sort, then an ordered set of (room, bin) for best fit and a max
// segment tree over bins for first fit; greedy is O(n).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace docqa_fast {
namespace packing {

enum class Strategy : int64_t { kGreedy = 0, kFirstFitDecreasing = 1, kBestFitDecreasing = 2 };

struct Plan {
  // Items (samples or pieces of split samples), in item order.
  std::vector<int64_t> item_sample, item_start, item_length;
  // Bins in CSR form: the items of bin b are bin_items[bin_offsets[b] : bin_offsets[b + 1]].
  std::vector<int64_t> bin_offsets, bin_items;
};

// lengths[i] >= 0, max_tokens > 0 (checked; std::invalid_argument names the argument).
Plan plan(const int64_t* lengths, int64_t n, int64_t max_tokens, Strategy strategy, bool split_long);

}  // namespace packing
}  // namespace docqa_fast
