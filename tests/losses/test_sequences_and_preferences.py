"""sequence_logprobs over padded and packed batches; DPO / LongPO against hand-written formulas; the modules."""

import math

import pytest
import torch

from docqa_fast.losses import (
    FusedLinearDPOLoss,
    FusedLinearLongPOLoss,
    LinearCrossEntropyLoss,
    dpo_loss,
    longpo_loss,
    sequence_logprobs,
)
from docqa_fast.reference.losses import (
    fused_linear_dpo_loss_ref,
    fused_linear_longpo_loss_ref,
    linear_cross_entropy_ref,
    sequence_logprobs_ref,
)
from loss_checks import check_by_rule, random_head, random_labels

pytestmark = pytest.mark.backends("reference", "triton")


# ------------------------------------------------------------------ sequence_logprobs

@pytest.mark.parametrize("average", [False, True])
def test_packed_sequences(backend, dtype, device, average):
    # Lengths 5, 0 (an empty sequence), 17, 1, 30; a sequence whose labels are all ignored.
    cu_seqlens = torch.tensor([0, 5, 5, 22, 23, 53], dtype=torch.int32, device=device)
    hidden, weight, _ = random_head(53, 32, 150, dtype, device)
    labels = random_labels((53,), 150, device)
    labels[22] = -100

    def ours(hidden, weight):
        return sequence_logprobs(hidden, weight, labels, cu_seqlens=cu_seqlens, average=average)

    def ref(hidden, weight, upcast):
        return sequence_logprobs_ref(hidden, weight, labels, cu_seqlens=cu_seqlens, average=average, upcast=upcast)

    out = check_by_rule(ours, ref, {"hidden": hidden, "weight": weight})[0]
    assert out.shape == (5,) and out[1] == 0 and out[3] == 0


@pytest.mark.parametrize("average", [False, True])
def test_padded_sequences(backend, dtype, device, average):
    hidden, weight, _ = random_head(19, 32, 120, dtype, device, batch=3)
    labels = random_labels((3, 19), 120, device)
    attention_mask = torch.ones(3, 19, dtype=torch.long, device=device)
    attention_mask[0, 12:] = 0  # right padding
    attention_mask[1, :7] = 0  # left padding
    attention_mask[2] = 0  # nothing at all

    def ours(hidden, weight):
        return sequence_logprobs(hidden, weight, labels, attention_mask=attention_mask, average=average)

    def ref(hidden, weight, upcast):
        return sequence_logprobs_ref(hidden, weight, labels, attention_mask=attention_mask, average=average,
                                     upcast=upcast)

    out = check_by_rule(ours, ref, {"hidden": hidden, "weight": weight})[0]
    assert out.shape == (3,) and out[2] == 0


def test_packed_equals_padded(backend, device):
    hidden, weight, _ = random_head(8, 16, 64, torch.float32, device, batch=2)
    labels = random_labels((2, 8), 64, device)
    padded = sequence_logprobs(hidden, weight, labels)
    cu_seqlens = torch.tensor([0, 8, 16], device=device)
    packed = sequence_logprobs(hidden.reshape(16, 16), weight, labels.reshape(16), cu_seqlens=cu_seqlens)
    torch.testing.assert_close(packed, padded)


# --------------------------------------------------------------- DPO / LongPO formulas

def _log_sigmoid(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _sigmoid(x):
    return 1 / (1 + math.exp(-x))


def _dpo_by_hand(pc, pr, rc, rr, beta, eps, loss_type):
    """(loss, d loss / d pc) of one pair, written out; d/d pr is the negative."""
    m = (pc - pr) - (rc - rr)
    if loss_type == "sigmoid":
        loss = -(1 - eps) * _log_sigmoid(beta * m) - eps * _log_sigmoid(-beta * m)
        grad = -(1 - eps) * beta * _sigmoid(-beta * m) + eps * beta * _sigmoid(beta * m)
    elif loss_type == "ipo":
        loss = (m - 1 / (2 * beta)) ** 2
        grad = 2 * (m - 1 / (2 * beta))
    else:
        loss = max(0.0, 1 - beta * m)
        grad = -beta if 1 - beta * m > 0 else 0.0
    return loss, grad


def _pairs(device, n=6):
    logps = [(torch.randn(n, dtype=torch.float64, device=device) * 20 - 150) for _ in range(4)]
    return [t.requires_grad_() for t in logps]


@pytest.mark.parametrize(("loss_type", "eps", "beta"), [("sigmoid", 0.0, 0.1), ("sigmoid", 0.2, 0.05),
                                                         ("ipo", 0.0, 0.1), ("hinge", 0.0, 0.02)])
def test_dpo_loss_matches_formula(device, loss_type, eps, beta):
    pc, pr, rc, rr = _pairs(device)
    losses, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps,
                                                        loss_type=loss_type)
    grads = torch.autograd.grad(losses.sum(), (pc, pr, rc, rr))
    for i in range(pc.shape[0]):
        loss, grad = _dpo_by_hand(pc[i].item(), pr[i].item(), rc[i].item(), rr[i].item(), beta, eps, loss_type)
        assert losses[i].item() == pytest.approx(loss, rel=1e-12, abs=1e-12)
        assert grads[0][i].item() == pytest.approx(grad, rel=1e-12, abs=1e-12)
        assert grads[1][i].item() == pytest.approx(-grad, rel=1e-12, abs=1e-12)
        assert grads[2][i].item() == pytest.approx(-grad, rel=1e-12, abs=1e-12)
        assert chosen_rewards[i].item() == pytest.approx(beta * (pc[i] - rc[i]).item())
        assert rejected_rewards[i].item() == pytest.approx(beta * (pr[i] - rr[i]).item())
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad


def test_longpo_loss_matches_formula(device):
    pc, pr, rc, rr = _pairs(device)
    nll = (torch.rand(6, dtype=torch.float64, device=device) * 3).requires_grad_()
    beta, lam = 0.01, 0.01
    losses, chosen_rewards, _ = longpo_loss(pc, pr, rc, rr, nll, beta=beta, lam=lam)
    d_pc, d_nll = torch.autograd.grad(losses.sum(), (pc, nll))
    for i in range(6):
        dpo, grad = _dpo_by_hand(pc[i].item(), pr[i].item(), rc[i].item(), rr[i].item(), beta, 0.0, "sigmoid")
        assert losses[i].item() == pytest.approx(nll[i].item() + lam * dpo, rel=1e-12)
        assert d_pc[i].item() == pytest.approx(lam * grad, rel=1e-12)
        assert d_nll[i].item() == 1.0
    torch.testing.assert_close(chosen_rewards, beta * (pc - rc).detach())


# ----------------------------------------------------------------------------- modules

def _pair_batch(dtype, device, batch=2, answer=11, hidden_size=32, vocab=130):
    hidden_c, weight, _ = random_head(answer, hidden_size, vocab, dtype, device, batch=batch)
    hidden_r, _, _ = random_head(answer + 4, hidden_size, vocab, dtype, device, batch=batch)
    labels_c = random_labels((batch, answer), vocab, device)
    labels_r = random_labels((batch, answer + 4), vocab, device)
    labels_c[:, :3] = -100  # prompt tokens
    labels_r[0, -4:] = -100  # padding
    ref_c = torch.randn(batch, device=device) * 5 - 40
    ref_r = torch.randn(batch, device=device) * 5 - 45
    return weight, hidden_c, hidden_r, labels_c, labels_r, ref_c, ref_r


@pytest.mark.parametrize(("loss_type", "eps"), [("sigmoid", 0.0), ("sigmoid", 0.1), ("ipo", 0.0), ("hinge", 0.0)])
def test_fused_linear_dpo_module(backend, dtype, device, loss_type, eps):
    weight, hidden_c, hidden_r, labels_c, labels_r, ref_c, ref_r = _pair_batch(dtype, device)
    if loss_type == "ipo":  # IPO compares per-token means: reference means too
        ref_c, ref_r = ref_c / 8, ref_r / 10
    module = FusedLinearDPOLoss(beta=0.1, label_smoothing=eps, loss_type=loss_type)

    def ours(weight, hidden_c, hidden_r):
        return module(weight, hidden_c, hidden_r, labels_c, labels_r, ref_c, ref_r)

    def ref(weight, hidden_c, hidden_r, upcast):
        return fused_linear_dpo_loss_ref(weight, hidden_c, hidden_r, labels_c, labels_r, ref_c, ref_r, beta=0.1,
                                         label_smoothing=eps, loss_type=loss_type, upcast=upcast)

    # Rewards are detached: only the loss carries a gradient.
    check_by_rule(ours, ref, {"weight": weight, "hidden_c": hidden_c, "hidden_r": hidden_r},
                  grad_outputs=[torch.ones((), dtype=torch.float64)] + [torch.zeros(2, dtype=torch.float64)] * 2)


def test_fused_linear_longpo_module(backend, dtype, device):
    weight, hidden_c, hidden_r, labels_c, labels_r, ref_c, ref_r = _pair_batch(dtype, device)
    module = FusedLinearLongPOLoss(beta=0.01, lam=0.01)

    def ours(weight, hidden_c, hidden_r):
        return module(weight, hidden_c, hidden_r, labels_c, labels_r, ref_c, ref_r)

    def ref(weight, hidden_c, hidden_r, upcast):
        return fused_linear_longpo_loss_ref(weight, hidden_c, hidden_r, labels_c, labels_r, ref_c, ref_r,
                                            beta=0.01, lam=0.01, upcast=upcast)

    check_by_rule(ours, ref, {"weight": weight, "hidden_c": hidden_c, "hidden_r": hidden_r},
                  grad_outputs=[torch.ones((), dtype=torch.float64)] + [torch.zeros(2, dtype=torch.float64)] * 2)


def test_linear_cross_entropy_module(backend, device):
    hidden, weight, bias = random_head(21, 16, 90, torch.float32, device, bias=True, batch=2)
    labels = random_labels((2, 21), 90, device)
    module = LinearCrossEntropyLoss(reduction="sum", label_smoothing=0.1, z_loss=1e-4)
    expected = linear_cross_entropy_ref(hidden, weight, labels, bias, reduction="sum", label_smoothing=0.1,
                                        z_loss=1e-4)
    torch.testing.assert_close(module(weight, hidden, labels, bias), expected)
    assert "label_smoothing=0.1" in repr(module)
