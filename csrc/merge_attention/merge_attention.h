// Per-row logic of the attention-state merge, shared by the CPU loop
// (merge_attention_cpu.cpp) and the CUDA kernel (merge_attention_cuda.cu).
//
// A partial attention result over a key set K_i is (o_i, lse_i). Over disjoint key sets
//     lse = log sum_i exp(lse_i),    o = sum_i exp(lse_i - lse) * o_i.
// Semantics follow docqa_fast/reference/merge_attention.py exactly:
//   * lse_i = +inf (flash-attn's "no keys") counts as -inf: an empty part, weight 0;
//   * the shift is the max lse, or 0 when every part is empty (so exp gives 0, not NaN);
//   * a row whose parts are all empty gives out = 0, lse = -inf;
//   * a part whose normalised weight is not > 0 is never read (it may hold NaN);
//   * a NaN lse propagates: lse = NaN and, as no weight is > 0, out = 0.
//
// Layout: out rows (b, s, h) of D contiguous elements with free strides on b, s, h;
// LSEs (b, h, s) with free strides. Offsets are int64: B*S*H*D passes 2^31.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define DOCQA_HD __host__ __device__
#define DOCQA_INLINE __forceinline__
#define DOCQA_UNROLL _Pragma("unroll")
#define DOCQA_UNROLL4 _Pragma("unroll 4")
#else
#define DOCQA_HD
#define DOCQA_INLINE inline
#define DOCQA_UNROLL
#define DOCQA_UNROLL4
#endif

namespace docqa_fast {
namespace merge_attention {

constexpr float kNegInf = -INFINITY;

DOCQA_HD DOCQA_INLINE float exp_f32(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);  // the accurate expf, not __expf: this op is memory bound
#else
  return std::exp(x);
#endif
}

DOCQA_HD DOCQA_INLINE float log_f32(float x) {
#if defined(__CUDA_ARCH__)
  return logf(x);
#else
  return std::log(x);
#endif
}

// ------------------------------------------------------------------- row coordinates

struct RowCoord {
  int64_t b, s, h;
};

// Row r of the flattened (B, S, H) grid; rows are ordered like a contiguous (B, S, H, D) out.
DOCQA_HD DOCQA_INLINE RowCoord row_coord(int64_t row, int64_t S, int64_t H) {
  // 32-bit division is several times cheaper on the GPU; rows rarely pass 2^32.
  if (static_cast<uint64_t>(row) <= 0xffffffffull && static_cast<uint64_t>(S * H) <= 0xffffffffull) {
    const uint32_t r = static_cast<uint32_t>(row), h32 = static_cast<uint32_t>(H);
    const uint32_t sh = static_cast<uint32_t>(S * H);
    return {static_cast<int64_t>(r / sh), static_cast<int64_t>((r % sh) / h32), static_cast<int64_t>(r % h32)};
  }
  return {row / (S * H), (row / H) % S, row % H};
}

// ------------------------------------------------------------------ part accessors
//
// A "parts" object describes where the partial results live; row(coord) resolves one
// (b, s, h) into a "parts row" with count(), out(i) (pointer to D elements) and lse(i).
// The merge routines below are templated on the parts row, so the 2-way and n-way forms
// share one code path on CPU and GPU.

struct OutStrides {
  int64_t b, s, h;
  DOCQA_HD DOCQA_INLINE int64_t offset(const RowCoord& r) const { return r.b * b + r.s * s + r.h * h; }
};

struct LseStrides {
  int64_t b, h, s;
  DOCQA_HD DOCQA_INLINE int64_t offset(const RowCoord& r) const { return r.b * b + r.h * h + r.s * s; }
};

// flash-attn reports +inf for a row that saw no keys; it is the same empty part as -inf.
DOCQA_HD DOCQA_INLINE float sanitize_lse(float lse) { return lse == INFINITY ? kNegInf : lse; }

template <typename T>
struct PairRow {
  // count() is a compile-time 2, so loops over parts unroll and i is a constant.
  static constexpr int kPartsInFlight = 2;
  const T* out_a;
  const T* out_b;
  const float* lse_a;
  const float* lse_b;
  DOCQA_HD DOCQA_INLINE constexpr int count() const { return 2; }
  DOCQA_HD DOCQA_INLINE const T* out(int i) const { return i == 0 ? out_a : out_b; }
  DOCQA_HD DOCQA_INLINE float lse(int i) const { return sanitize_lse(i == 0 ? *lse_a : *lse_b); }
};

// Two parts held in separate tensors (the strides of a and b may differ).
template <typename T>
struct PairParts {
  const T* out_a;
  const T* out_b;
  const float* lse_a;
  const float* lse_b;
  OutStrides out_a_strides, out_b_strides;
  LseStrides lse_a_strides, lse_b_strides;

  DOCQA_HD DOCQA_INLINE PairRow<T> row(const RowCoord& r) const {
    return {out_a + out_a_strides.offset(r), out_b + out_b_strides.offset(r), lse_a + lse_a_strides.offset(r),
            lse_b + lse_b_strides.offset(r)};
  }
};

template <typename T>
struct StackedRow {
  // Parts are walked in groups of this many so that several row loads are in flight.
  static constexpr int kPartsInFlight = 4;
  const T* out0;
  const float* lse0;
  int64_t out_part_stride, lse_part_stride;
  int n;
  DOCQA_HD DOCQA_INLINE int count() const { return n; }
  DOCQA_HD DOCQA_INLINE const T* out(int i) const { return out0 + i * out_part_stride; }
  DOCQA_HD DOCQA_INLINE float lse(int i) const { return sanitize_lse(lse0[i * lse_part_stride]); }
};

// n parts stacked along a leading dimension of one tensor (any n >= 1).
template <typename T>
struct StackedParts {
  const T* outs;
  const float* lses;
  int64_t out_part_stride, lse_part_stride;
  OutStrides out_strides;
  LseStrides lse_strides;
  int n;

  DOCQA_HD DOCQA_INLINE StackedRow<T> row(const RowCoord& r) const {
    return {outs + out_strides.offset(r), lses + lse_strides.offset(r), out_part_stride, lse_part_stride, n};
  }
};

// ---------------------------------------------------------------------- row statistics

struct RowStats {
  float shift;  // max lse, or 0 when every part is empty
  float total;  // sum_i exp(lse_i - shift)
};

// Two passes over the (few, cached) LSEs, like the reference: max, then the normaliser.
template <class Row>
DOCQA_HD DOCQA_INLINE RowStats row_stats(const Row& parts) {
  float lse_max = kNegInf;
  DOCQA_UNROLL4
  for (int i = 0; i < parts.count(); ++i) {
    const float x = parts.lse(i);
    // NaN-propagating max (torch.amax semantics); fmaxf would drop the NaN.
    lse_max = (x > lse_max || x != x) ? x : lse_max;
  }
  const float shift = lse_max == kNegInf ? 0.0f : lse_max;
  float total = 0.0f;
  DOCQA_UNROLL4
  for (int i = 0; i < parts.count(); ++i) total += exp_f32(parts.lse(i) - shift);
  return {shift, total};
}

DOCQA_HD DOCQA_INLINE float merged_lse(const RowStats& st) {
  return st.total == 0.0f ? kNegInf : st.shift + log_f32(st.total);
}

// Normalised weight of a part; 0 for an all-empty row (avoids 0/0), NaN stays NaN.
DOCQA_HD DOCQA_INLINE float part_weight(float lse, const RowStats& st) {
  return st.total == 0.0f ? 0.0f : exp_f32(lse - st.shift) / st.total;
}

// ------------------------------------------------------------------- row slices

// VEC elements of T in one 16-byte (or smaller) register-friendly package.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Packed {
  T v[VEC];
};

// Reads `width` (<= VEC) elements at src as fp32. ALIGNED: one VEC-wide load, valid only when
// width == VEC and src is aligned to sizeof(T) * VEC (the CUDA launcher checks both).
template <typename T, int VEC, bool ALIGNED>
DOCQA_HD DOCQA_INLINE void load_slice(const T* src, int width, float (&x)[VEC]) {
  if constexpr (ALIGNED) {
    const Packed<T, VEC> p = *reinterpret_cast<const Packed<T, VEC>*>(src);
    DOCQA_UNROLL
    for (int j = 0; j < VEC; ++j) x[j] = static_cast<float>(p.v[j]);
  } else if (width == VEC) {  // branch-free body a CPU compiler can vectorise
    DOCQA_UNROLL
    for (int j = 0; j < VEC; ++j) x[j] = static_cast<float>(src[j]);
  } else {
    DOCQA_UNROLL
    for (int j = 0; j < VEC; ++j) x[j] = j < width ? static_cast<float>(src[j]) : 0.0f;
  }
}

template <typename T, int VEC, bool ALIGNED>
DOCQA_HD DOCQA_INLINE void store_slice(T* dst, int width, const float (&acc)[VEC]) {
  if constexpr (ALIGNED) {
    Packed<T, VEC> p;
    DOCQA_UNROLL
    for (int j = 0; j < VEC; ++j) p.v[j] = static_cast<T>(acc[j]);
    *reinterpret_cast<Packed<T, VEC>*>(dst) = p;
  } else if (width == VEC) {
    DOCQA_UNROLL
    for (int j = 0; j < VEC; ++j) dst[j] = static_cast<T>(acc[j]);
  } else {
    DOCQA_UNROLL
    for (int j = 0; j < VEC; ++j)
      if (j < width) dst[j] = static_cast<T>(acc[j]);
  }
}

// Merges columns [col, col + width) of one row over all parts into acc (fp32), parts in
// order 0..n-1. Parts go kPartsInFlight at a time: weights first, then every (predicated)
// load, then the FMAs, so a GPU thread has that many independent loads outstanding.
template <typename T, int VEC, bool ALIGNED, class Row>
DOCQA_HD DOCQA_INLINE void merge_row_slice(const Row& parts, const RowStats& st, int64_t col, int width,
                                           float (&acc)[VEC]) {
  constexpr int K = Row::kPartsInFlight;
  DOCQA_UNROLL
  for (int j = 0; j < VEC; ++j) acc[j] = 0.0f;
  const int n = parts.count();
  for (int i0 = 0; i0 < n; i0 += K) {
    float w[K];
    float x[K][VEC];
    DOCQA_UNROLL
    for (int k = 0; k < K; ++k) w[k] = i0 + k < n ? part_weight(parts.lse(i0 + k), st) : 0.0f;
    DOCQA_UNROLL
    for (int k = 0; k < K; ++k) {
      // `!(w > 0)` also skips NaN weights: an empty part is never read.
      if (w[k] > 0.0f) {
        load_slice<T, VEC, ALIGNED>(parts.out(i0 + k) + col, width, x[k]);
      } else {
        DOCQA_UNROLL
        for (int j = 0; j < VEC; ++j) x[k][j] = 0.0f;
      }
    }
    DOCQA_UNROLL
    for (int k = 0; k < K; ++k)
      if (w[k] > 0.0f) {
        DOCQA_UNROLL
        for (int j = 0; j < VEC; ++j) acc[j] += w[k] * x[k][j];
      }
  }
}

// Output row / LSE offsets in the contiguous (B, S, H, D) out and (B, H, S) lse_out.
DOCQA_HD DOCQA_INLINE int64_t out_row_offset(int64_t row, int64_t D) { return row * D; }
DOCQA_HD DOCQA_INLINE int64_t lse_out_offset(const RowCoord& r, int64_t S, int64_t H) {
  return (r.b * H + r.h) * S + r.s;
}

}  // namespace merge_attention
}  // namespace docqa_fast
