"""Benchmarks of fused linear log-probs and preference losses (docqa_fast.losses).

Shapes (README.md, Benchmarks): N = 8K / 32K / 128K tokens through the LM head of Qwen2.5-VL-7B
(hidden 3584, vocabulary 152,064) and of Mistral-7B (hidden 4096, vocabulary 32,000), bf16, for
the cross-entropy and for DPO (N tokens in all: a chosen and a rejected answer of N / 2 each).
Forward alone and forward + backward (d hidden, d weight). Providers:

* ``docqa_fast[triton]``: linear_cross_entropy / FusedLinearDPOLoss as dispatched (no logits
  anywhere; products from the GPU's tuned choice: library matmuls unless the sweep found the
  Triton ones faster); ``docqa_fast[all-triton]``: the same with the Triton products forced
  (DOCQA_FAST_LOSSES_PRODUCTS=triton), so both paths stay measured side by side; for the
  cross-entropy's forward + backward, ``docqa_fast[fwd-grad]`` and ``docqa_fast[recompute]``:
  the two routes forced (DOCQA_FAST_LOSSES_ROUTE; gradients formed in the forward with 3
  products, row chunks of 16-bit logits from a memory budget, or the logits recomputed in the
  backward, 4 products);
  ``docqa_fast[reference]``: the same API on its CPU path (materialised logits, fp32);
* ``eager``: the naive path trainers run -- ``hidden @ weight.T`` -> fp32 cross-entropy
  (transformers' causal-LM loss) or log_softmax -> gather -> sum -> DPO (TRL);
* ``torch.compile`` of the naive path;
* ``liger``: Liger-Kernel's LigerFusedLinearCrossEntropyLoss / LigerFusedLinearDPOLoss
  (chunked logits, gradients computed in the forward), when importable;
* ``cut_cross_entropy``: Apple's Cut Cross-Entropy ``linear_cross_entropy`` (logits tiles kept
  in shared memory, gradient sparsity) -- for DPO its per-token losses summed per answer --
  when importable.

An eighth of the cross-entropy's tokens are a prompt (ignore_index), as in SFT data: ours and
Cut Cross-Entropy leave them out of the products, the naive path and Liger compute them.

Work model: 2·N·H·V FLOPs forward, 3x that for forward + backward (the backward's recompute
of the logits is not counted as work). Targets (issue 15, H200): forward + backward at most the
time of ``torch.compile``'s naive path at 8K and 32K tokens, with peak memory beyond inputs and
gradients at most 10% of the naive path's; >= 1.3x faster than Liger and >= 1.0x Cut
Cross-Entropy at equal or lower memory; 128K tokens on one card (peak memory is reported per
provider, gradients included; the fractions are read off the table). Quick sizes (CPU smoke
runs, which check that each provider runs and agrees, not what a vocabulary costs) keep the
hidden sizes of Qwen2.5-0.5B (896) and Mistral (4096) with vocabularies of 8,192 and 4,000, at
128 tokens: the full vocabularies made the losses half of a quick run's time.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from docqa_fast.losses import FusedLinearDPOLoss, linear_cross_entropy

from .harness import (CHECK_TOLERANCE, Case, Provider, compiled_provider, eager_provider, gpu_only, ours_per_backend,
                      register_family)

FAMILY = "losses"
DTYPE = torch.bfloat16
HEADS = {"qwen": (3584, 152064), "mistral": (4096, 32000)}
QUICK_HEADS = {"qwen": (896, 8192), "mistral": (4096, 4000)}
SIZES = {"full": {"ce_tokens": (8192, 32768, 131072), "dpo_tokens": (8192, 32768, 131072)},
         "quick": {"ce_tokens": (128,), "dpo_tokens": (128,)}}
BETA = 0.1


# --------------------------------------------------------------------------- inputs

def _head(params, device):
    hidden_size, vocab = params["H"], params["V"]
    weight = torch.randn(vocab, hidden_size, device=device, dtype=DTYPE) / hidden_size**0.5
    return weight.requires_grad_(params["backward"])


def _ce_inputs(params, device):
    n, hidden_size, vocab = params["N"], params["H"], params["V"]
    hidden = torch.randn(n, hidden_size, device=device, dtype=DTYPE).requires_grad_(params["backward"])
    labels = torch.randint(0, vocab, (n,), device=device)
    labels[: n // 8] = -100  # a prompt that does not count
    return hidden, _head(params, device), labels


def _dpo_inputs(params, device):
    """One pair: a chosen and a rejected answer of N / 2 tokens each."""
    n, hidden_size, vocab = params["N"] // 2, params["H"], params["V"]
    hidden_c = torch.randn(1, n, hidden_size, device=device, dtype=DTYPE).requires_grad_(params["backward"])
    hidden_r = torch.randn(1, n, hidden_size, device=device, dtype=DTYPE).requires_grad_(params["backward"])
    labels_c = torch.randint(0, vocab, (1, n), device=device)
    labels_r = torch.randint(0, vocab, (1, n), device=device)
    ref_c = torch.randn(1, device=device) - 10.5 * n
    ref_r = torch.randn(1, device=device) - 10.5 * n
    return _head(params, device), hidden_c, hidden_r, labels_c, labels_r, ref_c, ref_r


def _with_backward(forward, grads_of):
    """forward(*inputs) -> scalar loss; returns the loss and the gradients of ``grads_of(inputs)``."""

    def run(*inputs):
        loss = forward(*inputs)
        wrt = [t for t in grads_of(inputs) if t.requires_grad]
        if not wrt:
            return loss.detach()
        return (loss.detach(), *torch.autograd.grad(loss, wrt))

    return run


# ------------------------------------------------------------------------ providers

def ours_ce(hidden, weight, labels):
    return linear_cross_entropy(hidden, weight, labels)


def naive_ce(hidden, weight, labels):
    """transformers' causal-LM loss: the full logits, upcast to fp32, cross-entropy."""
    return F.cross_entropy((hidden @ weight.T).float(), labels)


_DPO = FusedLinearDPOLoss(beta=BETA)


def ours_dpo(weight, hidden_c, hidden_r, labels_c, labels_r, ref_c, ref_r):
    return _DPO(weight, hidden_c, hidden_r, labels_c, labels_r, ref_c, ref_r)[0]


def naive_dpo(weight, hidden_c, hidden_r, labels_c, labels_r, ref_c, ref_r):
    """TRL's path: logits -> log_softmax (fp32) -> gather -> masked sum -> sigmoid DPO."""

    def logps(hidden, labels):
        log_probs = (hidden @ weight.T).float().log_softmax(-1)
        mask = labels != -100
        picked = log_probs.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        return (picked * mask).sum(-1)

    margin = (logps(hidden_c, labels_c) - logps(hidden_r, labels_r)) - (ref_c - ref_r)
    return -F.logsigmoid(BETA * margin).mean()


def _cuda_peer_unavailable(module: str, name: str):
    """Why a CUDA-only peer package cannot run here, or None."""
    def check(device):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed"
        return gpu_only(f"{name} runs on CUDA only")(device)

    return check


_liger_unavailable = _cuda_peer_unavailable("liger_kernel", "Liger-Kernel")


def _liger_ce():
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss = LigerFusedLinearCrossEntropyLoss()
    return lambda hidden, weight, labels: loss(weight, hidden, labels)


def _liger_dpo():
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    # The reference log-probs are given (like ours), so Liger does not run a reference head.
    loss = LigerFusedLinearDPOLoss(beta=BETA, use_ref_model=False)

    def run(weight, hidden_c, hidden_r, labels_c, labels_r, ref_c, ref_r):
        return loss(weight, torch.cat([hidden_c, hidden_r]), torch.cat([labels_c, labels_r]))[0]

    return run


def _cce_ce():
    from cut_cross_entropy import linear_cross_entropy as cce

    # Its (embeddings, classifier, targets) order; ignore_index -100 and a mean, as ours.
    return lambda hidden, weight, labels: cce(hidden, weight, labels, ignore_index=-100, reduction="mean")


def _cce_dpo():
    from cut_cross_entropy import linear_cross_entropy as cce

    def run(weight, hidden_c, hidden_r, labels_c, labels_r, ref_c, ref_r):
        # Its per-token losses are -log p(label) (0 where ignored): an answer's log-prob is minus their sum.
        hidden, labels = torch.cat([hidden_c, hidden_r]), torch.cat([labels_c, labels_r])
        logps = -cce(hidden, weight, labels, ignore_index=-100, reduction="none").sum(-1)
        margin = (logps[0] - logps[1]) - (ref_c - ref_r)
        return -F.logsigmoid(BETA * margin).mean()

    return run


def _forced(name, fn, **env):
    """Ours on the Triton backend with losses settings forced (``env``), e.g. the Triton products."""
    return Provider(f"docqa_fast[{name}]", fn=fn, ours=True, env={"DOCQA_FAST_BACKEND": "triton", **env},
                    unavailable=ours_per_backend(fn, backends=("triton",))[0].unavailable)


def _providers(ours, naive, liger_build, grads_of, backward, cce_build, routes=False):
    """``routes``: also both routes of a mean cross-entropy with gradients, forced
    (DOCQA_FAST_LOSSES_ROUTE): ``[fwd-grad]`` forms the gradients in the forward (3 products),
    ``[recompute]`` recomputes the logits in the backward (4), whichever the tuned table picks."""
    wrap = (lambda fn: _with_backward(fn, grads_of)) if backward else (lambda fn: fn)
    liger = Provider("liger", build=lambda: wrap(liger_build()), unavailable=_liger_unavailable)
    cce = Provider("cut_cross_entropy", build=lambda: wrap(cce_build()),
                   unavailable=_cuda_peer_unavailable("cut_cross_entropy", "Cut Cross-Entropy"))
    triton, reference = ours_per_backend(wrap(ours), backends=("triton", "reference"))
    forced = [_forced("all-triton", wrap(ours), DOCQA_FAST_LOSSES_PRODUCTS="triton")]
    if routes and backward:
        forced += [_forced(route, wrap(ours), DOCQA_FAST_LOSSES_ROUTE=route) for route in ("fwd-grad", "recompute")]
    return (triton, *forced, reference, eager_provider(wrap(naive)), compiled_provider(wrap(naive)), liger, cce)


# ---------------------------------------------------------------------------- cases

@register_family(FAMILY)
def cases(quick: bool) -> list[Case]:
    sizes = SIZES["quick" if quick else "full"]
    heads = QUICK_HEADS if quick else HEADS
    dtype = str(DTYPE).removeprefix("torch.")
    found = []
    for backward in (False, True):
        mode = "fwdbwd" if backward else "fwd"
        work = 3 if backward else 1
        for model, (hidden_size, vocab) in heads.items():
            providers = _providers(ours_ce, naive_ce, _liger_ce, lambda inputs: inputs[:2], backward, _cce_ce,
                                   routes=True)
            for n in sizes["ce_tokens"]:
                params = {"N": n, "H": hidden_size, "V": vocab, "backward": backward, "dtype": dtype}
                found.append(Case(
                    family=FAMILY, name=f"ce_{model}_{mode}-N{n}", group=f"ce_{model}_{mode}",
                    description=f"linear cross-entropy {mode}, H={hidden_size} V={vocab} {dtype}",
                    params=params, sweep="N", make_inputs=_ce_inputs, providers=providers,
                    flops=work * 2 * n * hidden_size * vocab, tolerance=CHECK_TOLERANCE[DTYPE]))
            providers = _providers(ours_dpo, naive_dpo, _liger_dpo, lambda inputs: inputs[:3], backward, _cce_dpo)
            for n in sizes["dpo_tokens"]:
                params = {"N": n, "H": hidden_size, "V": vocab, "backward": backward, "dtype": dtype}
                found.append(Case(
                    family=FAMILY, name=f"dpo_{model}_{mode}-N{n}", group=f"dpo_{model}_{mode}",
                    description=f"DPO {mode}, chosen + rejected of N / 2 tokens each, H={hidden_size} V={vocab} "
                                f"{dtype}",
                    params=params, sweep="N", make_inputs=_dpo_inputs, providers=providers,
                    flops=work * 2 * n * hidden_size * vocab, tolerance=CHECK_TOLERANCE[DTYPE]))
    return found
