"""End to end: what docqa_fast buys each example of ``examples/`` against the plain stack (issue 19).

Each case is one example's step at a token count, on a Qwen2.5-VL built from its transformers
config with random weights:

* on a GPU, "layer scale": the real Qwen2.5-VL-7B dimensions -- hidden 3,584, 28 query / 4 KV
  heads, FFN 18,944, vocabulary 152,064, vision hidden 1,280 over 16 heads -- with one decoder
  layer and one vision block, bf16, at 32K and 128K tokens (pages of 1,200 tokens: a 60 x 80
  patch grid, random pixels);
* on a CPU (``--quick``, a smoke run: each step runs and the two providers agree), the examples'
  tiny model cut to the same one decoder layer and one vision block, pages of 8 x 12 patches,
  256 tokens, fp32.

Providers, on the same inputs:

* ``docqa_fast``: what the example runs -- ``attn_implementation="docqa_fast"`` (text model and
  vision tower), documents packed into one padding-free row, the fused losses / reward heads on
  the hidden states, and for serving chunked prefill + decode with ``flash_attn_with_kvcache``
  over a paged cache;
* ``transformers sdpa``: the plain stack a user would run -- ``attn_implementation="sdpa"``, one
  padded row per sequence, logits for every token, ``F.cross_entropy`` / ``log_softmax`` +
  ``gather`` / K ``nn.Linear`` heads on every token, and ``model.generate``.

Cases: ``sft`` (forward + backward of the SFT loss over 4 documents), ``longpo`` (policy forward +
backward over a document with its chosen and rejected answers, the reference's forward over the
short chunks), ``reward`` (forward + backward of 4 candidates x 8 heads, pairwise + Plackett-Luce),
``serve`` (prefill + 16 greedy tokens). ``params["tokens"]`` is the tokens one call processes:
tokens/s = tokens / p50. The work model counts 6 N T FLOPs for training and 2 N T for serving
(N = the text model's matmul parameters, LM head included; attention and the vision tower left
out), so the TFLOP/s column understates both providers alike. Peak memory (GPU) is the harness's.
"""

from __future__ import annotations

import dataclasses
import functools
import random

import torch

from examples import long_doc_sft, longpo_step, reward_best_of_n, serve_long_doc
from examples._common import (MERGE, PATCH, PATCH_DIM, TINY, TOKENIZER, Sizes, build_model, model_config, pack_samples,
                              padded_batch, prompt_tokens)

from .harness import Case, Provider, register_family

FAMILY = "end_to_end"
LAYER_SCALE = Sizes(hidden=3584, layers=1, heads=28, kv_heads=4, mrope_section=(16, 24, 24), vision_hidden=1280,
                    vision_depth=1, vision_heads=16, vision_intermediate=3420, intermediate=18944, vocab=152064,
                    page_width=80 * PATCH, page_height=60 * PATCH, pages=(1, 1), documents=4, max_tokens=1 << 17)
# One decoder layer and one vision block, like the GPU cases. Pages of 26 tokens rather than the
# tests' 8: on a CPU our attention's backward runs the reference, a loop over the sequences, and
# the vision tower's sequences are the pages (dozens of them a document at 8 tokens a page).
# With one token count, the tiny model's steps take about a third of a --quick run (they took
# half with two layers, two vision blocks and 256 and 512 tokens).
QUICK = dataclasses.replace(TINY, layers=1, vision_depth=1, page_width=8 * PATCH, page_height=12 * PATCH)
SIZES = {"full": (LAYER_SCALE, torch.bfloat16, (32768, 131072)), "quick": (QUICK, torch.float32, (256,))}
ANSWER_TOKENS = 16
CANDIDATES, HEADS = 4, 8
NEW_TOKENS = 16
# Loss and rewards of bf16 models: ours and the peer round differently (fp32 results of bf16 inputs).
TOLERANCE = {torch.bfloat16: 5e-2, torch.float32: 1e-3}


@functools.cache
def _model(sizes: Sizes, dtype: torch.dtype, device: str):
    """One model per size (and a reward head on it), shared by every case and provider."""
    torch.manual_seed(0)
    model = build_model(model_config(sizes), "docqa_fast", dtype, device)
    return model, reward_best_of_n.RewardModel(model, HEADS)


def _text_matmul_parameters(model) -> int:
    text = model.model.language_model
    return sum(p.numel() for p in text.layers.parameters()) + model.lm_head.weight.numel()


def _document(rng: random.Random, tokens: int, sizes: Sizes, answer_tokens: int = ANSWER_TOKENS) -> dict:
    """A sample of about ``tokens`` tokens: pages of random pixels, a question, a random answer."""
    grid = [1, sizes.page_height // PATCH, sizes.page_width // PATCH]
    page_tokens = grid[1] * grid[2] // MERGE**2 + 2
    grids = torch.tensor([grid] * max(1, (tokens - answer_tokens - 16) // page_tokens))
    prompt = prompt_tokens(grids, "what is the value of item 7 on page 3 ?")
    words = len(TOKENIZER.vocabulary)
    answer = [rng.randrange(len(TOKENIZER.ids) - 10, words) for _ in range(answer_tokens - 1)] + [TOKENIZER.eos_id]
    ids = torch.tensor(prompt + answer)
    return {"input_ids": ids, "labels": torch.tensor([-100] * len(prompt) + answer),
            "mm_token_type_ids": (ids == TOKENIZER.image_id).to(torch.int32),
            "pixel_values": torch.randn(int(grids.prod(-1).sum()), PATCH_DIM), "image_grid_thw": grids,
            "answer_length": len(answer)}


@dataclasses.dataclass
class Inputs:
    """One input set: the samples, docqa_fast's packed rows and the plain stack's padded batch."""

    samples: list
    rows: list | None = None
    padded: dict | None = None
    extra: dict = dataclasses.field(default_factory=dict)


def _sft_inputs(params, device, sizes, dtype):
    rng = random.Random(torch.initial_seed())
    budget = params["tokens"]
    lengths = [budget // 4] * 4  # four documents filling one row
    samples = [_document(rng, n, sizes) for n in lengths]
    return (Inputs(samples, pack_samples(samples, budget, device, dtype), padded_batch(samples, device, dtype),
                   {"counted": long_doc_sft.counted_tokens(samples)}),)


def _training_step(loss_and_output):
    """Providers of a training case: ``loss_and_output(model, reward_model, inputs, ours)`` -> (loss,
    what the cross-check compares) with the model's attention set to ``attn``, then the backward."""

    def provider(attn):
        def step(inputs):
            model, reward_model = _model(*inputs.extra["key"])
            model.set_attn_implementation(attn)
            reward_model.zero_grad(set_to_none=True)  # the backbone (the whole model) and the heads
            loss, output = loss_and_output(model, reward_model, inputs, attn == "docqa_fast")
            loss.backward()
            return output.detach().float()

        return step

    return provider


def _sft_loss(model, reward_model, inputs, ours):
    loss = (long_doc_sft.docqa_fast_loss(model, inputs.rows, inputs.extra["counted"]) if ours
            else long_doc_sft.plain_loss(model, inputs.padded))
    return loss, loss


def _longpo_inputs(params, device, sizes, dtype):
    rng = random.Random(torch.initial_seed())
    context = _document(rng, params["tokens"] // 2, sizes)
    long = [context, dict(context, input_ids=context["input_ids"].clone())]
    # The rejected answer: other tokens in the answer's place.
    long[1]["input_ids"][-ANSWER_TOKENS:-1] = long[1]["input_ids"][-ANSWER_TOKENS:-1].flip(0)
    long[1]["labels"] = torch.where(long[0]["labels"] == -100, -100, long[1]["input_ids"])
    short_doc = _document(rng, params["tokens"] // 8, sizes)
    prompt = slice(0, -ANSWER_TOKENS)
    answer = slice(-ANSWER_TOKENS, None)
    short = [dict(short_doc, input_ids=torch.cat([short_doc["input_ids"][prompt], s["input_ids"][answer]]),
                  labels=torch.cat([short_doc["labels"][prompt], s["labels"][answer]])) for s in long]
    return (Inputs(long, extra={"short": short}),)


def _longpo_loss(model, reward_model, inputs, ours):
    short = inputs.extra["short"]  # the policy is its own reference here: the same work as a frozen copy
    if ours:
        budget = max(s["input_ids"].numel() for s in inputs.samples + short)
        loss, _ = longpo_step.longpo_step_loss(model, model, inputs.samples, short, budget, 0.01, 0.01)
    else:
        loss = longpo_step.plain_step_loss(model, model, inputs.samples, short, 0.01, 0.01)
    return loss, loss


def _reward_inputs(params, device, sizes, dtype):
    rng = random.Random(torch.initial_seed())
    context = _document(rng, params["tokens"] // CANDIDATES, sizes)
    samples = []
    for _ in range(CANDIDATES):
        ids = context["input_ids"].clone()
        ids[-ANSWER_TOKENS:-1] = ids[-ANSWER_TOKENS:-1][torch.randperm(ANSWER_TOKENS - 1)]
        samples.append(dict(context, input_ids=ids))
    ranks = torch.stack([torch.randperm(CANDIDATES)])
    return (Inputs(samples, extra={"ranks": ranks}),)


def _reward_loss(model, reward_model, inputs, ours):
    ranks = inputs.extra["ranks"]
    if ours:
        budget = sum(s["input_ids"].numel() for s in inputs.samples)
        rewards = reward_best_of_n.docqa_fast_rewards(reward_model, inputs.samples, budget)
        return reward_best_of_n.ranking_loss(rewards, ranks), rewards
    if "heads" not in inputs.extra:
        inputs.extra["heads"] = reward_model.head.to_linear_heads()
    rewards = reward_best_of_n.plain_rewards(model, inputs.extra["heads"], inputs.samples)
    return reward_best_of_n.plain_ranking_loss(rewards, ranks), rewards


def _serve_inputs(params, device, sizes, dtype):
    sample = _document(random.Random(torch.initial_seed()), params["tokens"] - NEW_TOKENS, sizes, answer_tokens=1)
    ids = sample["input_ids"][None, :-1]  # the prompt
    prompt = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "mm_token_type_ids": sample["mm_token_type_ids"][None, :-1], "pixel_values": sample["pixel_values"],
              "image_grid_thw": sample["image_grid_thw"]}
    return (Inputs([prompt]),)


def _serve(attn):
    @torch.no_grad()
    def step(inputs):
        model, _ = _model(*inputs.extra["key"])
        model.set_attn_implementation(attn)
        sample = inputs.samples[0]
        if attn == "docqa_fast":
            tokens = serve_long_doc.generate(model, sample, max_new_tokens=NEW_TOKENS, chunk=8192, eos_token_id=None)
            return torch.tensor(tokens, dtype=torch.float32)
        dtype, device = model.lm_head.weight.dtype, model.lm_head.weight.device
        batch = {k: v.to(device) for k, v in sample.items()}
        batch["pixel_values"] = batch["pixel_values"].to(dtype)
        model.generation_config.eos_token_id = None
        out = model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=TOKENIZER.pad_id)
        return out[0, sample["input_ids"].shape[1]:].float()

    return step


EXAMPLES = {  # case name: (example module, make inputs, provider step, training?)
    "sft": ("long_doc_sft", _sft_inputs, _training_step(_sft_loss), True),
    "longpo": ("longpo_step", _longpo_inputs, _training_step(_longpo_loss), True),
    "reward": ("reward_best_of_n", _reward_inputs, _training_step(_reward_loss), True),
    "serve": ("serve_long_doc", _serve_inputs, _serve, False),
}


def _with_model_key(make_inputs, sizes, dtype):
    def make(params, device):
        (inputs,) = make_inputs(params, device, sizes, dtype)
        inputs.extra["key"] = (sizes, dtype, str(device))
        return (inputs,)

    return make


@register_family(FAMILY)
def cases(quick: bool) -> list[Case]:
    sizes, dtype, token_counts = SIZES["quick" if quick else "full"]
    scale = "tiny model" if quick else "Qwen2.5-VL-7B dimensions, 1 decoder layer + 1 vision block"
    # N of the work model, from the config (the model is built when a case first runs).
    config = model_config(sizes).text_config
    head_dim = config.hidden_size // config.num_attention_heads
    layer = (config.hidden_size * head_dim * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)
             + 3 * config.hidden_size * config.intermediate_size)
    matmul_parameters = config.num_hidden_layers * layer + config.vocab_size * config.hidden_size
    found = []
    for name, (module, make_inputs, step, training) in EXAMPLES.items():
        providers = (Provider("docqa_fast", fn=step("docqa_fast"), ours=True),
                     Provider("transformers sdpa", fn=step("sdpa")))
        for tokens in token_counts:
            params = {"tokens": tokens, "example": name, "dtype": str(dtype)[6:], "layers": sizes.layers,
                      "hidden": sizes.hidden, "vocab": config.vocab_size}
            found.append(Case(
                family=FAMILY, name=f"{name}-T{tokens}", group=name,
                description=f"examples.{module}: {scale}, {str(dtype)[6:]}; tokens/s = tokens / p50",
                params=params, sweep="tokens", make_inputs=_with_model_key(make_inputs, sizes, dtype),
                providers=providers, reference="transformers sdpa",
                flops=(6 if training else 2) * matmul_parameters * tokens, tolerance=TOLERANCE[dtype]))
    return found
