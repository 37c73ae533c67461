"""flash_attn_with_kvcache against the reference: decode and chunked prefill over contiguous and
paged caches, the in-place append, rotary, splits, and bad input.

On CPU the Triton kernel runs under the interpreter, so sizes stay small there (GQA 28/4 is
scaled down to 7/1 and 8/2); a GPU run adds bf16 and longer caches.
"""

import math

import pytest
import torch

import docqa_fast.inference as inference
from docqa_fast.reference.kvcache import apply_rotary_ref, flash_attn_with_kvcache_ref, gather_row, rotary_positions
from docqa_fast.testing import assert_close_by_rule, capture_cuda_graph

pytestmark = pytest.mark.backends("reference", "triton")  # no CUDA C++ decode kernel: Triton is the fast path
ON_GPU = torch.cuda.is_available()
PRECISIONS = [torch.float16, torch.bfloat16] if ON_GPU else [torch.float16]


def make_cache(batch, capacity, kv_heads, head_dim, dtype, device, page_size=None, spare_rows=0):
    """Random caches (never zero); paged ones with the pages of every row shuffled at random."""
    if page_size is None:
        shape = (batch + spare_rows, capacity, kv_heads, head_dim)
        return torch.randn(shape, device=device).to(dtype), torch.randn(shape, device=device).to(dtype), None
    max_blocks = math.ceil(capacity / page_size)
    num_blocks = batch * max_blocks + 3  # a few blocks nobody uses: they must stay untouched
    shape = (num_blocks, page_size, kv_heads, head_dim)
    table = torch.randperm(num_blocks, device=device)[: batch * max_blocks].view(batch, max_blocks).int()
    return torch.randn(shape, device=device).to(dtype), torch.randn(shape, device=device).to(dtype), table


def appended_slots(k_cache, cache_seqlens, seqlen_new, cache_batch_idx=None, block_table=None):
    """Boolean mask over the cache's (rows or blocks, slots) of what the append may write, by loops."""
    touched = torch.zeros(k_cache.shape[:2], dtype=torch.bool)
    page = k_cache.shape[1]
    for b, length in enumerate(cache_seqlens.tolist()):
        for pos in range(length, length + seqlen_new):
            if block_table is not None:
                touched[int(block_table[b, pos // page]), pos % page] = True
            else:
                row = int(cache_batch_idx[b]) if cache_batch_idx is not None else b
                touched[row, pos] = True
    return touched


def check_kvcache(q, k_cache, v_cache, k=None, v=None, **options):
    """Ours against fp64 and plain-PyTorch references (tolerance rule); the cache against the exact append."""
    cast = lambda t, dtype: None if t is None else t.to(dtype)  # noqa: E731
    tensors = ("rotary_cos", "rotary_sin")
    exact_options = {key: (cast(val, torch.float64) if key in tensors else val) for key, val in options.items()}
    original_k, original_v = k_cache.clone(), v_cache.clone()

    ours_k, ours_v = k_cache.clone(), v_cache.clone()
    out, lse = inference.flash_attn_with_kvcache(q, ours_k, ours_v, k, v, return_softmax_lse=True, **options)
    plain_k, plain_v = k_cache.clone(), v_cache.clone()
    plain_out, plain_lse = flash_attn_with_kvcache_ref(q, plain_k, plain_v, k, v, return_softmax_lse=True, upcast=False,
                                               **options)
    exact_out, exact_lse = flash_attn_with_kvcache_ref(
        q.double(), k_cache.double(), v_cache.double(), cast(k, torch.float64), cast(v, torch.float64),
        return_softmax_lse=True, **exact_options)
    assert_close_by_rule(out, exact_out, plain_out, name="out")
    # The plain LSE is computed at q's precision too: with rotary, the rotated q and k are rounded to it.
    assert_close_by_rule(lse, exact_lse, plain_lse, name="lse")

    # The cache loses no data: every slot outside the appended range is bitwise unchanged,
    # and the appended slots hold exactly the new (rotated) k and v.
    seqlens = options.get("cache_seqlens")
    if isinstance(seqlens, int):
        seqlens = torch.full((q.shape[0],), seqlens, dtype=torch.int32)
    seqlen_new = 0 if k is None else k.shape[1]
    touched = appended_slots(k_cache, seqlens.cpu(), seqlen_new, options.get("cache_batch_idx"),
                             options.get("block_table")).to(k_cache.device)
    assert torch.equal(ours_k[~touched], original_k[~touched])
    assert torch.equal(ours_v[~touched], original_v[~touched])
    if k is not None:
        new_k = k
        if options.get("rotary_cos") is not None:
            new_k = apply_rotary_ref(k, options["rotary_cos"], options["rotary_sin"],
                                     rotary_positions(seqlens, seqlen_new, True),
                                     options.get("rotary_interleaved", True))
        for b, length in enumerate(seqlens.tolist()):
            got_k = gather_row(ours_k, b, length + seqlen_new, options.get("cache_batch_idx"),
                               options.get("block_table"))[length:]
            got_v = gather_row(ours_v, b, length + seqlen_new, options.get("cache_batch_idx"),
                               options.get("block_table"))[length:]
            assert torch.equal(got_v, v[b])
            if options.get("rotary_cos") is None or not ON_GPU:
                assert torch.equal(got_k, new_k[b])
            else:  # a GPU may contract the rotation into FMAs: one rounding step apart at most
                torch.testing.assert_close(got_k, new_k[b], atol=1e-3, rtol=2 ** -7)
    return out, lse


# (batch, heads, kv_heads, head_dim, page_size, lengths before the append): lengths 0, 1, 255 and odd ones,
# different per row; GQA 7:1 (Qwen2.5's 28/4 scaled down) and 8:2 (Mistral's 32/8).
DECODE_CASES = [
    (3, 7, 1, 64, None, [0, 1, 255]),
    (3, 7, 1, 128, 16, [255, 0, 37]),
    (2, 8, 2, 64, 32, [1, 200]),
    (1, 4, 4, 256, None, [113]),
    (2, 8, 2, 128, 64, [255, 130]),
    (2, 4, 1, 64, 256, [300, 0]),
    (2, 7, 1, 64, 64, [4097, 5]),  # a long row: many splits under the heuristic
    (16, 7, 1, 32, 16, [0, 1, 2, 15, 16, 17, 31, 32, 33, 47, 63, 64, 65, 80, 99, 100]),  # every page boundary
]
if ON_GPU:
    DECODE_CASES += [(16, 28, 4, 128, 256, [4097] * 8 + [0, 1, 255, 3000, 17, 64, 4000, 1]),
                     (3, 32, 8, 128, 64, [4097, 0, 1])]


@pytest.mark.parametrize("precision", PRECISIONS, ids=str)
@pytest.mark.parametrize("batch, heads, kv_heads, head_dim, page_size, lengths", DECODE_CASES, ids=str)
def test_decode_matches_reference(backend, precision, batch, heads, kv_heads, head_dim, page_size, lengths, device):
    capacity = max(lengths) + 1 + 7  # odd capacity, some free slots at the end
    k_cache, v_cache, table = make_cache(batch, capacity, kv_heads, head_dim, precision, device, page_size)
    q = torch.randn(batch, 1, heads, head_dim, device=device).to(precision)
    k, v = (torch.randn(batch, 1, kv_heads, head_dim, device=device).to(precision) for _ in range(2))
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
    check_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=seqlens, block_table=table)


@pytest.mark.parametrize("seqlen_q, page_size, causal", [(4, None, True), (33, 16, True), (4, 32, False),
                                                     (128, 64, True)], ids=str)
def test_chunked_prefill_matches_reference(backend, seqlen_q, page_size, causal, device):
    """Sq > 1 new tokens appended and attended to, causal masks bottom-right to cache_seqlens + Sk_new."""
    lengths = [0, 50, 17]
    k_cache, v_cache, table = make_cache(3, 51 + seqlen_q, 1, 64, torch.float16, device, page_size)
    q = torch.randn(3, seqlen_q, 7, 64, device=device).half()
    k, v = (torch.randn(3, seqlen_q, 1, 64, device=device).half() for _ in range(2))
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
    check_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=seqlens, block_table=table, causal=causal)


def test_more_queries_than_keys_see_nothing(backend, device):
    """Speculative-style Sq > keys: bottom-right alignment leaves the first queries with no key (0, -inf)."""
    k_cache, v_cache, _ = make_cache(1, 16, 1, 32, torch.float16, device)
    q = torch.randn(1, 6, 2, 32, device=device).half()
    out, lse = check_kvcache(q, k_cache, v_cache, cache_seqlens=3, causal=True)
    assert torch.equal(out[:, :3], torch.zeros_like(out[:, :3])) and torch.isneginf(lse[..., :3]).all()


@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "halves"])
@pytest.mark.parametrize("causal, seqlen_new", [(True, 3), (False, 1), (False, 3)], ids=str)
def test_rotary(backend, interleaved, causal, seqlen_new, device):
    """q and the new k rotated at cache_seqlens + i (q at cache_seqlens only when not causal/local)."""
    k_cache, v_cache, table = make_cache(2, 64, 1, 64, torch.float16, device, 16)
    q = torch.randn(2, seqlen_new, 4, 64, device=device).half()
    k, v = (torch.randn(2, seqlen_new, 1, 64, device=device).half() for _ in range(2))
    angle = torch.rand(64, 16, device=device) * 2 * math.pi  # rotary_dim 32 of 64: the rest passes through
    cos, sin = angle.cos().half(), angle.sin().half()
    check_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=torch.tensor([5, 40], dtype=torch.int32, device=device),
                  block_table=table, rotary_cos=cos, rotary_sin=sin, rotary_interleaved=interleaved, causal=causal)


def test_window_covering_the_cache_is_no_window_for_rotary(backend, device):
    """flash-attn turns a window side >= the cache capacity into -1: the call is then not local,
    so (non-causal) every query is rotated at cache_seqlens, exactly as with no window."""
    results = []
    for window in ((-1, -1), (64, -1)):  # capacity 64: the second covers the whole cache
        torch.manual_seed(1)  # the same cache and inputs for both windows
        k_cache, v_cache, table = make_cache(2, 64, 1, 64, torch.float16, device, 16)
        q = torch.randn(2, 3, 4, 64, device=device).half()
        k, v = (torch.randn(2, 3, 1, 64, device=device).half() for _ in range(2))
        angle = torch.rand(64, 16, device=device) * 2 * math.pi
        results.append(inference.flash_attn_with_kvcache(
            q, k_cache, v_cache, k, v, rotary_cos=angle.cos().half(), rotary_sin=angle.sin().half(),
            cache_seqlens=torch.tensor([5, 40], dtype=torch.int32, device=device), block_table=table,
            window_size=window))
    torch.testing.assert_close(results[1], results[0])


@pytest.mark.parametrize("window_size, causal, softcap", [((8, -1), True, 0.0), ((5, 3), False, 0.0),
                                                          ((-1, -1), True, 5.0)], ids=str)
def test_windows_and_softcap(backend, window_size, causal, softcap, device):
    k_cache, v_cache, table = make_cache(2, 80, 2, 64, torch.float16, device, 16)
    q = torch.randn(2, 5, 4, 64, device=device).half() * 2
    k, v = (torch.randn(2, 5, 2, 64, device=device).half() for _ in range(2))
    check_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=torch.tensor([60, 3], dtype=torch.int32, device=device),
                  block_table=table, window_size=window_size, causal=causal, softcap=softcap, softmax_scale=0.3)


@pytest.mark.parametrize("num_splits", [1, 3], ids=lambda n: f"splits{n}")
def test_cache_batch_idx_and_leftpad(backend, num_splits, device):
    k_cache, v_cache, _ = make_cache(3, 70, 1, 64, torch.float16, device, spare_rows=2)
    q = torch.randn(3, 2, 7, 64, device=device).half()
    k, v = (torch.randn(3, 2, 1, 64, device=device).half() for _ in range(2))
    check_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=torch.tensor([10, 0, 66], dtype=torch.int32, device=device),
                  cache_batch_idx=torch.tensor([4, 0, 2], dtype=torch.int32, device=device),
                  cache_leftpad=torch.tensor([3, 0, 60], dtype=torch.int32, device=device), causal=True,
                  num_splits=num_splits)


def test_no_new_tokens_and_int_seqlens(backend, device):
    k_cache, v_cache, table = make_cache(2, 48, 1, 64, torch.float16, device, 16)
    q = torch.randn(2, 1, 3, 64, device=device).half()
    check_kvcache(q, k_cache, v_cache, cache_seqlens=41, block_table=table)


@pytest.mark.parametrize("page_size, seqlen_q, options", [
    (None, 1, {}), (16, 1, {}), (32, 5, {"causal": True, "window_size": (100, 0), "softcap": 4.0})], ids=str)
def test_every_num_splits_matches_one_split(backend, page_size, seqlen_q, options, device):
    k_cache, v_cache, table = make_cache(2, 300, 1, 64, torch.float16, device, page_size)
    q = torch.randn(2, seqlen_q, 7, 64, device=device).half()
    k, v = (torch.randn(2, seqlen_q, 1, 64, device=device).half() for _ in range(2))
    seqlens = torch.tensor([290, 7], dtype=torch.int32, device=device) - seqlen_q + 1
    results = {}
    for splits in (1, 2, 5, 0):
        kc, vc = k_cache.clone(), v_cache.clone()
        results[splits] = inference.flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=seqlens, block_table=table,
                                                            num_splits=splits, return_softmax_lse=True, **options)
    for splits in (2, 5, 0):
        torch.testing.assert_close(results[splits][0], results[1][0], atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(results[splits][1], results[1][1], atol=1e-4, rtol=1e-4)


# (Sq, Sk_new, causal, window): the fused append with more new tokens than queries, fewer, and a
# left window that hides the first new tokens from the last query block (which still writes them).
APPEND_CASES = [(1, 1, False, (-1, -1)), (1, 3, False, (-1, -1)), (5, 2, True, (-1, -1)), (20, 20, True, (3, -1)),
                (20, 20, True, (-1, -1))]


@pytest.mark.parametrize("num_splits", [1, 3], ids=lambda n: f"splits{n}")
@pytest.mark.parametrize("page_size", [None, 16], ids=lambda p: "contiguous" if p is None else f"page{p}")
@pytest.mark.parametrize("seqlen_q, seqlen_new, causal, window_size", APPEND_CASES, ids=str)
def test_fused_append_every_split(backend, seqlen_q, seqlen_new, causal, window_size, page_size, num_splits, device):
    """The append happens inside the attention launch: with several query blocks and splits,
    every new slot is written exactly once and nothing else changes (check_kvcache), and the
    attention sees the new keys whichever program reads them."""
    k_cache, v_cache, table = make_cache(3, 120, 1, 64, torch.float16, device, page_size)
    q = torch.randn(3, seqlen_q, 4, 64, device=device).half()
    k, v = (torch.randn(3, seqlen_new, 1, 64, device=device).half() for _ in range(2))
    seqlens = torch.tensor([0, 77, 100 - seqlen_new], dtype=torch.int32, device=device)
    check_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=seqlens, block_table=table, causal=causal,
                  window_size=window_size, num_splits=num_splits)


def test_append_without_queries(backend, device):
    """Sq = 0 still appends (a launch of query-less blocks writes the new tokens)."""
    k_cache, v_cache, table = make_cache(2, 48, 2, 32, torch.float16, device, 16)
    q = torch.randn(2, 0, 4, 32, device=device).half()
    k, v = (torch.randn(2, 3, 2, 32, device=device).half() for _ in range(2))
    out, lse = check_kvcache(q, k_cache, v_cache, k, v, block_table=table,
                             cache_seqlens=torch.tensor([15, 40], dtype=torch.int32, device=device))
    assert out.shape == (2, 0, 4, 32) and lse.shape == (2, 4, 0)


@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "halves"])
def test_rotary_head_dim_256_prefill(backend, interleaved, device):
    """64-row tiles at D = 256 rotate q before the launch (see rotate_q_in_kernel); k is still
    rotated and written inside it."""
    k_cache, v_cache, table = make_cache(2, 64, 1, 256, torch.float16, device, 16)
    q = torch.randn(2, 5, 4, 256, device=device).half()  # 5 x 4 rows > 16: 64-row tiles
    k, v = (torch.randn(2, 5, 1, 256, device=device).half() for _ in range(2))
    angle = torch.rand(64, 64, device=device) * 2 * math.pi  # rotary_dim 128 of 256
    check_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=torch.tensor([5, 40], dtype=torch.int32, device=device),
                  block_table=table, rotary_cos=angle.cos().half(), rotary_sin=angle.sin().half(),
                  rotary_interleaved=interleaved, causal=True, num_splits=2)


@pytest.mark.parametrize("seqlen, head_dim", [(5, 64), (1, 256)], ids=["64-row tiles", "decode D256"])
def test_rotary_with_a_strided_q(backend, seqlen, head_dim, device):
    """q sliced from a fused qkv projection (not contiguous) on the path that rotates q before
    the launch: the kernel must read the rotated copy with the copy's own strides."""
    k_cache, v_cache, table = make_cache(2, 64, 1, head_dim, torch.float16, device, 16)
    qkv = torch.randn(2, seqlen, 6, head_dim, device=device).half()
    q = qkv[:, :, :4]
    assert not q.is_contiguous()
    k, v = (torch.randn(2, seqlen, 1, head_dim, device=device).half() for _ in range(2))
    angle = torch.rand(64, head_dim // 4, device=device) * 2 * math.pi
    check_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=torch.tensor([5, 40], dtype=torch.int32, device=device),
                  block_table=table, rotary_cos=angle.cos().half(), rotary_sin=angle.sin().half(), causal=True)


def test_two_rows_appending_to_one_cache_row_is_refused(device):
    """The append is fused into the attention launch, so rows sharing a cache row would race."""
    k_cache, v_cache, _ = make_cache(2, 32, 1, 32, torch.float16, device)
    q = torch.randn(2, 1, 2, 32, device=device).half()
    k, v = (torch.randn(2, 1, 1, 32, device=device).half() for _ in range(2))
    before = k_cache.clone()
    with pytest.raises(ValueError, match="distinct cache_batch_idx"):
        inference.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=torch.tensor(
            [4, 2], dtype=torch.int32, device=device), cache_batch_idx=torch.tensor([0, 0], dtype=torch.int32,
                                                                                     device=device))
    assert torch.equal(k_cache, before)


def test_empty_batch(backend, device):
    k_cache, v_cache, _ = make_cache(1, 16, 1, 32, torch.float16, device)
    q = torch.randn(0, 1, 2, 32, device=device).half()
    out, lse = inference.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=3, return_softmax_lse=True)
    assert out.shape == (0, 1, 2, 32) and lse.shape == (0, 2, 1)


def test_fp32_runs_on_the_reference_path(device, monkeypatch):
    k_cache, v_cache, _ = make_cache(1, 20, 1, 32, torch.float32, device)
    q = torch.randn(1, 1, 2, 32, device=device)
    check_kvcache(q, k_cache, v_cache, cache_seqlens=9)
    monkeypatch.setenv("DOCQA_FAST_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="fp16/bf16"):
        inference.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=9)


# ------------------------------------------------------------------------------ bad input

def _bad_inputs(device):
    k_cache, v_cache, table = make_cache(2, 64, 1, 32, torch.float16, device, 32)
    q = torch.randn(2, 1, 2, 32, device=device).half()
    k, v = (torch.randn(2, 1, 1, 32, device=device).half() for _ in range(2))
    return dict(q=q, k_cache=k_cache, v_cache=v_cache, k=k, v=v, block_table=table,
                cache_seqlens=torch.tensor([3, 5], dtype=torch.int32, device=device))


def _rotary(n, device):
    return torch.ones(n, 8, device=device).half(), torch.zeros(n, 8, device=device).half()


BAD_INPUTS = {
    "page size 24": (lambda a: a.update(k_cache=a["k_cache"][:, :24], v_cache=a["v_cache"][:, :24]),
                     ValueError, "page size"),
    "block_table outside the cache": (lambda a: a["block_table"].__setitem__((1, 0), 99), ValueError, "block_table"),
    "negative block_table entry": (lambda a: a["block_table"].__setitem__((0, 0), -1), ValueError, "block_table"),
    "beyond capacity": (lambda a: a.update(cache_seqlens=torch.tensor([3, 64], dtype=torch.int32)), ValueError,
                        "capacity"),
    "rotary too short": (lambda a: a.update(zip(("rotary_cos", "rotary_sin"), _rotary(5, "cpu"))), ValueError,
                         "rotary_cos"),
    "k dtype": (lambda a: a.update(k=a["k"].float()), TypeError, "expected k of dtype"),
    "k_cache dtype": (lambda a: a.update(k_cache=a["k_cache"].float()), TypeError, "k_cache"),
    "cache_seqlens int64": (lambda a: a.update(cache_seqlens=a["cache_seqlens"].long()), TypeError, "cache_seqlens"),
    "block_table int64": (lambda a: a.update(block_table=a["block_table"].long()), TypeError, "block_table"),
    "k without v": (lambda a: a.update(v=None), ValueError, "k and v"),
    "k shape": (lambda a: a.update(k=a["k"][:, :, :, :16], v=a["v"][:, :, :, :16]), ValueError, "expected k of shape"),
    "heads not a multiple": (lambda a: a.update(q=torch.randn(2, 1, 3, 32).half(), k_cache=a["k_cache"].expand(
        -1, -1, 2, -1), v_cache=a["v_cache"].expand(-1, -1, 2, -1), k=None, v=None), ValueError, "multiple"),
    # Row 1 appends into row 0's page: one launch would write slots the other row reads (or writes).
    "page written by two rows": (lambda a: a["block_table"].__setitem__((1, 0), int(a["block_table"][0, 0])),
                                 ValueError, "block_table"),
    "leftpad with paged": (lambda a: a.update(cache_leftpad=torch.zeros(2, dtype=torch.int32)), ValueError,
                           "cache_leftpad"),
    "num_splits negative": (lambda a: a.update(num_splits=-1), ValueError, "num_splits"),
    "alibi shape": (lambda a: a.update(alibi_slopes=torch.ones(3)), ValueError, r"alibi_slopes of shape \(2,\)"),
    "alibi dtype": (lambda a: a.update(alibi_slopes=torch.ones(2).half()), TypeError, "alibi_slopes"),
    "strided rotary table": (lambda a: a.update(zip(("rotary_cos", "rotary_sin"),
                                                    (t.repeat(1, 2)[:, ::2] for t in _rotary(70, "cpu")))),
                             ValueError, "rotary_cos"),
    # The rotary tables' checks are apply_rotary_emb's (docqa_fast.rotary.check_tables), under this call's names.
    "rotary_sin shape": (lambda a: a.update(rotary_cos=_rotary(70, "cpu")[0], rotary_sin=_rotary(69, "cpu")[1]),
                         ValueError, r"rotary_sin of shape \(70, 8\) \(the shape of rotary_cos\)"),
    "rotary dtype": (lambda a: a.update(rotary_cos=_rotary(70, "cpu")[0].float(), rotary_sin=_rotary(70, "cpu")[1]),
                     TypeError, r"rotary_cos and rotary_sin of dtype torch.float16 \(the dtype of q\)"),
    "rotary dim past the head dim": (lambda a: a.update(zip(("rotary_cos", "rotary_sin"),
                                                            (torch.ones(70, 17).half(), torch.ones(70, 17).half()))),
                                     ValueError, r"rotary_cos of shape .* <= 32 \(q's head dim\)"),
}


def test_rows_sharing_a_page_the_append_does_not_write(backend, device):
    """A shared prefix page (full, only read) is fine in two rows; each appends into its own page."""
    k_cache, v_cache, table = make_cache(2, 64, 1, 32, torch.float16, device, 32)
    table[1, 0] = table[0, 0]
    q = torch.randn(2, 1, 2, 32, device=device).half()
    k, v = (torch.randn(2, 1, 1, 32, device=device).half() for _ in range(2))
    check_kvcache(q, k_cache, v_cache, k, v, block_table=table,
                  cache_seqlens=torch.tensor([40, 33], dtype=torch.int32, device=device))


def test_shared_written_page_rule_on_random_tables():
    """The device rule (a sort, no per-block count) against the rule written out: a page some row
    writes (slots cache_seqlens onwards) that block_table uses anywhere else among the pages in use."""
    from docqa_fast.inference.ops import _written_page_shared

    generator = torch.Generator().manual_seed(0)
    page = 16
    found = set()
    for trial in range(300):
        batch, width, blocks = (int(torch.randint(1, n, (1,), generator=generator)) for n in (5, 5, 12))
        table = torch.randint(0, blocks, (batch, width), generator=generator, dtype=torch.int32)
        new = int(torch.randint(1, 20, (1,), generator=generator))
        lengths = torch.randint(0, width * page - new + 1, (batch,), generator=generator) if width * page > new \
            else torch.zeros(batch, dtype=torch.long)
        ends = lengths + new
        uses = [(b, j) for b in range(batch) for j in range(width) if j * page < ends[b]]
        written = [(b, j) for b, j in uses if (j + 1) * page > lengths[b]]
        expected = any(sum(int(table[u]) == int(table[w]) for u in uses) > 1 for w in written)
        found.add(expected)
        assert bool(_written_page_shared(table, lengths, ends, page)) == expected, (table, lengths, new)
    assert found == {False, True}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_names_the_argument_before_writing(name):
    """Errors name the argument and are raised before anything is written to the cache."""
    args = _bad_inputs("cpu")
    mutate, error, match = BAD_INPUTS[name]
    mutate(args)
    before = args["k_cache"].clone(), args["v_cache"].clone()
    with pytest.raises(error, match=match):
        inference.flash_attn_with_kvcache(**args)
    assert torch.equal(args["k_cache"], before[0]) and torch.equal(args["v_cache"], before[1])


def test_custom_op_and_compile(backend, device):
    """The op passes torch.library.opcheck (its fake impl and mutation declaration) and compiles fullgraph."""
    k_cache, v_cache, table = make_cache(2, 32, 1, 32, torch.float16, device, 16)
    q = torch.randn(2, 1, 2, 32, device=device).half()
    k, v = (torch.randn(2, 1, 1, 32, device=device).half() for _ in range(2))
    seqlens = torch.tensor([3, 20], dtype=torch.int32, device=device)
    from docqa_fast.inference.ops import _kvcache_op
    args = (q, k_cache.clone(), v_cache.clone(), k, v, None, None, seqlens, None, None, table, 0.2, True, -1, -1, 0.0,
            True, 1, None)
    torch.library.opcheck(_kvcache_op, args, test_utils=("test_schema", "test_faketensor"))
    slopes = torch.rand(2, device=device)
    torch.library.opcheck(_kvcache_op, (*args[:1], k_cache.clone(), v_cache.clone(), *args[3:-1], slopes),
                          test_utils=("test_schema", "test_faketensor"))

    def step(q, k_cache, v_cache, k, v):
        return inference.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=seqlens, block_table=table,
                                                 causal=True)

    eager_k, eager_v = k_cache.clone(), v_cache.clone()
    expected = step(q, eager_k, eager_v, k, v)
    compiled_k, compiled_v = k_cache.clone(), v_cache.clone()
    got = torch.compile(step, fullgraph=True)(q, compiled_k, compiled_v, k, v)
    torch.testing.assert_close(got, expected)
    assert torch.equal(compiled_k, eager_k) and torch.equal(compiled_v, eager_v)


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a CUDA device")
def test_cuda_graph_capture_and_replay(backend, device):
    """Captured once, replayed with new lengths written into the same cache_seqlens tensor: no host sync,
    no value-dependent allocation, the same answer as an eager call."""
    if backend != "triton":
        pytest.skip("the reference path syncs (per-row loop); graphs are for the kernel path")
    k_cache, v_cache, table = make_cache(4, 512, 2, 128, torch.bfloat16, device, 16)
    q = torch.randn(4, 1, 8, 128, device=device).bfloat16()
    k, v = (torch.randn(4, 1, 2, 128, device=device).bfloat16() for _ in range(2))
    seqlens = torch.tensor([10, 0, 300, 77], dtype=torch.int32, device=device)

    def step():
        return inference.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=seqlens, block_table=table,
                                                 causal=True)

    graph = capture_cuda_graph(step)  # its warm-up compiles the kernels outside the capture
    seqlens.copy_(torch.tensor([11, 1, 301, 78], dtype=torch.int32, device=device))
    out = graph.replay()
    torch.cuda.synchronize()
    expected = step()
    torch.testing.assert_close(out, expected)
