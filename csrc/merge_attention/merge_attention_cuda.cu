// CUDA kernel of the attention-state merge; the per-row code is merge_attention.h, shared
// with the CPU twin.
//
// Mapping: a row (one (b, s, h)) is split into slices of VEC elements (16 bytes when the
// pointers and strides allow, else 1 element); threads_per_row threads share a row, one
// slice each (looping only when a scalar row is wider than the block), and a 256-thread
// block holds several rows. Every thread recomputes its row's statistics from the LSEs:
// they are a few cached floats, cheaper than a shared-memory exchange and valid for any n.
// The op is memory bound: low register use gives full occupancy, and the parts are read
// kPartsInFlight at a time so each thread has several 16-byte loads outstanding.
// c10's stream header, not ATen/cuda/CUDAContext.h: that one pulls in cuBLAS/cuSPARSE headers
// a minimal toolkit lacks, and this file needs neither.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>

#include "merge_attention/merge_attention_ops.h"

namespace docqa_fast {
namespace merge_attention {
namespace {

constexpr int kBlockThreads = 256;

// Resident 256-thread blocks per SM the register budget must allow. Tighter caps (8 for the
// pair, 4 for the stacked form) make the 16-bit kernels spill to the stack; these do not.
template <class Parts>
struct MinBlocksPerSM {
  static constexpr int value = 3;  // <= 85 registers: room for kPartsInFlight 16-byte loads
};
template <typename T>
struct MinBlocksPerSM<PairParts<T>> {
  static constexpr int value = 6;  // <= 42 registers
};
constexpr int64_t kMaxBlocks = 0x7fffffff;  // gridDim.x limit; the kernel strides past it

template <typename T, int VEC, bool ALIGNED, class Parts>
__global__ void __launch_bounds__(kBlockThreads, MinBlocksPerSM<Parts>::value)
    merge_kernel(const Parts parts, T* __restrict__ out, float* __restrict__ lse_out, int64_t S, int64_t H,
                 int64_t D, int64_t n_rows, int threads_per_row, int rows_per_block) {
  const int local_row = threadIdx.x / threads_per_row;
  const int lane = threadIdx.x - local_row * threads_per_row;
  const int64_t n_slices = (D + VEC - 1) / VEC;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * rows_per_block + local_row; row < n_rows;
       row += static_cast<int64_t>(gridDim.x) * rows_per_block) {
    const RowCoord r = row_coord(row, S, H);
    const auto part_row = parts.row(r);
    const RowStats st = row_stats(part_row);
    T* dst = out + out_row_offset(row, D);
    for (int64_t slice = lane; slice < n_slices; slice += threads_per_row) {
      const int64_t col = slice * VEC;
      // Aligned rows hold whole slices; the scalar path has VEC = 1, so width is VEC either way.
      float acc[VEC];
      merge_row_slice<T, VEC, ALIGNED>(part_row, st, col, VEC, acc);
      store_slice<T, VEC, ALIGNED>(dst + col, VEC, acc);
    }
    if (lane == 0) lse_out[lse_out_offset(r, S, H)] = merged_lse(st);
  }
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// Dims [first, first + count) of t step by whole 16-byte units (size-1 dims never step).
bool strides_aligned16(const at::Tensor& t, int64_t first, int64_t count) {
  for (int64_t d = first; d < first + count; ++d)
    if (t.size(d) != 1 && (t.stride(d) * t.element_size()) % 16 != 0) return false;
  return true;
}

template <typename T, class Parts>
void launch(const Parts& parts, bool vectorize, const MergeShape& shape, T* out, float* lse_out) {
  constexpr int kVec = 16 / sizeof(T);
  const int vec = vectorize ? kVec : 1;
  const int64_t n_slices = std::max<int64_t>(1, (shape.D + vec - 1) / vec);
  const int threads_per_row = static_cast<int>(std::min<int64_t>(n_slices, kBlockThreads));
  // Not rounded to a power of two: D = 80 would idle 6 of 16 threads per row.
  const int rows_per_block = kBlockThreads / threads_per_row;
  const int threads = threads_per_row * rows_per_block;
  const int64_t blocks = std::min<int64_t>((shape.rows() + rows_per_block - 1) / rows_per_block, kMaxBlocks);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (vectorize) {
    merge_kernel<T, kVec, true><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
        parts, out, lse_out, shape.S, shape.H, shape.D, shape.rows(), threads_per_row, rows_per_block);
  } else {
    merge_kernel<T, 1, false><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
        parts, out, lse_out, shape.S, shape.H, shape.D, shape.rows(), threads_per_row, rows_per_block);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void merge_pair_cuda(const at::Tensor& out_a, const at::Tensor& lse_a, const at::Tensor& out_b,
                     const at::Tensor& lse_b, const at::Tensor& out, const at::Tensor& lse_out) {
  const c10::cuda::CUDAGuard guard(out.device());
  const MergeShape shape = merge_shape(out);
  const int64_t vec = 16 / out.element_size();
  const bool vectorize = shape.D % vec == 0 && aligned16(out_a.const_data_ptr()) &&
                         aligned16(out_b.const_data_ptr()) && aligned16(out.const_data_ptr()) &&
                         strides_aligned16(out_a, 0, 3) && strides_aligned16(out_b, 0, 3);
  DOCQA_DISPATCH_MERGE_TYPES(out.scalar_type(), "merge_attention_states_cuda", [&] {
    launch<scalar_t>(make_pair_parts<scalar_t>(out_a, lse_a, out_b, lse_b), vectorize, shape,
                     out.mutable_data_ptr<scalar_t>(), lse_out.mutable_data_ptr<float>());
  });
}

void merge_stacked_cuda(const at::Tensor& outs, const at::Tensor& lses, const at::Tensor& out,
                        const at::Tensor& lse_out) {
  const c10::cuda::CUDAGuard guard(out.device());
  const MergeShape shape = merge_shape(out);
  const int64_t vec = 16 / out.element_size();
  const bool vectorize = shape.D % vec == 0 && aligned16(outs.const_data_ptr()) &&
                         aligned16(out.const_data_ptr()) && strides_aligned16(outs, 0, 4);
  DOCQA_DISPATCH_MERGE_TYPES(out.scalar_type(), "merge_stacked_attention_states_cuda", [&] {
    launch<scalar_t>(make_stacked_parts<scalar_t>(outs, lses), vectorize, shape, out.mutable_data_ptr<scalar_t>(),
                     lse_out.mutable_data_ptr<float>());
  });
}

}  // namespace merge_attention
}  // namespace docqa_fast
