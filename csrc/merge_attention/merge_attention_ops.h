// Declarations shared by the bindings, the dispatching entry points and the CPU / CUDA
// implementations of the attention-state merge, plus the tensor -> accessor builders
// both implementations use.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include "merge_attention/merge_attention.h"

// Runs the lambda with scalar_t = float, c10::Half or c10::BFloat16: the dtypes the ops take
// (no double instantiation, to keep the build small).
#define DOCQA_DISPATCH_MERGE_TYPES(TYPE, NAME, ...)                   \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                      \
                     AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))

namespace docqa_fast {

// Entry points bound in csrc/bindings.cpp: light checks, then CPU or CUDA by device.
// out_a/out_b (B, S, H, D), lse_a/lse_b (B, H, S) fp32; writes contiguous out (B, S, H, D)
// and lse_out (B, H, S).
void merge_attention_states(const at::Tensor& out_a, const at::Tensor& lse_a, const at::Tensor& out_b,
                            const at::Tensor& lse_b, const at::Tensor& out, const at::Tensor& lse_out);
// outs (n, B, S, H, D), lses (n, B, H, S) fp32; same outputs.
void merge_stacked_attention_states(const at::Tensor& outs, const at::Tensor& lses, const at::Tensor& out,
                                    const at::Tensor& lse_out);

namespace merge_attention {

// Implementations; arguments are already checked and B*S*H > 0.
void merge_pair_cpu(const at::Tensor& out_a, const at::Tensor& lse_a, const at::Tensor& out_b,
                    const at::Tensor& lse_b, const at::Tensor& out, const at::Tensor& lse_out);
void merge_stacked_cpu(const at::Tensor& outs, const at::Tensor& lses, const at::Tensor& out,
                       const at::Tensor& lse_out);
#if defined(DOCQA_FAST_WITH_CUDA)
void merge_pair_cuda(const at::Tensor& out_a, const at::Tensor& lse_a, const at::Tensor& out_b,
                     const at::Tensor& lse_b, const at::Tensor& out, const at::Tensor& lse_out);
void merge_stacked_cuda(const at::Tensor& outs, const at::Tensor& lses, const at::Tensor& out,
                        const at::Tensor& lse_out);
#endif

// (B, S, H, D) of the merged output; rows() = B*S*H.
struct MergeShape {
  int64_t B, S, H, D;
  int64_t rows() const { return B * S * H; }
};

inline MergeShape merge_shape(const at::Tensor& out) {
  return {out.size(0), out.size(1), out.size(2), out.size(3)};
}

// Strides of dims [first, first + 3) of an out tensor (b, s, h) and of an lse tensor (b, h, s).
inline OutStrides out_strides(const at::Tensor& t, int64_t first) {
  return {t.stride(first), t.stride(first + 1), t.stride(first + 2)};
}
inline LseStrides lse_strides(const at::Tensor& t, int64_t first) {
  return {t.stride(first), t.stride(first + 1), t.stride(first + 2)};
}

template <typename T>
PairParts<T> make_pair_parts(const at::Tensor& out_a, const at::Tensor& lse_a, const at::Tensor& out_b,
                             const at::Tensor& lse_b) {
  return {out_a.const_data_ptr<T>(), out_b.const_data_ptr<T>(),   lse_a.const_data_ptr<float>(),
          lse_b.const_data_ptr<float>(), out_strides(out_a, 0),    out_strides(out_b, 0),
          lse_strides(lse_a, 0),         lse_strides(lse_b, 0)};
}

template <typename T>
StackedParts<T> make_stacked_parts(const at::Tensor& outs, const at::Tensor& lses) {
  return {outs.const_data_ptr<T>(), lses.const_data_ptr<float>(), outs.stride(0), lses.stride(0),
          out_strides(outs, 1),     lse_strides(lses, 1),          static_cast<int>(outs.size(0))};
}

}  // namespace merge_attention
}  // namespace docqa_fast
