"""The packing family's dispatch entries and custom ops.

Every op here has two implementations (``docqa_fast._backend``): ``extension`` -- the C++ and
CUDA code of ``csrc/packing/`` (CUDA kernels for CUDA tensors; on CPU tensors their C++ twins,
which share the per-element functions and are the data loader's fast path, so CPU tensors take
them by default too) -- and ``reference``, whole-tensor PyTorch. ``DOCQA_FAST_BACKEND`` forces
either.

* ``get_rope_index``: :mod:`.rope_extension` / :mod:`.rope_tensor`; the extension is not
  eligible for a video time step multiplied in half precision (only the tensor ops round like
  transformers there) or under ``torch.compile`` (its call is not a registered op).
* ``merge_visual_tokens`` (+ its backward): custom ops. The extension makes one launch each
  for forward and backward, the placeholder prefix sum inside it (tiles of 32 rows counted by a
  warp ballot, earlier tiles' counts found by a decoupled look-back), then 16-byte row copies.
  The tensor path: token i, if it is a placeholder, takes feature row ``cumsum(mask)[i] - 1``;
  the backward gathers the j-th placeholder's row (``searchsorted`` on the same prefix sum,
  no sync) and zeroes those rows of the embeddings' gradient. Indices are clamped, so even
  unchecked bad counts cannot read out of bounds.
* ``pack_tokens``: every document's token fields into one packed row and, in the same launch,
  the vision fields (grids, pixel values, seconds per grid step) joined as torch.cat joins them
  (the extension: one launch, or its C++ twin; the reference: ``torch.cat`` per field).
* ``plan_packing``: the C++ bin-packing planner, or the Python reference planner.
"""

from __future__ import annotations

import torch

from .._backend import Implementation, extension, register_op
from .._validation import FLOAT_DTYPES, check_int, check_same_device, check_tensor
from .rope_extension import rope_index_extension
from .rope_tensor import rope_index_tensor

# ------------------------------------------------------------------------ get_rope_index


def _rope_extension_eligible(input_ids, mm_token_type_ids, image_grid, video_grid, steps, *rest):
    if steps.dtype in (torch.float16, torch.bfloat16):
        return "a video time step multiplied in half precision rounds as only the tensor path mirrors"
    if torch.compiler.is_compiling():
        return "under torch.compile the tensor path is traced (the extension call is not a registered op)"
    return None


GET_ROPE_INDEX = register_op(
    "get_rope_index",
    Implementation("extension", rope_index_extension, eligible=_rope_extension_eligible, cpu=True),
    Implementation("reference", rope_index_tensor),
)


# ------------------------------------------------------------------- merge_visual_tokens

def _positions(input_ids: torch.Tensor, token_ids: torch.Tensor):
    """Flattened placeholder mask (N,) and its inclusive prefix sum."""
    mask = torch.isin(input_ids.reshape(-1), token_ids)
    return mask, mask.cumsum(0)


def _ids_for_extension(input_ids: torch.Tensor) -> torch.Tensor:
    """Flat contiguous ids in a dtype the kernels read in place (int32 / int64)."""
    flat = input_ids.reshape(-1)
    return flat.contiguous() if flat.dtype in (torch.int32, torch.int64) else flat.to(torch.long)


def _merge_extension(inputs_embeds, input_ids, visual_embeds, token_ids):
    hidden = inputs_embeds.shape[-1]
    flat = inputs_embeds.reshape(-1, hidden)
    out = torch.empty(flat.shape, dtype=flat.dtype, device=flat.device)
    extension().merge_visual_forward(flat.contiguous(), _ids_for_extension(input_ids), token_ids,
                                     visual_embeds.reshape(-1, hidden).contiguous(), out)
    return out.reshape(inputs_embeds.shape)


def _merge_tensor(inputs_embeds, input_ids, visual_embeds, token_ids):
    hidden = inputs_embeds.shape[-1]
    flat = inputs_embeds.reshape(-1, hidden)
    visual = visual_embeds.reshape(-1, hidden)
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


def _merge_backward_extension(grad, input_ids, token_ids, n_visual):
    # One launch; it also zeroes the feature rows no placeholder reached.
    hidden = grad.shape[-1]
    grad_flat = grad.reshape(-1, hidden)
    grad_inputs = torch.empty(grad_flat.shape, dtype=grad.dtype, device=grad.device)
    grad_visual = torch.empty(n_visual, hidden, dtype=grad.dtype, device=grad.device)
    extension().merge_visual_backward(grad_flat.contiguous(), _ids_for_extension(input_ids), token_ids,
                                      grad_inputs, grad_visual)
    return grad_inputs.reshape(grad.shape), grad_visual


def _merge_backward_tensor(grad, input_ids, token_ids, n_visual):
    hidden = grad.shape[-1]
    grad_flat = grad.reshape(-1, hidden)
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


MERGE_VISUAL_TOKENS = register_op(
    "merge_visual_tokens",
    Implementation("extension", _merge_extension, cpu=True),
    Implementation("reference", _merge_tensor),
)
MERGE_VISUAL_TOKENS_BACKWARD = register_op(
    "merge_visual_tokens_backward",
    Implementation("extension", _merge_backward_extension, cpu=True),
    Implementation("reference", _merge_backward_tensor),
)


INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def check_merge_inputs(inputs_embeds, input_ids, visual_embeds, token_ids=None) -> None:
    """merge_visual_tokens' checks that read no tensor value (the public function's and the ops')."""
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
    tensors = [("inputs_embeds", inputs_embeds), ("input_ids", input_ids), ("visual_embeds", visual_embeds)]
    if token_ids is not None:
        check_tensor("token_ids", token_ids, dtypes=(torch.int64,), ndims=(1,))
        tensors.append(("token_ids", token_ids))
    check_same_device(*zip(*tensors))


@torch.library.custom_op("docqa_fast::merge_visual_tokens", mutates_args=())
def merge_visual_tokens_op(inputs_embeds: torch.Tensor, input_ids: torch.Tensor, visual_embeds: torch.Tensor,
                           token_ids: torch.Tensor) -> torch.Tensor:
    check_merge_inputs(inputs_embeds, input_ids, visual_embeds, token_ids)
    return MERGE_VISUAL_TOKENS(inputs_embeds.device, inputs_embeds.dtype, inputs_embeds, input_ids, visual_embeds,
                               token_ids)


@merge_visual_tokens_op.register_fake
def _(inputs_embeds, input_ids, visual_embeds, token_ids):
    return torch.empty_like(inputs_embeds, memory_format=torch.contiguous_format)


@torch.library.custom_op("docqa_fast::merge_visual_tokens_backward", mutates_args=())
def merge_visual_tokens_backward_op(grad: torch.Tensor, input_ids: torch.Tensor, token_ids: torch.Tensor,
                                    n_visual: int) -> tuple[torch.Tensor, torch.Tensor]:
    check_tensor("grad", grad, dtypes=FLOAT_DTYPES, ndims=(2, 3))
    check_tensor("input_ids", input_ids, dtypes=INT_DTYPES)
    if tuple(input_ids.shape) != tuple(grad.shape[:-1]):
        raise ValueError(f"expected input_ids of shape {tuple(grad.shape[:-1])} (grad without its hidden dimension), "
                         f"got {tuple(input_ids.shape)}")
    check_tensor("token_ids", token_ids, dtypes=(torch.int64,), ndims=(1,))
    check_same_device(("grad", "input_ids", "token_ids"), (grad, input_ids, token_ids))
    check_int("n_visual", n_visual)
    return MERGE_VISUAL_TOKENS_BACKWARD(grad.device, grad.dtype, grad, input_ids, token_ids, n_visual)


@merge_visual_tokens_backward_op.register_fake
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
    grad_inputs, grad_visual = merge_visual_tokens_backward_op(grad, input_ids, token_ids, n_visual)
    return grad_inputs, None, grad_visual.reshape(ctx.visual_shape), None


merge_visual_tokens_op.register_autograd(_backward, setup_context=_setup)


# ------------------------------------------------------------------------- pack_tokens

def _joined_empty(parts, device):
    """An uninitialised torch.cat(parts): the summed rows, the parts' trailing shape and dtype."""
    return torch.empty((sum(p.shape[0] for p in parts), *parts[0].shape[1:]), dtype=parts[0].dtype, device=device)


def _pack_extension(ids, labels, types, mrope, ignore_index, device, parts):
    total = sum(t.shape[0] for t in ids)
    ids_out = torch.empty(1, total, dtype=torch.long, device=device)
    labels_out = torch.empty(1, total, dtype=torch.long, device=device)
    types_out = torch.empty(1, total, dtype=torch.int32, device=device)
    positions = torch.empty(4, 1, total, dtype=torch.long, device=device)
    joined = [_joined_empty(field, device) for field in parts]
    extension().pack_tokens(ids, labels, types, mrope, ignore_index, ids_out, labels_out, types_out, positions,
                            parts, joined)
    return ids_out, labels_out, types_out, positions, joined


def _pack_tensor(ids, labels, types, mrope, ignore_index, device, parts):
    starts = torch.tensor([0] + [t.shape[0] for t in ids[:-1]], device=device).cumsum(0)
    labels_row = torch.cat(labels)
    labels_row[starts] = ignore_index  # never predict a document's first token from the previous one
    text_pos = torch.cat([torch.arange(t.shape[0], device=device) for t in ids])
    positions = torch.cat([text_pos[None], torch.cat(mrope, dim=1)], 0).unsqueeze(1)
    return torch.cat(ids)[None], labels_row[None], torch.cat(types)[None], positions, [torch.cat(p) for p in parts]


# (input_ids, labels, mm_token_type_ids, position_ids, [torch.cat(p) for p in parts]) of a packed
# row from per-document parts: the token fields and the joined vision fields (grids, pixel
# values; each field's parts contiguous, of one dtype and trailing shape) in one launch.
PACK_TOKENS = register_op(
    "pack_tokens",
    Implementation("extension", _pack_extension, cpu=True),
    Implementation("reference", _pack_tensor),
)


# ------------------------------------------------------------------------ plan_packing

STRATEGY_CODES = {"greedy": 0, "ffd": 1, "bfd": 2}  # csrc/packing/planner.h: Strategy


def _plan_extension(lengths, max_tokens, strategy, split_long):
    sample, start, length, offsets, items = extension().plan_packing(
        lengths, max_tokens, STRATEGY_CODES[strategy], bool(split_long))
    offsets = offsets.tolist()
    if split_long:
        spans = list(zip(sample.tolist(), start.tolist(), (start + length).tolist()))
        flat = [spans[k] for k in items.tolist()]
    else:
        flat = sample[items].tolist()
    return [flat[offsets[b]:offsets[b + 1]] for b in range(len(offsets) - 1)]


def _plan_reference(lengths, max_tokens, strategy, split_long):
    from ..reference.packing import plan_packing_ref

    return plan_packing_ref(lengths.tolist(), max_tokens, strategy=strategy, split_long=split_long)


PLAN_PACKING = register_op(
    "plan_packing",
    Implementation("extension", _plan_extension, cpu=True),
    Implementation("reference", _plan_reference),
)
