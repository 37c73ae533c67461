// CUDA kernels of the visual-token merge: one launch each for forward and backward, the
// placeholder prefix sum included. A block takes a tile of kMergeTileRows (32) token rows:
//   1. warp 0 tests its tile's ids (one lane per row) and counts them with a ballot;
//   2. lane 0 finds the placeholders of all earlier tiles by a decoupled look-back (Merrill &
//      Garland): it publishes its tile's count, then walks back over earlier tiles' published
//      words, adding counts until it meets a tile that published its inclusive prefix;
//   3. the block's 8 warps copy the 32 rows (16-byte vectors when the rows allow them).
// Tiles are numbered by an atomic ticket, not blockIdx, so the tile a block waits on always
// belongs to a block that is already running: the look-back cannot deadlock. The per-row
// decisions are the functions of merge_visual.h, shared with the CPU twin.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>

#include "packing/merge_visual.h"

namespace docqa_fast {
namespace packing {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
static_assert(kMergeTileRows == 32, "one warp ballot per tile");

// A tile's published word: count << 2 | flag, written and read as one 64-bit value.
constexpr unsigned long long kAggregate = 1, kInclusive = 2;

struct TileState {
  unsigned long long* ticket;  // next tile number to hand out
  unsigned long long* words;   // (n_tiles,) zero = not published yet
};

__device__ __forceinline__ unsigned long long read_word(const unsigned long long* p) {
  return *reinterpret_cast<const volatile unsigned long long*>(p);
}

// Fills slot_sh[32] with the slots of this block's tile; returns the tile number, and the
// placeholders up to the tile's end in *through_sh.
template <typename IdT>
__device__ int64_t tile_slots(const IdT* __restrict__ ids, int64_t N, const int64_t* __restrict__ token_ids,
                              int64_t n_token_ids, TileState state, int64_t* slot_sh, int64_t* tile_sh,
                              int64_t* through_sh) {
  if (threadIdx.x == 0) *tile_sh = static_cast<int64_t>(atomicAdd(state.ticket, 1ull));
  __syncthreads();
  const int64_t tile = *tile_sh;
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    const int64_t i = tile * kMergeTileRows + lane;
    const bool ph = i < N && is_placeholder(static_cast<int64_t>(ids[i]), token_ids, n_token_ids);
    const unsigned ballot = __ballot_sync(0xffffffffu, ph);
    const long long count = __popc(ballot);
    long long prefix = 0;
    if (lane == 0) {
      if (tile == 0) {
        atomicExch(&state.words[0], static_cast<unsigned long long>(count) << 2 | kInclusive);
      } else {
        // Publish the count first, so later tiles can pass over this one while it looks back.
        atomicExch(&state.words[tile], static_cast<unsigned long long>(count) << 2 | kAggregate);
        int64_t k = tile - 1;
        while (true) {
          const unsigned long long w = read_word(&state.words[k]);
          if ((w & 3ull) == 0) continue;  // that tile's block has not counted yet
          prefix += static_cast<long long>(w >> 2);
          if ((w & 3ull) == kInclusive) break;
          --k;
        }
        atomicExch(&state.words[tile], static_cast<unsigned long long>(prefix + count) << 2 | kInclusive);
      }
    }
    prefix = __shfl_sync(0xffffffffu, prefix, 0);
    slot_sh[lane] = token_slot(ph, prefix, __popc(ballot & ((1u << lane) - 1u)));
    if (lane == 0) *through_sh = prefix + count;
  }
  __syncthreads();
  return tile;
}

template <typename U>
__device__ __forceinline__ void copy_row(U* dst, const U* src, int64_t units, int lane) {
  for (int64_t k = lane; k < units; k += 32) dst[k] = src[k];
}

template <typename U>
__device__ __forceinline__ void zero_row(U* dst, int64_t units, int lane) {
  for (int64_t k = lane; k < units; k += 32) dst[k] = U{};
}

template <typename U, typename IdT>
__global__ void __launch_bounds__(kThreads)
    merge_forward_kernel(const U* __restrict__ embeds, const U* __restrict__ visual, const IdT* __restrict__ ids,
                         const int64_t* __restrict__ token_ids, int64_t n_token_ids, TileState state, int64_t N,
                         int64_t n_visual, int64_t units, U* __restrict__ out) {
  __shared__ int64_t slot_sh[kMergeTileRows], tile_sh, through_sh;
  const int64_t tile = tile_slots(ids, N, token_ids, n_token_ids, state, slot_sh, &tile_sh, &through_sh);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int r = warp; r < kMergeTileRows; r += kWarps) {
    const int64_t i = tile * kMergeTileRows + r;
    if (i >= N) break;
    const int64_t v = forward_source_row(slot_sh[r], n_visual);
    copy_row(out + i * units, v >= 0 ? visual + v * units : embeds + i * units, units, lane);
  }
}

template <typename U, typename IdT>
__global__ void __launch_bounds__(kThreads)
    merge_backward_kernel(const U* __restrict__ grad, const IdT* __restrict__ ids,
                          const int64_t* __restrict__ token_ids, int64_t n_token_ids, TileState state, int64_t N,
                          int64_t n_tiles, int64_t n_visual, int64_t units, U* __restrict__ grad_inputs,
                          U* __restrict__ grad_visual) {
  __shared__ int64_t slot_sh[kMergeTileRows], tile_sh, through_sh;
  const int64_t tile = tile_slots(ids, N, token_ids, n_token_ids, state, slot_sh, &tile_sh, &through_sh);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int r = warp; r < kMergeTileRows; r += kWarps) {
    const int64_t i = tile * kMergeTileRows + r;
    if (i >= N) break;
    const int64_t s = slot_sh[r];
    const int64_t v = backward_target_row(s, n_visual);
    if (v >= 0) copy_row(grad_visual + v * units, grad + i * units, units, lane);  // slots are unique
    if (s >= 0) {
      zero_row(grad_inputs + i * units, units, lane);
    } else {
      copy_row(grad_inputs + i * units, grad + i * units, units, lane);
    }
  }
  // The last tile knows the total: it zeroes the feature rows no placeholder reached
  // (grad_visual comes uninitialised, so the launch needs no separate fill).
  if (tile == n_tiles - 1) {
    const int64_t first = first_unreached_row(through_sh, n_visual);
    const int64_t n = (n_visual - first) * units;
    for (int64_t k = threadIdx.x; k < n; k += kThreads) grad_visual[first * units + k] = U{};
  }
}

bool aligned16(std::initializer_list<const at::Tensor*> tensors, int64_t row_bytes) {
  if (row_bytes % 16 != 0) return false;
  for (const at::Tensor* t : tensors)
    if (reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 != 0) return false;
  return true;
}

// Launch with U = int4 when every row starts 16-byte aligned, else with the element-sized type,
// and IdT the dtype of input_ids.
template <class Launch>
void launch_by_width(const at::Tensor& rows, const at::Tensor& ids, std::initializer_list<const at::Tensor*> tensors,
                     Launch&& launch) {
  const int64_t row_bytes = rows.size(1) * rows.element_size();
  auto by_ids = [&](auto unit, int64_t units) {
    if (ids.scalar_type() == at::kInt) return launch(unit, int32_t{}, units);
    return launch(unit, int64_t{}, units);
  };
  if (aligned16(tensors, row_bytes)) return by_ids(int4{}, row_bytes / 16);
  if (rows.element_size() == 4) return by_ids(float{}, rows.size(1));
  return by_ids(short{}, rows.size(1));  // fp16 / bf16 moved as raw 2-byte words
}

// Zeroed look-back state from PyTorch's caching allocator; cudaMemsetAsync is a stream-ordered
// memset (no kernel), capturable in a CUDA graph like the launch itself.
TileState make_state(const at::Tensor& like, int64_t n_tiles, at::Tensor& storage, cudaStream_t stream) {
  storage = at::empty({n_tiles + 1}, like.options().dtype(at::kLong));
  C10_CUDA_CHECK(cudaMemsetAsync(storage.data_ptr(), 0, storage.nbytes(), stream));
  auto* base = reinterpret_cast<unsigned long long*>(storage.data_ptr());
  return TileState{base, base + 1};
}

}  // namespace

void merge_visual_forward_cuda(const at::Tensor& embeds, const at::Tensor& ids, const at::Tensor& token_ids,
                               const at::Tensor& visual, const at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(embeds.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t N = embeds.size(0), V = visual.size(0);
  const int64_t n_tiles = (N + kMergeTileRows - 1) / kMergeTileRows;
  at::Tensor storage;
  const TileState state = make_state(embeds, n_tiles, storage, stream);
  launch_by_width(embeds, ids, {&embeds, &visual, &out}, [&](auto unit, auto id_tag, int64_t units) {
    using U = decltype(unit);
    using IdT = decltype(id_tag);
    merge_forward_kernel<U, IdT><<<n_tiles, kThreads, 0, stream>>>(
        static_cast<const U*>(embeds.data_ptr()), static_cast<const U*>(visual.data_ptr()), ids.data_ptr<IdT>(),
        token_ids.data_ptr<int64_t>(), token_ids.numel(), state, N, V, units, static_cast<U*>(out.data_ptr()));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void merge_visual_backward_cuda(const at::Tensor& grad, const at::Tensor& ids, const at::Tensor& token_ids,
                                const at::Tensor& grad_inputs, const at::Tensor& grad_visual) {
  const c10::cuda::CUDAGuard guard(grad.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t N = grad.size(0), V = grad_visual.size(0);
  const int64_t n_tiles = (N + kMergeTileRows - 1) / kMergeTileRows;
  at::Tensor storage;
  const TileState state = make_state(grad, n_tiles, storage, stream);
  launch_by_width(grad, ids, {&grad, &grad_inputs, &grad_visual}, [&](auto unit, auto id_tag, int64_t units) {
    using U = decltype(unit);
    using IdT = decltype(id_tag);
    merge_backward_kernel<U, IdT><<<n_tiles, kThreads, 0, stream>>>(
        static_cast<const U*>(grad.data_ptr()), ids.data_ptr<IdT>(), token_ids.data_ptr<int64_t>(),
        token_ids.numel(), state, N, n_tiles, V, units, static_cast<U*>(grad_inputs.data_ptr()),
        static_cast<U*>(grad_visual.data_ptr()));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace packing
}  // namespace docqa_fast
