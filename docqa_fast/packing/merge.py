"""``merge_visual_tokens``: visual features into the token stream, as ``masked_scatter`` does.

``inputs_embeds.masked_scatter(mask[..., None], visual)`` expands the mask to (T, hidden)
and prefix-sums it. Here the prefix sum runs over T token flags only: token i, if it is a
visual placeholder, takes row ``cumsum(mask)[i] - 1`` of the features. The backward is two
gathers: the features' gradient is the placeholder rows of the incoming gradient (row j
comes from the position of the j-th placeholder, found by ``searchsorted`` on the same
prefix sum, so nothing syncs), the embeddings' gradient is the incoming gradient with those
rows zeroed. Indices are clamped, so even unchecked bad counts cannot read out of bounds.

Implementations: ``cuda`` -- the extension (``csrc/packing/merge_visual*``): one launch
each for forward and backward, the placeholder prefix sum computed inside it (tiles of 32
rows counted by a warp ballot, earlier tiles' counts found by a decoupled look-back), then
16-byte row copies; the C++ twin on CPU tensors runs the same per-row functions. Chosen for
CUDA tensors, and for CPU tensors when the extension is built. ``reference`` -- the PyTorch
ops above (on CPU tensors they copy only the placeholder rows: a host sync costs nothing
there). ``DOCQA_FAST_BACKEND`` forces either. Both are ``torch.library`` custom ops (forward
and backward) with fake implementations.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .._backend import choose_backend, extension
from .._validation import FLOAT_DTYPES, check_same_device, check_tensor

_IMPLEMENTED = ("cuda",)  # the extension: CUDA kernels, and their C++ twins on CPU tensors


def _backend(device: torch.device, dtype: torch.dtype) -> str:
    """The project's dispatch; CPU tensors take the C++ twin when it is built (this family's
    CPU code runs in data loaders, and the twin copies rows about twice as fast as
    ``masked_scatter`` there). ``DOCQA_FAST_BACKEND`` still forces either path."""
    return choose_backend("merge_visual_tokens", device, _IMPLEMENTED, dtype, cpu_twin=True)
INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _positions(input_ids: torch.Tensor, token_ids: torch.Tensor):
    """Flattened placeholder mask (N,) and its inclusive prefix sum."""
    mask = torch.isin(input_ids.reshape(-1), token_ids)
    return mask, mask.cumsum(0)


def _ids_for_extension(input_ids: torch.Tensor) -> torch.Tensor:
    """Flat contiguous ids in a dtype the kernels read in place (int32 / int64)."""
    flat = input_ids.reshape(-1)
    return flat.contiguous() if flat.dtype in (torch.int32, torch.int64) else flat.to(torch.long)


@torch.library.custom_op("docqa_fast::merge_visual_tokens", mutates_args=())
def _merge_op(inputs_embeds: torch.Tensor, input_ids: torch.Tensor, visual_embeds: torch.Tensor,
              token_ids: torch.Tensor) -> torch.Tensor:
    hidden = inputs_embeds.shape[-1]
    flat = inputs_embeds.reshape(-1, hidden)
    visual = visual_embeds.reshape(-1, hidden)
    backend = _backend(inputs_embeds.device, inputs_embeds.dtype)
    if backend == "cuda":  # one launch: the placeholder prefix sum happens inside it
        out = torch.empty(flat.shape, dtype=flat.dtype, device=flat.device)
        extension().merge_visual_forward(flat.contiguous(), _ids_for_extension(input_ids), token_ids,
                                         visual.contiguous(), out)
        return out.reshape(inputs_embeds.shape)
    mask, count = _positions(input_ids, token_ids)
    if visual.shape[0] == 0:
        return inputs_embeds.clone()
    if flat.device.type == "cpu":
        # CPU tensors have no host sync to avoid: copy just the placeholder rows.
        where = mask.nonzero().squeeze(1)
        source = (torch.arange(where.shape[0]).clamp_max(visual.shape[0] - 1))
        out = flat.clone()
        out[where] = visual[source]
        return out.reshape(inputs_embeds.shape)
    rows = visual[(count - 1).clamp(0, visual.shape[0] - 1)]
    return torch.where(mask[:, None], rows, flat).reshape(inputs_embeds.shape)


@_merge_op.register_fake
def _(inputs_embeds, input_ids, visual_embeds, token_ids):
    return torch.empty_like(inputs_embeds, memory_format=torch.contiguous_format)


@torch.library.custom_op("docqa_fast::merge_visual_tokens_backward", mutates_args=())
def _merge_backward_op(grad: torch.Tensor, input_ids: torch.Tensor, token_ids: torch.Tensor,
                       n_visual: int) -> tuple[torch.Tensor, torch.Tensor]:
    hidden = grad.shape[-1]
    grad_flat = grad.reshape(-1, hidden)
    backend = _backend(grad.device, grad.dtype)
    if backend == "cuda":  # one launch; it also zeroes the feature rows no placeholder reached
        grad_inputs = torch.empty(grad_flat.shape, dtype=grad.dtype, device=grad.device)
        grad_visual = torch.empty(n_visual, hidden, dtype=grad.dtype, device=grad.device)
        extension().merge_visual_backward(grad_flat.contiguous(), _ids_for_extension(input_ids), token_ids,
                                          grad_inputs, grad_visual)
        return grad_inputs.reshape(grad.shape), grad_visual
    mask, count = _positions(input_ids, token_ids)
    grad_inputs = grad_flat.masked_fill(mask[:, None], 0).reshape(grad.shape)
    if grad.device.type == "cpu":  # no sync to avoid: gather the first n_visual placeholder rows
        where = mask.nonzero().squeeze(1)[:n_visual]
        grad_visual = grad_flat.new_zeros(n_visual, hidden)
        grad_visual[:where.shape[0]] = grad_flat[where]
        return grad_inputs, grad_visual
    if grad_flat.shape[0] == 0:  # no token rows at all: nothing to gather from
        return grad_inputs, grad_flat.new_zeros(n_visual, hidden)
    # The j-th placeholder is the first position where the inclusive count reaches j + 1.
    wanted = torch.arange(1, n_visual + 1, device=grad.device, dtype=count.dtype)
    where = torch.searchsorted(count, wanted)
    found = where < count.shape[0]  # fewer placeholders than features: those rows get 0
    grad_visual = torch.where(found[:, None], grad_flat[where.clamp_max(max(count.shape[0] - 1, 0))], 0)
    return grad_inputs, grad_visual


@_merge_backward_op.register_fake
def _(grad, input_ids, token_ids, n_visual):
    return (torch.empty_like(grad, memory_format=torch.contiguous_format),
            grad.new_empty(n_visual, grad.shape[-1]))


def _setup(ctx, inputs, output):
    inputs_embeds, input_ids, visual_embeds, token_ids = inputs
    ctx.save_for_backward(input_ids, token_ids)
    ctx.visual_shape = visual_embeds.shape


def _backward(ctx, grad):
    input_ids, token_ids = ctx.saved_tensors
    hidden = grad.shape[-1]
    n_visual = ctx.visual_shape.numel() // hidden if hidden else 0
    grad_inputs, grad_visual = _merge_backward_op(grad, input_ids, token_ids, n_visual)
    return grad_inputs, None, grad_visual.reshape(ctx.visual_shape), None


_merge_op.register_autograd(_backward, setup_context=_setup)


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
    check_tensor("inputs_embeds", inputs_embeds, dtypes=FLOAT_DTYPES, ndims=(2, 3))
    check_tensor("input_ids", input_ids, dtypes=INT_DTYPES)
    if tuple(input_ids.shape) != tuple(inputs_embeds.shape[:-1]):
        raise ValueError(f"expected input_ids of shape {tuple(inputs_embeds.shape[:-1])} (inputs_embeds without "
                         f"its hidden dimension), got {tuple(input_ids.shape)}")
    check_tensor("visual_embeds", visual_embeds, dtypes=FLOAT_DTYPES)
    hidden = inputs_embeds.shape[-1]
    if visual_embeds.dim() == 0 or visual_embeds.shape[-1] != hidden:
        raise ValueError(f"expected visual_embeds with a last dimension of {hidden} (the hidden size of "
                         f"inputs_embeds), got shape {tuple(visual_embeds.shape)}")
    if visual_embeds.dtype != inputs_embeds.dtype:
        raise TypeError(f"expected visual_embeds of dtype {inputs_embeds.dtype} (the dtype of inputs_embeds), "
                        f"got {visual_embeds.dtype}")
    check_same_device(("inputs_embeds", "input_ids", "visual_embeds"), (inputs_embeds, input_ids, visual_embeds))
    token_ids = _token_id_tensor(token_id, input_ids.device)
    if check and not torch.compiler.is_compiling():
        n_tokens = int(torch.isin(input_ids, token_ids).sum())
        n_features = visual_embeds.numel() // hidden
        if n_tokens != n_features:
            raise ValueError(f"visual features and visual tokens do not match: tokens: {n_tokens}, "
                             f"features: {n_features} (visual_embeds of shape {tuple(visual_embeds.shape)})")
    return _merge_op(inputs_embeds, input_ids, visual_embeds, token_ids)
