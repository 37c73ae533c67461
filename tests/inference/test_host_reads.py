"""How often the KV-cache front ends' value checks read the device: once per
``flash_attn_with_kvcache`` call and once per ``flash_attn_varlen_func`` over a paged cache
(every figure reduced on the device, then read together), never under ``value_checks(False)``.
On a GPU each read is a host sync, which leaves the GPU idle while the host prepares the launch.

Counted on any device as the calls that read tensor values on the host: ``Tensor.tolist`` and
the ops that copy a value out (``item``, ``int()``, ``bool()``: ``aten._local_scalar_dense``) or
whose output size depends on values (``nonzero``, ``masked_select``, boolean indexing,
``unique``). The attention op itself is replaced by a stub: only validation is counted (the
reference path reads values per row by design).
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import docqa_fast
from docqa_fast.inference import ops
from docqa_fast.testing import OpLog

_READING_OPS = ("aten._local_scalar_dense.", "aten.nonzero.", "aten.masked_select.", "aten.unique", "aten._unique")


def _reads_host(name, args):
    """Whether a dispatched op reads tensor values on the host (``tolist`` is counted by the patch below)."""
    boolean_index = name.startswith("aten.index.") and any(
        isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])
    return name.startswith(_READING_OPS) or boolean_index


@pytest.fixture
def host_reads(monkeypatch):
    """The host reads of the calls made under it, by name, in ``ops``; the attention ops are stubs
    returning None."""
    counter = OpLog(keep=_reads_host)
    tolist = torch.Tensor.tolist

    def counted_tolist(self):
        counter.ops.append("tolist")
        return tolist(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counted_tolist)
    monkeypatch.setattr(ops, "_kvcache_op", lambda *args: (None, None))
    monkeypatch.setattr(ops, "_varlen_paged_op", lambda *args: (None, None))
    return counter


def _kvcache_inputs(paged, device):
    batch, heads, kv_heads, head_dim, page = 3, 4, 2, 32, 16
    q = torch.randn(batch, 1, heads, head_dim, device=device, dtype=torch.float16)
    new = [torch.randn(batch, 1, kv_heads, head_dim, device=device, dtype=torch.float16) for _ in range(2)]
    angles = torch.rand(64, head_dim // 4, device=device)
    options = dict(k=new[0], v=new[1], rotary_cos=angles.cos().half(), rotary_sin=angles.sin().half(),
                   cache_seqlens=torch.tensor([5, 0, 20], dtype=torch.int32, device=device), causal=True)
    if paged:
        cache_shape = (8, page, kv_heads, head_dim)
        options["block_table"] = torch.tensor([[3, 0], [1, 7], [2, 5]], dtype=torch.int32, device=device)
    else:
        cache_shape = (4, 32, kv_heads, head_dim)
        options.update(cache_batch_idx=torch.tensor([2, 0, 3], dtype=torch.int32, device=device),
                       cache_leftpad=torch.tensor([1, 0, 4], dtype=torch.int32, device=device))
    caches = [torch.zeros(cache_shape, device=device, dtype=torch.float16) for _ in range(2)]
    return (q, *caches), options


def _paged_varlen_inputs(device, max_seqlen_k):
    page, kv_heads, head_dim = 16, 2, 32
    q = torch.randn(5, 4, head_dim, device=device, dtype=torch.float16)
    caches = [torch.randn(6, page, kv_heads, head_dim, device=device, dtype=torch.float16) for _ in range(2)]
    cu_q = torch.tensor([0, 2, 2, 5], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 17, 17, 40], dtype=torch.int32, device=device)
    table = torch.tensor([[4, 1], [0, 0], [5, 2]], dtype=torch.int32, device=device)
    return (q, *caches, cu_q, cu_k, 3, max_seqlen_k), dict(block_table=table, causal=True)


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_kvcache_value_checks_read_the_device_once(host_reads, paged, device):
    args, options = _kvcache_inputs(paged, device)
    with host_reads:
        docqa_fast.flash_attn_with_kvcache(*args, **options)
    assert host_reads.ops == ["tolist"]


# max_seqlen_k past the table's capacity (32 slots): the longest key sequence is judged against it too.
@pytest.mark.parametrize("max_seqlen_k", [23, 1000])
def test_paged_varlen_value_checks_read_the_device_once(host_reads, max_seqlen_k, device):
    args, options = _paged_varlen_inputs(device, max_seqlen_k)
    with host_reads:
        docqa_fast.flash_attn_varlen_func(*args, **options)
    # q's and k's boundaries and the pages in use, together.
    assert host_reads.ops == ["tolist"]


def _i32(*values):
    return torch.tensor(values, dtype=torch.int32)


# Each value rule of the paged varlen path still refuses, naming the argument, from the one read.
PAGED_VARLEN_BAD = {
    "q boundaries end": (dict(cu_seqlens_q=_i32(0, 2, 2, 4)),
                         "cu_seqlens_q to start at 0 and end at the token count 5"),
    "q longer than max_seqlen_q": (dict(max_seqlen_q=2), "max_seqlen_q >= every sequence length"),
    "k not starting at 0": (dict(cu_seqlens_k=_i32(1, 17, 17, 40)), "cu_seqlens_k to start at 0"),
    "k decreasing": (dict(cu_seqlens_k=_i32(0, 17, 10, 40)), "cu_seqlens_k to be non-decreasing"),
    # int32 differences wrap: 2**31 - 1 then -2 once read as a length of 2**31 - 1 and passed.
    "q wrapping int32": (dict(cu_seqlens_q=_i32(0, 2**31 - 1, -2, 5), max_seqlen_q=2**31 - 1),
                         "cu_seqlens_q to be non-decreasing"),
    "k longer than max_seqlen_k": (dict(max_seqlen_k=20), "max_seqlen_k >= every sequence length"),
    "k past the capacity": (dict(cu_seqlens_k=_i32(0, 33, 33, 40), max_seqlen_k=1000),
                            r"key length \(cu_seqlens_k\) <= the block_table capacity 32"),
    "page outside the cache": (dict(block_table=_i32(4, 1, 0, 0, 5, 6).view(3, 2)), "block_table entries"),
}


@pytest.mark.parametrize("name", list(PAGED_VARLEN_BAD))
def test_paged_varlen_value_checks_refuse_after_one_read(host_reads, name, device):
    changes, match = PAGED_VARLEN_BAD[name]
    args, options = _paged_varlen_inputs(device, 23)
    names = ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k")
    arguments = {**dict(zip(names, args)), **options}
    arguments.update({key: value.to(device) if isinstance(value, torch.Tensor) else value
                      for key, value in changes.items()})
    with host_reads, pytest.raises(ValueError, match=match):
        docqa_fast.flash_attn_varlen_func(**arguments)
    # The judgement comes from the one read; only a message may read more (the first boundaries).
    assert host_reads.ops[0] == "tolist" and "aten._local_scalar_dense.default" not in host_reads.ops


def test_no_device_read_without_value_checks(host_reads, device):
    kvcache_args, kvcache_options = _kvcache_inputs(True, device)
    varlen_args, varlen_options = _paged_varlen_inputs(device, 23)
    with docqa_fast.value_checks(False), host_reads:
        docqa_fast.flash_attn_with_kvcache(*kvcache_args, **kvcache_options)
        docqa_fast.flash_attn_varlen_func(*varlen_args, **varlen_options)
    assert host_reads.ops == []


def test_the_counter_sees_a_boolean_index(host_reads, device):
    """The counter is not blind: the rule the pages' check had before (boolean indexing, then the
    minimum and maximum read one by one) counts three reads."""
    _, options = _kvcache_inputs(True, device)
    table = options["block_table"]
    with host_reads:
        entries = table.long()[table > 0]
        int(entries.min()), int(entries.max())
    assert len(host_reads.ops) == 3


class _LargestStorage(TorchDispatchMode):
    """The largest storage, in bytes, of any tensor an op under it returns (a view counts its
    base's storage: the broadcast cache below is one page)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.untyped_storage().nbytes())
        return out


def test_append_checks_allocate_nothing_of_the_cache_size(host_reads, device):
    """The shared-written-page check costs the block table's size, not the cache's block count
    (a count per block was 8 MB for a million-page cache on every decode step). The cache is
    one page broadcast to a million blocks, so the test allocates no more than the checks do."""
    args, options = _kvcache_inputs(True, device)
    q, k_cache, v_cache = args
    blocks = 2 ** 20
    k_cache, v_cache = (c[:1].expand(blocks, *c.shape[1:]) for c in (k_cache, v_cache))
    options["block_table"] = options["block_table"] * 1000 + 7  # in use, far apart, none shared
    sizes = _LargestStorage()
    with host_reads, sizes:
        docqa_fast.flash_attn_with_kvcache(q, k_cache, v_cache, **options)
    assert host_reads.ops == ["tolist"]
    assert 0 < sizes.largest <= 4096  # the table has 6 entries; a cache page is 2 KB, q 768 bytes
    options["block_table"][2, 1] = options["block_table"][0, 0]  # row 2 appends into its page 1: shared
    with pytest.raises(ValueError, match="block_table page the append writes"):
        docqa_fast.flash_attn_with_kvcache(q, k_cache, v_cache, **options)
