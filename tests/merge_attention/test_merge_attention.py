"""merge_attention_states / merge_stacked_attention_states against the reference and fp64."""

import re

import pytest
import torch

import docqa_fast
from docqa_fast.merge_attention.ops import _merge_pair_op, _merge_stacked_op
from docqa_fast.reference.merge_attention import merge_attention_states_ref, merge_stacked_attention_states_ref
from docqa_fast.testing import assert_close_by_rule

NEG_INF = float("-inf")

# (out shape of one part); 4-D = dense (B, S, H, D), 3-D = packed (T, H, D).
SHAPES = [
    (2, 113, 3, 80),  # odd length, the ViT head dim
    (1, 1, 28, 128),  # decode: one query, Qwen2.5-VL's 28 heads
    (3, 17, 4, 64),
    (203, 4, 128),  # packed
    (1, 2, 7),  # head dim not a multiple of 8
    (0, 5, 2, 32),  # an empty batch
]


def lse_shape(out_shape):
    *lead, seq, heads, _ = out_shape
    return (*lead, heads, seq)


def random_parts(n, out_shape, dtype, device, empty_fraction=0.2, empty_rows=True):
    """n partials: random outputs and LSEs, some parts of some rows empty (-inf or +inf),
    a few rows with every part empty, and NaN in the outputs of empty parts."""
    outs = torch.randn(n, *out_shape, device=device).to(dtype)
    lse_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    lses = torch.randn(n, *lse_shape(out_shape), device=device, dtype=lse_dtype) * 4
    empty = torch.rand(lses.shape, device=device) < empty_fraction
    lses = torch.where(empty, NEG_INF, lses)
    # flash-attn writes +inf for rows that saw no keys; some of ours do so too.
    lses = torch.where(empty & (torch.rand(lses.shape, device=device) < 0.3), float("inf"), lses)
    if lses.numel():
        if empty_rows:
            lses.view(n, -1)[:, : max(1, lses[0].numel() // 10)] = NEG_INF  # rows with no keys at all
        empty_rows = (lses == NEG_INF) | (lses == float("inf"))
        out_view = outs.transpose(-2, -3) if outs.dim() >= 4 else outs
        out_view[empty_rows.unsqueeze(-1).expand_as(out_view)] = float("nan")
    return outs, lses


def check_against_reference(out, lse, outs, lses):
    exact_out, exact_lse = merge_stacked_attention_states_ref(outs.double(), lses.double())
    plain_out, plain_lse = merge_stacked_attention_states_ref(outs, lses)
    assert out.dtype == outs.dtype and lse.dtype == torch.float32
    assert out.is_contiguous() and lse.is_contiguous()
    assert_close_by_rule(out, exact_out, plain_out, name="out")
    assert_close_by_rule(lse, exact_lse, plain_lse, name="lse")


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_pair_matches_reference(backend, dtype, shape, device):
    outs, lses = random_parts(2, shape, dtype, device)
    out, lse = docqa_fast.merge_attention_states(outs[0], lses[0], outs[1], lses[1])
    check_against_reference(out, lse, outs, lses)


@pytest.mark.parametrize("n_parts", [1, 3, 16])
@pytest.mark.parametrize("shape", SHAPES[:4], ids=str)
def test_stacked_matches_reference(backend, dtype, shape, n_parts, device):
    outs, lses = random_parts(n_parts, shape, dtype, device)
    out, lse = docqa_fast.merge_stacked_attention_states(outs, lses)
    check_against_reference(out, lse, outs, lses)


def test_merging_with_an_empty_part_returns_the_other_unchanged(backend, dtype, device):
    out_a = torch.randn(2, 33, 4, 96, device=device).to(dtype)
    lse_a = torch.randn(2, 4, 33, device=device) * 3
    out_b = torch.full_like(out_a, float("nan"))  # an empty part's output must not be read
    for empty_lse in (NEG_INF, float("inf")):
        lse_b = torch.full_like(lse_a, empty_lse)
        for out, lse in (docqa_fast.merge_attention_states(out_a, lse_a, out_b, lse_b),
                         docqa_fast.merge_attention_states(out_b, lse_b, out_a, lse_a)):
            assert torch.equal(out, out_a)
            assert torch.equal(lse, lse_a)


def test_all_parts_empty_gives_zero_and_neg_inf(backend, dtype, device):
    outs = torch.full((4, 5, 3, 64), float("nan"), device=device).to(dtype)
    lses = torch.full((4, 3, 5), NEG_INF, device=device)
    out, lse = docqa_fast.merge_stacked_attention_states(outs, lses)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(lse, lses[0])
    out, lse = docqa_fast.merge_attention_states(outs[0], lses[0], outs[1], lses[1])
    assert torch.equal(out, torch.zeros_like(out)) and torch.equal(lse, lses[0])


def test_strided_inputs(backend, dtype, device):
    """Outputs sliced from wider tensors and LSEs that are transposed views still merge right."""
    wide = torch.randn(2, 2, 50, 6, 64, device=device).to(dtype)
    out_a, out_b = wide[0, :, :, ::2], wide[1, :, :, 1::2]  # (2, 50, 3, 64), head stride 128
    lse_a = (torch.randn(2, 50, 3, device=device) * 2).transpose(1, 2)  # (2, 3, 50), non-contiguous
    lse_b = torch.randn(3, 2, 50, device=device).permute(1, 0, 2)
    out, lse = docqa_fast.merge_attention_states(out_a, lse_a, out_b, lse_b)
    check_against_reference(out, lse, torch.stack([out_a, out_b]), torch.stack([lse_a, lse_b]))

    outs = torch.randn(3, 2, 40, 8, 32, device=device).to(dtype)[:, :, :, ::2]  # (3, 2, 40, 4, 32)
    lses = torch.randn(3, 40, 2, 4, device=device).permute(0, 2, 3, 1)  # (3, 2, 4, 40), non-contiguous
    out, lse = docqa_fast.merge_stacked_attention_states(outs, lses)
    check_against_reference(out, lse, outs, lses)


def test_stacked_equals_repeated_pairwise_merges(backend, device):
    outs, lses = random_parts(5, (3, 19, 2, 64), torch.float32, device)
    out, lse = outs[0], lses[0]
    for i in range(1, 5):
        out, lse = docqa_fast.merge_attention_states(out, lse, outs[i], lses[i])
    stacked_out, stacked_lse = docqa_fast.merge_stacked_attention_states(outs, lses)
    torch.testing.assert_close(stacked_out, out, atol=1e-5, rtol=1e-5, equal_nan=False)
    torch.testing.assert_close(stacked_lse, lse)


# --------------------------------------------------------------------------- autograd

@pytest.mark.parametrize("stacked", [True, False], ids=["stacked", "pair"])
def test_gradients_match_autograd_of_the_reference(backend, device, stacked):
    """The ops' analytic backward against PyTorch's autograd through the reference in fp64 (the ops
    take fp16/bf16/fp32 only, so no finite-difference gradcheck in fp64 through them)."""
    outs, lses = random_parts(3 if stacked else 2, (2, 7, 3, 32), torch.float32, device)
    outs = outs.nan_to_num(0.0).requires_grad_()
    lses = lses.requires_grad_()
    grad_out = torch.randn(2, 7, 3, 32, device=device)
    grad_lse = torch.randn(2, 3, 7, device=device)

    def merge(fn_stacked, fn_pair, o, l):
        return fn_stacked(o, l) if stacked else fn_pair(o[0], l[0], o[1], l[1])

    out, lse = merge(docqa_fast.merge_stacked_attention_states, docqa_fast.merge_attention_states, outs, lses)
    got = torch.autograd.grad((out * grad_out).sum() + (lse.nan_to_num(0, 0, 0) * grad_lse).sum(), (outs, lses))

    outs64 = outs.detach().double().requires_grad_()
    lses64 = lses.detach().double().requires_grad_()
    ref_out, ref_lse = merge(merge_stacked_attention_states_ref, merge_attention_states_ref, outs64, lses64)
    expected = torch.autograd.grad((ref_out * grad_out).sum() + (ref_lse.nan_to_num(0, 0, 0) * grad_lse).sum(),
                                   (outs64, lses64))
    for name, g, e in zip(("d outs", "d lses"), got, expected):
        assert not torch.isnan(g).any(), name
        torch.testing.assert_close(g.double(), e.nan_to_num(0.0), atol=2e-5, rtol=2e-5, msg=name)


# ------------------------------------------------------------- custom op and compile

def test_opcheck_custom_ops(backend, device):
    outs, lses = random_parts(2, (2, 9, 3, 32), torch.float32, device, empty_fraction=0.0)
    torch.library.opcheck(_merge_pair_op, (outs[0], lses[0], outs[1], lses[1]))
    torch.library.opcheck(_merge_stacked_op, (outs, lses))


def test_torch_compile_fullgraph(backend, device):
    outs, lses = random_parts(3, (2, 11, 4, 64), torch.float32, device)

    def split_kv_then_merge(outs, lses):
        out, lse = docqa_fast.merge_attention_states(outs[0], lses[0], outs[1], lses[1])
        out, lse = docqa_fast.merge_stacked_attention_states(torch.stack([out, outs[2]]),
                                                             torch.stack([lse, lses[2]]))
        return out * 2, lse + 1

    compiled = torch.compile(split_kv_then_merge, fullgraph=True)
    got = compiled(outs, lses)
    expected = split_kv_then_merge(outs, lses)
    torch.testing.assert_close(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1])


# ------------------------------------------------------------------------- bad input

def _valid(device="cpu"):
    out = torch.randn(2, 8, 3, 16, device=device)
    lse = torch.randn(2, 3, 8, device=device)
    return out, lse


@pytest.mark.parametrize("case, error, message", [
    ("lse_a_fp16", TypeError, "lse_a of dtype torch.float32"),
    ("out_a_int", TypeError, "out_a of dtype"),
    ("out_b_dtype", TypeError, "out_b of dtype torch.float32"),
    ("out_a_not_tensor", TypeError, "out_a to be a torch.Tensor"),
    ("out_b_shape", ValueError, "out_b of shape"),
    ("lse_a_layout", ValueError, "lse_a of shape (2, 3, 8)"),
    ("out_a_2d", ValueError, "out_a with 3 or 4 dimensions"),
    ("out_a_last_dim_strided", ValueError, "out_a with a contiguous last dimension"),
    ("lse_b_device", ValueError, "lse_b on cpu"),
    ("head_dim_too_big", ValueError, "head dim"),
])
def test_bad_pair_input_names_the_argument(case, error, message):
    out_a, lse_a = _valid()
    out_b, lse_b = _valid()
    if case == "lse_a_fp16":
        lse_a = lse_a.half()
    elif case == "out_a_int":
        out_a = out_a.int()
    elif case == "out_b_dtype":
        out_b = out_b.half()
    elif case == "out_a_not_tensor":
        out_a = out_a.tolist()
    elif case == "out_b_shape":
        out_b = out_b[:, :7]
    elif case == "lse_a_layout":
        lse_a = lse_a.transpose(1, 2).contiguous()  # (B, S, H): not flash-attn's layout
    elif case == "out_a_2d":
        out_a = out_a.flatten(0, 2)
    elif case == "out_a_last_dim_strided":
        out_a = torch.randn(2, 8, 3, 32)[..., ::2]
    elif case == "lse_b_device":
        lse_b = lse_b.to("meta")
    elif case == "head_dim_too_big":
        out_a, out_b = torch.randn(2, 2, 8, 3, 2048).unbind(0)
    with pytest.raises(error, match=re.escape(message)):
        docqa_fast.merge_attention_states(out_a, lse_a, out_b, lse_b)


def test_bad_stacked_input_names_the_argument():
    out, lse = _valid()
    with pytest.raises(ValueError, match="outs with at least one part"):
        docqa_fast.merge_stacked_attention_states(out[None][:0], lse[None][:0])
    with pytest.raises(ValueError, match="lses of shape"):
        docqa_fast.merge_stacked_attention_states(out[None], lse[None, :, :, :4])
    with pytest.raises(TypeError, match="lses of dtype torch.float32"):
        docqa_fast.merge_stacked_attention_states(out[None], lse[None].double())


def test_extension_entry_points_reject_bad_arguments():
    """The C++ checks behind the Python ones: a ValueError or TypeError with the shape in the
    message (the H200 stack crashed formatting integers into such messages)."""
    from docqa_fast._backend import extension

    ext = extension()
    if ext is None:
        pytest.skip("docqa_fast._C is not built")
    out, lse = _valid()
    B, S, H, _ = out.shape
    result, lse_result = torch.empty_like(out), torch.empty_like(lse)
    with pytest.raises(ValueError, match=re.escape(f"lse_b of shape [{B}, {H}, {S}], got [{B}, {H}, 4]")):
        ext.merge_attention_states(out, lse, out, lse[..., :4].contiguous(), result, lse_result)
    with pytest.raises(ValueError, match="out_a with 4 dimensions, got 3"):
        ext.merge_attention_states(out[0], lse, out, lse, result, lse_result)
    with pytest.raises(TypeError, match="lse_a of dtype float32, got Double"):
        ext.merge_attention_states(out, lse.double(), out, lse, result, lse_result)
    with pytest.raises(ValueError, match="outs with 1 to 2147483647 parts along dimension 0, got 0"):
        ext.merge_stacked_attention_states(out[None][:0], lse[None][:0], result, lse_result)
