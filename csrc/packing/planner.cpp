// The packing planner (see planner.h for the exact semantics), plain C++ on the CPU: data
// loaders plan there, so there is no CUDA twin.
#include "packing/planner.h"

#include <algorithm>
#include <limits>
#include <numeric>
#include <set>
#include <stdexcept>
#include <utility>

namespace docqa_fast {
namespace packing {
namespace {

void make_items(const int64_t* lengths, int64_t n, int64_t max_tokens, bool split_long, Plan& p) {
  p.item_sample.reserve(n);
  p.item_start.reserve(n);
  p.item_length.reserve(n);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t len = lengths[i];
    if (len < 0)
      throw std::invalid_argument("expected lengths >= 0, got lengths[" + std::to_string(i) + "] = " +
                                  std::to_string(len));
    if (len > max_tokens && !split_long)
      throw std::invalid_argument("lengths[" + std::to_string(i) + "] = " + std::to_string(len) +
                                  " exceeds max_tokens = " + std::to_string(max_tokens) +
                                  " (pass split_long=True to split such samples)");
    int64_t start = 0;
    // Full pieces first, then the remainder; a sample that fits is one piece starting at 0.
    while (len - start > max_tokens) {
      p.item_sample.push_back(i);
      p.item_start.push_back(start);
      p.item_length.push_back(max_tokens);
      start += max_tokens;
    }
    if (start == 0 || len - start > 0) {
      p.item_sample.push_back(i);
      p.item_start.push_back(start);
      p.item_length.push_back(len - start);
    }
  }
}

// Items by length descending; equal lengths keep item order (stable), as the reference's sort.
std::vector<int64_t> decreasing_order(const std::vector<int64_t>& length) {
  std::vector<int64_t> order(length.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return length[a] > length[b]; });
  return order;
}

// Assignment of items to bins -> CSR with items in insertion order.
void to_csr(const std::vector<int64_t>& insertion_order, const std::vector<int64_t>& bin_of_item, int64_t bins,
            Plan& p) {
  p.bin_offsets.assign(bins + 1, 0);
  for (int64_t item : insertion_order) ++p.bin_offsets[bin_of_item[item] + 1];
  for (int64_t b = 0; b < bins; ++b) p.bin_offsets[b + 1] += p.bin_offsets[b];
  std::vector<int64_t> cursor(p.bin_offsets.begin(), p.bin_offsets.end() - 1);
  p.bin_items.resize(insertion_order.size());
  for (int64_t item : insertion_order) p.bin_items[cursor[bin_of_item[item]]++] = item;
}

void next_fit(int64_t max_tokens, Plan& p) {
  const int64_t n = static_cast<int64_t>(p.item_length.size());
  std::vector<int64_t> bin_of(n), order(n);
  std::iota(order.begin(), order.end(), 0);
  int64_t bins = 0, room = -1;  // room < 0: no bin open yet
  for (int64_t i = 0; i < n; ++i) {
    const int64_t len = p.item_length[i];
    if (len > room) {
      ++bins;
      room = max_tokens;
    }
    room -= len;
    bin_of[i] = bins - 1;
  }
  to_csr(order, bin_of, bins, p);
}

// Max segment tree over bin slots; unopened slots hold max_tokens, so the leftmost slot with
// room >= len is either an open bin (first fit) or the next bin to open.
void first_fit_decreasing(int64_t max_tokens, Plan& p) {
  const int64_t n = static_cast<int64_t>(p.item_length.size());
  const std::vector<int64_t> order = decreasing_order(p.item_length);
  int64_t leaves = 1;
  while (leaves < std::max<int64_t>(n, 1)) leaves *= 2;
  std::vector<int64_t> tree(2 * leaves, max_tokens);
  std::vector<int64_t> bin_of(n);
  int64_t bins = 0;
  for (int64_t item : order) {
    const int64_t len = p.item_length[item];
    int64_t node = 1;  // the root always has room: max_tokens >= len and at most n bins open
    while (node < leaves) node = tree[2 * node] >= len ? 2 * node : 2 * node + 1;
    const int64_t bin = node - leaves;
    bins = std::max(bins, bin + 1);
    bin_of[item] = bin;
    tree[node] -= len;
    for (node /= 2; node >= 1; node /= 2) tree[node] = std::max(tree[2 * node], tree[2 * node + 1]);
  }
  to_csr(order, bin_of, bins, p);
}

// Ordered set of (room, bin): lower_bound(len, -inf) is the tightest bin, lowest number on ties.
void best_fit_decreasing(int64_t max_tokens, Plan& p) {
  const int64_t n = static_cast<int64_t>(p.item_length.size());
  const std::vector<int64_t> order = decreasing_order(p.item_length);
  std::set<std::pair<int64_t, int64_t>> open;
  std::vector<int64_t> bin_of(n);
  int64_t bins = 0;
  for (int64_t item : order) {
    const int64_t len = p.item_length[item];
    auto it = open.lower_bound({len, std::numeric_limits<int64_t>::min()});
    int64_t bin, room;
    if (it == open.end()) {
      bin = bins++;
      room = max_tokens;
    } else {
      bin = it->second;
      room = it->first;
      open.erase(it);
    }
    open.emplace(room - len, bin);
    bin_of[item] = bin;
  }
  to_csr(order, bin_of, bins, p);
}

}  // namespace

Plan plan(const int64_t* lengths, int64_t n, int64_t max_tokens, Strategy strategy, bool split_long) {
  if (max_tokens <= 0) throw std::invalid_argument("expected max_tokens > 0, got " + std::to_string(max_tokens));
  Plan p;
  make_items(lengths, n, max_tokens, split_long, p);
  switch (strategy) {
    case Strategy::kGreedy: next_fit(max_tokens, p); break;
    case Strategy::kFirstFitDecreasing: first_fit_decreasing(max_tokens, p); break;
    case Strategy::kBestFitDecreasing: best_fit_decreasing(max_tokens, p); break;
    default: throw std::invalid_argument("unknown packing strategy code " + std::to_string(static_cast<int64_t>(strategy)));
  }
  return p;
}

}  // namespace packing
}  // namespace docqa_fast
