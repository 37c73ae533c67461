"""What the examples share: a small Qwen2.5-VL from its transformers config, synthetic documents of
rendered page images, their processor-made samples, padded batches for the plain stack, and the
check of one training step against the plain way.

Nothing is downloaded (the machines these run on have no network):

* the model is transformers' own ``Qwen2_5_VLForConditionalGeneration`` built from a config
  (:func:`model_config`) with random weights -- the real classes, vision tower included;
* pages are PIL images with rendered text, turned into ``pixel_values`` / ``image_grid_thw`` by
  transformers' own Qwen2-VL image processor (constructed from its arguments, no files);
* text goes through :class:`WordTokenizer`, a closed word-level vocabulary over the words the
  generator writes (a Qwen tokenizer needs its vocabulary files). The token layout is the Qwen
  processor's: ``<vision_start> <image_pad> x n <vision_end>`` per page, then the question and
  the answer.
"""

from __future__ import annotations

import argparse
import copy
import random
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from docqa_fast.testing import assert_close_by_rule

IGNORE_INDEX = -100
PATCH, MERGE, TEMPORAL_PATCH = 14, 2, 2
PATCH_DIM = 3 * TEMPORAL_PATCH * PATCH * PATCH


# ------------------------------------------------------------------------------- settings

@dataclass(frozen=True)
class Sizes:
    """Model and data sizes of one run: ``TINY`` (tests, seconds on a CPU) or ``SMALL`` (the default)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    mrope_section: tuple[int, int, int]  # sums to head_dim / 2
    vision_hidden: int
    vision_depth: int
    page_width: int  # pixels; multiples of PATCH * MERGE, so the processor keeps the size
    page_height: int
    pages: tuple[int, int]  # pages per document, inclusive range
    documents: int  # documents per training step
    max_tokens: int  # the packed row's token budget
    # Defaults: 2x the hidden size, two vision heads, the word vocabulary.
    intermediate: int | None = None
    vision_heads: int = 2
    vision_intermediate: int | None = None
    vocab: int | None = None

    @property
    def tokens_per_page(self) -> int:
        return (self.page_width // PATCH) * (self.page_height // PATCH) // MERGE**2


TINY = Sizes(hidden=64, layers=2, heads=4, kv_heads=2, mrope_section=(2, 3, 3), vision_hidden=32, vision_depth=2,
             page_width=56, page_height=84, pages=(1, 6), documents=4, max_tokens=192)
SMALL = Sizes(hidden=128, layers=2, heads=4, kv_heads=2, mrope_section=(4, 6, 6), vision_hidden=64, vision_depth=2,
              page_width=168, page_height=224, pages=(3, 30), documents=4, max_tokens=4096)


# ---------------------------------------------------------------------------- tokenizer

SPECIAL_TOKENS = ("<pad>", "<eos>", "<unk>", "<vision_start>", "<vision_end>", "<image_pad>", "<video_pad>")
WORDS = ("question", "answer", "what", "is", "the", "value", "of", "item", "on", "page", "total", "report",
         "invoice", "table", "section", "amount", "date", "name", "?", ":", ".", ",", "-")
DIGITS = tuple("0123456789")
FIRST_WORD_ID, WORD_COUNT = len(SPECIAL_TOKENS), len(WORDS) + len(DIGITS)
VOCAB_SIZE = 128  # the model's embedding rows: the vocabulary above, padded


class WordTokenizer:
    """A closed word-level vocabulary: the special tokens, the generator's words and the digits.

    Digits are one token each (as Qwen's tokenizer splits numbers), so an answer such as
    ``42.17`` is five tokens. ``encode`` maps an unknown word to ``<unk>``.
    """

    def __init__(self):
        self.vocabulary = list(SPECIAL_TOKENS) + list(WORDS) + list(DIGITS)
        self.ids = {word: i for i, word in enumerate(self.vocabulary)}
        self.pad_id, self.eos_id, self.unk_id = (self.ids[t] for t in ("<pad>", "<eos>", "<unk>"))
        self.vision_start_id, self.vision_end_id = self.ids["<vision_start>"], self.ids["<vision_end>"]
        self.image_id, self.video_id = self.ids["<image_pad>"], self.ids["<video_pad>"]

    def encode(self, text: str) -> list[int]:
        return [self.ids.get(word, self.unk_id) for word in re.findall(r"\d|\w+|[^\w\s]", text.lower())]

    def decode(self, ids: Sequence[int]) -> str:
        """Words, and ``#id`` for an id past the vocabulary (the model's embedding has spare rows)."""
        return " ".join(self.vocabulary[i] if 0 <= i < len(self.vocabulary) else f"#{i}" for i in ids)


TOKENIZER = WordTokenizer()


# -------------------------------------------------------------------------------- model

def model_config(sizes: Sizes = TINY, initializer_range: float = 0.02):
    """A Qwen2.5-VL config at ``sizes`` (the real model's layout: GQA, M-RoPE, windowed ViT with
    full-attention blocks, 2x2 patch merger), with this vocabulary's special token ids.
    ``initializer_range``: the std of the random weights (transformers' default 0.02)."""
    from transformers import Qwen2_5_VLConfig

    vision = dict(depth=sizes.vision_depth, hidden_size=sizes.vision_hidden,
                  intermediate_size=sizes.vision_intermediate or 2 * sizes.vision_hidden,
                  num_heads=sizes.vision_heads, out_hidden_size=sizes.hidden, patch_size=PATCH,
                  spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL_PATCH, window_size=112,
                  fullatt_block_indexes=[sizes.vision_depth - 1], tokens_per_second=2, in_channels=3,
                  initializer_range=initializer_range)
    text = dict(initializer_range=initializer_range, vocab_size=sizes.vocab or VOCAB_SIZE, hidden_size=sizes.hidden,
                intermediate_size=sizes.intermediate or 2 * sizes.hidden, num_hidden_layers=sizes.layers,
                num_attention_heads=sizes.heads, num_key_value_heads=sizes.kv_heads,
                max_position_embeddings=1 << 19, tie_word_embeddings=False, bos_token_id=None,
                eos_token_id=TOKENIZER.eos_id, pad_token_id=TOKENIZER.pad_id,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "mrope_section": list(sizes.mrope_section)})
    return Qwen2_5_VLConfig(vision_config=vision, text_config=text, image_token_id=TOKENIZER.image_id,
                            video_token_id=TOKENIZER.video_id, vision_start_token_id=TOKENIZER.vision_start_id,
                            vision_end_token_id=TOKENIZER.vision_end_id, eos_token_id=TOKENIZER.eos_id,
                            pad_token_id=TOKENIZER.pad_id, tie_word_embeddings=False,
                            initializer_range=initializer_range)


def build_model(config, attn_implementation: str, dtype=torch.float32, device="cpu", state_dict=None,
                model_class=None):
    """transformers' Qwen2.5-VL (or ``model_class``) under ``attn_implementation`` -- for
    ``"docqa_fast"`` the text model and the vision tower both run docqa_fast's kernels
    (:func:`docqa_fast.integrations.transformers.register`) -- with ``state_dict``'s weights if given."""
    from docqa_fast.integrations.transformers import register

    if model_class is None:
        from transformers import Qwen2_5_VLForConditionalGeneration as model_class
    register()
    model = model_class._from_config(copy.deepcopy(config), attn_implementation=attn_implementation, dtype=dtype)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    return model.to(device)


def same_weights(model, attn_implementation: str, dtype):
    """A copy of ``model`` (same weights, cast to ``dtype``) under another attention implementation."""
    state = {name: value.to(dtype) for name, value in model.state_dict().items()}
    return build_model(model.config, attn_implementation, dtype, next(model.parameters()).device, state,
                       model_class=type(model))


# ---------------------------------------------------------------------------- documents

@dataclass
class Document:
    """A document as page images (rendered text), a question about it and its answer."""

    pages: list  # PIL images
    question: str
    answer: str
    answer_page: int = 0
    page_texts: list[str] = field(default_factory=list)


def _value(rng: random.Random) -> str:
    return f"{rng.randint(0, 999)}.{rng.randint(0, 99):02d}"


def render_page(lines: Sequence[str], width: int, height: int):
    """A white page with ``lines`` of black text (PIL's built-in font)."""
    from PIL import Image, ImageDraw

    page = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(page)
    step = max(8, height // max(len(lines), 1))
    for row, line in enumerate(lines):
        draw.text((2, 2 + row * step), line, fill="black")
    return page


def synthetic_documents(rng: random.Random, count: int, sizes: Sizes = TINY, pages=None) -> list[Document]:
    """``count`` documents of ``pages`` (default ``sizes.pages``) rendered pages each: tables of
    items and values; the question asks for one item's value on one page."""
    low, high = pages or sizes.pages
    documents = []
    for _ in range(count):
        n_pages = rng.randint(low, high)
        texts, images, table = [], [], []
        for p in range(n_pages):
            items = [(rng.randint(1, 99), _value(rng)) for _ in range(4)]
            table.append(items)
            lines = [f"page {p + 1}"] + [f"item {item} : {value}" for item, value in items]
            texts.append("\n".join(lines))
            images.append(render_page(lines, sizes.page_width, sizes.page_height))
        page = rng.randrange(n_pages)
        item, value = rng.choice(table[page])
        documents.append(Document(pages=images, question=f"what is the value of item {item} on page {page + 1} ?",
                                  answer=value, answer_page=page, page_texts=texts))
    return documents


def wrong_answer(rng: random.Random, answer: str, digits: int = 1) -> str:
    """``answer`` with ``digits`` of its digits changed (a plausible, wrong answer)."""
    chars = list(answer)
    where = [i for i, c in enumerate(chars) if c.isdigit()]
    for i in rng.sample(where, min(digits, len(where))):
        chars[i] = str((int(chars[i]) + rng.randint(1, 9)) % 10)
    return "".join(chars)


def image_processor(sizes: Sizes = TINY):
    """transformers' Qwen2-VL image processor (the one Qwen2.5-VL uses), built from arguments:
    pages of ``sizes`` keep their size (both sides are multiples of 28 px)."""
    import warnings

    import transformers

    pixels = sizes.page_width * sizes.page_height
    options = dict(size={"shortest_edge": min(pixels, 56 * 56), "longest_edge": pixels}, patch_size=PATCH,
                   temporal_patch_size=TEMPORAL_PATCH, merge_size=MERGE)
    # Without torchvision, transformers >= 5.18 names the PIL one apart (and warns when asked for the other).
    cls = getattr(transformers, "Qwen2VLImageProcessorPil", None) or transformers.Qwen2VLImageProcessor
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(**options)


def encode_pages(pages, processor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixel_values (patches, 1176) fp32, image_grid_thw (pages, 3)) of a document's pages."""
    out = processor(images=list(pages), return_tensors="pt")
    return out["pixel_values"].float(), out["image_grid_thw"].long()


def _check_document(doc, name: str) -> None:
    if not isinstance(doc, Document):
        raise TypeError(f"expected {name} to be a Document, got {type(doc).__name__}")
    if len(doc.pages) == 0:
        raise ValueError(f"expected {name}.pages to hold at least one page image, got none")
    if not TOKENIZER.encode(doc.answer):
        raise ValueError(f"expected {name}.answer to hold at least one token, got {doc.answer!r}")


def prompt_tokens(grids: torch.Tensor, question: str) -> list[int]:
    """The Qwen layout: a vision block per page (its merged-patch count of placeholders), the question."""
    ids = []
    for t, h, w in grids.tolist():
        ids += [TOKENIZER.vision_start_id] + [TOKENIZER.image_id] * (t * h * w // MERGE**2) + [TOKENIZER.vision_end_id]
    return ids + TOKENIZER.encode(f"question : {question} answer :")


def document_sample(doc: Document, processor, answer: str | None = None, pages: Sequence[int] | None = None,
                    name: str = "document") -> dict:
    """What a Qwen2.5-VL processor returns for one document, plus SFT labels: ``input_ids``,
    ``labels`` (IGNORE_INDEX but on the answer and its end token), ``mm_token_type_ids``,
    ``pixel_values``, ``image_grid_thw``; ``answer_length`` (tokens counted by the loss).

    ``answer`` replaces the document's (preference pairs, best-of-n candidates); ``pages`` keeps
    only those pages (the short chunks LongPO's reference reads).
    """
    _check_document(doc, name)
    images = doc.pages if pages is None else [doc.pages[p] for p in pages]
    if not images:
        raise ValueError(f"expected pages to select at least one page of {name}, got {list(pages)!r}")
    pixel_values, grids = encode_pages(images, processor)
    prompt = prompt_tokens(grids, doc.question)
    target = TOKENIZER.encode(doc.answer if answer is None else answer) + [TOKENIZER.eos_id]
    ids = torch.tensor(prompt + target)
    return {"input_ids": ids,
            "labels": torch.tensor([IGNORE_INDEX] * len(prompt) + target),
            "mm_token_type_ids": (ids == TOKENIZER.image_id).to(torch.int32),
            "pixel_values": pixel_values, "image_grid_thw": grids, "answer_length": len(target)}


def check_budget(samples: Sequence[dict], max_tokens: int, what: str = "samples") -> None:
    """Every sample fits one packed row of ``max_tokens``; its answer alone must, or nothing can."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens <= 0:
        raise ValueError(f"expected max_tokens to be a positive int, got {max_tokens!r}")
    for i, sample in enumerate(samples):
        length = sample["input_ids"].numel()
        if sample["answer_length"] > max_tokens:
            raise ValueError(f"{what}[{i}].answer holds {sample['answer_length']} tokens, more than the token "
                             f"budget max_tokens={max_tokens}")
        if length > max_tokens:
            raise ValueError(f"{what}[{i}] holds {length} tokens (pages and question included), more than the "
                             f"token budget max_tokens={max_tokens}: give fewer pages or a larger max_tokens")


def shifted_labels(labels: torch.Tensor) -> torch.Tensor:
    """Labels aligned with the hidden states that predict them (position t predicts t + 1), the
    last position ignored: the shift of transformers' causal-LM loss, keeping the length."""
    return F.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX)


def padded_batch(samples: Sequence[dict], device, dtype) -> dict:
    """The plain stack's batch: one right-padded row per sample, an attention mask, the pages'
    pixels and grids in order, and ``labels`` with IGNORE_INDEX on padding."""
    width = max(s["input_ids"].numel() for s in samples)
    rows = len(samples)
    ids = torch.full((rows, width), TOKENIZER.pad_id, dtype=torch.long)
    labels = torch.full((rows, width), IGNORE_INDEX, dtype=torch.long)
    types = torch.zeros(rows, width, dtype=torch.int32)
    mask = torch.zeros(rows, width, dtype=torch.long)
    for row, s in enumerate(samples):
        n = s["input_ids"].numel()
        ids[row, :n], labels[row, :n], types[row, :n], mask[row, :n] = (s["input_ids"], s["labels"],
                                                                        s["mm_token_type_ids"], 1)
    batch = {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": types, "labels": labels,
             "pixel_values": torch.cat([s["pixel_values"] for s in samples]).to(dtype),
             "image_grid_thw": torch.cat([s["image_grid_thw"] for s in samples])}
    return {k: v.to(device) for k, v in batch.items()}


def plan_rows(samples: Sequence[dict], max_tokens: int, what: str = "samples") -> list[list[int]]:
    """:func:`~docqa_fast.plan_packing`'s bins (sample indices per row) for rows of ``max_tokens``;
    ``what`` names the samples in errors."""
    from docqa_fast.packing import plan_packing

    check_budget(samples, max_tokens, what)
    return plan_packing([s["input_ids"].numel() for s in samples], max_tokens, strategy="bfd")


def pack_samples(samples: Sequence[dict], max_tokens: int, device, dtype, bins=None, what: str = "samples") -> list:
    """docqa_fast's collator: :func:`plan_rows` bins the samples into rows of ``max_tokens`` (or
    ``bins`` given), :func:`~docqa_fast.pack_multimodal` makes each bin one padding-free row
    (per-document M-RoPE positions, boundary-safe labels, cu_seqlens)."""
    from docqa_fast.packing import pack_multimodal

    if bins is None:
        bins = plan_rows(samples, max_tokens, what)
    keys = ("input_ids", "labels", "mm_token_type_ids", "pixel_values", "image_grid_thw")
    rows = []
    for bin_ in bins:
        packed = pack_multimodal([{k: samples[i][k] for k in keys} for i in bin_], max_tokens,
                                 image_token_id=TOKENIZER.image_id, video_token_id=TOKENIZER.video_id,
                                 spatial_merge_size=MERGE, tokens_per_second=2)
        packed.pixel_values = packed.pixel_values.to(dtype)
        rows.append(packed.to(device))
    return rows


def in_sample_order(per_row: Sequence[torch.Tensor], bins) -> torch.Tensor:
    """Per-sequence values computed row by row (each row's documents in bin order) back in the
    samples' order."""
    order = torch.tensor([i for bin_ in bins for i in bin_])
    return torch.cat(list(per_row))[order.argsort().to(per_row[0].device)]


def packed_hidden(model, packed) -> torch.Tensor:
    """The decoder's last hidden states (1, T, H) of one packed row -- the LM head is not applied."""
    inputs = packed.model_inputs()
    inputs.pop("labels")
    return model.model(**inputs).last_hidden_state


# ------------------------------------------------------------------------------- checks

def parameter_grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_step_matches(actual: tuple, exact: tuple, plain: tuple, *, factor: float = 3.0) -> int:
    """(loss, {name: grad}) of docqa_fast against the plain way in fp64 and at the run's precision,
    by the tolerance rule of :func:`docqa_fast.testing.assert_close_by_rule` (2x for the loss, 3x for
    gradients). Returns the number of gradients compared; a gradient missing on either side fails."""
    (loss, grads), (loss64, grads64), (loss_plain, grads_plain) = actual, exact, plain
    assert_close_by_rule(loss.detach().reshape(1), loss64.detach().reshape(1), loss_plain.detach().reshape(1),
                         factor=2.0, name="loss")
    if grads.keys() != grads64.keys():
        raise AssertionError(f"gradients differ in which parameters have one: only docqa_fast "
                             f"{sorted(grads.keys() - grads64.keys())}, "
                             f"only plain {sorted(grads64.keys() - grads.keys())}")
    for name in grads:
        assert_close_by_rule(grads[name], grads64[name], grads_plain[name], factor=factor, name=f"grad {name}")
    return len(grads)


# --------------------------------------------------------------------------- the CLI

def parse_args(description: str, argv=None, extra=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--tiny", action="store_true", help="the tiny model and documents (seconds on a CPU)")
    parser.add_argument("--steps", type=int, default=1, help="training steps (or generations) to run (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="default: bfloat16 on a GPU, float32 on a CPU")
    parser.add_argument("--no-check", action="store_true", help="skip the comparison with the plain stack")
    if extra is not None:
        extra(parser)
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    args.sizes = TINY if args.tiny else SMALL
    args.dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device.startswith("cuda")
                                                                else torch.float32)
    return args


class Timer:
    """Wall time of a block, the device synchronised at both ends."""

    def __init__(self, device):
        self.device = torch.device(device)

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds = time.perf_counter() - self.start
