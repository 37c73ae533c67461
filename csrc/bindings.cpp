// The one Python module of the extension, docqa_fast._C. The ops write into preallocated
// outputs; docqa_fast/<family>/ allocates them and wraps each op as a torch.library custom op.
#include <torch/extension.h>

#include "merge_attention/merge_attention_ops.h"
#include "packing/packing_ops.h"

namespace {

bool compiled_with_cuda() {
#if defined(DOCQA_FAST_WITH_CUDA)
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "docqa_fast C++ (CPU twins) and CUDA kernels";
  m.def("compiled_with_cuda", &compiled_with_cuda, "True when the CUDA kernels were built (else CPU twins only).");

  // The loops release the GIL: they touch no Python objects.
  m.def("merge_attention_states", &docqa_fast::merge_attention_states,
        "Merge two partial attention results by LSE into preallocated out (B, S, H, D) and lse_out (B, H, S).\n"
        "out_a, out_b: (B, S, H, D) fp16/bf16/fp32, last dim stride 1; lse_a, lse_b: (B, H, S) fp32.",
        py::arg("out_a"), py::arg("lse_a"), py::arg("out_b"), py::arg("lse_b"), py::arg("out"), py::arg("lse_out"),
        py::call_guard<py::gil_scoped_release>());
  m.def("merge_stacked_attention_states", &docqa_fast::merge_stacked_attention_states,
        "Merge n stacked partial results outs (n, B, S, H, D), lses (n, B, H, S) into preallocated\n"
        "out (B, S, H, D) and lse_out (B, H, S).",
        py::arg("outs"), py::arg("lses"), py::arg("out"), py::arg("lse_out"),
        py::call_guard<py::gil_scoped_release>());
  m.def("plan_packing", &docqa_fast::plan_packing,
        "Bin-pack sample lengths (1-D int64 CPU) into bins of max_tokens; strategy 0 greedy, 1 ffd, 2 bfd.\n"
        "Returns [item_sample, item_start, item_length, bin_offsets, bin_items] (int64).",
        py::arg("lengths"), py::arg("max_tokens"), py::arg("strategy"), py::arg("split_long"),
        py::call_guard<py::gil_scoped_release>());
  m.def("mrope_position_ids", &docqa_fast::mrope_position_ids,
        "Qwen2-VL / Qwen2.5-VL M-RoPE position ids (CPU: one pass per row, or chunked: the CUDA kernels'\n"
        "scan; CUDA kernels on CUDA tensors), no host sync.\n"
        "Returns [position_ids (3, B, T), deltas (B,), status (B, 6)] (int64).",
        py::arg("mm_token_type_ids"), py::arg("attention_mask"), py::arg("image_grid_thw"),
        py::arg("video_grid_thw"), py::arg("video_steps"), py::arg("steps_are_f32"), py::arg("spatial_merge_size"),
        py::arg("chunked") = false, py::call_guard<py::gil_scoped_release>());
  m.def("merge_visual_forward", &docqa_fast::merge_visual_forward,
        "Visual-token merge forward, one launch: out[i] = visual[slot(i)] for placeholder ids, else embeds[i].",
        py::arg("embeds"), py::arg("ids"), py::arg("token_ids"), py::arg("visual"), py::arg("out"),
        py::call_guard<py::gil_scoped_release>());
  m.def("merge_visual_backward", &docqa_fast::merge_visual_backward,
        "Visual-token merge backward, one launch, into grad_inputs and grad_visual (every row written).",
        py::arg("grad"), py::arg("ids"), py::arg("token_ids"), py::arg("grad_inputs"), py::arg("grad_visual"),
        py::call_guard<py::gil_scoped_release>());
  m.def("pack_tokens", &docqa_fast::pack_tokens,
        "Packing copy: every document's ids, labels, type ids and M-RoPE positions into one packed row,\n"
        "and joined[f] = torch.cat(parts[f]) for each f (grids, pixel values) in the same launch.",
        py::arg("ids"), py::arg("labels"), py::arg("types"), py::arg("mrope"), py::arg("ignore_index"),
        py::arg("ids_out"), py::arg("labels_out"), py::arg("types_out"), py::arg("positions_out"),
        py::arg("parts") = std::vector<std::vector<at::Tensor>>{}, py::arg("joined") = std::vector<at::Tensor>{},
        py::call_guard<py::gil_scoped_release>());
}
