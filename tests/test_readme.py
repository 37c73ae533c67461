"""Every example the README and docs/ mark as runnable, run as printed, so none can rot.

An example is a ```python block right after an HTML comment ``<!-- test: NAME -->`` in
README.md or docs/*.md (invisible when rendered). It runs in a fresh namespace on CPU tensors,
through the default dispatch. ``<!-- test: NAME backends=reference,triton -->`` runs it once
per listed backend instead (forced through DOCQA_FAST_BACKEND, with the test device as
PyTorch's default device, so that a GPU machine's Triton backend gets CUDA tensors).
"""

import re
from pathlib import Path

import pytest
import torch

import docqa_fast

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKED_BLOCK = re.compile(r"<!-- test: (?P<name>[\w-]+)(?: backends=(?P<backends>[\w,]+))? -->\n"
                          r"```python\n(?P<code>.*?)^```", re.S | re.M)


def marked_examples():
    examples = []
    for path in DOCUMENTS:
        for match in MARKED_BLOCK.finditer(path.read_text()):
            backends = match["backends"].split(",") if match["backends"] else [None]
            examples += [(path.relative_to(ROOT).as_posix(), match["name"], backend, match["code"])
                         for backend in backends]
    return examples


EXAMPLES = marked_examples()


def _longpo_step_reached_every_parameter(namespace):
    # The step reached every parameter through the fused loss (the head included).
    moved = [not torch.equal(p, r) for p, r in zip(namespace["policy"].parameters(),
                                                    namespace["reference"].parameters())]
    assert all(moved) and torch.isfinite(namespace["loss"])


def _packed_rows_give_back_every_document(namespace):
    batch = namespace["batch"]
    assert [x.shape[1] for x in namespace["per_doc_logits"]] == batch.doc_lengths
    assert torch.isfinite(namespace["out"].loss)


# What an example's own asserts do not show, checked on the names it leaves behind.
AFTERWARDS = {"losses-longpo-step": _longpo_step_reached_every_parameter,
              "packing": _packed_rows_give_back_every_document}


def _uses_transformers(code):
    # examples/ (the end-to-end examples) builds transformers models too.
    return re.search(r"^\s*(from|import) (transformers|examples)\b", code, re.M) is not None


def _param(document, name, backend, code):
    # Not called ``backend``: conftest would parametrize that over every backend of the machine.
    marks = []
    if backend is not None:
        status = docqa_fast.backends()[backend]
        if not status.available:
            marks.append(pytest.mark.skip(reason=f"{backend} backend {status}"))
    # make check leaves to the families' own tests what builds a model, and the docs' longer
    # examples under the Triton interpreter (the README's run there too).
    if _uses_transformers(code) or (backend == "triton" and document != "README.md"):
        marks.append(pytest.mark.slow)
    return pytest.param(document, name, backend, code, marks=marks,
                        id=f"{document}:{name}" + (f"[{backend}]" if backend else ""))


def test_every_marked_block_is_found():
    # A marker whose block does not follow it directly would be skipped silently.
    for path in DOCUMENTS:
        text = path.read_text()
        assert text.count("<!-- test: ") == len(MARKED_BLOCK.findall(text)), path
    names = [(document, name) for document, name, backend, _ in EXAMPLES if backend in (None, "reference")]
    assert len(names) == len(set(names)), "two examples of one document share a name"
    readme = {name for document, name, _, _ in EXAMPLES if document == "README.md"}
    # One per family on the front page.
    assert {"attention", "inference", "merge-attention", "losses", "reward", "packing"} <= readme


@pytest.mark.parametrize(("document", "name", "forced_backend", "code"), [_param(*e) for e in EXAMPLES])
def test_example_runs_as_printed(document, name, forced_backend, code, monkeypatch, device):
    if _uses_transformers(code):
        pytest.importorskip("transformers")
    namespace = {"__name__": f"example_{name.replace('-', '_')}"}
    source = compile(code, f"{document}:{name}", "exec")
    if forced_backend is None:
        monkeypatch.delenv("DOCQA_FAST_BACKEND", raising=False)
        exec(source, namespace)
    else:
        monkeypatch.setenv("DOCQA_FAST_BACKEND", forced_backend)
        with torch.device(device):  # the example's factory calls and modules land on the test device
            exec(source, namespace)
    if name in AFTERWARDS:
        AFTERWARDS[name](namespace)
