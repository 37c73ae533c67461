"""examples.serve_long_doc: chunked prefill into a paged cache + greedy decoding with flash_attn_with_kvcache
(rotary in the kernel) generates what transformers' generate does with eager attention."""

import random

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("PIL")

from examples import serve_long_doc as serve  # noqa: E402
from examples._common import TINY, Document, synthetic_documents  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def model(make_tiny_model):
    return make_tiny_model(initializer_range=serve.SERVE_INIT).eval()


# Chunks of 1 token (prefill as decode), an odd size, one chunk for the whole prompt; pages of 16 and
# 32 slots; a one-page document and one of 30 pages.
@pytest.mark.parametrize(("pages", "chunk", "page_size"), [(1, 1, 16), (30, 37, 16), (5, 1000, 32)])
def test_tokens_equal_generate(model, processor, pages, chunk, page_size):
    doc = synthetic_documents(random.Random(pages), 1, TINY, pages=(pages, pages))[0]
    sample = serve.prompt_sample(doc, processor)
    # No stop at the end token: six tokens every time.
    tokens, logits = serve.generate(model, sample, max_new_tokens=6, chunk=chunk, page_size=page_size,
                                    return_logits=True, eos_token_id=None)
    assert len(tokens) == 6 and len(set(tokens)) > 1  # a model that repeats one token would make the check weak
    serve.check_against_generate(model, sample, tokens, logits, 6, eos_token_id=None)


def test_the_check_sees_text_only_positions(model, processor, monkeypatch):
    """Rotating with plain 1-D positions instead of the pages' M-RoPE ones: the check fails."""
    doc = synthetic_documents(random.Random(7), 1, TINY, pages=(4, 4))[0]
    sample = serve.prompt_sample(doc, processor)
    rope_index = serve.get_rope_index

    def text_positions(ids, *args, **kwargs):
        positions, _ = rope_index(ids, *args, **kwargs)
        return torch.arange(ids.shape[1]).expand_as(positions), torch.zeros(1, 1, dtype=torch.long)

    monkeypatch.setattr(serve, "get_rope_index", text_positions)
    tokens, logits = serve.generate(model, sample, max_new_tokens=4, chunk=16, return_logits=True, eos_token_id=None)
    with pytest.raises(AssertionError):
        serve.check_against_generate(model, sample, tokens, logits, 4, eos_token_id=None)


def test_cli_serves_two_documents(capsys):
    assert serve.main(["--tiny", "--steps", "2", "--max-new-tokens", "3", "--no-check"]) == 0
    assert capsys.readouterr().out.count("tokens generated") == 2


def test_bad_requests_are_refused(model, processor):
    with pytest.raises(ValueError, match=r"requests\[0\]\.pages"):
        serve.prompt_sample(Document(pages=[], question="what ?", answer=""), processor, name="requests[0]")
    sample = serve.prompt_sample(synthetic_documents(random.Random(8), 1, TINY, pages=(1, 1))[0], processor)
    for name, options in [("max_new_tokens", dict(max_new_tokens=0, chunk=8)),
                          ("chunk", dict(max_new_tokens=2, chunk=0)),
                          ("max_tokens=20", dict(max_new_tokens=2, chunk=8, max_tokens=20)),
                          ("page size", dict(max_new_tokens=2, chunk=8, page_size=8))]:
        with pytest.raises(ValueError, match=name):
            serve.generate(model, sample, **options)
