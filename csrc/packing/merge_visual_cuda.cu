// CUDA kernels of the visual-token merge: one block per token row, 16-byte vector copies
// when the rows allow them. Memory bound: each element is read once and written once.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <initializer_list>

#include "packing/merge_visual.h"

namespace docqa_fast {
namespace packing {
namespace {

constexpr int kThreads = 128;

// Copies `units` elements of type U (int4 = 16 bytes, or a 2-byte/4-byte scalar) per row.
template <typename U>
__device__ __forceinline__ void copy_row(U* dst, const U* src, int64_t units) {
  for (int64_t k = threadIdx.x; k < units; k += blockDim.x) dst[k] = src[k];
}

template <typename U>
__device__ __forceinline__ void zero_row(U* dst, int64_t units) {
  for (int64_t k = threadIdx.x; k < units; k += blockDim.x) dst[k] = U{};
}

template <typename U>
__global__ void merge_forward_kernel(const U* __restrict__ embeds, const U* __restrict__ visual,
                                     const int64_t* __restrict__ slot, U* __restrict__ out, int64_t n_visual,
                                     int64_t units) {
  const int64_t i = blockIdx.x;
  const int64_t v = forward_source_row(slot[i], n_visual);
  copy_row(out + i * units, v >= 0 ? visual + v * units : embeds + i * units, units);
}

template <typename U>
__global__ void merge_backward_kernel(const U* __restrict__ grad, const int64_t* __restrict__ slot,
                                      U* __restrict__ grad_inputs, U* __restrict__ grad_visual, int64_t n_visual,
                                      int64_t units) {
  const int64_t i = blockIdx.x;
  const int64_t s = slot[i];
  const int64_t v = backward_target_row(s, n_visual);
  if (v >= 0) copy_row(grad_visual + v * units, grad + i * units, units);
  if (s >= 0) {
    zero_row(grad_inputs + i * units, units);
  } else {
    copy_row(grad_inputs + i * units, grad + i * units, units);
  }
}

bool aligned16(std::initializer_list<const at::Tensor*> tensors, int64_t row_bytes) {
  if (row_bytes % 16 != 0) return false;
  for (const at::Tensor* t : tensors)
    if (reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 != 0) return false;
  return true;
}

// Launch with U = int4 when every row starts 16-byte aligned, else with the element-sized type.
template <class Launch>
void launch_by_width(const at::Tensor& rows, std::initializer_list<const at::Tensor*> tensors, Launch&& launch) {
  const int64_t row_bytes = rows.size(1) * rows.element_size();
  if (aligned16(tensors, row_bytes)) return launch(int4{}, row_bytes / 16);
  if (rows.element_size() == 4) return launch(float{}, rows.size(1));
  return launch(short{}, rows.size(1));  // fp16 / bf16 moved as raw 2-byte words
}

}  // namespace

void merge_visual_forward_cuda(const at::Tensor& embeds, const at::Tensor& visual, const at::Tensor& slot,
                               const at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(embeds.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t N = embeds.size(0), V = visual.size(0);
  launch_by_width(embeds, {&embeds, &visual, &out}, [&](auto unit, int64_t units) {
    using U = decltype(unit);
    merge_forward_kernel<U><<<N, kThreads, 0, stream>>>(
        static_cast<const U*>(embeds.data_ptr()), static_cast<const U*>(visual.data_ptr()),
        slot.data_ptr<int64_t>(), static_cast<U*>(out.data_ptr()), V, units);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void merge_visual_backward_cuda(const at::Tensor& grad, const at::Tensor& slot, const at::Tensor& grad_inputs,
                                const at::Tensor& grad_visual) {
  const c10::cuda::CUDAGuard guard(grad.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t N = grad.size(0), V = grad_visual.size(0);
  launch_by_width(grad, {&grad, &grad_inputs, &grad_visual}, [&](auto unit, int64_t units) {
    using U = decltype(unit);
    merge_backward_kernel<U><<<N, kThreads, 0, stream>>>(
        static_cast<const U*>(grad.data_ptr()), slot.data_ptr<int64_t>(), static_cast<U*>(grad_inputs.data_ptr()),
        static_cast<U*>(grad_visual.data_ptr()), V, units);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace packing
}  // namespace docqa_fast
