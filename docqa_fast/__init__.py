"""docqa_fast: fused Triton and CUDA kernels for long-context, image-heavy document QA models.

Public ops are drop-in replacements for the reference pieces of a VLM training and serving
stack; each dispatches per call to the CUDA extension, a Triton kernel or the pure-PyTorch
reference (see :func:`backends` and ``DOCQA_FAST_BACKEND``).
"""

from ._backend import BACKENDS, backends
from .merge_attention import merge_attention_states, merge_stacked_attention_states

__version__ = "0.1.0"

__all__ = ["BACKENDS", "backends", "merge_attention_states", "merge_stacked_attention_states", "__version__"]
