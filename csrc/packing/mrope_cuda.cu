// CUDA kernels of the M-RoPE position ids: one block per row, one thread per chunk of the row
// (mrope.h). Two launches, no host synchronisation, nothing else launched:
//   1. each thread summarises its chunk; the block scans the summaries (Hillis-Steele over
//      kChunks entries in shared memory) and stores the inclusive prefixes; one extra block
//      writes the prefix sums of the grids' position advances;
//   2. each block counts the vision runs of the rows before it (which grid its first run
//      takes), then each thread walks its chunk from its exact prefix, writing positions.
// The per-token work is the functions of mrope.h, shared with the CPU twin.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>

#include "packing/mrope.h"

namespace docqa_fast {
namespace packing {
namespace {

namespace mr = mrope;
using mr::Span;
constexpr int K = mr::kChunks;
static_assert(sizeof(Span) % 8 == 0, "the advance prefix sums follow the spans in one scratch buffer");

// cum[0..n] = prefix sums of the n grids' advances, by one block: each thread sums a stretch
// of grids, thread 0 scans the K partial sums, each thread then writes its stretch.
__device__ void prefix_advances(const int64_t* __restrict__ thw, int64_t n, int64_t merge, int64_t* __restrict__ cum,
                                int64_t* partial) {
  const int i = threadIdx.x;
  const int64_t per = (n + K - 1) / K;
  const int64_t begin = i * per < n ? i * per : n, end = begin + per < n ? begin + per : n;
  int64_t sum = 0;
  for (int64_t g = begin; g < end; ++g) sum += mr::grid_advance(thw + 3 * g, merge);
  partial[i] = sum;
  __syncthreads();
  if (i == 0) {
    int64_t running = 0;
    for (int j = 0; j < K; ++j) {
      const int64_t part = partial[j];
      partial[j] = running;
      running += part;
    }
    cum[0] = 0;
  }
  __syncthreads();
  int64_t running = partial[i];
  for (int64_t g = begin; g < end; ++g) {
    running += mr::grid_advance(thw + 3 * g, merge);
    cum[g + 1] = running;
  }
  __syncthreads();
}

// Blocks 0 .. B-1 scan their row; block B writes both modalities' advance prefix sums (read
// by the second kernel), so the whole call is two launches.
template <typename TypeT, typename MaskT>
__global__ void __launch_bounds__(K) mrope_scan_kernel(const TypeT* __restrict__ types,
                                                       const MaskT* __restrict__ keep, int64_t B, int64_t T,
                                                       mr::RopeArgs a, int64_t* __restrict__ image_cum,
                                                       int64_t* __restrict__ video_cum, Span* __restrict__ incl) {
  __shared__ Span s[K];
  const int64_t b = blockIdx.x;
  const int i = threadIdx.x;
  if (b == B) {
    __shared__ int64_t partial[K];
    prefix_advances(a.grids[0].thw, a.grids[0].n, a.merge, image_cum, partial);
    prefix_advances(a.grids[1].thw, a.grids[1].n, a.merge, video_cum, partial);
    return;
  }
  int64_t begin, end;
  mr::chunk_range(T, i, &begin, &end);
  s[i] = mr::summarize(types + b * T, keep + b * T, begin, end);
  __syncthreads();
  // Inclusive scan in log2(K) steps; combine() is associative, not commutative: left operand first.
  for (int d = 1; d < K; d <<= 1) {
    Span x = s[i];
    if (i >= d) x = mr::combine(s[i - d], x);
    __syncthreads();
    s[i] = x;
    __syncthreads();
  }
  incl[b * K + i] = s[i];
}

template <typename TypeT, typename MaskT>
__global__ void __launch_bounds__(K) mrope_walk_kernel(const TypeT* __restrict__ types,
                                                       const MaskT* __restrict__ keep, int64_t B, int64_t T,
                                                       mr::RopeArgs a, const Span* __restrict__ incl,
                                                       int64_t* __restrict__ pos, int64_t* __restrict__ delta,
                                                       int64_t* __restrict__ status) {
  __shared__ unsigned long long runs_sh[2], bad_sh, first_bad_sh;
  __shared__ long long max_sh;
  __shared__ int64_t detail_sh[3];
  const int64_t b = blockIdx.x;
  const int i = threadIdx.x;
  constexpr unsigned long long kNoBad = ~0ull;
  if (i == 0) {
    runs_sh[0] = runs_sh[1] = bad_sh = 0;
    first_bad_sh = kNoBad;
    max_sh = -1;
    detail_sh[0] = -1;
    detail_sh[1] = detail_sh[2] = 0;
  }
  __syncthreads();
  // Runs of each modality in rows 0 .. b-1 (each row's total is the last inclusive prefix).
  unsigned long long r0 = 0, r1 = 0;
  for (int64_t bb = i; bb < b; bb += K) {
    r0 += incl[bb * K + K - 1].starts[0];
    r1 += incl[bb * K + K - 1].starts[1];
  }
  if (r0) atomicAdd(&runs_sh[0], r0);
  if (r1) atomicAdd(&runs_sh[1], r1);
  __syncthreads();
  const int64_t row_runs[2] = {static_cast<int64_t>(runs_sh[0]), static_cast<int64_t>(runs_sh[1])};

  int64_t begin, end;
  mr::chunk_range(T, i, &begin, &end);
  Span prefix = i == 0 ? mr::empty_span(true) : incl[b * K + i - 1];
  const mr::ChunkResult r = mr::walk(a, row_runs, prefix, types + b * T, keep + b * T, begin, end, pos + b * T,
                                     pos + (B + b) * T, pos + (2 * B + b) * T);
  atomicMax(&max_sh, static_cast<long long>(r.max_pos));
  if (r.bad_runs) {
    atomicAdd(&bad_sh, static_cast<unsigned long long>(r.bad_runs));
    atomicMin(&first_bad_sh, static_cast<unsigned long long>(r.bad_col));
  }
  __syncthreads();
  // Chunks are in column order, so the smallest bad column is the row's first bad run.
  if (r.bad_runs && static_cast<unsigned long long>(r.bad_col) == first_bad_sh) {
    detail_sh[0] = r.bad_col;
    detail_sh[1] = r.bad_length;
    detail_sh[2] = r.bad_expected;
  }
  __syncthreads();
  if (i != 0) return;
  const Span& row = incl[b * K + K - 1];
  int64_t bad = static_cast<int64_t>(bad_sh);
  int64_t l, e;
  if (mr::run_ends(a, row_runs, row, mr::kNone, &l, &e) && l != e && bad++ == 0) {  // the row's last run
    detail_sh[0] = T;
    detail_sh[1] = l;
    detail_sh[2] = e;
  }
  delta[b] = max_sh + 1 - row.n_real;
  int64_t* s = status + b * mr::kStatusCols;
  s[mr::kImageRuns] = row.starts[0];
  s[mr::kVideoRuns] = row.starts[1];
  s[mr::kBadRuns] = bad;
  s[mr::kBadCol] = detail_sh[0];
  s[mr::kBadLength] = detail_sh[1];
  s[mr::kBadExpected] = detail_sh[2];
}

template <typename TypeT, typename MaskT>
void launch(const at::Tensor& types, const at::Tensor& keep, mr::RopeArgs args, const at::Tensor& positions,
            const at::Tensor& deltas, const at::Tensor& status, cudaStream_t stream) {
  const int64_t B = types.size(0), T = types.size(1);
  const int64_t n_img = args.grids[0].n, n_vid = args.grids[1].n;
  // One scratch buffer from PyTorch's caching allocator (stream ordered): the scanned chunk
  // summaries, then both modalities' advance prefix sums (Span is a multiple of 8 bytes).
  const int64_t span_bytes = B * K * static_cast<int64_t>(sizeof(Span));
  at::Tensor scratch = at::empty({span_bytes + (n_img + n_vid + 2) * 8}, types.options().dtype(at::kByte));
  Span* incl = reinterpret_cast<Span*>(scratch.data_ptr());
  int64_t* image_cum = reinterpret_cast<int64_t*>(static_cast<char*>(scratch.data_ptr()) + span_bytes);
  int64_t* video_cum = image_cum + n_img + 1;
  args.grids[0].cum_advance = image_cum;
  args.grids[1].cum_advance = video_cum;
  const TypeT* ty = types.data_ptr<TypeT>();
  const MaskT* kp = keep.data_ptr<MaskT>();
  mrope_scan_kernel<TypeT, MaskT><<<B + 1, K, 0, stream>>>(ty, kp, B, T, args, image_cum, video_cum, incl);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  mrope_walk_kernel<TypeT, MaskT><<<B, K, 0, stream>>>(ty, kp, B, T, args, incl, positions.data_ptr<int64_t>(),
                                                        deltas.data_ptr<int64_t>(), status.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void mrope_position_ids_cuda(const at::Tensor& types, const at::Tensor& keep, const mr::RopeArgs& args,
                             const at::Tensor& positions, const at::Tensor& deltas, const at::Tensor& status) {
  const c10::cuda::CUDAGuard guard(types.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto by_mask = [&](auto type_tag) {
    using TypeT = decltype(type_tag);
    switch (keep.scalar_type()) {
      case at::kBool: return launch<TypeT, bool>(types, keep, args, positions, deltas, status, stream);
      case at::kInt: return launch<TypeT, int32_t>(types, keep, args, positions, deltas, status, stream);
      default: return launch<TypeT, int64_t>(types, keep, args, positions, deltas, status, stream);
    }
  };
  if (types.scalar_type() == at::kInt) {
    by_mask(int32_t{});
  } else {
    by_mask(int64_t{});
  }
}

}  // namespace packing
}  // namespace docqa_fast
