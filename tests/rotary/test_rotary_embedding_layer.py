"""docqa_fast.rotary.RotaryEmbedding (flash-attn's rotary module) against the reference formula:
tables from docqa_fast.reference.rotary.rotary_tables_ref and the rotation rotate_at in fp64 (the
exact result), the same in plain PyTorch at the input's precision (flash-attn's rule: at most 2x
its error, 3x for gradients). Packed qkv, grouped heads (28/4), q with kv, XPos, int and
per-sequence offsets, interleaved, rotary dim below the head dim, lengths 1 and 113; the tables'
growth; bad input."""

import pytest
import torch

from docqa_fast import value_checks
from docqa_fast.reference.rotary import rotary_tables_ref, rotate_at
from docqa_fast.rotary import RotaryEmbedding
from docqa_fast.testing import assert_close_by_rule

# The rotary op has these two implementations (no C++ one).
pytestmark = pytest.mark.backends("reference", "triton")


def _inputs(layout, batch, seqlen, heads, heads_k, head_dim, dtype, device):
    """The module's tensor arguments for a layout: (qkv,) or (q, kv)."""
    def randn(*shape):
        return torch.randn(*shape, dtype=dtype, device=device)

    if layout == "packed":
        return (randn(batch, seqlen, 3, heads, head_dim),)
    if layout == "grouped":
        return (randn(batch, seqlen, heads + 2 * heads_k, head_dim),)
    return randn(batch, seqlen, heads, head_dim), randn(batch, seqlen, 2, heads_k, head_dim)


def _split(layout, tensors, heads):
    """(q, k, v) of the module's arguments (or results)."""
    if layout == "packed":
        qkv, = tensors
        return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if layout == "grouped":
        qkv, = tensors
        heads_k = (qkv.shape[2] - heads) // 2
        return qkv[:, :, :heads], qkv[:, :, heads:heads + heads_k], qkv[:, :, heads + heads_k:]
    q, kv = tensors
    return q, kv[:, :, 0], kv[:, :, 1]


def _join(layout, q, k, v):
    if layout == "packed":
        return (torch.stack((q, k, v), dim=2),)
    if layout == "grouped":
        return (torch.cat((q, k, v), dim=2),)
    return q, torch.stack((k, v), dim=2)


def _positions(offset, batch, seqlen, device):
    starts = offset.long() if isinstance(offset, torch.Tensor) else torch.full((batch,), offset, device=device)
    return starts[:, None] + torch.arange(seqlen, device=device)[None, :]


def _formula(layout, tensors, heads, positions, dim, length, base, scale_base, interleaved, dtype):
    """The module's result by the formula, computed in ``dtype``: fp64 (exact), or the input's
    dtype with fp32 tables rounded to it (plain PyTorch, as flash-attn's reference does)."""
    table_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    tables = [t.to(positions.device, dtype) for t in rotary_tables_ref(dim, length, base, scale_base, table_dtype)]
    cos, sin, cos_k, sin_k = tables
    q, k, v = _split(layout, tensors, heads)
    return _join(layout, rotate_at(q, cos, sin, positions, interleaved, dtype),
                 rotate_at(k, cos_k, sin_k, positions, interleaved, dtype), v.to(dtype))


# layout, batch, seqlen, heads (q), heads (k), head dim, rotary dim, offset, max_seqlen, interleaved, scale_base
CASES = {
    "packed-113-int-offset": ("packed", 2, 113, 3, 3, 40, 24, 5, None, False, None),
    "packed-1-tensor-offset-interleaved": ("packed", 2, 1, 2, 2, 80, 32, [0, 9], 16, True, None),
    "gqa-28-4": ("grouped", 1, 17, 28, 4, 40, 40, [3], 24, False, None),
    "kv-113-interleaved": ("kv", 2, 113, 6, 2, 80, 64, 0, None, True, None),
    "packed-xpos": ("packed", 2, 33, 2, 2, 40, 40, 2, None, False, 16.0),
    "kv-xpos-tensor-offset": ("kv", 2, 9, 4, 2, 40, 32, [7, 1], 20, True, 16.0),
}


def _offset(offset, device):
    return torch.tensor(offset, device=device, dtype=torch.int32) if isinstance(offset, list) else offset


def _expected_length(seqlen, offset, max_seqlen):
    """flash-attn's table length after one call on a fresh module."""
    return max_seqlen if max_seqlen is not None else seqlen + offset


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_forward_matches_the_formula(backend, dtype, device, case):
    layout, batch, seqlen, heads, heads_k, head_dim, dim, offset, max_seqlen, interleaved, scale_base = case
    module = RotaryEmbedding(dim, base=500.0, interleaved=interleaved, scale_base=scale_base, device=device)
    tensors = _inputs(layout, batch, seqlen, heads, heads_k, head_dim, dtype, device)
    before = [t.clone() for t in tensors]
    offset = _offset(offset, device)
    kwargs = dict(seqlen_offset=offset, max_seqlen=max_seqlen, num_heads_q=heads if layout == "grouped" else None)
    out = module(*tensors, **kwargs)
    out = out if isinstance(out, tuple) else (out,)
    assert all(o is t for o, t in zip(out, tensors)), "rotated in place: the arguments are returned"
    length = _expected_length(seqlen, offset, max_seqlen)
    assert module._seq_len_cached == length and module._cos_cached.shape == (length, dim // 2)
    positions = _positions(offset, batch, seqlen, device)
    args = (layout, before, heads, positions, dim, length, 500.0, scale_base, interleaved)
    exact, plain = _formula(*args, torch.float64), _formula(*args, dtype)
    for name, actual, e, p in zip("qkv", _split(layout, out, heads), _split(layout, exact, heads),
                                  _split(layout, plain, heads)):
        assert_close_by_rule(actual, e, p, name=name)
    assert torch.equal(_split(layout, out, heads)[2], _split(layout, before, heads)[2]), "v is left as it is"


@pytest.mark.parametrize("case", ["packed-1-tensor-offset-interleaved", "gqa-28-4", "kv-xpos-tensor-offset",
                                  "packed-xpos"])
def test_gradients_through_q_and_k(backend, dtype, device, case):
    layout, batch, seqlen, heads, heads_k, head_dim, dim, offset, max_seqlen, interleaved, scale_base = CASES[case]
    seqlen = min(seqlen, 13)
    module = RotaryEmbedding(dim, interleaved=interleaved, scale_base=scale_base, device=device)
    leaves = [t.requires_grad_() for t in _inputs(layout, batch, seqlen, heads, heads_k, head_dim, dtype, device)]
    offset = _offset(offset, device)
    out = module(*[t.clone() for t in leaves], seqlen_offset=offset, max_seqlen=max_seqlen,
                 num_heads_q=heads if layout == "grouped" else None)
    out = out if isinstance(out, tuple) else (out,)
    upstream = [torch.randn_like(o) for o in out]
    grads = torch.autograd.grad(out, leaves, upstream)
    length = _expected_length(seqlen, offset, max_seqlen)
    positions = _positions(offset, batch, seqlen, device)
    references = []
    for precision in (torch.float64, dtype):
        inputs = [t.detach().to(precision).requires_grad_() for t in leaves]
        result = _formula(layout, inputs, heads, positions, dim, length, 10000.0, scale_base, interleaved, precision)
        references.append(torch.autograd.grad(result, inputs, [u.to(precision) for u in upstream]))
    for name, actual, exact, plain in zip(("dq", "dk", "dv"), _split(layout, grads, heads),
                                          _split(layout, references[0], heads), _split(layout, references[1], heads)):
        assert_close_by_rule(actual, exact, plain, factor=3.0, name=name)


def _packed(seqlen, device, dtype=torch.float32, head_dim=16):
    return torch.randn(2, seqlen, 3, 2, head_dim, device=device, dtype=dtype)


def test_tables_are_built_on_use_grown_and_rebuilt(device):
    module = RotaryEmbedding(16, device=device)
    assert module._cos_cached is None and module._seq_len_cached == 0 and module.state_dict() == {}
    module(_packed(4, device))
    assert module._seq_len_cached == 4 and module._cos_cached.dtype == torch.float32
    module(_packed(4, device), seqlen_offset=6)  # int offset: grown to offset + S
    assert module._seq_len_cached == 10
    tables = module._cos_cached
    module(_packed(3, device), seqlen_offset=2)  # shorter: kept as they are
    assert module._cos_cached is tables and module._seq_len_cached == 10
    module(_packed(3, device), max_seqlen=40)
    assert module._seq_len_cached == 40
    cos, sin, _, _ = rotary_tables_ref(16, 40)
    torch.testing.assert_close(module._cos_cached.double(), cos, atol=1e-5, rtol=0)
    torch.testing.assert_close(module._sin_cached.double(), sin, atol=1e-5, rtol=0)
    module(_packed(3, device, torch.float16), seqlen_offset=1)  # another dtype: rebuilt (flash-attn's length)
    assert module._cos_cached.dtype == torch.float16 and module._seq_len_cached == 4


def test_tensor_offsets_need_max_seqlen_past_the_tables(device):
    module = RotaryEmbedding(16, device=device)
    qkv = _packed(3, device)
    offsets = torch.tensor([0, 20], device=device)
    with pytest.raises(ValueError, match="max_seqlen"):
        module(qkv.clone(), seqlen_offset=offsets)
    assert module._seq_len_cached == 3  # a tensor offset is not read to size the tables
    out = module(qkv.clone(), seqlen_offset=offsets, max_seqlen=23)
    cos, sin, _, _ = rotary_tables_ref(16, 23)
    expected = rotate_at(qkv[:, :, :2], cos, sin, _positions(offsets, 2, 3, device)[..., None], False)
    torch.testing.assert_close(out[:, :, :2].double(), expected, atol=1e-5, rtol=0)
    with value_checks(False):  # the caller's precondition then: no host read, positions clamped
        module(qkv.clone(), seqlen_offset=torch.tensor([0, 30], device=device))


def test_inference_tables_are_rebuilt_for_training(device):
    module = RotaryEmbedding(16, device=device).eval()
    with torch.inference_mode():
        module(_packed(4, device))
    assert module._cos_cached.is_inference()
    module(_packed(4, device))  # eval: inference tables serve
    assert module._cos_cached.is_inference()
    module.train()(_packed(4, device))
    assert not module._cos_cached.is_inference()


def test_xpos_tables_for_k_are_the_inverse_scale(device):
    module = RotaryEmbedding(8, scale_base=32, device=device)
    module(_packed(5, device, head_dim=8), seqlen_offset=60)
    cos, sin, cos_k, sin_k = rotary_tables_ref(8, 65, scale_base=32)
    for actual, expected in zip((module._cos_cached, module._sin_cached, module._cos_k_cached, module._sin_k_cached),
                                (cos, sin, cos_k, sin_k)):
        torch.testing.assert_close(actual.double(), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(cos, cos_k)


def test_positions_in_fp32_after_the_module_is_cast(device):
    exact, _, _, _ = rotary_tables_ref(8, 2100)
    errors = {}
    for in_fp32 in (True, False):
        module = RotaryEmbedding(8, pos_idx_in_fp32=in_fp32, device=device).half()
        assert module.inv_freq.dtype == torch.float16
        module._update_cos_sin_cache(2100, device=torch.device(device), dtype=torch.float32)
        errors[in_fp32] = (module._cos_cached.double() - exact).abs().max().item()
    assert errors[True] < 1e-3  # fp32 positions and frequencies
    assert errors[False] > 0.1  # fp16 positions: 2049 and 2050 are one number


def _call(module_kwargs=None, *args, **kwargs):
    return lambda device: RotaryEmbedding(**{"dim": 16, **(module_kwargs or {})})(
        *[a(device) if callable(a) else a for a in args],
        **{k: v(device) if callable(v) else v for k, v in kwargs.items()})


def _t(*shape, dtype=torch.float32, **kw):
    return lambda device: torch.randn(*shape, device=device, **kw).to(dtype)


BAD = {
    "odd-dim": (lambda device: RotaryEmbedding(15), ValueError, "even dim"),
    "zero-dim": (lambda device: RotaryEmbedding(0), ValueError, "dim"),
    "float-dim": (lambda device: RotaryEmbedding(16.0), TypeError, "dim"),
    "negative-base": (lambda device: RotaryEmbedding(16, base=-1.0), ValueError, "base"),
    "interleaved-not-bool": (lambda device: RotaryEmbedding(16, interleaved="yes"), TypeError, "interleaved"),
    "zero-scale-base": (lambda device: RotaryEmbedding(16, scale_base=0), ValueError, "scale_base"),
    "pos-idx-not-bool": (lambda device: RotaryEmbedding(16, pos_idx_in_fp32=None), TypeError, "pos_idx_in_fp32"),
    "qkv-int": (_call(None, _t(1, 3, 3, 2, 16, dtype=torch.int32)), TypeError, "qkv"),
    "qkv-3-dims": (_call(None, _t(3, 3, 16)), ValueError, "qkv"),
    "qkv-not-3": (_call(None, _t(1, 3, 4, 2, 16)), ValueError, "3, H, D"),
    "head-dim-below-dim": (_call(None, _t(1, 3, 3, 2, 8)), ValueError, "dim"),
    "grouped-without-num-heads-q": (_call(None, _t(1, 3, 6, 16)), TypeError, "num_heads_q"),
    "grouped-bad-num-heads-q": (_call(None, _t(1, 3, 6, 16), num_heads_q=3), ValueError, "num_heads_q"),
    "kv-shape": (_call(None, _t(1, 3, 2, 16), _t(1, 4, 2, 2, 16)), ValueError, "kv"),
    "kv-dtype": (_call(None, _t(1, 3, 2, 16), _t(1, 3, 2, 2, 16, dtype=torch.float16)), TypeError, "kv"),
    "q-5-dims-with-kv": (_call(None, _t(1, 3, 3, 2, 16), _t(1, 3, 2, 2, 16)), ValueError, "qkv"),
    "num-heads-q-with-kv": (_call(None, _t(1, 3, 2, 16), _t(1, 3, 2, 2, 16), num_heads_q=2), ValueError,
                            "num_heads_q"),
    "negative-offset": (_call(None, _t(1, 3, 3, 2, 16), seqlen_offset=-1), ValueError, "seqlen_offset"),
    "float-offset": (_call(None, _t(1, 3, 3, 2, 16), seqlen_offset=1.0), TypeError, "seqlen_offset"),
    "float-offset-tensor": (_call(None, _t(2, 3, 3, 2, 16), seqlen_offset=_t(2)), TypeError, "seqlen_offset"),
    "offset-per-sequence-count": (_call(None, _t(2, 3, 3, 2, 16), seqlen_offset=lambda d: torch.zeros(3, device=d,
                                  dtype=torch.long)), ValueError, "seqlen_offset"),
    "zero-max-seqlen": (_call(None, _t(1, 3, 3, 2, 16), max_seqlen=0), ValueError, "max_seqlen"),
    "leaf-requires-grad": (_call(None, _t(1, 3, 3, 2, 16, requires_grad=True)), ValueError, "qkv"),
    "view-of-a-leaf": (_call(None, lambda d: torch.randn(1, 3, 96, device=d, requires_grad=True).view(1, 3, 3, 2, 16)),
                       ValueError, "qkv"),
}


def test_kv_is_checked_before_q_is_rotated(device):
    """q is rotated in place first: a kv the kernels cannot take is refused before q changes."""
    q = torch.randn(1, 4, 2, 32, device=device)
    kv = torch.randn(1, 4, 2, 2, 32, device=device)[..., ::2]  # head dim 16, not contiguous
    before = q.clone()
    with pytest.raises(ValueError, match="kv"):
        RotaryEmbedding(16, device=device)(q, kv)
    assert torch.equal(q, before)


@pytest.mark.parametrize("layout", ["packed", "kv"])
def test_an_empty_sequence(backend, device, layout):
    """S = 0 (and an empty batch): nothing to rotate, on every backend (the reference stacked no rows)."""
    for batch, seqlen in ((1, 0), (0, 3)):
        tensors = _inputs(layout, batch, seqlen, 2, 2, 16, torch.float32, device)
        out = RotaryEmbedding(16, device=device)(*tensors, seqlen_offset=2)
        out = out if isinstance(out, tuple) else (out,)
        assert all(o is t and o.numel() == 0 for o, t in zip(out, tensors))


@pytest.mark.parametrize("call, error, message", BAD.values(), ids=BAD.keys())
def test_bad_input_names_the_argument(device, call, error, message):
    with pytest.raises(error, match=message):
        call(device)
