"""What each rank of a spawned gloo world runs for tests/distributed/test_context_parallel.py.

One world per size (spawning costs seconds on a loaded 2-core machine): every case runs in
turn on every rank and the rank records ``None`` (passed) or the failure's text per case;
rank 0's and every other rank's records come back through files. Inputs are drawn from the
same seed on every rank, sharded, and the gathered outputs and gradients are compared by the
tolerance rule with the single-process computation: exact = the reference in fp64, plain =
the reference in the inputs' dtype (fp32 here; bf16 in the error-growth case).
"""

from __future__ import annotations

import datetime
import json
import os
import traceback

import torch
import torch.distributed as dist

TIMEOUT_S = 60  # the world's collective timeout: a hang fails the run instead of blocking it
SHORT_TIMEOUT_S = 4  # the group of the "a rank raises" case


def _exact_and_plain(q, k, v, grad, **options):
    """(out, dq, dk, dv) of the single-process computation in fp64 and at the inputs' dtype."""
    from docqa_fast.reference.attention import attention_ref

    results = []
    for dtype, upcast in ((torch.float64, True), (q.dtype, False)):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        out, _ = attention_ref(*leaves, upcast=upcast, **options)
        out.backward(grad.to(dtype))
        results.append((out.detach(), *(t.grad for t in leaves)))
    return results


def _check(actual, exact, plain):
    from docqa_fast.testing import assert_close_by_rule

    for name, a, e, p, factor in zip(("out", "dq", "dk", "dv"), actual, exact, plain, (2, 3, 3, 3)):
        assert_close_by_rule(a, e, p, factor=factor, name=name)


def _inputs(seed, shape_q, shape_kv, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(shape_q, generator=generator).to(dtype)
    k = torch.randn(shape_kv, generator=generator).to(dtype)
    v = torch.randn(shape_kv, generator=generator).to(dtype)
    grad = torch.randn(shape_q, generator=generator).to(dtype)
    return q, k, v, grad


def _run_sharded(fn, q, k, v, grad, split, gather, **kwargs):
    """Shard, run ``fn`` forward and backward, gather (out, dq, dk, dv)."""
    leaves = [split(t).detach().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves, **kwargs)
    out.backward(split(grad))
    return [gather(t) for t in (out.detach(), *(t.grad for t in leaves))]


def _boundaries(total, seed):
    generator = torch.Generator().manual_seed(seed)
    cuts = sorted(torch.randint(1, total, (4,), generator=generator).tolist())
    cuts.insert(1, cuts[1])  # an empty document
    return torch.tensor([0, *cuts, total], dtype=torch.int32)


def _ring_case(layout, varlen, causal, window, heads=(4, 2), head_dim=16, softcap=0.0, chunk=5, batch=2, seed=0):
    from docqa_fast import distributed as cp

    def case(world):
        per_rank = 2 if layout == "zigzag" else 1
        total = chunk * per_rank * world
        H, Hk = heads
        options = dict(causal=causal, window_size=window, softcap=softcap)
        split = lambda t: cp.split_sequence(t, 0 if varlen else 1, layout)  # noqa: E731
        gather = lambda t: cp.gather_sequence(t, 0 if varlen else 1, layout)  # noqa: E731
        if varlen:
            cu = _boundaries(total, seed)
            q, k, v, grad = _inputs(seed, (total, H, head_dim), (total, Hk, head_dim))
            fn = cp.zigzag_ring_flash_attn_varlen_func if layout == "zigzag" else cp.ring_flash_attn_varlen_func
            actual = _run_sharded(fn, q, k, v, grad, split, gather, cu_seqlens_q=cu, cu_seqlens_k=cu, **options)
            options.update(cu_seqlens_q=cu, cu_seqlens_k=cu)
        else:
            q, k, v, grad = _inputs(seed, (batch, total, H, head_dim), (batch, total, Hk, head_dim))
            fn = cp.zigzag_ring_flash_attn_func if layout == "zigzag" else cp.ring_flash_attn_func
            actual = _run_sharded(fn, q, k, v, grad, split, gather, **options)
        _check(actual, *_exact_and_plain(q, k, v, grad, **options))

    return case


def _lse_gradient(world):
    """The LSE that return_attn_probs gives is differentiable: a loss on out and lse together
    (what a ring-of-rings or a split-KV merge would do) has the single-process gradients."""
    from docqa_fast import distributed as cp
    from docqa_fast.reference.attention import attention_ref

    total, H, Hk, D = 4 * world, 4, 2, 16
    q, k, v, grad = _inputs(5, (1, total, H, D), (1, total, Hk, D))
    grad_lse = torch.randn(1, H, total, generator=torch.Generator().manual_seed(6))
    leaves = [cp.zigzag_split(t, 1).detach().requires_grad_() for t in (q, k, v)]
    out, lse, _ = cp.zigzag_ring_flash_attn_func(*leaves, causal=True, window_size=(5, -1), return_attn_probs=True)
    ((out * cp.zigzag_split(grad, 1)).sum() + (lse * cp.zigzag_split(grad_lse, 2)).sum()).backward()
    actual = [cp.zigzag_gather(t, 1) for t in (out.detach(), *(t.grad for t in leaves))]
    results = []
    for dtype, upcast in ((torch.float64, True), (torch.float32, False)):
        full = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        o, l = attention_ref(*full, causal=True, window_size=(5, -1), upcast=upcast)
        ((o * grad.to(dtype)).sum() + (l * grad_lse.to(dtype)).sum()).backward()
        results.append((o.detach(), *(t.grad for t in full)))
    _check(actual, *results)


def _ulysses_case(varlen, causal, window, heads, alibi=False, seed=1):
    from docqa_fast import distributed as cp

    def case(world):
        total, H, Hk, D = 6 * world, *heads, 16
        split = lambda t: cp.split_sequence(t, 0 if varlen else 1, "contiguous")  # noqa: E731
        gather = lambda t: cp.gather_sequence(t, 0 if varlen else 1, "contiguous")  # noqa: E731
        options = dict(causal=causal, window_size=window)
        if alibi:
            options["alibi_slopes"] = torch.rand(H, generator=torch.Generator().manual_seed(seed))
        if varlen:
            cu = _boundaries(total, seed)
            q, k, v, grad = _inputs(seed, (total, H, D), (total, Hk, D))
            actual = _run_sharded(cp.ulysses_flash_attn_varlen_func, q, k, v, grad, split, gather, cu_seqlens_q=cu,
                                  cu_seqlens_k=cu, max_seqlen_q=total, max_seqlen_k=total, **options)
            options.update(cu_seqlens_q=cu, cu_seqlens_k=cu)
        else:
            q, k, v, grad = _inputs(seed, (1, total, H, D), (1, total, Hk, D))
            actual = _run_sharded(cp.ulysses_flash_attn_func, q, k, v, grad, split, gather, **options)
        _check(actual, *_exact_and_plain(q, k, v, grad, **options))

    return case


def _hybrid_case(varlen, causal, window, seed=2):
    from docqa_fast import distributed as cp

    def case(world):
        layout = cp.setup_context_parallel(2, world // 2, timeout=datetime.timedelta(seconds=TIMEOUT_S))
        total, H, Hk, D = 4 * world, 4, 2, 16
        options = dict(causal=causal, window_size=window)
        dim = 0 if varlen else 1
        if varlen:
            cu = _boundaries(total, seed)
            q, k, v, grad = _inputs(seed, (total, H, D), (total, Hk, D))
            actual = _run_sharded(layout.attention, q, k, v, grad, lambda t: layout.split(t, dim),
                                  lambda t: layout.gather(t, dim), cu_seqlens=cu, max_seqlen=total, **options)
            options.update(cu_seqlens_q=cu, cu_seqlens_k=cu)
        else:
            q, k, v, grad = _inputs(seed, (1, total, H, D), (1, total, Hk, D))
            actual = _run_sharded(layout.attention, q, k, v, grad, lambda t: layout.split(t, dim),
                                  lambda t: layout.gather(t, dim), **options)
        _check(actual, *_exact_and_plain(q, k, v, grad, **options))

    return case


def _bf16_error(world):
    """Errors against fp64 of zigzag causal attention in bf16 through the ring and through one
    single-process call, [ring max, single max, ring mean, single mean] (the parent compares
    them across world sizes: an accumulator rounded to bf16 at every ring step adds a rounding
    per merged block, which the mean error shows; the max is dominated by the final rounding)."""
    from docqa_fast import distributed as cp
    from docqa_fast import flash_attn_func
    from docqa_fast.reference.attention import attention_ref

    total = 128  # the same global problem for every world size
    q, k, v, _ = _inputs(7, (2, total, 4, 32), (2, total, 4, 32), torch.bfloat16)
    out = cp.zigzag_gather(cp.zigzag_ring_flash_attn_func(*(cp.zigzag_split(t, 1) for t in (q, k, v)), causal=True), 1)
    exact, _ = attention_ref(q.double(), k.double(), v.double(), causal=True)
    single = flash_attn_func(q, k, v, causal=True)  # one process, the same kernels
    ring_error, single_error = (out.double() - exact).abs(), (single.double() - exact).abs()
    return [ring_error.max().item(), single_error.max().item(), ring_error.mean().item(), single_error.mean().item()]


def _model_step(world):
    """examples.context_parallel_step over a zigzag ring of the world: the loss and every
    parameter gradient (averaged over the ranks as DDP/FSDP do) equal the single-process ones;
    then the same through FSDP2's fully_shard (gloo, CPU)."""
    import copy

    from docqa_fast.distributed import ring_layout
    from examples.context_parallel_step import SINGLE, StepLoss, average_gradients, build_model, fsdp_wrap, make_batch

    model, batch = build_model(0), make_batch(0)
    reference = StepLoss(copy.deepcopy(model))
    expected = reference(batch, SINGLE)
    expected.backward()
    expected_grads = {name: p.grad for name, p in reference.named_parameters()}
    assert all(g is not None for g in expected_grads.values())
    layout = ring_layout()
    for fsdp in (False, True):
        step = fsdp_wrap(copy.deepcopy(model)) if fsdp else StepLoss(copy.deepcopy(model))
        loss = step(batch, layout)
        loss.backward()
        if not fsdp:
            average_gradients(step, None)
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
        for name, p in step.named_parameters():
            grad = p.grad.full_tensor() if fsdp else p.grad
            torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def _local_cu_seqlens(world):
    from docqa_fast.distributed import ring_layout
    from docqa_fast.distributed.transformers import local_cu_seqlens

    total = 8 * world
    cu = _boundaries(total, 3)
    layout = ring_layout()
    local = local_cu_seqlens(layout, cu, total).tolist()
    document = torch.bucketize(torch.arange(total), cu[1:].long(), right=True)
    mine = layout.split(document[None], 1)[0].tolist()
    position = layout.split(torch.arange(total)[None], 1)[0].tolist()
    expected = [0] + [i for i in range(1, len(mine)) if mine[i] != mine[i - 1] or position[i] != position[i - 1] + 1]
    assert local == expected + [len(mine)], (local, expected)


def _expect_error(fn, *patterns):
    from docqa_fast.distributed import ContextParallelError

    try:
        fn()
    except ContextParallelError as exc:
        for pattern in patterns:
            assert pattern in str(exc), f"{pattern!r} not in the error: {exc}"
        return
    raise AssertionError("expected a ContextParallelError on every rank")


def _fault_dtype(world):
    from docqa_fast import distributed as cp

    dtype = torch.float16 if dist.get_rank() == 1 else torch.float32
    q = torch.randn(1, 4, 2, 8, dtype=dtype)
    _expect_error(lambda: cp.zigzag_ring_flash_attn_func(q, q, q, causal=True), "differ", "float16", "rank 1")


def _fault_shape(world):
    from docqa_fast import distributed as cp

    q = torch.randn(1, 4 + 2 * (dist.get_rank() == world - 1), 2, 8)
    _expect_error(lambda: cp.zigzag_ring_flash_attn_func(q, q, q, causal=True), "differ", f"rank {world - 1}")


def _fault_indivisible(world):
    from docqa_fast import distributed as cp

    q = torch.randn(1, 5, 2, 8)  # zigzag needs an even local length
    _expect_error(lambda: cp.zigzag_ring_flash_attn_func(q, q, q, causal=True), "divisible by", "rank 0")
    cu = torch.tensor([0, 3, 4 * world], dtype=torch.int32)
    qv = torch.randn(4, 2, 8)
    bad_cu = cu if dist.get_rank() else torch.tensor([0, 3, 5], dtype=torch.int32)  # rank 0: wrong total
    _expect_error(lambda: cp.zigzag_ring_flash_attn_varlen_func(qv, qv, qv, bad_cu, bad_cu, causal=True),
                  "rank 0", "cu_seqlens_q")
    heads = torch.randn(1, 4, 3, 8)  # 3 heads over a Ulysses degree of 2 or 4
    _expect_error(lambda: cp.ulysses_flash_attn_func(heads, heads, heads), "Ulysses degree")


def _ring_reads_once(world):
    """A ring call reads the device on the host once: the agreement's gathered rows, with a packed
    call's cu_seqlens in the same copy; under value_checks(False) a packed call reads only the
    boundaries its plan needs and a dense one nothing."""
    import docqa_fast
    from docqa_fast.distributed import ring

    reads = []
    originals = {name: getattr(torch.Tensor, name) for name in ("item", "tolist", "__bool__", "__int__")}
    equal = torch.equal
    for name, original in originals.items():
        setattr(torch.Tensor, name,
                lambda self, *a, _o=original, _n=name, **k: (reads.append(_n), _o(self, *a, **k))[1])
    torch.equal = lambda a, b: (reads.append("equal"), equal(a, b))[1]
    q, cu = torch.randn(4, 2, 8), torch.tensor([0, 3, 3, 4 * world], dtype=torch.int32)
    found = {}
    try:
        for checks in (True, False):
            with docqa_fast.value_checks(checks):
                for kind, args in (("varlen", (q, q, q, cu, cu)), ("dense", (q[None], q[None], q[None], None, None))):
                    reads.clear()
                    ring._prepare(*args, 0.0, None, True, (-1, -1), 0.0, None, "zigzag", None)
                    found[kind, checks] = list(reads)
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
        torch.equal = equal
    assert found == {("varlen", True): ["tolist"], ("dense", True): ["tolist"], ("varlen", False): ["tolist"],
                     ("dense", False): []}, found


def _fault_shared_cu_seqlens(world):
    """cu_seqlens equally wrong on every rank (found after the one read, by every rank alike), and
    cu_seqlens_k unlike cu_seqlens_q: every rank raises, none waits."""
    from docqa_fast import distributed as cp

    qv = torch.randn(4, 2, 8)
    decreasing = torch.tensor([0, 5, 3, 4 * world], dtype=torch.int32)
    _expect_error(lambda: cp.zigzag_ring_flash_attn_varlen_func(qv, qv, qv, decreasing, decreasing, causal=True),
                  "every rank", "cu_seqlens_q to be non-decreasing")
    cu, other = (torch.tensor([0, c, 4 * world], dtype=torch.int32) for c in (3, 2))
    _expect_error(lambda: cp.ring_flash_attn_varlen_func(qv, qv, qv, cu, other), "every rank",
                  "cu_seqlens_k equal to cu_seqlens_q")
    mine = torch.tensor([0, 1 + dist.get_rank(), 4 * world], dtype=torch.int32)  # valid, but unlike the others'
    _expect_error(lambda: cp.zigzag_ring_flash_attn_varlen_func(qv, qv, qv, mine, mine), "differ",
                  "cu_seqlens_q+cu_seqlens_k=[0, 1")


def _fault_rank_raises(world):
    """Rank 1 fails before the call; the others must end with an error within the group's
    timeout, not wait forever."""
    from docqa_fast import distributed as cp

    group = dist.new_group(list(range(world)), timeout=datetime.timedelta(seconds=SHORT_TIMEOUT_S))
    q = torch.randn(1, 4, 2, 8)
    if dist.get_rank() == 1:
        return  # this rank "raised" in its own code and never calls
    try:
        cp.zigzag_ring_flash_attn_func(q, q, q, causal=True, group=group)
    except (TypeError, ValueError):
        raise  # an argument error is not the group's timeout (a hang is the parent's timeout to catch)
    except Exception:  # noqa: BLE001  (gloo's timeout error type varies by release)
        return
    raise AssertionError("expected an error when a rank never joins")


def cases(world: int) -> dict:
    """Every case of a world of ``world`` ranks, by name (the order they run in)."""
    found = {
        "zigzag-dense-causal-gqa": _ring_case("zigzag", False, True, (-1, -1)),
        "zigzag-dense-full-mha": _ring_case("zigzag", False, False, (-1, -1), heads=(4, 4)),
        "zigzag-dense-window-gqa41": _ring_case("zigzag", False, True, (4, -1), heads=(4, 1), head_dim=40),
        "zigzag-dense-twosided-window-softcap": _ring_case("zigzag", False, False, (3, 6), softcap=5.0),
        "zigzag-varlen-causal": _ring_case("zigzag", True, True, (-1, -1), chunk=7),
        "zigzag-varlen-full": _ring_case("zigzag", True, False, (-1, -1), chunk=7),
        "zigzag-varlen-window": _ring_case("zigzag", True, True, (5, -1), chunk=7),
        "zigzag-lse-gradient": _lse_gradient,
        "ring-dense-causal": _ring_case("contiguous", False, True, (-1, -1)),
        "ring-dense-window": _ring_case("contiguous", False, True, (3, -1)),
        "ring-varlen-twosided-window": _ring_case("contiguous", True, False, (2, 3), chunk=9),
        "ulysses-dense-causal": _ulysses_case(False, True, (-1, -1), (4, 2)),
        "ulysses-dense-alibi-repeat-kv": _ulysses_case(False, True, (-1, -1), (4, 1), alibi=True),
        "ulysses-varlen-window": _ulysses_case(True, True, (4, -1), (8, 4)),
    }
    if world % 2 == 0 and world > 2:
        found["hybrid-dense-causal"] = _hybrid_case(False, True, (-1, -1))
        found["hybrid-varlen-window"] = _hybrid_case(True, True, (3, -1))
    if world == 2:  # transformers in every rank costs seconds: the smallest world only
        found["model-step-and-fsdp2"] = _model_step
    found["local-cu-seqlens"] = _local_cu_seqlens
    found.update({"fault-dtype": _fault_dtype, "fault-shape": _fault_shape, "fault-indivisible": _fault_indivisible,
                  "fault-shared-cu-seqlens": _fault_shared_cu_seqlens, "ring-reads-once": _ring_reads_once})
    return found


def run(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ["DOCQA_FAST_BACKEND"] = "reference"  # fp32 on CPU: the reference runs every block
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}",
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    records = {}
    for name, case in cases(world).items():
        try:
            case(world)
            records[name] = None
        except Exception:  # noqa: BLE001  (recorded, the parent's test reports it)
            records[name] = traceback.format_exc(limit=6)
    try:
        records["bf16-error"] = _bf16_error(world)
    except Exception:  # noqa: BLE001
        records["bf16-error"] = traceback.format_exc(limit=6)
    dist.barrier()
    try:
        _fault_rank_raises(world)
        records["fault-rank-raises"] = None
    except Exception:  # noqa: BLE001
        records["fault-rank-raises"] = traceback.format_exc(limit=6)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(records, f)
    # The timed-out group cannot be torn down cleanly: leave without the teardown.
    os._exit(0)
