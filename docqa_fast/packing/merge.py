"""``merge_visual_tokens``: visual features into the token stream, as ``masked_scatter`` does.

``inputs_embeds.masked_scatter(mask[..., None], visual)`` expands the mask to (T, hidden)
and prefix-sums it; here the prefix sum runs over T token flags only (the custom ops and their
two implementations are in :mod:`.ops`). This module validates the call and builds the
placeholder ids without a host sync.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .._validation import value_checks_enabled
from .ops import check_merge_inputs, merge_visual_tokens_op


def _token_id_tensor(token_id, device) -> torch.Tensor:
    """The placeholder ids as an int64 tensor on ``device``, built without a host sync.

    ``torch.tensor(ids, device="cuda")`` copies from pageable host memory: the stream
    synchronises (an error under ``torch.cuda.set_sync_debug_mode("error")``) and a CUDA graph
    cannot capture the copy. ``torch.full`` passes its value to the fill kernel as an
    argument: nothing is read from host memory, and a captured fill replays the same id.
    """
    if isinstance(token_id, bool):
        raise TypeError("expected token_id to be an int or a sequence of ints, got bool")
    if isinstance(token_id, int):
        ids = [token_id]
    elif isinstance(token_id, Sequence) and token_id and all(isinstance(t, int) and not isinstance(t, bool)
                                                             for t in token_id):
        ids = list(token_id)
    elif isinstance(token_id, torch.Tensor) and token_id.dim() <= 1 and not token_id.dtype.is_floating_point:
        if token_id.numel() == 0:
            raise ValueError("expected token_id to hold at least one id, got an empty tensor")
        if token_id.device.type != "cpu" or torch.compiler.is_compiling():
            # On a device already: converted there, no host copy. (Under torch.compile,
            # tolist() would break the graph; the compiled graph makes the copy.)
            return token_id.reshape(-1).to(device=device, dtype=torch.long)
        ids = token_id.reshape(-1).tolist()  # host memory: reading it waits for no device
    else:
        raise TypeError(f"expected token_id to be an int or a non-empty sequence of ints, got {token_id!r:.60}")
    fills = [torch.full((1,), i, dtype=torch.long, device=device) for i in ids]
    return fills[0] if len(fills) == 1 else torch.cat(fills)


def merge_visual_tokens(inputs_embeds: torch.Tensor, input_ids: torch.Tensor, visual_embeds: torch.Tensor,
                        token_id, *, check: bool = True) -> torch.Tensor:
    """``inputs_embeds.masked_scatter(isin(input_ids, token_id)[..., None], visual_embeds)``.

    Args:
        inputs_embeds: (B, T, H) or (T, H) token embeddings, fp16/bf16/fp32.
        input_ids: (B, T) or (T,) token ids, shaped like ``inputs_embeds[..., 0]``.
        visual_embeds: (N, H) (or any shape ending in H) features, in order, same dtype
            and device as ``inputs_embeds``.
        token_id: the placeholder id, or a sequence of them (image and video ids), or an
            integer tensor of them. Ints (and a CPU tensor's values) are filled into a device
            tensor by kernels, never copied from host memory: nothing syncs, and a CUDA graph
            captures them.
        check: verify that the number of placeholders equals N (one host sync; a
            ``ValueError`` like transformers' on mismatch). ``check=False`` never syncs and
            is CUDA-graph capturable; surplus placeholders then repeat the last feature row
            and surplus features are ignored (no out-of-bounds access either way).

    Returns:
        A new tensor shaped like ``inputs_embeds``. Gradients flow to ``inputs_embeds`` (its
        placeholder rows zeroed) and ``visual_embeds`` (the placeholder rows gathered).
    """
    check_merge_inputs(inputs_embeds, input_ids, visual_embeds)
    hidden = inputs_embeds.shape[-1]
    token_ids = _token_id_tensor(token_id, input_ids.device)
    if check and value_checks_enabled():
        n_tokens = int(torch.isin(input_ids, token_ids).sum())
        n_features = visual_embeds.numel() // hidden
        if n_tokens != n_features:
            raise ValueError(f"visual features and visual tokens do not match: tokens: {n_tokens}, "
                             f"features: {n_features} (visual_embeds of shape {tuple(visual_embeds.shape)})")
    return merge_visual_tokens_op(inputs_embeds, input_ids, visual_embeds, token_ids)
