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
