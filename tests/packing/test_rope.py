"""get_rope_index against the installed transformers' Qwen2-VL / Qwen2.5-VL get_rope_index."""

import functools
import inspect
import random
import types
import warnings
import zlib

import pytest
import torch

from docqa_fast.packing import get_rope_index, patch_transformers_rope_index, unpatch_transformers_rope_index
from docqa_fast.integrations.transformers import detect_video_time_rounding
from docqa_fast.reference.packing import get_rope_index_ref
from docqa_fast.testing import no_host_sync

from .documents import batch, random_document, tiny_qwen_config

transformers = pytest.importorskip("transformers")
from transformers import Qwen2_5_VLModel, Qwen2VLModel  # noqa: E402

# "extension": the extension (its one-pass C++ loop on CPU tensors); "reference": the vectorised
# PyTorch path, the one CUDA tensors take.
pytestmark = pytest.mark.backends("reference", "extension")
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


@functools.cache
def _peer_rounding():
    """The video time rounding of the installed transformers (it changed in 5.18), found by
    the probe patch_transformers_rope_index uses: comparisons with it use the same one."""
    return detect_video_time_rounding(Qwen2_5_VLModel)


def _ours(model_type, inputs, tokens_per_second=2):
    kwargs = dict(inputs)
    if model_type == "qwen2_vl":
        kwargs.pop("second_per_grid_ts")
        return get_rope_index(**kwargs, model_type="qwen2_vl")
    return get_rope_index(**kwargs, tokens_per_second=tokens_per_second, video_time_rounding=_peer_rounding())


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
        if backend == "extension" and _peer_rounding() == "floor_product":
            # Only the tensor path rounds a half-precision product like transformers: the
            # dispatch runs it by default, and forcing the extension says why it cannot.
            # (Truncated seconds are exact in float64: the extension computes those.)
            with pytest.raises(RuntimeError, match="half precision"):
                _ours("qwen2_5_vl", inputs, tokens_per_second)
            continue
        _assert_same(_ours("qwen2_5_vl", inputs, tokens_per_second), _theirs("qwen2_5_vl", inputs, tokens_per_second))


def test_reference_agrees(request):
    rng = _rng(request)
    inputs = batch([random_document(rng, max_images=8, max_side=16, video_prob=0.4) for _ in range(2)], "left")
    expected = _theirs("qwen2_5_vl", inputs)
    ref_inputs = dict(inputs)
    if _peer_rounding() == "truncate_seconds":
        # The reference truncates the product (transformers >= 5.18); a transformers that
        # truncates the seconds first sees only their integer part, the same for both then.
        ref_inputs["second_per_grid_ts"] = inputs["second_per_grid_ts"].trunc()
    _assert_same(get_rope_index_ref(**ref_inputs, tokens_per_second=2), expected)


def test_no_host_sync_when_unchecked(request):
    if not torch.cuda.is_available():
        pytest.skip("host syncs are observable on CUDA tensors only")
    rng = _rng(request)
    inputs = {k: v.cuda() if v is not None else None for k, v in batch([random_document(rng, max_images=20)]).items()}
    with no_host_sync():
        get_rope_index(**inputs, check=False)


@pytest.mark.filterwarnings("ignore:Qwen2_5_VLModel.get_rope_index truncates")  # transformers <= 5.17
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
        # The cache goes by position: transformers 5.17 names it past_key_values, 5.24 cache.
        positions = model.compute_3d_position_ids(
            inputs["input_ids"], inputs["image_grid_thw"], inputs["video_grid_thw"], None, inputs["attention_mask"],
            None, second_per_grid_ts=inputs["second_per_grid_ts"], mm_token_type_ids=inputs["mm_token_type_ids"])
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


TEXT_TYPE, VIDEO_TYPE = 0, 2


def _one_video_per_row(seconds):
    """Row b: a text token, a video of grid (t=4, h=2, w=2) (after the 2x2 merge one token
    per frame), a text token; seconds[b] per grid step."""
    type_ids = torch.tensor([[TEXT_TYPE] + [VIDEO_TYPE] * 4 + [TEXT_TYPE]] * len(seconds), dtype=torch.int32)
    return {"input_ids": torch.zeros(len(seconds), 6, dtype=torch.long), "mm_token_type_ids": type_ids,
            "image_grid_thw": None, "video_grid_thw": torch.tensor([[4, 2, 2]] * len(seconds)),
            "second_per_grid_ts": seconds, "attention_mask": None}


# Rows of _one_video_per_row with 0.5 s, 1.5 s and 1/3 s per grid step, tokens_per_second=2.
# The text token is at 0, the video starts at p = 1, frame ti at t = p + offset(ti), h = w = p,
# the closing text token at p + max(h, w) = 2; delta = max position + 1 - 6 tokens.
# floor_product: offset = trunc(ti * (2 * s)):
#   0.5 s: step 1.0          -> offsets 0, 1, 2, 3 -> t = 1, 2, 3, 4   (delta 4 + 1 - 6 = -1)
#   1.5 s: step 3.0          -> offsets 0, 3, 6, 9 -> t = 1, 4, 7, 10  (delta 10 + 1 - 6 = 5)
#   1/3 s: step 0.6666667f   -> ti * step = 0, 0.67, 1.33, 2.0000001 (rounds to 2.0f)
#                            -> offsets 0, 0, 1, 2 -> t = 1, 1, 2, 3   (delta 3 + 1 - 6 = -2)
# truncate_seconds: offset = ti * 2 * int(s):
#   0.5 s: int 0, step 0     -> offsets 0, 0, 0, 0 -> t = 1, 1, 1, 1   (delta 2 + 1 - 6 = -3)
#   1.5 s: int 1, step 2     -> offsets 0, 2, 4, 6 -> t = 1, 3, 5, 7   (delta 7 + 1 - 6 = 2)
#   1/3 s: int 0, step 0     -> offsets 0, 0, 0, 0 -> t = 1, 1, 1, 1   (delta -3)
_HAND_T = {
    "floor_product": [[0, 1, 2, 3, 4, 2], [0, 1, 4, 7, 10, 2], [0, 1, 1, 2, 3, 2]],
    "truncate_seconds": [[0, 1, 1, 1, 1, 2], [0, 1, 3, 5, 7, 2], [0, 1, 1, 1, 1, 2]],
}
_HAND_DELTA = {"floor_product": [-1, 5, -2], "truncate_seconds": [-3, 2, -3]}
_HAND_HW = [0, 1, 1, 1, 1, 2]  # h and w rows: text 0, the 1x1 grid at p = 1, text 2


@pytest.mark.parametrize("rounding", ["floor_product", "truncate_seconds"])
def test_video_time_rounding_by_hand(backend, rounding, device):
    seconds = torch.tensor([0.5, 1.5, 1 / 3], dtype=torch.float32)
    inputs = {k: v.to(device) if v is not None else None for k, v in _one_video_per_row(seconds).items()}
    pos, delta = get_rope_index(**inputs, tokens_per_second=2, video_time_rounding=rounding)
    expected = torch.stack([torch.tensor(_HAND_T[rounding]), torch.tensor([_HAND_HW] * 3),
                            torch.tensor([_HAND_HW] * 3)])
    assert torch.equal(pos.cpu(), expected)
    assert torch.equal(delta.cpu(), torch.tensor(_HAND_DELTA[rounding])[:, None])
    # 0.5 and 1.5 are exact in every float dtype: bf16 seconds (multiplied in bf16 under
    # floor_product, by the tensor path) give the same positions, float64 ones too.
    for dtype in (torch.bfloat16, torch.float64):
        call = {**inputs, "second_per_grid_ts": inputs["second_per_grid_ts"].to(dtype)}
        if backend == "extension" and dtype == torch.bfloat16 and rounding == "floor_product":
            with pytest.raises(RuntimeError, match="half precision"):  # only the tensor path rounds as bf16 does
                get_rope_index(**call, tokens_per_second=2, video_time_rounding=rounding)
            continue
        pos, delta = get_rope_index(**call, tokens_per_second=2, video_time_rounding=rounding)
        assert torch.equal(pos[:, :2].cpu(), expected[:, :2])
        assert torch.equal(delta[:2].cpu(), torch.tensor(_HAND_DELTA[rounding][:2])[:, None])


def test_video_time_rounding_default_and_bad_value():
    inputs = _one_video_per_row(torch.tensor([0.5]))
    assert torch.equal(get_rope_index(**inputs)[0], get_rope_index(**inputs, video_time_rounding="floor_product")[0])
    with pytest.raises(ValueError, match="video_time_rounding"):
        get_rope_index(**inputs, video_time_rounding="round")
    # Qwen2-VL has no video time scaling: the value does not matter there
    q2 = get_rope_index(**inputs, model_type="qwen2_vl", video_time_rounding="truncate_seconds")[0]
    assert torch.equal(q2, get_rope_index(**inputs, model_type="qwen2_vl")[0])


@pytest.mark.parametrize("rounding", ["floor_product", "truncate_seconds"])
def test_float_tokens_per_second_without_seconds(backend, rounding):
    """No second_per_grid_ts and a float tokens_per_second: transformers >= 5.18 computes
    (arange(t) * tokens_per_second).long() in float32 (<= 5.17 raises in its meshgrid on a
    float step; both roundings scale by tokens_per_second alone here). 100 * float32(0.29)
    rounds up to 29.0 where the float64 product 28.999... truncates to 28: the extension
    must multiply in float32 too."""
    type_ids = torch.tensor([[TEXT_TYPE] + [VIDEO_TYPE] * 101], dtype=torch.int32)
    inputs = {"input_ids": torch.zeros(1, 102, dtype=torch.long), "mm_token_type_ids": type_ids,
              "image_grid_thw": None, "video_grid_thw": torch.tensor([[101, 2, 2]]), "second_per_grid_ts": None,
              "attention_mask": None}
    ours = get_rope_index(**inputs, tokens_per_second=0.29, video_time_rounding=rounding)
    assert ours[0][0, 0, 101].item() == 1 + 29  # frame 100, after the text token
    # every frame: the video starts at position 1, frame ti at 1 + (ti * 0.29 in float32), truncated
    assert torch.equal(ours[0][0, 0, 1:], 1 + (torch.arange(101) * 0.29).long())
    if _peer_rounding() == "floor_product":
        # transformers' config class takes only an int: its method is fed a plain config here
        config = types.SimpleNamespace(vision_config=types.SimpleNamespace(spatial_merge_size=2,
                                                                           tokens_per_second=0.29))
        holder = types.SimpleNamespace(config=config)
        holder.get_vision_position_ids = functools.partial(Qwen2_5_VLModel.get_vision_position_ids, holder)
        _assert_same(ours, Qwen2_5_VLModel.get_rope_index(holder, **inputs))


def test_patch_matches_original_on_half_second_video():
    """0.5 s per grid step is where transformers <= 5.17 (every frame at offset 0) and 5.18+
    (offsets 0, 1, 2, 3) differ: the patched method must give what the original gives."""
    model = Qwen2_5_VLModel(tiny_qwen_config("qwen2_5_vl"))
    inputs = _one_video_per_row(torch.tensor([0.5]))
    expected = model.get_rope_index(**inputs)
    rounding = detect_video_time_rounding(Qwen2_5_VLModel)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        patch_transformers_rope_index(Qwen2_5_VLModel)
    try:
        assert Qwen2_5_VLModel.get_rope_index.__module__ == "docqa_fast.integrations.transformers"
        _assert_same(model.get_rope_index(**inputs), expected)
        # it warns exactly when it keeps the old rounding
        assert any("truncates second_per_grid_ts" in str(w.message) for w in caught) == (
            rounding == "truncate_seconds")
    finally:
        unpatch_transformers_rope_index(Qwen2_5_VLModel)


def _model_class(rounding=None, offset=0, fails=False):
    """A stand-in model class whose get_rope_index (Qwen2.5-VL's signature) computes
    positions with the given rounding (+ offset), or raises."""

    def method(self, input_ids, mm_token_type_ids, image_grid_thw=None, video_grid_thw=None,
               second_per_grid_ts=None, attention_mask=None, **kwargs):
        if fails:
            raise RuntimeError("boom")
        vision = self.config.vision_config
        pos, delta = get_rope_index(input_ids, mm_token_type_ids, image_grid_thw, video_grid_thw, second_per_grid_ts,
                                    attention_mask, spatial_merge_size=vision.spatial_merge_size,
                                    tokens_per_second=vision.tokens_per_second, video_time_rounding=rounding)
        return pos + offset, delta

    return type("StandInVLModel", (), {"get_rope_index": method})


def test_detect_video_time_rounding_and_patch_on_both_behaviours():
    """Whichever transformers is installed, the probe tells both behaviours apart, and the
    patch keeps each (warning for the old one only)."""
    seconds_inputs = _one_video_per_row(torch.tensor([0.5, 1.5, 1 / 3]))
    holder = types.SimpleNamespace(config=tiny_qwen_config("qwen2_5_vl"))
    for rounding in ("floor_product", "truncate_seconds"):
        cls = _model_class(rounding)
        assert detect_video_time_rounding(cls) == rounding
        expected = cls.get_rope_index(holder, **seconds_inputs)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert patch_transformers_rope_index(cls) == [cls]
        try:
            assert cls.get_rope_index.__module__ == "docqa_fast.integrations.transformers"
            _assert_same(cls.get_rope_index(holder, **seconds_inputs), expected)
            truncation = [str(w.message) for w in caught if "truncates second_per_grid_ts" in str(w.message)]
            assert len(truncation) == (rounding == "truncate_seconds")
            assert all(m.startswith("StandInVLModel.get_rope_index") for m in truncation)
            assert detect_video_time_rounding(cls) == rounding  # a patched class: its original is probed
        finally:
            unpatch_transformers_rope_index(cls)
        assert cls.get_rope_index.__module__ == __name__
    with pytest.raises(ValueError, match="no video_time_rounding"):
        detect_video_time_rounding(_model_class("floor_product", offset=1))
    with pytest.raises(ValueError, match="no video_time_rounding"):
        patch_transformers_rope_index(_model_class("floor_product", offset=1))
    with pytest.raises(TypeError, match="could not run StandInVLModel.get_rope_index.*boom"):
        detect_video_time_rounding(_model_class(fails=True))
    with pytest.raises(TypeError, match="get_rope_index method"):
        detect_video_time_rounding(int)


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


def _random_runs(rng, B, T, pad_prob):
    """Arbitrary type sequences (adjacent image and video runs, runs of 1 token, rows of all
    padding, padding anywhere in a row) with grids that match each run's length."""
    types = torch.zeros(B, T, dtype=torch.int32)
    mask = (torch.rand(B, T, generator=torch.Generator().manual_seed(rng.randrange(2**31))) >= pad_prob).long()
    if B > 1:
        mask[rng.randrange(B)] = 0  # one row of padding only
    images, videos, seconds = [], [], []
    for b in range(B):
        real = mask[b].nonzero().flatten().tolist()
        k = 0
        while k < len(real):
            kind = rng.choice([0, 0, 1, 2])
            n = rng.choice([1, 2, 3, 7, 40, 300])
            if kind == 0:
                k += n
                continue
            n = min(n, len(real) - k)
            types[b, real[k:k + n]] = kind
            t = rng.choice([f for f in (1, 2, 3) if n % f == 0]) if kind == 2 else 1
            (videos if kind == 2 else images).append((t, 2, 2 * (n // t)))  # t * 1 * (n / t) LLM tokens
            if kind == 2:
                seconds.append(rng.choice([0.5, 1.0, 1.5, 0.3333333]))
            k += n
            # a following run of the same kind would merge with this one: put text between
            if k < len(real) and rng.random() < 0.5:
                k += 1
            elif k < len(real):
                nxt = 3 - kind  # the other modality right after: a new run without text between
                m = min(rng.choice([1, 5]), len(real) - k)
                types[b, real[k:k + m]] = nxt
                (videos if nxt == 2 else images).append((1, 2, 2 * m))
                if nxt == 2:
                    seconds.append(1.0)
                k += m + 1  # then one text token
    # a run that reaches the row's end must not merge with the next row's: rows are independent
    return {
        "input_ids": torch.randint(0, 1000, (B, T)), "mm_token_type_ids": types, "attention_mask": mask,
        "image_grid_thw": torch.tensor(images, dtype=torch.long) if images else None,
        "video_grid_thw": torch.tensor(videos, dtype=torch.long) if videos else None,
        "second_per_grid_ts": torch.tensor(seconds, dtype=torch.float32) if seconds else None,
    }


@pytest.mark.parametrize("B, T", [(1, 1), (3, 7), (2, 255), (4, 257), (2, 1500), (1, 9000)])
def test_chunk_scan_on_arbitrary_runs(backend, B, T, device, request):
    """Rows shorter and longer than the 256 chunks of the scan, runs straddling chunk
    boundaries, adjacent image/video runs, padding inside runs, rows of padding only:
    equal to the run-by-run reference (transformers itself cannot take an all-padding row)."""
    rng = _rng(request)
    for pad_prob in (0.0, 0.2):
        inputs = _random_runs(rng, B, T, pad_prob)
        expected = get_rope_index_ref(**inputs, tokens_per_second=2)
        on_device = {k: v.to(device) if v is not None else None for k, v in inputs.items()}
        ours = get_rope_index(**on_device, tokens_per_second=2)
        _assert_same((ours[0].cpu(), ours[1].cpu()), expected)
        rows = inputs["attention_mask"].any(1)
        if rows.all():  # transformers as well, when every row has a token (in its video time rounding)
            ours = get_rope_index(**on_device, tokens_per_second=2, video_time_rounding=_peer_rounding())
            _assert_same((ours[0].cpu(), ours[1].cpu()), _theirs("qwen2_5_vl", inputs))


@pytest.mark.parametrize("B, T", [(1, 1), (3, 7), (4, 257), (2, 1500)])
def test_one_pass_walk_equals_the_chunked_twin(B, T, request):
    """The CPU path walks each row once; the chunked twin runs the CUDA kernels' scan. Both give
    the same positions, deltas and per-row status (run counts, first bad run), bad grids included."""
    from docqa_fast._backend import extension

    ext = extension()
    if ext is None:
        pytest.skip("docqa_fast._C is not built")
    rng = _rng(request)
    empty = torch.zeros(0, 3, dtype=torch.long)
    for pad_prob in (0.0, 0.2):
        inputs = _random_runs(rng, B, T, pad_prob)
        seconds = inputs["second_per_grid_ts"]
        steps = (2 * seconds).double() if seconds is not None else torch.zeros(0, dtype=torch.float64)
        images = inputs["image_grid_thw"] if inputs["image_grid_thw"] is not None else empty
        videos = inputs["video_grid_thw"] if inputs["video_grid_thw"] is not None else empty
        for grids in (images, images * torch.tensor([1, 1, 2])):  # the second: every image run too short
            args = (inputs["mm_token_type_ids"], inputs["attention_mask"], grids, videos, steps, True, 2)
            one_pass, chunked = ext.mrope_position_ids(*args), ext.mrope_position_ids(*args, chunked=True)
            for name, a, b in zip(("positions", "deltas", "status"), one_pass, chunked):
                assert torch.equal(a, b), name


def test_empty_rows_and_no_tokens(backend, device):
    ids = torch.zeros(3, 0, dtype=torch.long, device=device)
    pos, delta = get_rope_index(ids, ids.int())
    assert pos.shape == (3, 3, 0) and torch.equal(delta.cpu(), torch.zeros(3, 1, dtype=torch.long))
    pos, delta = get_rope_index(ids[:0], ids[:0].int())
    assert pos.shape == (3, 0, 0) and delta.shape == (0, 1)


def test_bad_run_length_at_row_end(backend):
    # text, a complete 2x2 image, text, then an image of grid 4x4 (4 tokens) cut to 3 tokens
    # by the row's end: the scan's row-end check (no token after the run) must catch it.
    types = torch.tensor([[0, 0, 1, 0, 1, 1, 1]], dtype=torch.int32)
    grids = torch.tensor([[1, 2, 2], [1, 4, 4]])
    with pytest.raises(ValueError, match="has 3 tokens, but its grid gives t\\*h\\*w/merge\\*\\*2 = 4"):
        get_rope_index(types.long(), types, grids)
    if backend == "extension":
        with pytest.raises(ValueError, match="at the end of row 0"):
            get_rope_index(types.long(), types, grids)
    # the same run followed by a text token is caught where the text token stands
    types2 = torch.cat([types, torch.zeros(1, 1, dtype=torch.int32)], 1)
    with pytest.raises(ValueError, match="has 3 tokens"):
        get_rope_index(types2.long(), types2, grids)


def test_extension_op_rejects_bad_arguments():
    from docqa_fast._backend import extension

    ext = extension()
    if ext is None:
        pytest.skip("docqa_fast._C is not built")
    types = torch.zeros(2, 5, dtype=torch.int32)
    mask = torch.ones(2, 5, dtype=torch.long)
    grids = torch.zeros(0, 3, dtype=torch.long)
    steps = torch.zeros(0, dtype=torch.float64)
    with pytest.raises(ValueError, match="attention_mask"):
        ext.mrope_position_ids(types, mask.float(), grids, grids, steps, False, 2)
    with pytest.raises(ValueError, match="attention_mask"):
        ext.mrope_position_ids(types, mask[:, :4], grids, grids, steps, False, 2)
    with pytest.raises(ValueError, match="video_steps"):
        ext.mrope_position_ids(types, mask, grids, torch.ones(2, 3, dtype=torch.long), steps, False, 2)
    with pytest.raises(ValueError, match="grids"):
        ext.mrope_position_ids(types, mask, grids.int(), grids, steps, False, 2)
    with pytest.raises(ValueError, match="spatial_merge_size"):
        ext.mrope_position_ids(types, mask, grids, grids, steps, False, 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA kernels need a GPU (their C++ twin runs above)")
def test_cuda_kernels_equal_cpu_twin_on_long_rows(monkeypatch, request):
    """Rows far longer than the 256 chunks (each chunk hundreds of tokens), many rows (the
    grid offsets of earlier rows): the CUDA kernels give exactly the CPU twin's output."""
    monkeypatch.setenv("DOCQA_FAST_BACKEND", "extension")
    rng = _rng(request)
    inputs = batch([random_document(rng, max_images=30, max_side=60, video_prob=0.3) for _ in range(6)], "left")
    # The installed transformers' video rounding (5.17, the GPU machine's, truncates differently).
    rounding = _peer_rounding()
    cpu = get_rope_index(**inputs, video_time_rounding=rounding)
    gpu = get_rope_index(**{k: v.cuda() if v is not None else None for k, v in inputs.items()},
                         video_time_rounding=rounding)
    _assert_same((gpu[0].cpu(), gpu[1].cpu()), cpu)
    _assert_same(cpu, _theirs("qwen2_5_vl", inputs))


def test_compiles_fullgraph_with_the_default_dispatch(request, monkeypatch):
    """No backend forced: the dispatch itself must trace (the extension is not eligible there)."""
    monkeypatch.delenv("DOCQA_FAST_BACKEND", raising=False)
    rng = _rng(request)
    inputs = batch([random_document(rng, max_images=2, max_side=8, video_prob=0.3) for _ in range(2)], "left")
    rounding = _peer_rounding()
    fn = torch.compile(lambda kw: get_rope_index(**kw, video_time_rounding=rounding, check=False), fullgraph=True)
    _assert_same(fn(inputs), _theirs("qwen2_5_vl", inputs))


def test_compiles_fullgraph(backend, request):
    # Under torch.compile the whole-batch tensor path is traced (no graph break on the extension).
    rng = _rng(request)
    inputs = batch([random_document(rng, max_images=3, max_side=8, video_prob=0.3) for _ in range(2)], "left")
    rounding = _peer_rounding()
    fn = torch.compile(lambda kw: get_rope_index(**kw, video_time_rounding=rounding, check=False), fullgraph=True)
    if backend == "extension":  # forced, but its call cannot be traced: a clear error, not a silent switch
        with pytest.raises(Exception, match="extension cannot run get_rope_index.*torch.compile"):
            fn(inputs)
        return
    _assert_same(fn(inputs), _theirs("qwen2_5_vl", inputs))
