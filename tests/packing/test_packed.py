"""pack_multimodal / unpack: a tiny random-weight Qwen2.5-VL forward on a packed row equals,
document by document, forwarding each document alone (no cross-document attention, each
document's own M-RoPE positions)."""

import random
import zlib

import pytest
import torch

from docqa_fast.packing import get_rope_index, pack_multimodal, plan_packing, unpack

from .documents import IMAGE_ID, VIDEO_ID, VISION_END, VISION_START, tiny_qwen_config

transformers = pytest.importorskip("transformers")

PATCH_DIM = 3 * 2 * 14 * 14  # channels * temporal patch * patch * patch


def _sample(rng: random.Random, n_images: int, video: bool = False):
    """A processor-like sample: ids with vision blocks, grids, random pixel patches."""
    ids, grids, vgrids = [], [], []
    for _ in range(n_images):
        ids += [rng.randrange(100, 1000) for _ in range(rng.randint(0, 6))]
        h, w = 2 * rng.randint(1, 3), 2 * rng.randint(1, 3)
        ids += [VISION_START] + [IMAGE_ID] * (h * w // 4) + [VISION_END]
        grids.append((1, h, w))
    if video:
        t, h, w = 2, 4, 2
        ids += [VISION_START] + [VIDEO_ID] * (t * h * w // 4) + [VISION_END]
        vgrids.append((t, h, w))
    ids += [rng.randrange(100, 1000) for _ in range(rng.randint(1, 8))]
    sample = {"input_ids": torch.tensor(ids)}
    if grids:
        grid = torch.tensor(grids)
        sample["image_grid_thw"] = grid
        sample["pixel_values"] = torch.randn(int(grid.prod(-1).sum()), PATCH_DIM)
    if vgrids:
        vgrid = torch.tensor(vgrids)
        sample["video_grid_thw"] = vgrid
        sample["pixel_values_videos"] = torch.randn(int(vgrid.prod(-1).sum()), PATCH_DIM)
        sample["second_per_grid_ts"] = torch.tensor([1.5])
    return sample


def _types(ids):
    return ((ids == IMAGE_ID).int() + 2 * (ids == VIDEO_ID).int())


@pytest.fixture(scope="module", params=["eager", "docqa_fast"])
def model(request):
    """The same tiny model with transformers' eager attention and with ours (the varlen kernel
    must keep the packed documents apart exactly as eager's block-diagonal mask does)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from docqa_fast.integrations.transformers import register

    register()
    torch.manual_seed(0)
    config = tiny_qwen_config("qwen2_5_vl")
    for part in (config, config.text_config, config.vision_config):
        part._attn_implementation = request.param
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def test_packed_forward_equals_per_document(model, request):
    rng = random.Random(zlib.crc32(request.node.nodeid.encode()))
    samples = [_sample(rng, n, video=(i == 1)) for i, n in enumerate([2, 1, 0, 3])]
    packed = pack_multimodal(samples, max_tokens=512)
    with torch.no_grad():
        out = model(**{k: v for k, v in packed.model_inputs().items() if k != "labels"})
        per_doc = unpack(packed, out.logits)
        for sample, logits in zip(samples, per_doc):
            ids = sample["input_ids"][None]
            # The document's positions as pack_multimodal computes them (get_rope_index's default
            # video time rounding, transformers >= 5.18's): transformers <= 5.17 would place the
            # 1.5 s video's frames differently by itself, which is not what this test is about.
            positions, _ = get_rope_index(ids, _types(ids), sample.get("image_grid_thw"),
                                          sample.get("video_grid_thw"), sample.get("second_per_grid_ts"),
                                          tokens_per_second=model.config.vision_config.tokens_per_second)
            alone = model(input_ids=ids, mm_token_type_ids=_types(ids), position_ids=positions,
                          **{k: v for k, v in sample.items() if k != "input_ids"}).logits
            torch.testing.assert_close(logits, alone, rtol=1e-4, atol=1e-4)


def test_packed_fields(request):
    rng = random.Random(zlib.crc32(request.node.nodeid.encode()))
    samples = [_sample(rng, n) for n in (1, 2, 0)]
    lengths = [s["input_ids"].numel() for s in samples]
    packed = pack_multimodal(samples, max_tokens=200)
    T = sum(lengths)
    assert packed.input_ids.shape == (1, T) and packed.position_ids.shape == (4, 1, T)
    assert packed.cu_seqlens.dtype == torch.int32 and packed.cu_seqlens.tolist() == [0, *torch.tensor(lengths).cumsum(0).tolist()]
    assert packed.max_seqlen == max(lengths)
    starts = packed.cu_seqlens[:-1].long()
    assert (packed.labels[0, starts] == -100).all()
    # text positions restart at every document (what transformers detects as packed)
    assert torch.equal(packed.position_ids[0, 0, starts], torch.zeros(len(lengths), dtype=torch.long))
    assert packed.image_order == [(0, 0), (1, 0), (1, 1)]
    grid = packed.image_grid_thw
    assert packed.vision_cu_seqlens.tolist() == [0, *(grid[:, 1] * grid[:, 2]).cumsum(0).tolist()]
    assert packed.pixel_values.shape[0] == int(grid.prod(-1).sum())
    assert packed.padding_ratio == pytest.approx(1 - T / 200)
    pieces = unpack(packed, packed.input_ids)
    assert all(torch.equal(p[0], s["input_ids"]) for p, s in zip(pieces, samples))
    assert [p.shape[-1] for p in unpack(packed, packed.position_ids, dim=-1)] == lengths


def test_collator_workflow(request):
    rng = random.Random(zlib.crc32(request.node.nodeid.encode()))
    samples = [_sample(rng, rng.randint(0, 3)) for _ in range(20)]
    lengths = [s["input_ids"].numel() for s in samples]
    bins = plan_packing(lengths, 128)
    rows = [pack_multimodal([samples[i] for i in b], max_tokens=128) for b in bins]
    assert sum(r.input_ids.shape[1] for r in rows) == sum(lengths)
    assert all(r.input_ids.shape[1] <= 128 for r in rows)


def test_bad_input(request):
    rng = random.Random(zlib.crc32(request.node.nodeid.encode()))
    sample = _sample(rng, 2)
    with pytest.raises(ValueError, match="more than max_tokens"):
        pack_multimodal([sample, sample], max_tokens=sample["input_ids"].numel())
    with pytest.raises(ValueError, match=r"samples\[1\].*image_grid_thw has 1 rows"):
        pack_multimodal([sample, {**sample, "image_grid_thw": sample["image_grid_thw"][:1]}])
    with pytest.raises(ValueError, match="at least one sample"):
        pack_multimodal([])
    with pytest.raises(ValueError, match="input_ids"):
        pack_multimodal([{"labels": torch.ones(3)}])
    with pytest.raises(ValueError, match=r"labels'\] of shape"):
        pack_multimodal([{**sample, "labels": sample["input_ids"][1:]}])
    packed = pack_multimodal([sample])
    with pytest.raises(ValueError, match="packed row"):
        unpack(packed, torch.zeros(3, 5))


def _fields(packed):
    return {name: getattr(packed, name).cpu() for name in
            ("input_ids", "labels", "position_ids", "mm_token_type_ids", "cu_seqlens")}


@pytest.mark.backends("reference", "extension")
def test_packing_copy_equals_reference(backend, device, monkeypatch, request):
    """The one-call packing copy (the extension's kernel on a GPU, its C++ twin here) gives
    the fields torch.cat gives: odd document sizes (1 token), given labels and type ids, videos."""
    rng = random.Random(zlib.crc32(request.node.nodeid.encode()))
    samples = [_sample(rng, rng.randint(0, 3), video=(i % 3 == 1)) for i in range(7)]
    samples.append({"input_ids": torch.tensor([5])})  # a one-token document
    samples[2]["labels"] = torch.randint(0, 1000, samples[2]["input_ids"].shape)
    samples[3]["mm_token_type_ids"] = _types(samples[3]["input_ids"])[None]  # (1, L) as processors return
    on_device = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in s.items()} for s in samples]
    ours = pack_multimodal(on_device, max_tokens=4096)
    assert ours.input_ids.device.type == device.type
    monkeypatch.setenv("DOCQA_FAST_BACKEND", "reference")
    expected = pack_multimodal(samples, max_tokens=4096)
    for name, value in _fields(expected).items():
        assert torch.equal(_fields(ours)[name], value), name
        assert _fields(ours)[name].dtype == value.dtype, name
    starts = expected.cu_seqlens[:-1].long()
    assert (expected.labels[0, starts] == -100).all()
    assert torch.equal(expected.labels[0, starts[2] + 1:starts[3]], samples[2]["labels"][1:])


def test_pack_tokens_op_empty_documents_and_bad_arguments():
    """The op itself: empty documents are skipped (the kernel's search passes over them), and
    every mismatch is a ValueError / TypeError naming the argument, never a stray write."""
    from docqa_fast._backend import extension

    ext = extension()
    if ext is None:
        pytest.skip("docqa_fast._C is not built")
    lengths = [0, 3, 0, 0, 1, 5, 0]
    ids = [torch.randint(0, 100, (n,)) for n in lengths]
    labels = [torch.randint(0, 100, (n,)) for n in lengths]
    types = [torch.randint(0, 3, (n,), dtype=torch.int32) for n in lengths]
    mrope = [torch.randint(0, 100, (3, n)) for n in lengths]
    T = sum(lengths)

    def outputs(total=T):
        return (torch.full((1, total), -7), torch.full((1, total), -7), torch.full((1, total), -7, dtype=torch.int32),
                torch.full((4, 1, total), -7))

    out = outputs()
    ext.pack_tokens(ids, labels, types, mrope, -100, *out)
    live = [i for i, n in enumerate(lengths) if n]
    assert torch.equal(out[0][0], torch.cat([ids[i] for i in live]))
    assert torch.equal(out[1][0], torch.cat([torch.cat([torch.tensor([-100]), labels[i][1:]]) for i in live]))
    assert torch.equal(out[2][0], torch.cat([types[i] for i in live]))
    assert torch.equal(out[3][0, 0], torch.cat([torch.arange(lengths[i]) for i in live]))
    assert torch.equal(out[3][1:, 0], torch.cat([mrope[i] for i in live], 1))

    with pytest.raises(TypeError, match=r"types\[1\] of dtype Int, got Long"):
        ext.pack_tokens(ids, labels, types[:1] + [types[1].long()] + types[2:], mrope, -100, *outputs())
    with pytest.raises(ValueError, match=r"labels\[5\] as a contiguous \(5,\)"):
        ext.pack_tokens(ids, labels[:5] + [labels[5][:4]] + labels[6:], types, mrope, -100, *outputs())
    with pytest.raises(ValueError, match=r"mrope\[4\] as a contiguous \(3, 1\)"):
        ext.pack_tokens(ids, labels, types, mrope[:4] + [torch.zeros(2, 1, dtype=torch.long)] + mrope[5:], -100,
                        *outputs())
    with pytest.raises(ValueError, match="positions_out of shape"):
        o = outputs()
        ext.pack_tokens(ids, labels, types, mrope, -100, o[0], o[1], o[2], torch.zeros(4, 1, T - 1, dtype=torch.long))
    with pytest.raises(ValueError, match="ids_out of shape"):
        ext.pack_tokens(ids, labels, types, mrope, -100, *outputs(T + 1))
    with pytest.raises(ValueError, match="one per document"):
        ext.pack_tokens(ids, labels[:-1], types, mrope, -100, *outputs())
    with pytest.raises(ValueError, match="at least one document"):
        ext.pack_tokens([], [], [], [], -100, *outputs(0))


def test_pack_bad_device_and_dtype(request):
    rng = random.Random(zlib.crc32(request.node.nodeid.encode()))
    sample = _sample(rng, 1)
    elsewhere = {**sample, "labels": sample["input_ids"].to("meta")}
    with pytest.raises(ValueError, match=r"samples\[1\]\['labels'\] on cpu"):
        pack_multimodal([sample, elsewhere])
    with pytest.raises(TypeError, match=r"samples\[0\]\['input_ids'\] of an integer dtype"):
        pack_multimodal([{**sample, "input_ids": sample["input_ids"].float()}])
    with pytest.raises(ValueError, match=r"mm_token_type_ids'\] of shape"):
        pack_multimodal([{**sample, "mm_token_type_ids": _types(sample["input_ids"])[1:]}])
