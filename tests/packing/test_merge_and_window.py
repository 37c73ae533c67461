"""merge_visual_tokens against masked_scatter (values and gradients); vision_window_index
against the installed transformers' Qwen2.5-VL window index."""

import random
import zlib

import pytest
import torch

from docqa_fast.packing import merge_visual_tokens, vision_window_index
from docqa_fast.reference.packing import merge_visual_tokens_ref, vision_window_index_ref
from docqa_fast.testing import OpLog, capture_cuda_graph, no_host_sync

IMAGE, VIDEO = 151655, 151656
# merge: "extension" = the extension (CUDA kernels on a GPU, their C++ twins on CPU tensors here),
# "reference" = the PyTorch path.
pytestmark = pytest.mark.backends("reference", "extension")


def _ids(shape, n_image, n_video=0):
    ids = torch.randint(0, 1000, shape)
    flat = ids.view(-1)
    pos = torch.randperm(flat.numel())[: n_image + n_video]
    flat[pos[:n_image]] = IMAGE
    flat[pos[n_image:]] = VIDEO
    return ids


# dtype: fp16, bf16 and fp32 from the conftest
@pytest.mark.parametrize("shape, n_image, n_video", [((2, 113, 80), 40, 0), ((203, 16), 0, 0), ((1, 7, 8), 7, 0),
                                                     ((3, 50, 24), 30, 12)])
@pytest.mark.parametrize("check", [True, False])
def test_merge_equals_masked_scatter(backend, shape, n_image, n_video, dtype, check, device):
    embeds = torch.randn(shape, dtype=dtype, device=device, requires_grad=True)
    ids = _ids(shape[:-1], n_image, n_video).to(device)
    visual = torch.randn(n_image + n_video, shape[-1], dtype=dtype, device=device, requires_grad=True)
    token = IMAGE if not n_video else (IMAGE, VIDEO)
    out = merge_visual_tokens(embeds, ids, visual, token, check=check)
    expected = merge_visual_tokens_ref(embeds, ids, visual, token)
    assert torch.equal(out, expected)
    grad = torch.randn_like(out)
    g_ours = torch.autograd.grad(out, (embeds, visual), grad)
    g_ref = torch.autograd.grad(expected, (embeds, visual), grad)
    for a, b in zip(g_ours, g_ref):
        assert torch.equal(a, b)


def test_merge_features_with_leading_dims_and_opcheck(backend):
    embeds = torch.randn(2, 30, 16)
    ids = _ids((2, 30), 12)
    visual = torch.randn(3, 4, 16)  # e.g. per-image feature blocks
    assert torch.equal(merge_visual_tokens(embeds, ids, visual, IMAGE), merge_visual_tokens_ref(embeds, ids, visual, IMAGE))
    from docqa_fast.packing.ops import merge_visual_tokens_op as _merge_op

    torch.library.opcheck(_merge_op, (embeds.requires_grad_(), ids, visual.requires_grad_(), torch.tensor([IMAGE])))
    from docqa_fast.packing.ops import merge_visual_tokens_backward_op as _merge_backward_op

    torch.library.opcheck(_merge_backward_op, (torch.randn(2, 30, 16), ids, torch.tensor([IMAGE]), 12))


def test_merge_unaligned_rows_and_views(backend):
    # odd hidden size (no 16-byte vectors), a non-contiguous view of the embeddings
    base = torch.randn(3, 41, 2 * 13, dtype=torch.float16)
    embeds = base[..., ::2]
    ids = _ids((3, 41), 20)
    visual = torch.randn(20, 13, dtype=torch.float16, requires_grad=True)
    out = merge_visual_tokens(embeds, ids, visual, IMAGE)
    assert torch.equal(out, merge_visual_tokens_ref(embeds, ids, visual, IMAGE))
    out.sum().backward()
    assert torch.equal(visual.grad, torch.ones_like(visual))


def test_merge_compiles_fullgraph(backend):
    embeds, ids, visual = torch.randn(1, 40, 8), _ids((1, 40), 10), torch.randn(10, 8)
    fn = torch.compile(lambda e, i, v: merge_visual_tokens(e, i, v, IMAGE, check=False), fullgraph=True)
    assert torch.equal(fn(embeds, ids, visual), merge_visual_tokens_ref(embeds, ids, visual, IMAGE))


@pytest.mark.parametrize("token", [IMAGE, (IMAGE, VIDEO), [VIDEO, IMAGE], "cpu tensor"])
def test_merge_token_ids_not_built_from_host_data(token):
    """check=False must not sync on CUDA tensors, nor hold a copy a CUDA graph cannot capture:
    the placeholder ids may not be built from host data. torch.tensor(ids, device="cuda")
    dispatches as aten.lift_fresh (its pageable host-to-device copy, a stream sync, done
    before); a CPU id tensor moved to the device would be an aten._to_copy. Ids filled in
    by kernels (aten.full) need neither; seen here on CPU tensors, the same calls on CUDA."""
    expected_token = IMAGE if token == IMAGE else (IMAGE, VIDEO)
    if token == "cpu tensor":
        token = torch.tensor([IMAGE, VIDEO])
    embeds, ids, visual = torch.randn(2, 30, 8), _ids((2, 30), 6, 4), torch.randn(10, 8)
    with OpLog() as log:
        out = merge_visual_tokens(embeds, ids, visual, token, check=False)
    names = log.ops
    assert not [n for n in names if "lift_fresh" in n or "_to_copy" in n or n.startswith("aten.copy")], names
    assert "aten.full.default" in names
    assert torch.equal(out, merge_visual_tokens_ref(embeds, ids, visual, expected_token))


def test_merge_bad_input(backend):
    embeds, ids, visual = torch.randn(2, 10, 8), _ids((2, 10), 4), torch.randn(4, 8)
    with pytest.raises(ValueError, match="tokens: 4, features: 3"):
        merge_visual_tokens(embeds, ids, visual[:3], IMAGE)
    with pytest.raises(TypeError, match="visual_embeds of dtype torch.float32"):
        merge_visual_tokens(embeds, ids, visual.half(), IMAGE)
    with pytest.raises(ValueError, match="last dimension of 8"):
        merge_visual_tokens(embeds, ids, torch.randn(4, 7), IMAGE)
    with pytest.raises(ValueError, match="input_ids of shape"):
        merge_visual_tokens(embeds, ids[:, 1:], visual, IMAGE)
    with pytest.raises(TypeError, match="input_ids of dtype"):
        merge_visual_tokens(embeds, ids.float(), visual, IMAGE)
    with pytest.raises(TypeError, match="token_id"):
        merge_visual_tokens(embeds, ids, visual, 1.5)
    with pytest.raises(TypeError, match="inputs_embeds of dtype"):
        merge_visual_tokens(embeds.long(), ids, visual, IMAGE)
    # unchecked mismatches never index out of bounds
    assert merge_visual_tokens(embeds, ids, visual[:1], IMAGE, check=False).shape == embeds.shape
    assert merge_visual_tokens(embeds, ids, visual[:0], IMAGE, check=False).shape == embeds.shape
    surplus = merge_visual_tokens(embeds, ids, torch.randn(9, 8), IMAGE, check=False)  # features beyond the count
    assert surplus.shape == embeds.shape


@pytest.mark.parametrize("N, n_placeholders, n_features", [
    (0, 0, 0), (1, 1, 1), (31, 0, 0), (33, 33, 33), (1000, 517, 517),  # tiles of 32 rows: partial, full, many
    (1000, 517, 400), (1000, 517, 700), (97, 5, 0),  # unchecked mismatches: fewer, more, no features
])
@pytest.mark.parametrize("ids_dtype", [torch.int64, torch.int32, torch.int16])
def test_merge_tiles_and_unchecked_counts(backend, N, n_placeholders, n_features, ids_dtype, device):
    """The in-launch prefix sum across tiles, id dtypes read in place or converted, and
    count mismatches (check=False): equal to the reference, values and gradients, and the
    feature rows no placeholder reached get a zero gradient."""
    H = 24
    ids = _ids((N,), n_placeholders).to(ids_dtype) if ids_dtype != torch.int16 else \
        torch.where(_ids((N,), n_placeholders) == IMAGE, 7, 3).to(ids_dtype)
    token = IMAGE if ids_dtype != torch.int16 else 7
    embeds = torch.randn(N, H, device=device, requires_grad=True)
    visual = torch.randn(n_features, H, device=device, requires_grad=True)
    ids = ids.to(device)
    out = merge_visual_tokens(embeds, ids, visual, token, check=False)
    grad = torch.randn_like(out)
    g_embeds, g_visual = torch.autograd.grad(out, (embeds, visual), grad)
    # The documented semantics, written out: the j-th placeholder takes feature row
    # min(j, V - 1) (its embedding when there are no features); a feature row's gradient is
    # its placeholder's, 0 for rows no placeholder reached; placeholder rows pass no gradient
    # to the embeddings.
    where = (ids == token).nonzero().flatten()
    expected = embeds.detach().clone()
    if n_features:
        expected[where] = visual.detach()[torch.arange(len(where), device=device).clamp_max(n_features - 1)]
    assert torch.equal(out, expected)
    reached = min(len(where), n_features)
    expected_gv = torch.zeros_like(visual)
    expected_gv[:reached] = grad[where[:reached]]
    assert torch.equal(g_visual, expected_gv)
    assert torch.equal(g_embeds, grad.masked_fill((ids == token)[:, None], 0))
    if n_placeholders == n_features:  # and masked_scatter, where it is defined
        assert torch.equal(out, merge_visual_tokens_ref(embeds, ids, visual, token))


def test_merge_extension_ops_reject_bad_arguments():
    from docqa_fast._backend import extension

    ext = extension()
    if ext is None:
        pytest.skip("docqa_fast._C is not built")
    rows, visual, out = torch.randn(10, 8), torch.randn(4, 8), torch.empty(10, 8)
    ids, tokens = _ids((10,), 4), torch.tensor([IMAGE])
    with pytest.raises(TypeError, match="input_ids of dtype int32 or int64"):
        ext.merge_visual_forward(rows, ids.float(), tokens, visual, out)
    with pytest.raises(ValueError, match="input_ids as a contiguous"):
        ext.merge_visual_forward(rows, ids[:9], tokens, visual, out)
    with pytest.raises(ValueError, match="token_ids as a non-empty"):
        ext.merge_visual_forward(rows, ids, tokens[:0], visual, out)
    with pytest.raises(ValueError, match="visual rows with H = 8"):
        ext.merge_visual_forward(rows, ids, tokens, torch.randn(4, 6), out)
    with pytest.raises(ValueError, match="output shaped like"):
        ext.merge_visual_backward(rows, ids, tokens, torch.empty(9, 8), visual)
    for dtype in (torch.float64, torch.int8):  # element sizes the CUDA kernel's copy words do not fit
        with pytest.raises(TypeError, match="float16, bfloat16 or float32 rows"):
            ext.merge_visual_forward(rows.to(dtype), ids, tokens, visual.to(dtype), out.to(dtype))
    with pytest.raises(ValueError, match="token_id to hold at least one id"):
        merge_visual_tokens(rows, ids, visual, torch.tensor([], dtype=torch.long))


def _grids(rng, n, max_side):
    return torch.tensor([[rng.choice([1, 1, 2, 3]), 2 * rng.randint(1, max_side // 2), 2 * rng.randint(1, max_side // 2)]
                         for _ in range(n)])


@pytest.mark.parametrize("window_size, patch_size", [(112, 14), (56, 14), (224, 16)])
def test_window_index_equals_transformers(window_size, patch_size, request):
    vision_utils = pytest.importorskip("transformers.vision_utils")
    rng = random.Random(zlib.crc32(request.node.nodeid.encode()))
    for n, side in ((1, 4), (8, 100), (40, 30)):
        grid = _grids(rng, n, side)
        expected = vision_utils.get_vision_window_index(grid, 2, window_size, patch_size)
        ours = vision_window_index(grid, window_size, patch_size, 2)
        assert torch.equal(ours[0], expected[0]) and ours[0].dtype == expected[0].dtype
        assert torch.equal(ours[1], expected[1]) and ours[1].dtype == expected[1].dtype
        ref = vision_window_index_ref(grid, window_size, patch_size, 2)
        assert torch.equal(ref[0], expected[0]) and torch.equal(ref[1], expected[1])


def test_window_index_is_what_the_vision_tower_uses():
    # Qwen2.5-VL's vision tower takes precomputed (window_index, cu_window_seqlens) kwargs.
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl

    assert "get_vision_window_index" in vars(modeling_qwen2_5_vl)


def test_window_index_bad_input():
    with pytest.raises(ValueError, match="divisible by spatial_merge_size"):
        vision_window_index(torch.tensor([[1, 3, 4]]))
    with pytest.raises(ValueError, match=r"shape \(n, 3\)"):
        vision_window_index(torch.tensor([[1, 4]]))
    with pytest.raises(ValueError, match="window_size"):
        vision_window_index(torch.tensor([[1, 4, 4]]), window_size=8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA kernels need a GPU (their C++ twins run above)")
def test_merge_cuda_kernel_many_tiles_sync_free_and_capturable(monkeypatch):
    """Thousands of tiles resolving their prefixes by look-back at once; check=False never
    syncs (whatever form token_id takes, on either path) and the launch (memset and the
    token ids included) can be captured in a CUDA graph."""
    monkeypatch.setenv("DOCQA_FAST_BACKEND", "extension")
    N, H = 200_003, 40
    ids = _ids((N,), 120_001).cuda()
    embeds = torch.randn(N, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    visual = torch.randn(120_001, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out = merge_visual_tokens(embeds, ids, visual, IMAGE)
    assert torch.equal(out, merge_visual_tokens_ref(embeds, ids, visual, IMAGE))
    grad = torch.randn_like(out)
    g_ours = torch.autograd.grad(out, (embeds, visual), grad)
    g_ref = torch.autograd.grad(merge_visual_tokens_ref(embeds, ids, visual, IMAGE), (embeds, visual), grad)
    assert all(torch.equal(a, b) for a, b in zip(g_ours, g_ref))

    e, v = embeds.detach(), visual.detach()
    expected = out.detach()
    torch.cuda.synchronize()
    # Every form of token_id (ids has no VIDEO token: all select the IMAGE rows), both paths:
    # ints are filled in on the device, a CPU tensor is read on the host, a CUDA one used there.
    tokens = (IMAGE, (IMAGE, VIDEO), [IMAGE], torch.tensor([IMAGE]), torch.tensor([IMAGE, VIDEO], device="cuda"))
    for backend in ("extension", "reference"):
        monkeypatch.setenv("DOCQA_FAST_BACKEND", backend)
        for token in tokens:
            with no_host_sync():
                unchecked = merge_visual_tokens(e, ids, v, token, check=False)
            assert torch.equal(unchecked, expected), (backend, token)
    monkeypatch.setenv("DOCQA_FAST_BACKEND", "extension")
    # two ids: two fills and their concatenation are captured too
    graph = capture_cuda_graph(lambda: merge_visual_tokens(e, ids, v, (IMAGE, VIDEO), check=False))
    e.add_(1)  # new inputs, same buffers
    assert torch.equal(graph.replay(), merge_visual_tokens_ref(e, ids, v, IMAGE))
