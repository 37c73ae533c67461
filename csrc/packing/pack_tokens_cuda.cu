// CUDA kernel of the packing copy: one launch writes every document's tokens into the packed
// row. The documents' pointers and offsets travel as one table (pinned host memory, copied
// asynchronously on the stream); a thread per packed column finds its document by binary
// search over the offsets and writes the token with pack_token() (pack_tokens.h).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstring>
#include <vector>

#include "packing/pack_tokens.h"

namespace docqa_fast {
namespace packing {
namespace {

constexpr int kThreads = 256;

__global__ void __launch_bounds__(kThreads)
    pack_tokens_kernel(const DocSource* __restrict__ docs, int64_t n_docs, PackedRow row) {
  const int64_t g = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (g >= row.total) return;
  const DocSource& d = docs[find_doc(docs, n_docs, g)];
  pack_token(d, g - d.offset, row);
}

}  // namespace

void pack_tokens_cuda(const std::vector<DocSource>& docs, const PackedRow& row, const at::Tensor& like) {
  const c10::cuda::CUDAGuard guard(like.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t bytes = static_cast<int64_t>(docs.size() * sizeof(DocSource));
  // Pinned staging: the non-blocking copy below does not wait for the host, and PyTorch's
  // host allocator keeps the block alive until the copy on this stream has run.
  at::Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr(), docs.data(), bytes);
  const at::Tensor table = host.to(like.device(), /*non_blocking=*/true);
  const int64_t blocks = (row.total + kThreads - 1) / kThreads;
  pack_tokens_kernel<<<blocks, kThreads, 0, stream>>>(reinterpret_cast<const DocSource*>(table.data_ptr()),
                                                      static_cast<int64_t>(docs.size()), row);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace packing
}  // namespace docqa_fast
