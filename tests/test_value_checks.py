"""docqa_fast.value_checks: the checks that read tensor values (host syncs) can be turned off
for trusted loops, process-wide or for a block, and come back after it."""

import pytest
import torch

import docqa_fast
from docqa_fast._validation import value_checks_enabled
from docqa_fast.rotary import apply_rotary_emb


def _tables(positions, half):
    angles = torch.arange(positions, dtype=torch.float32)[:, None] * torch.linspace(0.1, 1.0, half)
    return angles.cos(), angles.sin()


def test_off_inside_the_block_and_restored_after():
    x = torch.randn(1, 6, 2, 8)
    cos, sin = _tables(4, 4)  # 4 positions for 6 tokens: a value check refuses it
    with pytest.raises(ValueError, match="positions"):
        apply_rotary_emb(x, cos, sin)
    with docqa_fast.value_checks(False):
        assert not value_checks_enabled()
        out = apply_rotary_emb(x, cos, sin)  # the compiled path's behaviour: positions clamped
        with docqa_fast.value_checks(True):
            assert value_checks_enabled()
        assert not value_checks_enabled()
    assert value_checks_enabled()
    # Tokens 0-3 are within the table, so they agree with a table long enough for all six.
    long_cos, long_sin = _tables(6, 4)
    torch.testing.assert_close(out[:, :4], apply_rotary_emb(x, long_cos, long_sin)[:, :4])
    with pytest.raises(ValueError, match="positions"):
        apply_rotary_emb(x, cos, sin)


def test_restored_when_the_block_raises():
    with pytest.raises(RuntimeError, match="inside"):
        with docqa_fast.value_checks(False):
            raise RuntimeError("inside")
    assert value_checks_enabled()


def test_process_wide_call_and_bad_argument():
    setting = docqa_fast.value_checks(False)
    try:
        assert not value_checks_enabled()
    finally:
        setting.__exit__(None, None, None)
    assert value_checks_enabled()
    with pytest.raises(TypeError, match="enabled"):
        docqa_fast.value_checks(0)
    assert value_checks_enabled()


def test_merge_visual_tokens_honours_the_switch():
    embeds, features = torch.zeros(1, 4, 3), torch.ones(3, 3)  # 3 features for 2 placeholders
    ids = torch.tensor([[5, 9, 9, 5]])
    with pytest.raises(ValueError, match="do not match"):
        docqa_fast.merge_visual_tokens(embeds, ids, features, 9)
    with docqa_fast.value_checks(False):
        out = docqa_fast.merge_visual_tokens(embeds, ids, features, 9)  # surplus features ignored
    assert torch.equal(out[0, 1:3], features[:2]) and not out[0, [0, 3]].any()


def test_one_pass_backward_never_under_torch_deterministic_mode(monkeypatch):
    # The training op turns torch's deterministic mode into deterministic=True for our backward
    # (and keeps the cuDNN route out): the launcher then never picks the atomic one-pass kernel.
    from docqa_fast.attention import ops
    from docqa_fast.kernels import attention as kernels

    seen = []
    monkeypatch.setattr(kernels, "backward", lambda *args: seen.append(args[-1]))
    q = torch.zeros(1, 2, 1, 8, dtype=torch.float16)
    call = (q, q, q, q, q, torch.zeros(1, 1, 2), None, None, None, 2, 2, 1.0, False, -1, -1, 0.0, None, 0.0, None)
    ops._backward_triton(*call, deterministic=False)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        ops._backward_triton(*call, deterministic=False)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert seen == [False, True]
