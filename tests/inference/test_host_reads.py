"""How often the KV-cache front ends' value checks read the device: once per
``flash_attn_with_kvcache`` call (every figure reduced on the device, then read together), four
times per ``flash_attn_varlen_func`` over a paged cache (q's boundaries, k's total, k's
boundaries, then the pages in use with the longest key sequence), never under
``value_checks(False)``. On a GPU each read is a host sync, which leaves the GPU idle while the
host prepares the launch.

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

_READING_OPS = ("aten._local_scalar_dense.", "aten.nonzero.", "aten.masked_select.", "aten.unique", "aten._unique")


class _HostReads(TorchDispatchMode):
    """The host reads of the calls made under it, by name (``tolist`` counted by the patch below)."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        boolean_index = name.startswith("aten.index.") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])
        if name.startswith(_READING_OPS) or boolean_index:
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def host_reads(monkeypatch):
    """Counts host reads; the attention ops are stubs returning None."""
    counter = _HostReads()
    tolist = torch.Tensor.tolist

    def counted_tolist(self):
        counter.reads.append("tolist")
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
    assert host_reads.reads == ["tolist"]


# max_seqlen_k past the table's capacity (32 slots) adds the longest sequence to the pages' read.
@pytest.mark.parametrize("max_seqlen_k", [23, 1000])
def test_paged_varlen_value_checks_read_the_device_four_times(host_reads, max_seqlen_k, device):
    args, options = _paged_varlen_inputs(device, max_seqlen_k)
    with host_reads:
        docqa_fast.flash_attn_varlen_func(*args, **options)
    # q's boundaries; k's total (int(cu_seqlens_k[-1])); k's boundaries; the pages in use.
    assert sorted(host_reads.reads) == sorted(["tolist", "aten._local_scalar_dense.default", "tolist", "tolist"])


def test_no_device_read_without_value_checks(host_reads, device):
    kvcache_args, kvcache_options = _kvcache_inputs(True, device)
    varlen_args, varlen_options = _paged_varlen_inputs(device, 23)
    with docqa_fast.value_checks(False), host_reads:
        docqa_fast.flash_attn_with_kvcache(*kvcache_args, **kvcache_options)
        docqa_fast.flash_attn_varlen_func(*varlen_args, **varlen_options)
    assert host_reads.reads == []


def test_the_counter_sees_a_boolean_index(host_reads, device):
    """The counter is not blind: the rule the pages' check had before (boolean indexing, then the
    minimum and maximum read one by one) counts three reads."""
    _, options = _kvcache_inputs(True, device)
    table = options["block_table"]
    with host_reads:
        entries = table.long()[table > 0]
        int(entries.min()), int(entries.max())
    assert len(host_reads.reads) == 3
