// Per-element logic of the packing copy (pack_multimodal's row): every document's ids, labels,
// type ids and M-RoPE positions into one packed row, and in the same pass the images' and
// videos' rows (grids, pixel values, seconds per grid step) as byte segments. Shared by the CPU
// twin (pack_tokens_cpu.cpp) and the CUDA kernel (pack_tokens_cuda.cu).
#pragma once

#include <cstdint>
#include <cstring>

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

// One contiguous source's bytes into its place in a joined output (a torch.cat along dim 0 is
// its parts' bytes one after another). Cut into tiles of kCopyTileBytes: a CUDA block per tile,
// its kCopyLanes threads striding over the tile's words; the CPU twin walks the same tiles and
// lanes.
constexpr int64_t kCopyTileBytes = 16384;
constexpr int kCopyLanes = 256;  // threads of a CUDA block (token and copy blocks alike)

struct CopySegment {
  const unsigned char* src;
  unsigned char* dst;
  int64_t bytes;   // > 0 (empty parts get no segment)
  int64_t offset;  // the segment's first tile among all segments' tiles
  int64_t word;    // bytes per load/store: the widest of 16, 8, 4, 2, 1 dividing both addresses
};

// Tiles are whole multiples of 16 bytes, so every tile starts as aligned as its segment.
inline int64_t segment_tiles(int64_t bytes) { return (bytes + kCopyTileBytes - 1) / kCopyTileBytes; }

inline int64_t widest_word(const void* src, const void* dst) {
  const uintptr_t both = reinterpret_cast<uintptr_t>(src) | reinterpret_cast<uintptr_t>(dst);
  int64_t word = 16;
  while (both % word) word /= 2;
  return word;
}

#if defined(__CUDACC__)
using Word16 = uint4;
#else
struct alignas(16) Word16 {
  uint64_t lo, hi;
};
#endif

// Bytes [0, n) of a tile: words of type Word at lane, lane + lanes, ..., then the n % sizeof(Word)
// tail bytes the same way.
template <typename Word>
DOCQA_PACKCOPY_HD inline void copy_words(const unsigned char* src, unsigned char* dst, int64_t n, int64_t lane,
                                         int64_t lanes) {
  constexpr int64_t size = sizeof(Word);
  const int64_t words = n / size;
  for (int64_t w = lane; w < words; w += lanes) {
#if defined(__CUDA_ARCH__)
    reinterpret_cast<Word*>(dst)[w] = reinterpret_cast<const Word*>(src)[w];
#else
    std::memcpy(dst + w * size, src + w * size, size);  // one move; no aliasing assumption about the buffers
#endif
  }
  for (int64_t b = words * size + lane; b < n; b += lanes) dst[b] = src[b];
}

// This lane's share of tile `tile` (counted within the segment) of segment s.
DOCQA_PACKCOPY_HD inline void copy_tile(const CopySegment& s, int64_t tile, int64_t lane, int64_t lanes) {
  const int64_t begin = tile * kCopyTileBytes;
  const int64_t left = s.bytes - begin;
  const int64_t n = left < kCopyTileBytes ? left : kCopyTileBytes;
  const unsigned char* src = s.src + begin;
  unsigned char* dst = s.dst + begin;
  switch (s.word) {
    case 16: return copy_words<Word16>(src, dst, n, lane, lanes);
    case 8: return copy_words<uint64_t>(src, dst, n, lane, lanes);
    case 4: return copy_words<uint32_t>(src, dst, n, lane, lanes);
    case 2: return copy_words<uint16_t>(src, dst, n, lane, lanes);
    default: return copy_words<unsigned char>(src, dst, n, lane, lanes);
  }
}

// The item holding index g (a packed column among documents, a tile among segments): the last
// of items[0..n) whose offset is <= g (empty documents share their offset with the next one and
// are passed over).
template <typename Item>
DOCQA_PACKCOPY_HD inline int64_t find_item(const Item* items, int64_t n, int64_t g) {
  int64_t lo = 0, hi = n - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (items[mid].offset <= g) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

}  // namespace packing
}  // namespace docqa_fast
