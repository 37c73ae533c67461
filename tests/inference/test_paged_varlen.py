"""flash_attn_varlen_func with block_table (chunked prefill of a packed batch over a paged cache)
against the reference: gather each sequence's pages into a dense sequence, then attention_ref.

Under the interpreter (CPU) sizes stay small; GQA 28/4 runs at its real head counts.
"""

import math

import pytest
import torch

import docqa_fast
from docqa_fast.reference.attention import attention_ref
from docqa_fast.testing import assert_close_by_rule

pytestmark = pytest.mark.backends("reference", "triton")
ON_GPU = torch.cuda.is_available()
PRECISIONS = [torch.float16, torch.bfloat16] if ON_GPU else [torch.float16]


def make_paged(lengths_q, lengths_k, heads, kv_heads, head_dim, page_size, dtype, device, spare_blocks=3):
    """Packed q, a paged cache with each sequence's pages shuffled at random (some blocks unused),
    the cu_seqlens and the block table."""
    batch = len(lengths_q)
    max_blocks = max(1, max(math.ceil(n / page_size) for n in lengths_k))
    num_blocks = batch * max_blocks + spare_blocks
    table = torch.randperm(num_blocks, device=device)[: batch * max_blocks].view(batch, max_blocks).int()
    shape = (num_blocks, page_size, kv_heads, head_dim)
    k_cache, v_cache = (torch.randn(shape, device=device).to(dtype) for _ in range(2))
    q = torch.randn(sum(lengths_q), heads, head_dim, device=device).to(dtype)
    cu = lambda lengths: torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32,  # noqa: E731
                                      device=device)
    return q, k_cache, v_cache, cu(lengths_q), cu(lengths_k), table


def dense_keys(cache, lengths_k, table):
    """Each sequence's first lengths_k[b] logical slots, gathered page by page and packed: by loops."""
    page = cache.shape[1]
    rows = [cache[int(table[b, j // page]), j % page] for b, n in enumerate(lengths_k) for j in range(n)]
    return torch.stack(rows) if rows else cache.new_empty((0, *cache.shape[2:]))


def check_paged_varlen(q, k_cache, v_cache, cu_q, cu_k, table, lengths_q, lengths_k, **options):
    before = k_cache.clone(), v_cache.clone()
    out, lse, _ = docqa_fast.flash_attn_varlen_func(q, k_cache, v_cache, cu_q, cu_k, max(lengths_q, default=0),
                                                     max(lengths_k, default=0), block_table=table,
                                                     return_attn_probs=True, **options)
    keys, values = dense_keys(k_cache, lengths_k, table), dense_keys(v_cache, lengths_k, table)
    boundaries = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    exact_out, exact_lse = attention_ref(q.double(), keys.double(), values.double(), **boundaries, **options)
    plain_out, plain_lse = attention_ref(q, keys, values, upcast=False, **boundaries, **options)
    assert_close_by_rule(out, exact_out, plain_out, name="out")
    assert_close_by_rule(lse, exact_lse, plain_lse, name="lse")
    # Forward over a cache: nothing is written to it.
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])
    return out, lse


# (lengths_q, lengths_k, heads, kv_heads, head_dim, page_size): empty sequences (no queries, no keys),
# lengths 1 and 113, more queries than keys, GQA 28/4 and 8/2, head dim 80.
CASES = [
    ([1, 113, 0, 5], [1, 113, 40, 70], 28, 4, 64, 16),
    ([3, 0, 17], [200, 0, 17], 8, 2, 80, 32),
    ([9, 4], [0, 2], 4, 1, 32, 16),  # no keys at all / fewer keys than queries
    ([0, 0], [5, 0], 4, 2, 32, 64),  # no queries at all
    ([64, 1], [300, 1], 7, 1, 128, 256),
]


@pytest.mark.parametrize("precision", PRECISIONS, ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("lengths_q, lengths_k, heads, kv_heads, head_dim, page_size", CASES, ids=str)
def test_matches_reference(backend, precision, causal, lengths_q, lengths_k, heads, kv_heads, head_dim, page_size,
                           device):
    q, k_cache, v_cache, cu_q, cu_k, table = make_paged(lengths_q, lengths_k, heads, kv_heads, head_dim, page_size,
                                                        precision, device)
    out, lse = check_paged_varlen(q, k_cache, v_cache, cu_q, cu_k, table, lengths_q, lengths_k, causal=causal)
    # A query that sees no key: out 0, lse -inf (bottom-right causal with more queries than keys, or no keys).
    starts = cu_q.tolist()
    for b, (n_q, n_k) in enumerate(zip(lengths_q, lengths_k)):
        blind = n_q if n_k == 0 else (max(0, n_q - n_k) if causal else 0)
        rows = slice(starts[b], starts[b] + blind)
        assert torch.equal(out[rows], torch.zeros_like(out[rows])) and torch.isneginf(lse[:, rows]).all()


@pytest.mark.parametrize("options", [{"window_size": (7, 0), "causal": True}, {"window_size": (5, 3)},
                                     {"window_size": (2**31 - 1, 2**31 - 1)},  # unbounded, without int32 wrap
                                     {"softcap": 3.0, "softmax_scale": 0.4, "causal": True}], ids=str)
def test_windows_and_softcap(backend, options, device):
    lengths_q, lengths_k = [6, 13], [50, 13]
    q, k_cache, v_cache, cu_q, cu_k, table = make_paged(lengths_q, lengths_k, 8, 2, 64, 16, torch.float16, device)
    check_paged_varlen(q, k_cache, v_cache, cu_q, cu_k, table, lengths_q, lengths_k, **options)


def test_every_num_splits_matches_one_split(backend, device):
    from docqa_fast.inference.ops import varlen_paged_attention as flash_attn_varlen_paged

    lengths_q, lengths_k = [5, 1, 0], [290, 7, 33]
    q, k_cache, v_cache, cu_q, cu_k, table = make_paged(lengths_q, lengths_k, 7, 1, 64, 16, torch.float16, device)
    results = {splits: flash_attn_varlen_paged(q, k_cache, v_cache, cu_q, cu_k, 5, 290, table, causal=True,
                                               num_splits=splits) for splits in (1, 2, 5, 0)}
    for splits in (2, 5, 0):
        torch.testing.assert_close(results[splits][0], results[1][0], atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(results[splits][1], results[1][1], atol=1e-4, rtol=1e-4)


def test_fp32_runs_on_the_reference_path(device, monkeypatch):
    lengths_q, lengths_k = [3, 2], [20, 2]
    q, k_cache, v_cache, cu_q, cu_k, table = make_paged(lengths_q, lengths_k, 2, 1, 32, 16, torch.float32, device)
    check_paged_varlen(q, k_cache, v_cache, cu_q, cu_k, table, lengths_q, lengths_k, causal=True)
    monkeypatch.setenv("DOCQA_FAST_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="fp16/bf16"):
        docqa_fast.flash_attn_varlen_func(q, k_cache, v_cache, cu_q, cu_k, 3, 20, block_table=table)


def test_custom_op_and_compile(backend, device):
    from docqa_fast.inference.ops import _varlen_paged_op

    lengths_q, lengths_k = [3, 1], [20, 40]
    q, k_cache, v_cache, cu_q, cu_k, table = make_paged(lengths_q, lengths_k, 4, 2, 32, 16, torch.float16, device)
    for slopes in (None, torch.rand(2, 4, device=device)):
        torch.library.opcheck(_varlen_paged_op, (q, k_cache, v_cache, cu_q, cu_k, 3, table, 0.2, True, -1, -1, 0.0, 1,
                                                 slopes), test_utils=("test_schema", "test_faketensor"))

    def prefill(q, k_cache, v_cache):
        return docqa_fast.flash_attn_varlen_func(q, k_cache, v_cache, cu_q, cu_k, 3, 40, causal=True,
                                                 block_table=table)

    torch.testing.assert_close(torch.compile(prefill, fullgraph=True)(q, k_cache, v_cache), prefill(q, k_cache, v_cache))


# ------------------------------------------------------------------------------ bad input

def _args(device="cpu"):
    q, k_cache, v_cache, cu_q, cu_k, table = make_paged([2, 3], [20, 40], 4, 2, 32, 32, torch.float16, device)
    return dict(q=q, k=k_cache, v=v_cache, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=3, max_seqlen_k=40,
                block_table=table)


BAD_INPUTS = {
    "page size 24": (lambda a: a.update(k=a["k"][:, :24], v=a["v"][:, :24]), ValueError, "page size"),
    "block_table outside the cache": (lambda a: a["block_table"].__setitem__((1, 1), 99), ValueError, "block_table"),
    "negative block_table entry": (lambda a: a["block_table"].__setitem__((0, 0), -1), ValueError, "block_table"),
    "block_table int64": (lambda a: a.update(block_table=a["block_table"].long()), TypeError, "block_table"),
    "block_table rows": (lambda a: a.update(block_table=a["block_table"][:1]), ValueError, "block_table"),
    "keys beyond the table": (lambda a: a.update(cu_seqlens_k=torch.tensor([0, 20, 20 + 65], dtype=torch.int32),
                                                 max_seqlen_k=65), ValueError, "capacity"),
    "cu_seqlens_k decreasing": (lambda a: a.update(cu_seqlens_k=torch.tensor([0, 20, 10], dtype=torch.int32)),
                                ValueError, "cu_seqlens_k"),
    "cu_seqlens_k int64": (lambda a: a.update(cu_seqlens_k=a["cu_seqlens_k"].long()), TypeError, "cu_seqlens_k"),
    "cu_seqlens_q end": (lambda a: a.update(cu_seqlens_q=torch.tensor([0, 2, 4], dtype=torch.int32)), ValueError,
                         "cu_seqlens_q"),
    "max_seqlen_q too small": (lambda a: a.update(max_seqlen_q=2), ValueError, "max_seqlen_q"),
    "max_seqlen_k too small": (lambda a: a.update(max_seqlen_k=39), ValueError, "max_seqlen_k"),
    "k dtype": (lambda a: a.update(k=a["k"].float()), TypeError, "expected k of dtype"),
    "v shape": (lambda a: a.update(v=a["v"][:-1]), ValueError, "expected v of shape"),
    "q 4-D": (lambda a: a.update(q=a["q"][None]), ValueError, "expected q with 3 dimensions"),
    "heads not a multiple": (lambda a: a.update(q=a["q"][:, :3]), ValueError, "multiple"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_names_the_argument(name):
    args = _args()
    mutate, error, match = BAD_INPUTS[name]
    mutate(args)
    with pytest.raises(error, match=match):
        docqa_fast.flash_attn_varlen_func(**args)


def test_the_unmutated_bad_input_arguments_run():
    """The control of the table above: each error comes from its one change."""
    out = docqa_fast.flash_attn_varlen_func(**_args())
    assert out.shape == (5, 4, 32) and torch.isfinite(out).all()
