"""Shared checks of the losses tests: a fused computation against the materialised reference.

``check_by_rule`` runs our function on inputs of the test's dtype, the reference on the same
values in fp64 (exact) and in plain PyTorch at the inputs' dtype (``upcast=False``), with
one non-uniform upstream gradient for all three, and applies flash-attn's rule to every
output (factor 2) and every gradient (factor 3).
"""

from __future__ import annotations

import torch

from docqa_fast.testing import assert_close_by_rule


def random_head(n_rows, hidden_size, vocab, dtype, device, *, bias=False, batch=None, scale=1.0):
    """hidden, weight, bias: logits of a few units (a trained head's range), never all-zero."""
    shape = (batch, n_rows, hidden_size) if batch else (n_rows, hidden_size)
    hidden = torch.randn(shape, device=device).to(dtype)
    weight = (torch.randn(vocab, hidden_size, device=device) * (scale * 2.0 / hidden_size ** 0.5)).to(dtype)
    b = (torch.randn(vocab, device=device) * 0.5).to(dtype) if bias else None
    return hidden, weight, b


def random_labels(shape, vocab, device, *, ignore="scattered", ignore_index=-100):
    labels = torch.randint(0, vocab, shape, device=device)
    if ignore == "everywhere":
        labels.fill_(ignore_index)
    elif ignore == "scattered":
        labels = torch.where(torch.rand(shape, device=device) < 0.3, ignore_index, labels)
    return labels


def _as_list(value):
    return list(value) if isinstance(value, (tuple, list)) else [value]


def _run(fn, tensors: dict, grads_out):
    leaves = {k: v.detach().clone().requires_grad_() for k, v in tensors.items() if v is not None}
    outs = _as_list(fn(**{k: leaves.get(k) for k in tensors}))
    total = sum((o.double() * g.to(o.device)).sum() for o, g in zip(outs, grads_out))
    grads = torch.autograd.grad(total, list(leaves.values()), allow_unused=True)
    grads = {k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(leaves.items(), grads)}
    return [o.detach() for o in outs], grads


def check_by_rule(ours, reference, tensors: dict, *, out_factor=2.0, grad_factor=3.0, grad_outputs=None):
    """Compare ``ours(**tensors)`` with ``reference(**tensors, upcast=...)`` outputs and gradients.

    ``tensors`` maps argument names to floating tensors (or None) of one dtype; every one
    gets a gradient. ``grad_outputs`` (one per output) defaults to random non-uniform weights.
    Returns our outputs.
    """
    probe = _as_list(reference(**{k: None if v is None else v.detach().double() for k, v in tensors.items()},
                               upcast=True))
    if grad_outputs is None:
        grad_outputs = [torch.randn(p.shape, dtype=torch.float64, device=p.device) for p in probe]
    got, got_grads = _run(ours, tensors, grad_outputs)
    exact, exact_grads = _run(lambda **kw: reference(**kw, upcast=True),
                              {k: None if v is None else v.double() for k, v in tensors.items()}, grad_outputs)
    plain, plain_grads = _run(lambda **kw: reference(**kw, upcast=False), tensors, grad_outputs)
    assert len(got) == len(exact), (len(got), len(exact))
    for i, (g, e, p) in enumerate(zip(got, exact, plain)):
        assert g.dtype == torch.float32, f"output {i} has dtype {g.dtype}, expected torch.float32"
        assert_close_by_rule(g, e, p, factor=out_factor, name=f"output {i}")
    for name in got_grads:
        g = got_grads[name]
        assert g.dtype == tensors[name].dtype, f"d {name} has dtype {g.dtype}"
        assert_close_by_rule(g, exact_grads[name], plain_grads[name], factor=grad_factor, name=f"d {name}")
    return got


def cross_entropy_step_memory(n_rows, hidden_size, vocab, labels_ignore="scattered"):
    """CUDA bytes a bf16 mean cross-entropy's forward + backward (linear_cross_entropy, as the
    environment routes it) holds at its peak beyond its inputs and the gradients of hidden and
    weight; a first call outside the measurement compiles and probes."""
    from docqa_fast.losses import linear_cross_entropy

    hidden, weight, _ = random_head(n_rows, hidden_size, vocab, torch.bfloat16, "cuda")
    hidden.requires_grad_()
    weight.requires_grad_()
    labels = random_labels((n_rows,), vocab, "cuda", ignore=labels_ignore)
    linear_cross_entropy(hidden, weight, labels).backward()
    hidden.grad = weight.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    linear_cross_entropy(hidden, weight, labels).backward()
    torch.cuda.synchronize()
    gradients = (hidden.numel() + weight.numel()) * 2
    return torch.cuda.max_memory_allocated() - base - gradients
