"""Triton flash attention for training: forward with LSE, and backward (delta, dK/dV, dQ).

One set of kernels serves the dense (B, S, H, D) and the packed varlen (total, H, D)
layouts: a sequence is (start token, length, batch stride); dense sequences start at 0
with a batch stride, varlen ones start at ``cu_seqlens[b]`` with batch stride 0.

Semantics are flash-attn 2's (docqa_fast/reference/attention.py): GQA (query head h reads
KV head h // (H / Hk)), causal and sliding windows aligned bottom-right (query i sees keys
[i + Sk - Sq - left, i + Sk - Sq + right]), softcap ``cap * tanh(s / cap)``, LSE fp32 in
natural log; a query that sees no key gets out 0 and LSE -inf.

Techniques: scores are taken in base 2 with the softmax scale and log2(e) folded into one
multiplier (exp2 is one instruction); key blocks outside a query block's causal / window
band are never visited (the loop bounds are computed per block), and the visited ones run in
two stages: its inside (blocks every row of the tile sees in full) with no mask and unmasked
loads, then its edges with the mask; head dims that are not powers of two (80, 96, 192) are
masked, not padded by a copy. Causal query blocks run longest first. The grid is (block,
sequence, head), so a packed batch holds at most 65,535 sequences (CUDA's y-axis limit, as
in flash-attn; the front end checks it). The
backward is the FlashAttention-2 split: a small kernel for delta = rowsum(dO * O), one kernel
per KV block accumulating dK/dV over every query head of its group (no atomics, so the
gradients are bitwise reproducible), one kernel per query block for dQ.
"""

from .launch import TUNABLE, backward, default_tiles, forward, tile_key  # noqa: F401  (registers the configs)
