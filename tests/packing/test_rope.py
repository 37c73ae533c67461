"""get_rope_index against the installed transformers' Qwen2-VL / Qwen2.5-VL get_rope_index."""

import functools
import inspect
import random
import types
import zlib

import pytest
import torch

from docqa_fast.packing import get_rope_index, patch_transformers_rope_index, unpatch_transformers_rope_index
from docqa_fast.reference.packing import get_rope_index_ref

from .documents import batch, random_document, tiny_qwen_config

transformers = pytest.importorskip("transformers")
from transformers import Qwen2_5_VLModel, Qwen2VLModel  # noqa: E402

# "cuda": the extension (its one-pass C++ loop on CPU tensors); "reference": the vectorised
# PyTorch path, the one CUDA tensors take.
pytestmark = pytest.mark.backends("reference", "cuda")
CLASSES = {"qwen2_5_vl": Qwen2_5_VLModel, "qwen2_vl": Qwen2VLModel}


def _rng(request):
    return random.Random(zlib.crc32(request.node.nodeid.encode()))


@functools.cache
def _peer(model_type, tokens_per_second=2):
    """transformers' own get_rope_index, bound to a stand-in holding just the config."""
    cls = CLASSES[model_type]
    holder = types.SimpleNamespace(config=tiny_qwen_config(model_type, tokens_per_second))
    holder.get_vision_position_ids = functools.partial(cls.get_vision_position_ids, holder)
    return functools.partial(cls.get_rope_index, holder)


def _ours(model_type, inputs, tokens_per_second=2):
    kwargs = dict(inputs)
    if model_type == "qwen2_vl":
        kwargs.pop("second_per_grid_ts")
        return get_rope_index(**kwargs, model_type="qwen2_vl")
    return get_rope_index(**kwargs, tokens_per_second=tokens_per_second)


def _theirs(model_type, inputs, tokens_per_second=2):
    kwargs = dict(inputs)
    if model_type == "qwen2_vl":
        kwargs.pop("second_per_grid_ts")
    return _peer(model_type, tokens_per_second)(**kwargs)


def _assert_same(ours, theirs):
    assert ours[0].dtype == theirs[0].dtype and ours[0].shape == theirs[0].shape
    assert torch.equal(ours[0], theirs[0])
    assert torch.equal(ours[1].to(theirs[1].dtype), theirs[1]) and ours[1].shape == theirs[1].shape


def test_signature_follows_transformers():
    # The installed transformers (5.x) keeps get_rope_index on the model classes; our
    # positional arguments follow Qwen2.5-VL's, config values become keywords.
    theirs = list(inspect.signature(Qwen2_5_VLModel.get_rope_index).parameters)[1:-1]
    ours = list(inspect.signature(get_rope_index).parameters)
    assert ours[:len(theirs)] == theirs


@pytest.mark.parametrize("model_type", ["qwen2_5_vl", "qwen2_vl"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_random_documents_small_grids(backend, model_type, padding_side, device, request):
    rng = _rng(request)
    for _ in range(3):
        docs = [random_document(rng, max_images=rng.choice([1, 5, 100]), max_side=24,
                                max_text=rng.choice([0, 20, 500]), video_prob=0.3)
                for _ in range(rng.randint(1, 3))]
        inputs = batch(docs, padding_side)
        theirs = _theirs(model_type, inputs)
        on_device = {k: v.to(device) if v is not None else None for k, v in inputs.items()}
        ours = _ours(model_type, on_device)
        assert ours[0].device.type == device.type
        _assert_same((ours[0].cpu(), ours[1].cpu()), theirs)


@pytest.mark.parametrize("model_type", ["qwen2_5_vl", "qwen2_vl"])
def test_random_documents_large_grids(backend, model_type, request):
    rng = _rng(request)
    docs = [random_document(rng, max_images=4, max_side=100, video_prob=0.3, max_frames=3) for _ in range(2)]
    inputs = batch(docs, "left")
    _assert_same(_ours(model_type, inputs), _theirs(model_type, inputs))


def test_no_attention_mask_and_seconds_defaults(backend, request):
    rng = _rng(request)
    inputs = batch([random_document(rng, max_images=6, max_side=20, video_prob=0.5)])
    expected = _theirs("qwen2_5_vl", inputs)
    for mask_dtype in (torch.bool, torch.int32, torch.float32):  # every mask dtype a collator may use
        _assert_same(_ours("qwen2_5_vl", {**inputs, "attention_mask": inputs["attention_mask"].to(mask_dtype)}),
                     expected)
    _assert_same(_ours("qwen2_5_vl", {**inputs, "mm_token_type_ids": inputs["mm_token_type_ids"].long()}), expected)
    inputs["attention_mask"] = None
    _assert_same(_ours("qwen2_5_vl", inputs), _theirs("qwen2_5_vl", inputs))
    inputs["second_per_grid_ts"] = None  # transformers then uses 1 second per grid step
    _assert_same(_ours("qwen2_5_vl", inputs, 4), _theirs("qwen2_5_vl", inputs, 4))


def test_half_precision_seconds(backend, request):
    """transformers multiplies in the seconds' dtype (bf16 / fp16 after a processor output is
    cast): both paths must round exactly as it does."""
    rng = _rng(request)
    # Long videos (hundreds of frames): bf16 / fp16 rounding of t * step shows from t ~ 256.
    doc = random_document(rng, max_images=1, max_side=4, video_prob=1.0, max_frames=600)
    inputs = batch([doc])
    assert inputs.get("video_grid_thw") is not None  # video_prob=1.0: every document has a video
    n_videos = inputs["video_grid_thw"].shape[0]
    for dtype, seconds, tokens_per_second in ((torch.bfloat16, 1.0, 2), (torch.float16, 0.3, 25)):
        inputs["second_per_grid_ts"] = torch.full((n_videos,), seconds, dtype=dtype)
        _assert_same(_ours("qwen2_5_vl", inputs, tokens_per_second), _theirs("qwen2_5_vl", inputs, tokens_per_second))


def test_reference_agrees(request):
    rng = _rng(request)
    inputs = batch([random_document(rng, max_images=8, max_side=16, video_prob=0.4) for _ in range(2)], "left")
    expected = _theirs("qwen2_5_vl", inputs)
    _assert_same(get_rope_index_ref(**inputs, tokens_per_second=2), expected)


def test_no_host_sync_when_unchecked(request):
    if not torch.cuda.is_available():
        pytest.skip("host syncs are observable on CUDA tensors only")
    rng = _rng(request)
    inputs = {k: v.cuda() if v is not None else None for k, v in batch([random_document(rng, max_images=20)]).items()}
    torch.cuda.set_sync_debug_mode("error")
    try:
        get_rope_index(**inputs, check=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_patch_transformers(request):
    rng = _rng(request)
    inputs = batch([random_document(rng, max_images=5, max_side=16, video_prob=0.4) for _ in range(2)], "right")
    model = Qwen2_5_VLModel(tiny_qwen_config("qwen2_5_vl"))
    expected = model.get_rope_index(**inputs)
    patched = patch_transformers_rope_index()
    try:
        assert set(patched) == {Qwen2_5_VLModel, Qwen2VLModel}
        assert Qwen2_5_VLModel.get_rope_index is not expected  # swapped
        _assert_same(model.get_rope_index(**inputs), expected)
        # what the model's forward calls
        positions = model.compute_3d_position_ids(
            input_ids=inputs["input_ids"], image_grid_thw=inputs["image_grid_thw"],
            video_grid_thw=inputs["video_grid_thw"], inputs_embeds=None, attention_mask=inputs["attention_mask"],
            past_key_values=None, second_per_grid_ts=inputs["second_per_grid_ts"],
            mm_token_type_ids=inputs["mm_token_type_ids"])
        assert torch.equal(positions, expected[0])
        q2 = dict(inputs)
        q2.pop("second_per_grid_ts")
        mask = q2.pop("attention_mask")
        holder = types.SimpleNamespace(config=tiny_qwen_config("qwen2_vl"))
        # Qwen2-VL's positional order has attention_mask fifth
        _assert_same(Qwen2VLModel.get_rope_index(holder, q2["input_ids"], q2["mm_token_type_ids"],
                                                 q2["image_grid_thw"], q2["video_grid_thw"], mask),
                     _theirs("qwen2_vl", inputs))
    finally:
        unpatch_transformers_rope_index()
    assert "docqa" not in Qwen2_5_VLModel.get_rope_index.__code__.co_filename


def test_bad_input(backend, request):
    rng = _rng(request)
    doc = random_document(rng, max_images=1, max_side=8)
    while len(doc[2]) != 3:
        doc = random_document(rng, max_images=3, max_side=8)
    inputs = batch([doc])
    grids = inputs["image_grid_thw"]
    with pytest.raises(ValueError, match="image_grid_thw has 2 rows"):
        get_rope_index(**{**inputs, "image_grid_thw": grids[:2]})
    with pytest.raises(ValueError, match="image_grid_thw has 0 rows"):
        get_rope_index(**{**inputs, "image_grid_thw": None})
    wrong = grids.clone()
    wrong[1, 1] += 2
    with pytest.raises(ValueError, match="do not match"):
        get_rope_index(**{**inputs, "image_grid_thw": wrong})
    with pytest.raises(ValueError, match="mm_token_type_ids of shape"):
        get_rope_index(**{**inputs, "mm_token_type_ids": inputs["mm_token_type_ids"][:, 1:]})
    with pytest.raises(ValueError, match=r"image_grid_thw of shape \(n, 3\)"):
        get_rope_index(**{**inputs, "image_grid_thw": grids[:, :2]})
    with pytest.raises(ValueError, match="model_type"):
        get_rope_index(**inputs, model_type="llava")
    # unchecked bad counts: wrong positions allowed, out-of-bounds reads not
    pos, _ = get_rope_index(**{**inputs, "image_grid_thw": grids[:1]}, check=False)
    assert pos.shape == (3, *inputs["input_ids"].shape)
