// The one Python module of the extension, docqa_fast._C. The ops write into preallocated
// outputs; docqa_fast/<family>/ allocates them and wraps each op as a torch.library custom op.
#include <torch/extension.h>

#include "merge_attention/merge_attention_ops.h"

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
}
