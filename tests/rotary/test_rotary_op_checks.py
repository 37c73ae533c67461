"""The rotary op (``torch.ops.docqa_fast.rotary``) checks its tables by apply_rotary_emb's rule
(``check_tables``, one rule for both): the same bad table gets the same message from either, and
the op refuses what the kernel cannot read (a table strided along a row), which it let through
when it re-wrote part of the rule."""

import pytest
import torch

from docqa_fast.rotary import apply_rotary_emb

TOKENS, HEADS, DIM = 6, 2, 8


def _tables(positions=16, half=DIM // 4):
    angles = torch.rand(positions, half)
    return angles.cos().half(), angles.sin().half()


BAD_TABLES = {
    "strided along a row": (lambda cos, sin: (cos.repeat(1, 2)[:, ::2], sin), ValueError, "contiguous last dimension"),
    "shapes differ": (lambda cos, sin: (cos, sin[:, :1]), ValueError, r"sin of shape \(16, 2\)"),
    "dtype not x's": (lambda cos, sin: (cos.float(), sin.float()), TypeError, "cos and sin of dtype torch.float16"),
    "rotary dim past the head dim": (lambda cos, sin: (torch.ones(16, DIM).half(), torch.ones(16, DIM).half()),
                                     ValueError, r"0 < rotary_dim <= 8"),
    "rank": (lambda cos, sin: (cos[0], sin[0]), ValueError, "cos with 2 dimensions"),
    # No row for value_checks(False)'s clamp to clamp into: the kernel would read before the table.
    "no position": (lambda cos, sin: (cos[:0], sin[:0]), ValueError, "cos with at least one position"),
}


@pytest.mark.parametrize("name", list(BAD_TABLES))
def test_op_and_front_end_refuse_a_bad_table_alike(name):
    change, error, match = BAD_TABLES[name]
    cos, sin = change(*_tables())
    x = torch.randn(TOKENS, HEADS, DIM).half()
    with pytest.raises(error, match=match) as from_op:
        torch.ops.docqa_fast.rotary(x, cos, sin, torch.arange(TOKENS), False, False)
    with pytest.raises(error) as from_front_end:
        apply_rotary_emb(x[None], cos, sin)
    assert str(from_op.value) == str(from_front_end.value)


def test_op_accepts_a_table_strided_between_rows():
    """Rows of a wider table (stride(0) > row length) are what the kernel reads: accepted."""
    cos, sin = (t.repeat(1, 2)[:, :DIM // 4] for t in _tables())
    x = torch.randn(TOKENS, HEADS, DIM).half()
    out = torch.ops.docqa_fast.rotary(x, cos, sin, torch.arange(TOKENS), False, False)
    expected = torch.ops.docqa_fast.rotary(x, cos.contiguous(), sin.contiguous(), torch.arange(TOKENS), False, False)
    assert torch.equal(out, expected)
