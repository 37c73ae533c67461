"""The packing copy's vision fields: grids, pixel values and seconds per grid step joined in the
same call as the token fields (one CUDA launch; its C++ twin here), bit for bit what torch.cat
gives, over odd sizes, misaligned sources, empty parts and every pixel dtype."""

import pytest
import torch

from docqa_fast.packing import pack_multimodal

from .documents import IMAGE_ID, VIDEO_ID, VISION_END, VISION_START

PATCH_DIM = 59  # an odd row: 59 * 2 bytes is no multiple of 4, so row offsets misalign the words


def _extension():
    from docqa_fast._backend import extension

    ext = extension()
    if ext is None:
        pytest.skip("docqa_fast._C is not built")
    return ext


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes (NaN-safe, dtype-blind equality)."""
    return t.contiguous().view(torch.uint8) if t.numel() else t.reshape(-1).to(torch.uint8)


def _token_fields(lengths):
    ids = [torch.randint(0, 100, (n,)) for n in lengths]
    labels = [torch.randint(0, 100, (n,)) for n in lengths]
    types = [torch.randint(0, 3, (n,), dtype=torch.int32) for n in lengths]
    mrope = [torch.randint(0, 100, (3, n)) for n in lengths]
    T = sum(lengths)
    out = (torch.full((1, T), -7), torch.full((1, T), -7), torch.full((1, T), -7, dtype=torch.int32),
           torch.full((4, 1, T), -7))
    return (ids, labels, types, mrope), out


def _random(shape, dtype):
    if dtype.is_floating_point:
        return torch.randn(shape).to(dtype)
    return torch.randint(-1000, 1000, shape).to(dtype)


def _misaligned(shape, dtype, shift):
    """A contiguous tensor starting ``shift`` elements into its storage (its address off the
    16-byte grid for most shifts), as a slice of a processor's batch would be."""
    rows = shape[0]
    flat = _random((rows * int(torch.tensor(shape[1:]).prod()) + shift,), dtype)
    return flat[shift:].view(shape)


def _garbage(like_parts):
    """The joined output, filled with a byte pattern no part holds, so an unwritten byte shows."""
    rows = sum(p.shape[0] for p in like_parts)
    out = torch.empty((rows, *like_parts[0].shape[1:]), dtype=like_parts[0].dtype)
    if out.numel():
        out.view(torch.uint8).fill_(0xA5)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32,
                                   torch.uint8])
def test_joined_fields_equal_torch_cat(dtype):
    """Parts of 0, 1, 113 and 203 rows (203 x 59 fp32: three 16 KiB tiles, the last partial), at
    aligned and misaligned addresses (words of 16, 8, 4, 2 and 1 bytes), beside a grid field
    (24-byte rows: 8-byte words after the first part): every joined byte is torch.cat's, the
    token fields are right in the same call."""
    ext = _extension()
    fields, out = _token_fields([5, 1, 0, 3])
    pixels = [_random((113, PATCH_DIM), dtype), _misaligned((1, PATCH_DIM), dtype, 1),
              _random((0, PATCH_DIM), dtype), _misaligned((203, PATCH_DIM), dtype, 3),
              _misaligned((2, PATCH_DIM), dtype, 2)]
    grids = [torch.randint(1, 9, (n, 3)) for n in (2, 0, 1, 3)]
    seconds = [torch.rand(n, dtype=torch.float64) for n in (1, 2)]
    parts = [pixels, grids, seconds]
    joined = [_garbage(p) for p in parts]
    ext.pack_tokens(*fields, -100, *out, parts, joined)
    for got, field in zip(joined, parts):
        assert got.dtype == field[0].dtype
        assert torch.equal(_bits(got), _bits(torch.cat(field)))
    ids = fields[0]
    assert torch.equal(out[0][0], torch.cat(ids)) and torch.equal(out[2][0], torch.cat(fields[2]))
    assert torch.equal(out[3][1:, 0], torch.cat(fields[3], 1))


def test_joined_fields_without_tokens_or_rows():
    """A row of empty documents still joins its fields; a field of empty parts is (0, ...); no
    fields at all is the token-only call."""
    ext = _extension()
    fields, out = _token_fields([0, 0])
    parts = [[torch.randn(3, 5), torch.randn(4, 5)], [torch.zeros(0, 3, dtype=torch.long)] * 2]
    joined = [_garbage(p) for p in parts]
    ext.pack_tokens(*fields, -100, *out, parts, joined)
    assert torch.equal(joined[0], torch.cat(parts[0])) and joined[1].shape == (0, 3)
    fields, out = _token_fields([2, 3])
    ext.pack_tokens(*fields, -100, *out, [], [])
    assert torch.equal(out[0][0], torch.cat(fields[0]))


def test_joined_fields_bad_arguments():
    """Each mismatch is a TypeError / ValueError naming the part, raised before anything is written."""
    ext = _extension()
    fields, out = _token_fields([2, 3])
    parts = [torch.randn(3, 5), torch.randn(4, 5)]

    def call(parts_, joined_):
        ext.pack_tokens(*fields, -100, *out, parts_, joined_)

    joined = torch.full((7, 5), 7.0)
    with pytest.raises(TypeError, match=r"parts\[0\]\[1\] of dtype Float \(the dtype of joined\[0\]\), got Half"):
        call([[parts[0], parts[1].half()]], [joined])
    with pytest.raises(ValueError, match=r"parts\[0\]\[1\] as a contiguous tensor of shape \(rows, \[5\]\)"):
        call([[parts[0], torch.randn(4, 6)]], [torch.empty(7, 5)])
    with pytest.raises(ValueError, match=r"parts\[0\]\[0\] as a contiguous"):
        call([[torch.randn(5, 3).t(), parts[1]]], [joined])
    with pytest.raises(ValueError, match=r"joined\[0\] of 7 rows"):
        call([parts], [torch.empty(8, 5)])
    with pytest.raises(ValueError, match=r"parts\[0\]\[1\] on cpu \(the packed row's device\), got meta"):
        call([[parts[0], parts[1].to("meta")]], [joined])
    with pytest.raises(ValueError, match=r"joined\[0\] on cpu \(the packed row's device\), got meta"):
        call([parts], [torch.empty(7, 5, device="meta")])
    with pytest.raises(ValueError, match="one list of parts per joined output, got 1 lists for 2 outputs"):
        call([parts], [joined, joined])
    assert (joined == 7).all() and (out[0] == -7).all()  # the failed calls wrote nothing


# ------------------------------------------------------------------------- pack_multimodal

def _document(n_images, dtype, video=False, rows_per_image=None):
    """input_ids with image (and video) blocks, the grids, pixel values of ``dtype``."""
    ids, grids = [7, 8], []
    for i in range(n_images):
        h, w = (2, 2 * (i % 3 + 1))
        ids += [VISION_START] + [IMAGE_ID] * (h * w // 4) + [VISION_END, 9]
        grids.append((1, h, w))
    sample = {}
    if video:
        ids += [VISION_START] + [VIDEO_ID] * 2 + [VISION_END]
        sample.update(video_grid_thw=torch.tensor([[2, 2, 2]]), pixel_values_videos=_random((8, PATCH_DIM), dtype),
                      second_per_grid_ts=torch.tensor([0.5 + n_images]))
    sample["input_ids"] = torch.tensor(ids + [10])
    if grids:
        grid = torch.tensor(grids)
        sample.update(image_grid_thw=grid, pixel_values=_random((int(grid.prod(-1).sum()), PATCH_DIM), dtype))
    return sample


@pytest.mark.backends("reference", "extension")
@pytest.mark.parametrize("pixel_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_pack_multimodal_vision_fields_equal_torch_cat(backend, pixel_dtype, monkeypatch):
    """Images in some documents only (odd image counts and sizes), a video with its seconds in
    two: every vision field is the torch.cat of the documents' in document order, bit for bit
    (the extension: all five written by the one packing call)."""
    samples = [_document(0, pixel_dtype), _document(3, pixel_dtype, video=True), _document(0, pixel_dtype),
               _document(1, pixel_dtype), _document(2, pixel_dtype, video=True)]
    calls = []
    if backend == "extension":
        ext = _extension()
        original = ext.pack_tokens
        monkeypatch.setattr(ext, "pack_tokens", lambda *args: calls.append(len(args[-1])) or original(*args))
    packed = pack_multimodal(samples)
    assert calls == ([5] if backend == "extension" else [])
    for name in ("image_grid_thw", "pixel_values", "video_grid_thw", "pixel_values_videos", "second_per_grid_ts"):
        expected = torch.cat([s[name] for s in samples if name in s])
        got = getattr(packed, name)
        assert got.dtype == expected.dtype and got.shape == expected.shape, name
        assert torch.equal(_bits(got), _bits(expected)), name
    assert packed.image_order == [(1, 0), (1, 1), (1, 2), (3, 0), (4, 0), (4, 1)]
    assert packed.vision_cu_seqlens[-1] == packed.pixel_values.shape[0]


@pytest.mark.backends("reference", "extension")
def test_pack_multimodal_without_images(backend):
    """Text-only documents: no vision field, the token fields as before."""
    samples = [_document(0, torch.float32) for _ in range(3)]
    packed = pack_multimodal(samples)
    assert all(getattr(packed, name) is None for name in ("image_grid_thw", "pixel_values", "video_grid_thw",
                                                          "pixel_values_videos", "second_per_grid_ts",
                                                          "vision_cu_seqlens"))
    assert torch.equal(packed.input_ids[0], torch.cat([s["input_ids"] for s in samples]))


def test_pack_multimodal_refuses_mixed_vision_fields():
    """Pixel values of another dtype, row width or device than the earlier documents', or given
    for some documents' images but not others': a ValueError / TypeError naming the sample."""
    first, second = _document(1, torch.float32), _document(2, torch.float32)
    with pytest.raises(TypeError, match=r"samples\[1\]\['pixel_values'\] of dtype torch.float32 .* got torch.bfloat16"):
        pack_multimodal([first, {**second, "pixel_values": second["pixel_values"].bfloat16()}])
    with pytest.raises(ValueError, match=r"samples\[1\]\['pixel_values'\] of shape \(rows, 59\)"):
        pack_multimodal([first, {**second, "pixel_values": torch.randn(second["pixel_values"].shape[0], 60)}])
    with pytest.raises(ValueError, match=r"samples\[1\]\['pixel_values'\] on cpu .* got meta"):
        pack_multimodal([first, {**second, "pixel_values": second["pixel_values"].to("meta")}])
    with pytest.raises(ValueError, match=r"samples\[1\]\['pixel_values'\]: other samples give pixel_values"):
        pack_multimodal([first, {k: v for k, v in second.items() if k != "pixel_values"}])
    video = _document(0, torch.float32, video=True)
    with pytest.raises(ValueError, match=r"samples\[0\]\['second_per_grid_ts'\]: other samples give"):
        pack_multimodal([{k: v for k, v in video.items() if k != "second_per_grid_ts"}, video])
    # Grids without pixels in every document (features computed elsewhere): no pixel field.
    no_pixels = pack_multimodal([{k: v for k, v in s.items() if k != "pixel_values"} for s in (first, second)])
    assert no_pixels.pixel_values is None and no_pixels.image_grid_thw.shape == (3, 3)


@pytest.mark.backends("reference", "extension")
def test_pack_multimodal_empty_grid_without_pixels(backend):
    """A text-only sample given image_grid_thw of no rows and no pixel_values (a collator that sets
    every key) beside a sample with images: its images' pixels are all there is (it was refused
    as lacking pixel values, where torch.cat used to join the others)."""
    with_images, text_only = _document(2, torch.float32), _document(0, torch.float32)
    text_only["image_grid_thw"] = torch.zeros(0, 3, dtype=torch.long)
    packed = pack_multimodal([with_images, text_only])
    assert torch.equal(packed.pixel_values, with_images["pixel_values"])
    assert torch.equal(packed.image_grid_thw, with_images["image_grid_thw"])
