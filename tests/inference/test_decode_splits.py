"""The split-KV decode kernel's tiling against the reference: odd lengths and head dims, GQA 28/4,
pages of 16 and 256 shuffled in memory, empty cache rows, every split count, the key ranges that
put tiles in the unmasked interior, the masked head (left window) and the masked tail -- and the
split heuristic's properties.

Sizes are the smallest that reach each code path under the Triton interpreter: BLOCK_N is 64 for
head dims up to 128 (32 above), so contexts of 113 and 203 have interior tiles and a partial tail.
"""

import pytest
import torch
import triton

import docqa_fast
from test_kvcache import check_kvcache, make_cache  # tests/inference is on sys.path (pytest's rootdir insertion)

from docqa_fast.kernels import inference as kernels
from docqa_fast.kernels import tuning

pytestmark = pytest.mark.backends("reference", "triton")


def _decode(batch, heads, kv_heads, head_dim, lengths, device, page_size=None, seqlen_q=1, seqlen_new=1,
            **options):
    capacity = max(lengths) + seqlen_new + 3
    k_cache, v_cache, table = make_cache(batch, capacity, kv_heads, head_dim, torch.float16, device, page_size)
    q = torch.randn(batch, seqlen_q, heads, head_dim, device=device).half()
    k = v = None
    if seqlen_new:
        k, v = (torch.randn(batch, seqlen_new, kv_heads, head_dim, device=device).half() for _ in range(2))
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
    return check_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=seqlens, block_table=table, **options)


# (head_dim, lengths, page_size): contexts 1, 113 and 203 (after the one new token: 2, 114, 204), odd head
# dims (masked to the next power of two), an empty row beside a long one; pages of 16 (one table entry
# per key) and 256 (whole tiles: one entry per tile).
ODD_CASES = [
    (40, [0, 113], None),
    (59, [202, 1], 16),
    (80, [113, 0], 256),
    (80, [203], 16),
]


@pytest.mark.parametrize("head_dim, lengths, page_size", ODD_CASES, ids=str)
def test_odd_sizes_match_reference(backend, head_dim, lengths, page_size, device):
    _decode(len(lengths), 7, 1, head_dim, lengths, device, page_size)


@pytest.mark.parametrize("page_size", [None, 16, 256], ids=lambda p: "contiguous" if p is None else f"page{p}")
def test_gqa_28_4_tiny_contexts(backend, page_size, device):
    """Qwen2.5-VL's 28 / 4 heads (7 query heads per KV head: 7 of a 16-row tile), contexts 0 to 3."""
    _decode(4, 28, 4, 32, [0, 1, 2, 3], device, page_size)


def test_empty_cache_rows(backend, device):
    """Rows with no cached key: with one new token they see only it; with none, nothing (out 0, lse -inf)."""
    _decode(3, 7, 1, 64, [0, 0, 130], device, 16)
    out, lse = _decode(2, 7, 1, 64, [0, 70], device, seqlen_new=0)
    assert torch.all(out[0] == 0) and torch.all(lse[0] == float("-inf"))


@pytest.mark.parametrize("num_splits", [1, 5, 16], ids=lambda n: f"splits{n}")
@pytest.mark.parametrize("page_size", [None, 16, 256], ids=lambda p: "contiguous" if p is None else f"page{p}")
def test_split_sweep(backend, page_size, num_splits, device):
    """Every split count, including more splits than tiles (idle splits) and splits that end mid-page."""
    _decode(2, 7, 1, 32, [203, 64], device, page_size, num_splits=num_splits)


@pytest.mark.parametrize("page_size", [None, 256], ids=lambda p: "contiguous" if p is None else f"page{p}")
@pytest.mark.parametrize("options", [{"window_size": (70, -1), "causal": True}, {"window_size": (100, 1)},
                                     {"causal": True}], ids=str)
def test_interior_head_and_tail(backend, page_size, options, device):
    """Four queries, one new token (speculative decoding's verify step): the causal / right-window
    edges cut cached keys (in the row of 128, the last keys of a whole tile: a masked tail tile,
    not part of the interior), a left window leaves masked head tiles
    before the unmasked interior (and, with pages of whole tiles, a first tile aligned down below
    the window: unaligned, the row of 300's tiles would straddle its first page's end)."""
    _decode(2, 7, 1, 32, [300, 128], device, page_size, seqlen_q=4, seqlen_new=1, num_splits=2, **options)


def test_chunked_prefill_over_pages_of_whole_tiles(backend, device):
    """64-row tiles (9 queries x 7 heads) over pages of 256: interior tiles under the causal edge."""
    _decode(1, 7, 1, 32, [150], device, 256, seqlen_q=20, seqlen_new=20, causal=True)


# ------------------------------------------------------------------------- the heuristic

SHAPES = [(batch, seqlen_q, heads, kv_heads, capacity) for batch in (1, 2, 8, 64, 512)
          for seqlen_q in (1, 4, 64) for heads, kv_heads in ((28, 4), (32, 8), (8, 8)) for capacity in (1, 600, 131072)]


@pytest.mark.parametrize("waves, min_keys", [(2, 512), (1, 256), (4, 1024)], ids=str)
def test_split_heuristic_properties(waves, min_keys):
    for batch, seqlen_q, heads, kv_heads, capacity in SHAPES:
        splits = kernels.num_splits_heuristic(batch, seqlen_q, heads, kv_heads, capacity, 132, waves, min_keys)
        assert 1 <= splits <= kernels.MAX_SPLITS
        assert splits == 1 or splits <= triton.cdiv(capacity, min_keys)  # each split keeps min_keys keys
        _, per_block = kernels.launch_shape(batch, seqlen_q, heads, kv_heads)
        programs = batch * kv_heads * triton.cdiv(seqlen_q, per_block)
        if splits < min(kernels.MAX_SPLITS, triton.cdiv(capacity, min_keys)):
            assert programs * splits >= waves * 132  # not capped: the launch covers the SMs
        else:
            assert programs * (splits - 1) < waves * 132 or splits == 1  # never more than covering needs
        more = kernels.num_splits_heuristic(2 * batch, seqlen_q, heads, kv_heads, capacity, 132, waves, min_keys)
        assert more <= splits  # a bigger batch fills the GPU with fewer splits


def test_split_heuristic_examples():
    """B 1 over 128K at 28 / 4 on an H200's 132 SMs: 66 splits of ~2K keys; B 64 at 32K: one program per SM pair."""
    assert kernels.num_splits_heuristic(1, 1, 28, 4, 131072, 132) == 66
    assert kernels.num_splits_heuristic(64, 1, 28, 4, 32768, 132) == 2
    assert kernels.num_splits_heuristic(1, 1, 28, 4, 300, 132) == 1


def test_split_constants_come_from_the_tuned_table(device):
    assert kernels.split_constants(device) in (kernels.SPLIT_DEFAULTS,
                                               tuning.lookup("decode_splits", kernels.SPLIT_KEY, {}, device))
    with tuning.override("decode_splits", kernels.SPLIT_KEY, {"waves": 4, "min_keys": 256}):
        assert kernels.split_constants(device) == {"waves": 4, "min_keys": 256}
    with pytest.raises(ValueError, match="decode_splits"):
        tuning.check_tiles("decode_splits", {"waves": 2})


@pytest.mark.parametrize("checked", [True, False])
def test_block_table_without_pages_is_refused(backend, device, checked):
    # The kernels read each row's first table entry ahead of their loop: a (B, 0) table is refused
    # by the shape checks, which value_checks(False) keeps.
    q = torch.randn(1, 1, 4, 64, device=device, dtype=torch.float16)
    cache = torch.zeros(2, 64, 2, 64, device=device, dtype=torch.float16)
    with docqa_fast.value_checks(checked), pytest.raises(ValueError, match="at least one page per row"):
        docqa_fast.flash_attn_with_kvcache(q, cache, cache.clone(), cache_seqlens=torch.zeros(1, dtype=torch.int32,
                                                                                              device=device),
                                           block_table=torch.zeros(1, 0, dtype=torch.int32, device=device))
