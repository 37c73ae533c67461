// CUDA kernel of the packing copy: one launch writes every document's tokens into the packed
// row and every joined output's bytes (grids, pixel values). The first blocks take a packed
// column per thread: the document by binary search over the offsets, the token by
// pack_token(); the rest take a 16 KiB tile each: the segment by the same search over the
// tiles, the bytes by copy_tile() (pack_tokens.h), as the CPU twin does.
//
// The documents' and segments' tables (docs, then segments from a 16-byte boundary) travel
// as the launch's own argument when they fit (kParamTableBytes; a __grid_constant__ parameter
// is read in place): nothing is copied from host memory, so a CUDA graph captures the call
// with its tables inside. Larger tables are staged in pinned memory and copied on the stream;
// a graph would replay that copy from a host block PyTorch may have reused, so a capture of
// such a row is refused.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <cstring>
#include <vector>

#include "messages.h"
#include "packing/pack_tokens.h"

namespace docqa_fast {
namespace packing {
namespace {

constexpr int kThreads = kCopyLanes;
// With the other arguments the launch stays under the 4 KiB every architecture takes:
// e.g. 16 documents with 4 vision parts each.
constexpr int64_t kParamTableBytes = 3584;

struct alignas(16) ParamTable {
  unsigned char bytes[kParamTableBytes];
};

__global__ void __launch_bounds__(kThreads)
    pack_tokens_kernel(const __grid_constant__ ParamTable param, const unsigned char* __restrict__ staged,
                       int64_t n_docs, int64_t segment_offset, int64_t n_segments, PackedRow row,
                       int64_t token_blocks) {
  const unsigned char* table = staged != nullptr ? staged : param.bytes;
  const auto* docs = reinterpret_cast<const DocSource*>(table);
  const auto* segments = reinterpret_cast<const CopySegment*>(table + segment_offset);
  const int64_t block = blockIdx.x;
  if (block < token_blocks) {
    const int64_t g = block * kThreads + threadIdx.x;
    if (g >= row.total) return;
    const DocSource& d = docs[find_item(docs, n_docs, g)];
    pack_token(d, g - d.offset, row);
    return;
  }
  const int64_t tile = block - token_blocks;
  const CopySegment& s = segments[find_item(segments, n_segments, tile)];
  copy_tile(s, tile - s.offset, threadIdx.x, kThreads);
}

}  // namespace

void pack_tokens_cuda(const std::vector<DocSource>& docs, const PackedRow& row,
                      const std::vector<CopySegment>& segments, int64_t tiles, const at::Tensor& like) {
  const c10::cuda::CUDAGuard guard(like.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t doc_bytes = static_cast<int64_t>((docs.size() * sizeof(DocSource) + 15) / 16 * 16);
  const int64_t bytes = doc_bytes + static_cast<int64_t>(segments.size() * sizeof(CopySegment));
  ParamTable param{};
  unsigned char* fill = param.bytes;
  at::Tensor staged;  // kept until the launch is queued (the host allocator then tracks the copy)
  if (bytes > kParamTableBytes) {
    cudaStreamCaptureStatus capturing = cudaStreamCaptureStatusNone;
    C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capturing));
    DOCQA_CHECK_VALUE(capturing == cudaStreamCaptureStatusNone, "pack_tokens: a CUDA graph captures rows whose ",
                      "tables fit ", kParamTableBytes, " bytes (", sizeof(DocSource), " per document, ",
                      sizeof(CopySegment), " per non-empty vision part), got ", bytes,
                      "; capture fewer documents per call");
    staged = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
    fill = static_cast<unsigned char*>(staged.data_ptr());
  }
  std::memcpy(fill, docs.data(), docs.size() * sizeof(DocSource));
  if (!segments.empty()) std::memcpy(fill + doc_bytes, segments.data(), segments.size() * sizeof(CopySegment));
  at::Tensor table;
  if (staged.defined()) table = staged.to(like.device(), /*non_blocking=*/true);
  const int64_t token_blocks = (row.total + kThreads - 1) / kThreads;
  pack_tokens_kernel<<<token_blocks + tiles, kThreads, 0, stream>>>(
      param, table.defined() ? static_cast<const unsigned char*>(table.data_ptr()) : nullptr,
      static_cast<int64_t>(docs.size()), doc_bytes, static_cast<int64_t>(segments.size()), row, token_blocks);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace packing
}  // namespace docqa_fast
