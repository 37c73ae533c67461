"""Serving a long document: chunked prefill into a paged KV cache, then greedy decoding, on a Qwen2.5-VL.

    python -m examples.serve_long_doc [--tiny] [--steps N] [--chunk C] [--page-size P] [--max-new-tokens M]

The prompt (a document's pages, then its question) is embedded by the model's own vision tower
and embeddings, merged with :func:`~docqa_fast.merge_visual_tokens`; its M-RoPE positions come
from :func:`~docqa_fast.get_rope_index`. The text model's layers then run with their own weights
(norms, projections, MLPs), their attention through :func:`~docqa_fast.flash_attn_with_kvcache`:

* a paged cache (``block_table`` over pages handed out in a scrambled order, as a server's
  allocator would) that the kernel appends the new keys and values to in place;
* rotary applied by the kernel to q and the new k: the tables hold each cache slot's M-RoPE
  angles (each frequency band at its section's temporal, height or width position), so the
  multimodal positions need no rotation outside the kernel;
* the prompt prefilled ``--chunk`` tokens at a time (causal, aligned to the cached tokens), then
  one token per step, greedy, until ``--max-new-tokens`` or the end token.

The check (unless ``--no-check``): the generated tokens equal ``model.generate(...)``'s with
``attn_implementation="eager"`` on the same prompt. ``--steps N`` serves N documents.
"""

from __future__ import annotations

import random
import sys

import torch

from docqa_fast import flash_attn_with_kvcache, get_rope_index, merge_visual_tokens

from docqa_fast.testing import assert_close_by_rule

from ._common import (MERGE, TOKENIZER, Document, Timer, build_model, encode_pages, image_processor, model_config,
                      parse_args, prompt_tokens, same_weights, synthetic_documents)


SERVE_INIT = 0.3


def prompt_sample(doc: Document, processor, name: str = "document") -> dict:
    """A serving request: the document's pages and question, no answer."""
    if not isinstance(doc, Document):
        raise TypeError(f"expected {name} to be a Document, got {type(doc).__name__}")
    if len(doc.pages) == 0:
        raise ValueError(f"expected {name}.pages to hold at least one page image, got none")
    pixel_values, grids = encode_pages(doc.pages, processor)
    ids = torch.tensor([prompt_tokens(grids, doc.question)])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "mm_token_type_ids": (ids == TOKENIZER.image_id).to(torch.int32),
            "pixel_values": pixel_values, "image_grid_thw": grids}


class PagedKVCache:
    """Per layer a (pages, page_size, kv_heads, head_dim) key and value pool, one sequence's block table."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, max_tokens: int, page_size: int, dtype, device,
                 seed: int = 0):
        pages = -(-max_tokens // page_size)
        shape = (pages, page_size, kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        order = torch.randperm(pages, generator=torch.Generator().manual_seed(seed))
        self.block_table = order.to(device=device, dtype=torch.int32)[None]
        self.capacity = pages * page_size
        self.length = 0


def rotary_tables(model, positions: torch.Tensor, dtype):
    """(cos, sin) (slots, head_dim / 2): row s holds the M-RoPE angles of cache slot s, whose
    (temporal, height, width) positions are ``positions[:, s]`` -- band j of the frequencies
    takes the position of its M-RoPE section, as transformers' Qwen2.5-VL rotary embedding does."""
    rotary = model.model.language_model.rotary_emb
    freqs = positions[..., None].float() * rotary.inv_freq.float().to(positions.device)  # (3, slots, D/2)
    sections = freqs.split(list(rotary.mrope_section), dim=-1)
    freqs = torch.cat([part[i % 3] for i, part in enumerate(sections)], dim=-1)
    scale = getattr(rotary, "attention_scaling", 1.0)
    return (freqs.cos() * scale).to(dtype), (freqs.sin() * scale).to(dtype)


def decoder_step(model, embeds: torch.Tensor, cache: PagedKVCache, cos, sin) -> torch.Tensor:
    """Run ``embeds`` (1, C, hidden) -- the next C tokens -- through the text model on the cache;
    returns the logits of the last one. Attention: flash_attn_with_kvcache, rotary in the kernel."""
    text = model.model.language_model
    seqlens = torch.full((1,), cache.length, dtype=torch.int32, device=embeds.device)
    x = embeds
    for index, layer in enumerate(text.layers):
        attn = layer.self_attn
        if getattr(attn, "sliding_window", None):
            raise NotImplementedError("this example serves models without sliding-window layers")
        h = layer.input_layernorm(x)
        q = attn.q_proj(h).unflatten(-1, (-1, attn.head_dim))
        k = attn.k_proj(h).unflatten(-1, (-1, attn.head_dim))
        v = attn.v_proj(h).unflatten(-1, (-1, attn.head_dim))
        out = flash_attn_with_kvcache(q, cache.k[index], cache.v[index], k=k, v=v, rotary_cos=cos, rotary_sin=sin,
                                      cache_seqlens=seqlens, block_table=cache.block_table, softmax_scale=attn.scaling,
                                      causal=True, rotary_interleaved=False)
        x = x + attn.o_proj(out.flatten(-2))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    cache.length += embeds.shape[1]
    return model.lm_head(text.norm(x[:, -1]))


def _check_positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"expected {name} to be a positive int, got {value!r}")
    return value


@torch.no_grad()
def generate(model, sample: dict, *, max_new_tokens: int, chunk: int, page_size: int = 16,
             max_tokens: int | None = None, return_logits: bool = False, eos_token_id: int | None = TOKENIZER.eos_id):
    """Greedy tokens after the prompt: chunked prefill into a paged cache of ``max_tokens`` slots
    (default: the prompt and the new tokens), then decoding, stopping after the end token.
    ``return_logits``: also the (new tokens, vocabulary) logits each token was picked from;
    ``eos_token_id=None``: never stop early."""
    _check_positive("max_new_tokens", max_new_tokens)
    _check_positive("chunk", chunk)
    _check_positive("page_size", page_size)
    device, dtype = model.lm_head.weight.device, model.lm_head.weight.dtype
    ids = sample["input_ids"].to(device)
    length = ids.shape[1]
    needed = length + max_new_tokens
    max_tokens = needed if max_tokens is None else _check_positive("max_tokens", max_tokens)
    if needed > max_tokens:
        raise ValueError(f"the prompt ({length} tokens) and max_new_tokens={max_new_tokens} need {needed} cache "
                         f"slots, more than the cache budget max_tokens={max_tokens}")
    config = model.config.text_config
    cache = PagedKVCache(config.num_hidden_layers, config.num_key_value_heads,
                         getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
                         max_tokens, page_size, dtype, device)

    grids = sample["image_grid_thw"].to(device)
    positions, delta = get_rope_index(ids, sample["mm_token_type_ids"].to(device), grids,
                                      spatial_merge_size=MERGE, tokens_per_second=2)
    # Generated tokens sit at their slot plus the prompt's delta on all three axes.
    later = torch.arange(length, cache.capacity, device=device) + delta[0]
    cos, sin = rotary_tables(model, torch.cat([positions[:, 0], later.expand(3, -1)], dim=1), dtype)

    embeds = model.model.get_input_embeddings()(ids)
    features = model.model.get_image_features(sample["pixel_values"].to(device, dtype), grids).pooler_output
    embeds = merge_visual_tokens(embeds, ids, torch.cat(list(features)).to(dtype), model.config.image_token_id)

    for start in range(0, length, chunk):
        logits = decoder_step(model, embeds[:, start : start + chunk], cache, cos, sin)
    tokens, scores = [], []
    embed = model.model.get_input_embeddings()
    while True:
        token = int(logits.argmax(-1))
        tokens.append(token)
        scores.append(logits[0].float())
        if token == eos_token_id or len(tokens) == max_new_tokens:
            return (tokens, torch.stack(scores)) if return_logits else tokens
        logits = decoder_step(model, embed(torch.tensor([[token]], device=device)), cache, cos, sin)


def reference_generate(model, sample: dict, max_new_tokens: int, dtype=None, eos_token_id=TOKENIZER.eos_id):
    """transformers' ``generate`` (greedy, eager attention, its own cache and positions) on a copy
    of ``model`` in ``dtype``: (tokens, (new tokens, vocabulary) scores)."""
    dtype = dtype or model.lm_head.weight.dtype
    eager = same_weights(model, "eager", dtype)
    eager.generation_config.eos_token_id = eos_token_id
    device = model.lm_head.weight.device
    inputs = {k: v.to(device) for k, v in sample.items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    with torch.no_grad():
        out = eager.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, output_scores=True,
                             return_dict_in_generate=True, pad_token_id=TOKENIZER.pad_id)
    return out.sequences[0, sample["input_ids"].shape[1]:].tolist(), torch.cat(out.scores).float()


def check_against_generate(model, sample: dict, tokens: list[int], logits: torch.Tensor, max_new_tokens: int,
                           eos_token_id=TOKENIZER.eos_id) -> None:
    """The tokens equal eager ``generate``'s at the model's precision, and the logits they were
    picked from match it by the tolerance rule (fp64 ``generate`` as the exact result)."""
    expected, plain = reference_generate(model, sample, max_new_tokens, eos_token_id=eos_token_id)
    if tokens != expected:
        raise AssertionError(f"generated {tokens}, model.generate (eager) {expected}")
    exact_tokens, exact = reference_generate(model, sample, max_new_tokens, torch.float64, eos_token_id)
    # Compared while fp64 picks the same tokens (a near tie may go the other way at fp64).
    same = next((i for i, (a, b) in enumerate(zip(tokens, exact_tokens)) if a != b),
                min(len(tokens), len(exact_tokens)))
    same = max(same, 1)  # the first token's logits depend on the prompt alone
    assert_close_by_rule(logits[:same], exact[:same], plain[:same], name="logits")


def serve(args) -> list[list[int]]:
    sizes = args.sizes
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    processor = image_processor(sizes)
    # Weights of a larger spread than transformers' default: greedy tokens that vary from step to
    # step (at 0.02 a random model repeats one token), so the check sees every position's rotary.
    model = build_model(model_config(sizes, initializer_range=SERVE_INIT), "docqa_fast", args.dtype,
                        args.device).eval()
    outputs = []
    for step, doc in enumerate(synthetic_documents(rng, args.steps, sizes)):
        sample = prompt_sample(doc, processor)
        with Timer(args.device) as timer:
            tokens, logits = generate(model, sample, max_new_tokens=args.max_new_tokens, chunk=args.chunk,
                                      page_size=args.page_size, return_logits=True)
        outputs.append(tokens)
        length = sample["input_ids"].shape[1]
        check = ""
        if not args.no_check:
            check_against_generate(model, sample, tokens, logits, args.max_new_tokens)
            check = " (= model.generate, eager; logits by the tolerance rule)"
        print(f"document {step + 1}: {len(doc.pages)} pages, {length}-token prompt prefilled in "
              f"{-(-length // args.chunk)} chunks of {args.chunk}; {len(tokens)} tokens generated{check}: "
              f"{TOKENIZER.decode(tokens)!r}; {(length + len(tokens)) / timer.seconds:,.0f} tokens/s")
    return outputs


def _options(parser):
    parser.add_argument("--chunk", type=int, default=None, help="prefill chunk in tokens (default 32 tiny, 1024)")
    parser.add_argument("--page-size", type=int, default=16, help="KV cache page size, a multiple of 16")
    parser.add_argument("--max-new-tokens", type=int, default=8)


def main(argv=None) -> int:
    args = parse_args(__doc__.splitlines()[0], argv, extra=_options)
    if args.chunk is None:
        args.chunk = 32 if args.tiny else 1024
    serve(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
