// Tensor wrappers of the packing planner: checks, then the plain C++ planner.
#include "packing/packing_ops.h"

#include <ATen/ATen.h>
#include "messages.h"

#include <stdexcept>

#include "packing/planner.h"

namespace docqa_fast {
namespace {

at::Tensor to_tensor(std::vector<int64_t>&& v) {
  at::Tensor t = at::empty({static_cast<int64_t>(v.size())}, at::kLong);
  std::copy(v.begin(), v.end(), t.data_ptr<int64_t>());
  return t;
}

}  // namespace

std::vector<at::Tensor> plan_packing(const at::Tensor& lengths, int64_t max_tokens, int64_t strategy,
                                     bool split_long) {
  DOCQA_CHECK_TYPE(lengths.scalar_type() == at::kLong, "plan_packing: expected lengths of dtype int64, got ",
                   lengths.scalar_type());
  DOCQA_CHECK_VALUE(lengths.dim() == 1, "plan_packing: expected 1-D lengths, got shape ", lengths.sizes());
  DOCQA_CHECK_VALUE(lengths.device().is_cpu(), "plan_packing: expected lengths on the CPU, got ", lengths.device());
  DOCQA_CHECK_VALUE(strategy >= 0 && strategy <= 2, "plan_packing: unknown strategy code ", strategy);
  const at::Tensor contiguous = lengths.contiguous();
  packing::Plan p;
  try {
    p = packing::plan(contiguous.data_ptr<int64_t>(), contiguous.numel(), max_tokens,
                      static_cast<packing::Strategy>(strategy), split_long);
  } catch (const std::invalid_argument& e) {
    DOCQA_CHECK_VALUE(false, "plan_packing: ", e.what());
  }
  return {to_tensor(std::move(p.item_sample)), to_tensor(std::move(p.item_start)),
          to_tensor(std::move(p.item_length)), to_tensor(std::move(p.bin_offsets)),
          to_tensor(std::move(p.bin_items))};
}

}  // namespace docqa_fast
