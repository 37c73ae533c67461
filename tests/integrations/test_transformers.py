"""attn_implementation="docqa_fast" against "eager" on tiny random-weight transformers models."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed")

from docqa_fast.integrations.transformers import register  # noqa: E402

pytestmark = pytest.mark.backends("reference", "triton")
register()


def _precision(backend):
    # The Triton kernels take fp16/bf16 (bf16 is wrong under the CPU interpreter); fp32 runs the reference.
    if backend == "triton":
        return torch.float16, dict(atol=3e-3, rtol=3e-3)
    return torch.float32, dict(atol=1e-5, rtol=1e-5)


def _pair(model_class, config, dtype, device):
    """The same random weights under "eager" and "docqa_fast"."""
    torch.manual_seed(0)
    eager = model_class._from_config(copy.deepcopy(config), attn_implementation="eager", torch_dtype=dtype)
    ours = model_class._from_config(copy.deepcopy(config), attn_implementation="docqa_fast", torch_dtype=dtype)
    ours.load_state_dict(eager.state_dict())
    return eager.to(device).eval(), ours.to(device).eval()


def _llama_config(**overrides):
    return transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                    **overrides)


def _logits_and_grads(model, **inputs):
    model.zero_grad()
    logits = model(**inputs).logits
    # Padded positions' outputs are arbitrary (eager computes them, flash-style kernels skip them):
    # the loss reads real tokens only, as a training loss does.
    mask = inputs.get("attention_mask")
    weight = torch.ones(logits.shape[:2], device=logits.device) if mask is None else mask.float()
    (logits.float().square().mean(-1) * weight).sum().backward()
    return logits, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _assert_same(eager_result, ours_result, tolerance, rows=None):
    (e_logits, e_grads), (o_logits, o_grads) = eager_result, ours_result
    if rows is not None:
        e_logits, o_logits = e_logits[rows], o_logits[rows]
    torch.testing.assert_close(o_logits, e_logits, **tolerance)
    assert e_grads.keys() == o_grads.keys()
    for name in e_grads:
        torch.testing.assert_close(o_grads[name], e_grads[name], **tolerance, msg=name)


@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_llama_padded_batch(backend, padding, device):
    dtype, tolerance = _precision(backend)
    eager, ours = _pair(transformers.LlamaForCausalLM, _llama_config(), dtype, device)
    ids = torch.randint(0, 97, (3, 23), device=device)
    mask = torch.ones_like(ids)
    if padding == "left":
        mask[1, :7], mask[2, :1] = 0, 0
    elif padding == "right":
        mask[1, 15:], mask[2, 22:] = 0, 0
    inputs = dict(input_ids=ids, attention_mask=mask)
    _assert_same(_logits_and_grads(eager, **inputs), _logits_and_grads(ours, **inputs), tolerance, mask.bool())


def test_qwen2_padded_batch(backend, device):
    """Qwen2 (q/k/v projections with biases, GQA 4/2): left padding through the varlen path."""
    dtype, tolerance = _precision(backend)
    config = transformers.Qwen2Config(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    eager, ours = _pair(transformers.Qwen2ForCausalLM, config, dtype, device)
    ids = torch.randint(0, 97, (3, 21), device=device)
    mask = torch.ones_like(ids)
    mask[0, :5], mask[2, :12] = 0, 0
    inputs = dict(input_ids=ids, attention_mask=mask)
    _assert_same(_logits_and_grads(eager, **inputs), _logits_and_grads(ours, **inputs), tolerance, mask.bool())


def test_llama_packed_documents_match_separate_forwards(backend, device):
    """Documents packed into one row with restarting position_ids: no attention across them."""
    dtype, tolerance = _precision(backend)
    eager, ours = _pair(transformers.LlamaForCausalLM, _llama_config(), dtype, device)
    lengths = [9, 1, 14]
    ids = torch.randint(0, 97, (1, sum(lengths)), device=device)
    position_ids = torch.cat([torch.arange(n, device=device) for n in lengths])[None]
    packed = ours(input_ids=ids, position_ids=position_ids).logits[0]
    start = 0
    for n in lengths:
        alone = eager(input_ids=ids[:, start : start + n]).logits[0]
        torch.testing.assert_close(packed[start : start + n], alone, **tolerance)
        start += n


def test_llama_sliding_window_matches_eager(backend, device):
    dtype, tolerance = _precision(backend)
    config = transformers.MistralConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=1, sliding_window=6,
                                        max_position_embeddings=128)
    eager, ours = _pair(transformers.MistralForCausalLM, config, dtype, device)
    ids = torch.randint(0, 97, (2, 19), device=device)
    _assert_same(_logits_and_grads(eager, input_ids=ids), _logits_and_grads(ours, input_ids=ids), tolerance)


def _qwen2_5_vl_config():
    vision = dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1],
                  in_channels=3)
    text = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    return transformers.Qwen2_5_VLConfig(vision_config=vision, text_config=text, image_token_id=151,
                                         video_token_id=152, vision_start_token_id=153, vision_end_token_id=154)


def test_qwen2_5_vl_text_and_vision_match_eager(backend, device):
    dtype, tolerance = _precision(backend)
    eager, ours = _pair(transformers.Qwen2_5_VLForConditionalGeneration, _qwen2_5_vl_config(), dtype, device)
    grid = torch.tensor([[1, 4, 8], [1, 8, 4]], device=device)  # two images: 32 patches -> 8 tokens each
    pixels = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 14 * 14, device=device).to(dtype)
    image = [153] + [151] * 8 + [154]
    row = [5, 6] + image + [7, 8, 9] + image + [10, 11]
    ids = torch.tensor([row, [1] * 3 + row[:-3]], device=device)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding in the second row
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=torch.cat([pixels, pixels]),
                  image_grid_thw=torch.cat([grid, grid]))
    _assert_same(_logits_and_grads(eager, **inputs), _logits_and_grads(ours, **inputs), tolerance, mask.bool())


# --- Qwen2-VL / Qwen2.5-VL vision towers: one varlen call per layer over all images -------------

def _qwen2_vl_config():
    vision = dict(depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=2, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    text = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    return transformers.Qwen2VLConfig(vision_config=vision, text_config=text, image_token_id=151,
                                      video_token_id=152, vision_start_token_id=153, vision_end_token_id=154)


_VL_MODELS = {
    "qwen2_vl": (lambda: transformers.Qwen2VLForConditionalGeneration, _qwen2_vl_config),
    "qwen2_5_vl": (lambda: transformers.Qwen2_5_VLForConditionalGeneration, _qwen2_5_vl_config),
}

# Grids (t, h, w) in patches: an odd-sized window (6 x 4 is 1.5 windows of 4 x 4 patches), a one-token
# image, a two-frame entry (each frame is its own attention segment).
_GRIDS = [[1, 4, 8], [1, 6, 4], [1, 2, 2], [2, 4, 4]]
_FULL_CU = [0, 32, 56, 60, 76, 92]  # one segment per frame
_WINDOW_CU = [0, 16, 32, 48, 56, 60, 76, 92]  # Qwen2.5-VL's 56-pixel windows (4 x 4 patches)


def _vision_layer_segments(kind, config):
    """(cu_seqlens, max_seqlen) that each vision layer's single attention call must receive."""
    full = (_FULL_CU, 32)
    if kind == "qwen2_vl":
        return [full] * config.vision_config.depth
    return [full if i in config.vision_config.fullatt_block_indexes else (_WINDOW_CU, 16)
            for i in range(config.vision_config.depth)]


@pytest.mark.parametrize("kind", sorted(_VL_MODELS))
def test_vision_tower_resolves_docqa_fast_to_the_varlen_alias(kind):
    """The user writes "docqa_fast"; only the vision sub-config reads the "flash" alias, through every
    way of setting the implementation, and transformers never tries to load a flash package for it."""
    import sys

    import transformers.modeling_flash_attention_utils as flash_utils
    from docqa_fast.integrations.transformers import NAME, VISION_NAME

    model_class, make_config = _VL_MODELS[kind]
    loaded_before = flash_utils._loaded_implementation
    model = model_class()._from_config(make_config(), attn_implementation="docqa_fast")
    config = model.config
    assert (config._attn_implementation, config.text_config._attn_implementation) == (NAME, NAME)
    assert config.vision_config._attn_implementation == VISION_NAME
    assert model.model.visual.config is config.vision_config
    assert model.model.language_model.config._attn_implementation == NAME
    model.set_attn_implementation("eager")
    assert {config._attn_implementation, config.text_config._attn_implementation,
            config.vision_config._attn_implementation} == {"eager"}
    model.set_attn_implementation("docqa_fast")
    assert (config.text_config._attn_implementation, config.vision_config._attn_implementation) == (NAME, VISION_NAME)
    model.set_attn_implementation({"vision_config": "sdpa"})  # a per-sub-config choice is kept
    assert (config.text_config._attn_implementation, config.vision_config._attn_implementation) == (NAME, "sdpa")
    model.set_attn_implementation({"vision_config": "docqa_fast"})
    assert config.vision_config._attn_implementation == VISION_NAME
    # Building or setting the alias went through no flash-attention import.
    assert flash_utils._loaded_implementation == loaded_before
    assert "flash_attn" not in sys.modules or loaded_before is not None


def test_saved_config_does_not_keep_the_alias(tmp_path):
    """from_pretrained(attn_implementation="docqa_fast") on a saved checkpoint: the alias is runtime
    state, never written to config.json."""
    from docqa_fast.integrations.transformers import NAME, VISION_NAME

    model = transformers.Qwen2_5_VLForConditionalGeneration._from_config(_qwen2_5_vl_config(),
                                                                         attn_implementation="docqa_fast")
    model.save_pretrained(tmp_path)
    assert VISION_NAME not in (tmp_path / "config.json").read_text()
    loaded = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="docqa_fast")
    assert loaded.config.text_config._attn_implementation == NAME
    assert loaded.config.vision_config._attn_implementation == VISION_NAME


@pytest.mark.parametrize("kind", sorted(_VL_MODELS))
def test_vision_attention_is_one_varlen_call_per_layer(backend, kind, device, monkeypatch):
    """Spy on the kernels the backend calls: each vision layer makes exactly one varlen call, with
    the per-image (Qwen2-VL, Qwen2.5-VL full layers) or per-window (Qwen2.5-VL) cu_seqlens, and the
    tower's output equals eager's."""
    import docqa_fast.integrations.transformers as integration

    dtype, tolerance = _precision(backend)
    model_class, make_config = _VL_MODELS[kind]
    config = make_config()
    eager, ours = _pair(model_class(), config, dtype, device)
    grid = torch.tensor(_GRIDS, device=device)
    pixels = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 14 * 14, device=device).to(dtype)

    varlen_calls, dense_calls = [], []

    def varlen_spy(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *args, **kwargs):
        varlen_calls.append((q.shape[0], cu_seqlens_q.tolist(), cu_seqlens_k.tolist(), max_seqlen_q, max_seqlen_k,
                             cu_seqlens_q.dtype, kwargs.get("causal")))
        return varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *args, **kwargs)

    varlen, dense = integration.flash_attn_varlen_func, integration.flash_attn_func
    monkeypatch.setattr(integration, "flash_attn_varlen_func", varlen_spy)
    monkeypatch.setattr(integration, "flash_attn_func", lambda *a, **k: dense_calls.append(1) or dense(*a, **k))
    with torch.no_grad():
        got = ours.model.visual(pixels, grid_thw=grid)
    assert dense_calls == []
    expected = [(92, cu, cu, longest, longest, torch.int32, False)
                for cu, longest in _vision_layer_segments(kind, config)]
    assert varlen_calls == expected

    with torch.no_grad():
        want = eager.model.visual(pixels, grid_thw=grid)
    for name in ("last_hidden_state", "pooler_output"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), **tolerance, msg=name)


@pytest.mark.parametrize("kind", sorted(_VL_MODELS))
def test_qwen_vl_several_images_match_eager(backend, kind, device):
    """Four images of different grids over two padded rows: logits and every gradient (the vision
    tower's through the varlen backward) against "eager"."""
    dtype, tolerance = _precision(backend)
    model_class, make_config = _VL_MODELS[kind]
    eager, ours = _pair(model_class(), make_config(), dtype, device)
    grids = [[1, 4, 8], [1, 6, 4], [1, 2, 2], [1, 4, 4]]  # 8, 6, 1 and 4 visual tokens
    grid = torch.tensor(grids, device=device)
    pixels = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 14 * 14, device=device).to(dtype)
    image = [[153] + [151] * (h * w // 4) + [154] for _, h, w in grids]
    rows = [[5, 6] + image[0] + [7, 8, 9] + image[1] + [10, 11], [12] + image[2] + [13, 14] + image[3] + [15]]
    width = max(map(len, rows))
    ids = torch.tensor([[1] * (width - len(r)) + r for r in rows], device=device)  # left padding
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grid,
                  mm_token_type_ids=(ids == 151).int())  # image tokens: M-RoPE positions
    _assert_same(_logits_and_grads(eager, **inputs), _logits_and_grads(ours, **inputs), tolerance, mask.bool())


@pytest.mark.parametrize("padding", [False, True])
def test_generate_with_a_static_cache_matches_eager(backend, padding, device):
    """A static cache is longer than the tokens seen: with or without a padding mask, the
    unfilled slots must not be attended to."""
    dtype, tolerance = _precision(backend)
    eager, ours = _pair(transformers.LlamaForCausalLM, _llama_config(), dtype, device)
    ids = torch.randint(1, 97, (2, 7), device=device)
    mask = torch.ones_like(ids)
    if padding:
        mask[0, :2] = 0
    options = dict(max_new_tokens=3, do_sample=False, cache_implementation="static", output_scores=True,
                   return_dict_in_generate=True, pad_token_id=0)
    expected = eager.generate(input_ids=ids, attention_mask=mask, **options)
    got = ours.generate(input_ids=ids, attention_mask=mask, **options)
    for e, g in zip(expected.scores, got.scores):
        torch.testing.assert_close(g, e, **tolerance)


def test_attention_sinks_are_refused(device):
    from docqa_fast.integrations.transformers import docqa_fast_attention_forward

    module = torch.nn.Module()
    module.is_causal, module.training = True, False
    q = torch.randn(1, 2, 4, 16, device=device)
    with pytest.raises(NotImplementedError, match="s_aux"):
        docqa_fast_attention_forward(module, q, q, q, None, s_aux=torch.zeros(2, device=device))
