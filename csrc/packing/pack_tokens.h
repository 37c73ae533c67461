// Per-token logic of the packing copy (pack_multimodal's token fields): every document's
// ids, labels, type ids and M-RoPE positions into one packed row. Shared by the CPU twin
// (pack_tokens_cpu.cpp) and the CUDA kernel (pack_tokens_cuda.cu).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define DOCQA_PACKCOPY_HD __host__ __device__
#else
#define DOCQA_PACKCOPY_HD
#endif

namespace docqa_fast {
namespace packing {

// Where one document's tensors are (all contiguous; the same struct is copied to the GPU).
struct DocSource {
  const int64_t* ids;     // (L,)
  const int64_t* labels;  // (L,)
  const int32_t* types;   // (L,) mm_token_type_ids
  const int64_t* mrope;   // (3, L) t, h, w positions of the document alone
  int64_t length;         // L
  int64_t offset;         // first column of the document in the packed row
};

// The packed row's buffers: ids, labels (1, T) int64; types (1, T) int32; positions (4, 1, T) int64.
struct PackedRow {
  int64_t* ids;
  int64_t* labels;
  int32_t* types;
  int64_t* positions;
  int64_t total;  // T
  int64_t ignore_index;
};

// Token i of document d into the packed row. Row 0 of the positions restarts at 0 in every
// document (transformers reads a restart as a document boundary); the document's first
// label is ignore_index, so no document is trained to predict its first token from the
// previous document's last one.
DOCQA_PACKCOPY_HD inline void pack_token(const DocSource& d, int64_t i, const PackedRow& out) {
  const int64_t g = d.offset + i;
  out.ids[g] = d.ids[i];
  out.labels[g] = i == 0 ? out.ignore_index : d.labels[i];
  out.types[g] = d.types[i];
  out.positions[g] = i;
  out.positions[out.total + g] = d.mrope[i];
  out.positions[2 * out.total + g] = d.mrope[d.length + i];
  out.positions[3 * out.total + g] = d.mrope[2 * d.length + i];
}

// The document holding packed column g: the last of docs[0..n) whose offset is <= g (empty
// documents share their offset with the next one and are passed over).
DOCQA_PACKCOPY_HD inline int64_t find_doc(const DocSource* docs, int64_t n, int64_t g) {
  int64_t lo = 0, hi = n - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (docs[mid].offset <= g) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

}  // namespace packing
}  // namespace docqa_fast
