"""The decode kernel's unmasked interior never reads a key slot outside the sequence: randomized
calls of flash_attn_with_kvcache whose cache holds NaN in every slot the call must not read (past
cache_seqlens, before cache_leftpad, unused pages and rows), against the reference on the same
cache with random values there instead. An unmasked tile that reached one of those slots -- a
wrong interior bound for some mix of splits, pages smaller than a tile, odd lengths, causal /
window edges, leftpad, cache_batch_idx, appended tokens, ALiBi, softcap -- makes the output NaN.
(Masked tiles load nothing past the end, and the append's slots are read from k/v, not the cache.)
"""

import math
import random

import pytest
import torch

import docqa_fast
import docqa_fast.inference as inference
from docqa_fast.reference.kvcache import flash_attn_varlen_paged_ref, flash_attn_with_kvcache_ref
from docqa_fast.testing import assert_close_by_rule
from test_paged_varlen import make_paged  # tests/inference is on sys.path (pytest's rootdir insertion)

pytestmark = pytest.mark.backends("triton")


def _random_call(rng: random.Random, device):
    heads, kv_heads = rng.choice([(7, 1), (8, 2), (4, 4)])
    head_dim = rng.choice([32, 40, 64])
    batch = rng.randint(1, 3)
    page_size = rng.choice([None, None, 16, 32, 64, 128])  # 64: BLOCK_N here (whole tiles), 16/32: smaller
    lengths = [rng.choice([0, 1, rng.randint(2, 70), rng.randint(60, 200)]) for _ in range(batch)]
    seqlen_q = rng.choice([1, 1, 2, 3, 5, 11])
    seqlen_new = rng.choice([0, 1, 1, 3])
    causal = rng.random() < 0.5
    left = rng.choice([-1, -1, 0, 7, 40, 100])
    right = rng.choice([-1, -1, 0, 5]) if not causal else rng.choice([-1, 0])
    options = {"causal": causal, "window_size": (left, right), "num_splits": rng.choice([1, 2, 3, 5, 7]),
               "softcap": rng.choice([0.0, 0.0, 5.0])}
    if rng.random() < 0.3:
        options["alibi_slopes"] = torch.rand(heads, device=device) * 0.3
    capacity = max(lengths) + seqlen_new + rng.randint(0, 40)
    pads = [0] * batch
    rows = list(range(batch))
    spare = 0
    if page_size is None:
        if rng.random() < 0.4:
            pads = [rng.randint(0, n) for n in lengths]
            options["cache_leftpad"] = torch.tensor(pads, dtype=torch.int32, device=device)
        if rng.random() < 0.4:
            spare = 2
            rows = rng.sample(range(batch + spare), batch)
            options["cache_batch_idx"] = torch.tensor(rows, dtype=torch.int32, device=device)
        shape = (batch + spare, capacity, kv_heads, head_dim)
    else:
        max_blocks = math.ceil(capacity / page_size)
        num_blocks = batch * max_blocks + 2
        table = torch.randperm(num_blocks, device=device)[: batch * max_blocks].view(batch, max_blocks).int()
        options["block_table"] = table
        shape = (num_blocks, page_size, kv_heads, head_dim)
    k_cache, v_cache = (torch.randn(shape, device=device).half() for _ in range(2))
    # Slots the call may read: [leftpad, cache_seqlens) of each row, wherever they live.
    readable = torch.zeros(shape[:2], dtype=torch.bool, device=device)
    for b in range(batch):
        for pos in range(pads[b], lengths[b]):
            if page_size is None:
                readable[rows[b], pos] = True
            else:
                readable[int(table[b, pos // page_size]), pos % page_size] = True
    q = torch.randn(batch, seqlen_q, heads, head_dim, device=device).half()
    k = v = None
    if seqlen_new:
        k, v = (torch.randn(batch, seqlen_new, kv_heads, head_dim, device=device).half() for _ in range(2))
    options["cache_seqlens"] = torch.tensor(lengths, dtype=torch.int32, device=device)
    return q, k_cache, v_cache, k, v, readable, options


def _poisoned(cache, readable):
    """A copy of cache with NaN in every slot outside ``readable`` (a (rows or blocks, slots) mask)."""
    poisoned = cache.clone()
    poisoned[~readable] = float("nan")
    return poisoned


@pytest.mark.parametrize("seed", range(12))
def test_interior_reads_no_slot_outside_the_sequence(backend, seed, device):
    q, k_cache, v_cache, k, v, readable, options = _random_call(random.Random(seed), device)
    poisoned_k, poisoned_v = _poisoned(k_cache, readable), _poisoned(v_cache, readable)
    out, lse = inference.flash_attn_with_kvcache(q, poisoned_k, poisoned_v, k, v, return_softmax_lse=True,
                                                 **options)
    assert not out.isnan().any() and not lse.isnan().any(), f"a NaN slot was read: {options}"
    ref = {key: val for key, val in options.items() if key != "num_splits"}
    exact_out, exact_lse = flash_attn_with_kvcache_ref(
        q.double(), k_cache.double(), v_cache.double(), None if k is None else k.double(),
        None if v is None else v.double(), return_softmax_lse=True, **ref)
    plain_out, plain_lse = flash_attn_with_kvcache_ref(q, k_cache.clone(), v_cache.clone(), k, v,
                                                       return_softmax_lse=True, upcast=False, **ref)
    assert_close_by_rule(out, exact_out, plain_out, name="out")
    assert_close_by_rule(lse, exact_lse, plain_lse, name="lse")


@pytest.mark.parametrize("seed", range(6))
def test_paged_varlen_reads_no_slot_outside_the_sequence(backend, seed, device):
    """The same for flash_attn_varlen_func over a paged cache (packed queries: blocks past a
    sequence's queries, several query blocks per sequence)."""
    rng = random.Random(1000 + seed)
    heads, kv_heads = rng.choice([(7, 1), (8, 2)])
    head_dim, page_size = rng.choice([32, 40]), rng.choice([16, 32, 64, 128])
    lengths_q = [rng.choice([0, 1, 3, 12]) for _ in range(rng.randint(1, 3))]
    lengths_k = [rng.choice([0, 1, rng.randint(2, 200)]) for _ in lengths_q]
    options = {"causal": rng.random() < 0.5, "window_size": (rng.choice([-1, 9, 70]), rng.choice([-1, 0, 4])),
               "softcap": rng.choice([0.0, 5.0])}
    if options["causal"]:
        options["window_size"] = (options["window_size"][0], -1)
    if rng.random() < 0.3:
        options["alibi_slopes"] = torch.rand(heads, device=device) * 0.3
    q, k_cache, v_cache, cu_q, cu_k, table = make_paged(lengths_q, lengths_k, heads, kv_heads, head_dim, page_size,
                                                        torch.float16, device, spare_blocks=2)
    readable = torch.zeros(k_cache.shape[:2], dtype=torch.bool, device=device)
    for b, n in enumerate(lengths_k):
        for pos in range(n):
            readable[int(table[b, pos // page_size]), pos % page_size] = True
    poisoned_k, poisoned_v = _poisoned(k_cache, readable), _poisoned(v_cache, readable)
    out, lse, _ = docqa_fast.flash_attn_varlen_func(q, poisoned_k, poisoned_v, cu_q, cu_k, max(lengths_q),
                                                    max(lengths_k), block_table=table, return_attn_probs=True,
                                                    **options)
    assert not out.isnan().any() and not lse.isnan().any(), f"a NaN slot was read: {options}"
    exact_out, exact_lse = flash_attn_varlen_paged_ref(q.double(), k_cache.double(), v_cache.double(), cu_q, cu_k,
                                                       table, **options)
    plain_out, plain_lse = flash_attn_varlen_paged_ref(q, k_cache, v_cache, cu_q, cu_k, table, upcast=False,
                                                       **options)
    assert_close_by_rule(out, exact_out, plain_out, name="out")
    assert_close_by_rule(lse, exact_lse, plain_lse, name="lse")
