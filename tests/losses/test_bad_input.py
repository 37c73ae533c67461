"""Bad input to the losses raises TypeError / ValueError naming the argument."""

import pytest
import torch

from docqa_fast.losses import (
    FusedLinearDPOLoss,
    dpo_loss,
    linear_cross_entropy,
    linear_logprobs,
    longpo_loss,
    sequence_logprobs,
)


def _inputs(n=6, hidden_size=8, vocab=20):
    return torch.randn(n, hidden_size), torch.randn(vocab, hidden_size), torch.randint(0, vocab, (n,))


def _raises(error, match, fn, *args, **kwargs):
    with pytest.raises(error, match=match):
        fn(*args, **kwargs)


@pytest.mark.parametrize("fn", [linear_logprobs, linear_cross_entropy, sequence_logprobs])
def test_shape_mismatches(fn):
    hidden, weight, labels = _inputs()
    _raises(ValueError, "weight of shape", fn, hidden, torch.randn(20, 9), labels)
    _raises(ValueError, "labels of shape", fn, hidden, weight, labels[:5])
    _raises(ValueError, "labels of shape", fn, hidden.reshape(2, 3, 8), weight, labels)
    _raises(ValueError, "hidden with 2 or 3 dimensions", fn, hidden[0], weight, labels[0])
    _raises(ValueError, "weight with 2 dimensions", fn, hidden, weight[0], labels)


def test_dtype_mismatches():
    hidden, weight, labels = _inputs()
    _raises(TypeError, "weight of dtype torch.float32", linear_logprobs, hidden, weight.half(), labels)
    _raises(TypeError, "labels of dtype", linear_logprobs, hidden, weight, labels.float())
    _raises(TypeError, "hidden of dtype", linear_logprobs, hidden.double(), weight.double(), labels)
    _raises(TypeError, "bias of dtype torch.float32", linear_logprobs, hidden, weight, labels, torch.zeros(20).half())
    _raises(ValueError, "bias of shape", linear_cross_entropy, hidden, weight, labels, torch.zeros(19))


def test_labels_out_of_range_checked_on_request():
    hidden, weight, labels = _inputs()
    for bad in (20, -1, -5):
        wrong = labels.clone()
        wrong[3] = bad
        _raises(ValueError, r"labels in \[0, 20\)", linear_logprobs, hidden, weight, wrong, validate=True)
        _raises(ValueError, r"labels in \[0, 20\)", linear_cross_entropy, hidden, weight, wrong, validate=True)
        _raises(ValueError, r"labels in \[0, 20\)", sequence_logprobs, hidden, weight, wrong, validate=True)
        # Without validate there is no host sync and no error: the token matches no vocabulary row.
        assert torch.isfinite(linear_cross_entropy(hidden, weight, wrong))
    labels[0] = -100
    linear_logprobs(hidden, weight, labels, validate=True)  # ignore_index is fine


def test_bad_scalars():
    hidden, weight, labels = _inputs()
    _raises(ValueError, "temperature > 0", linear_logprobs, hidden, weight, labels, temperature=0.0)
    _raises(TypeError, "ignore_index to be an int", linear_logprobs, hidden, weight, labels, ignore_index=-100.0)
    _raises(ValueError, "reduction", linear_cross_entropy, hidden, weight, labels, reduction="avg")
    _raises(ValueError, "label_smoothing", linear_cross_entropy, hidden, weight, labels, label_smoothing=1.5)
    _raises(ValueError, "z_loss", linear_cross_entropy, hidden, weight, labels, z_loss=-1e-4)


def test_bad_sequences():
    hidden, weight, labels = _inputs(n=10)
    _raises(ValueError, "end at the token count 10", sequence_logprobs, hidden, weight, labels,
            cu_seqlens=torch.tensor([0, 4, 9]))
    _raises(ValueError, "non-decreasing", sequence_logprobs, hidden, weight, labels,
            cu_seqlens=torch.tensor([0, 6, 4, 10]))
    _raises(TypeError, "cu_seqlens of dtype", sequence_logprobs, hidden, weight, labels,
            cu_seqlens=torch.tensor([0.0, 10.0]))
    _raises(ValueError, "not both", sequence_logprobs, hidden, weight, labels, cu_seqlens=torch.tensor([0, 10]),
            attention_mask=torch.ones(10))
    _raises(ValueError, "attention_mask of shape", sequence_logprobs, hidden.reshape(2, 5, 8), weight,
            labels.reshape(2, 5), attention_mask=torch.ones(2, 4))


def test_bad_preference_arguments():
    logps = [torch.randn(4) for _ in range(4)]
    for beta in (0.0, -0.1):
        _raises(ValueError, "beta > 0", dpo_loss, *logps, beta=beta)
        _raises(ValueError, "beta > 0", longpo_loss, *logps, torch.rand(4), beta=beta)
        _raises(ValueError, "beta > 0", FusedLinearDPOLoss, beta=beta)
    _raises(TypeError, "beta to be a Python number", dpo_loss, *logps, beta=torch.tensor(0.1))
    _raises(ValueError, "loss_type", dpo_loss, *logps, loss_type="kto")
    _raises(ValueError, "label_smoothing", dpo_loss, *logps, label_smoothing=0.7)
    _raises(ValueError, "ref_rejected_logps of shape", dpo_loss, *logps[:3], torch.randn(5))
    _raises(ValueError, "chosen_nll of shape", longpo_loss, *logps, torch.rand(3))
    _raises(ValueError, "lam >= 0", longpo_loss, *logps, torch.rand(4), lam=-1.0)


def test_the_ops_check_their_own_arguments():
    """Direct torch.ops calls (the public functions flatten and check first) get the same kind of errors."""
    ops = torch.ops.docqa_fast
    hidden, weight, labels = _inputs()
    stats = ops.linear_logit_stats
    _raises(ValueError, "hidden with 2 dimensions", stats, hidden.reshape(2, 3, 8), weight, None, labels, -100, 1.0)
    _raises(ValueError, "weight of shape", stats, hidden, torch.randn(20, 9), None, labels, -100, 1.0)
    _raises(TypeError, "weight of dtype torch.float32", stats, hidden, weight.half(), None, labels, -100, 1.0)
    _raises(TypeError, "labels of dtype torch.int64", stats, hidden, weight, None, labels.int(), -100, 1.0)
    _raises(ValueError, "labels of shape", stats, hidden, weight, None, labels[:4], -100, 1.0)
    _raises(ValueError, "bias of shape", stats, hidden, weight, torch.zeros(19), labels, -100, 1.0)
    _raises(ValueError, "temperature > 0", stats, hidden, weight, None, labels, -100, -1.0)
    lse, coefs = torch.zeros(6), torch.zeros(4, 6)
    bound = stats(hidden, weight, None, labels, -100, 1.0)[4]
    backward = ops.linear_logit_stats_backward
    _raises(ValueError, "coefs of shape", backward, hidden, weight, None, labels, lse, coefs[:3], bound, -100, 1.0,
            True, True, False)
    _raises(TypeError, "lse of dtype", backward, hidden, weight, None, labels, lse.half(), coefs, bound, -100, 1.0,
            True, True, False)
    _raises(ValueError, "bound of shape", backward, hidden, weight, None, labels, lse, coefs, bound[:0], -100, 1.0,
            True, True, False)
