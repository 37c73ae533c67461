"""Random multimodal documents in Qwen2-VL's token layout, and tiny transformers models."""

from __future__ import annotations

import random

import torch

IMAGE_ID, VIDEO_ID, VISION_START, VISION_END, PAD_ID = 151655, 151656, 151652, 151653, 151643
MERGE = 2


def random_document(rng: random.Random, *, max_images=100, max_text=500, max_side=100, video_prob=0.0,
                    max_frames=4):
    """(token ids, type ids, image grids, video grids, seconds) of one document.

    Text runs of 0..max_text tokens; every image / video sits between a vision-start and a
    vision-end token (text), as the Qwen processors emit them. Grids are ViT patches,
    2..max_side on a side (multiples of the merge size).
    """
    ids, types, images, videos, seconds = [], [], [], [], []

    def text(n):
        ids.extend(rng.randrange(0, 150000) for _ in range(n))
        types.extend([0] * n)

    for _ in range(rng.randint(1, max_images)):
        text(rng.randint(0, max_text))
        h, w = (MERGE * rng.randint(1, max_side // MERGE) for _ in range(2))
        is_video = rng.random() < video_prob
        t = rng.randint(1, max_frames) if is_video else 1
        n = t * h * w // MERGE**2
        ids.append(VISION_START)
        types.append(0)
        ids.extend([VIDEO_ID if is_video else IMAGE_ID] * n)
        types.extend([2 if is_video else 1] * n)
        ids.append(VISION_END)
        types.append(0)
        (videos if is_video else images).append((t, h, w))
        if is_video:
            seconds.append(rng.choice([0.5, 1.0, 1.5, 2.0, 0.3333333, 4.0]))
    text(rng.randint(0, max_text))
    return ids, types, images, videos, seconds


def batch(docs, padding_side="right"):
    """Pad documents into (B, T) input_ids / mm_token_type_ids / attention_mask + concatenated grids."""
    T = max(len(d[0]) for d in docs)
    B = len(docs)
    input_ids = torch.full((B, T), PAD_ID, dtype=torch.long)
    types = torch.zeros(B, T, dtype=torch.int32)
    mask = torch.zeros(B, T, dtype=torch.long)
    for b, (ids, ty, *_) in enumerate(docs):
        cols = slice(0, len(ids)) if padding_side == "right" else slice(T - len(ids), T)
        input_ids[b, cols] = torch.tensor(ids)
        types[b, cols] = torch.tensor(ty, dtype=torch.int32)
        mask[b, cols] = 1
    images = [g for d in docs for g in d[2]]
    videos = [g for d in docs for g in d[3]]
    seconds = [s for d in docs for s in d[4]]
    return {
        "input_ids": input_ids, "mm_token_type_ids": types, "attention_mask": mask,
        "image_grid_thw": torch.tensor(images, dtype=torch.long) if images else None,
        "video_grid_thw": torch.tensor(videos, dtype=torch.long) if videos else None,
        "second_per_grid_ts": torch.tensor(seconds, dtype=torch.float32) if seconds else None,
    }


def tiny_qwen_config(model_type="qwen2_5_vl", tokens_per_second=2):
    """A few-kilobyte Qwen2-VL / Qwen2.5-VL config (random weights; nothing downloaded)."""
    if model_type == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig as Config
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                      patch_size=14, spatial_merge_size=MERGE, temporal_patch_size=2, window_size=112,
                      fullatt_block_indexes=[1], tokens_per_second=tokens_per_second, in_channels=3)
    else:
        from transformers import Qwen2VLConfig as Config
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                      spatial_merge_size=MERGE, temporal_patch_size=2, in_channels=3)
    text = dict(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, rope_theta=10000.0)
    return Config(text_config=text, vision_config=vision, image_token_id=IMAGE_ID, video_token_id=VIDEO_ID,
                  vision_start_token_id=VISION_START)
