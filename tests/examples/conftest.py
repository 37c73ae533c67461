"""The examples (examples/) import as a package of the repository root, not of the installed
distribution: a plain ``pytest tests`` would not find them otherwise. The tiny model and its image
processor, which every example test builds, are made here."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


@pytest.fixture(autouse=True)
def _one_thread():
    # The tiny model's matrices are a few kilobytes: a thread pool costs more than it saves, and
    # on a shared 2-core machine its spin-waiting threads made a step 20x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def processor():
    from examples._common import TINY, image_processor

    return image_processor(TINY)


def _tiny_model(dtype=torch.float32, device="cpu", **config):
    from examples._common import TINY, build_model, model_config

    torch.manual_seed(0)
    return build_model(model_config(TINY, **config), "docqa_fast", dtype, device)


@pytest.fixture(scope="session")
def make_tiny_model():
    """``make_tiny_model(dtype=, device=, **model_config options)``: the examples' tiny Qwen2.5-VL on
    docqa_fast, its weights drawn from seed 0 -- the same ones every time (docs/examples.md's
    walk-through seeds the same, and its test relies on it)."""
    return _tiny_model


@pytest.fixture(scope="module")
def tiny_model(make_tiny_model):
    """The default tiny model, one per test module: a module's checks leave gradients on it."""
    return make_tiny_model()


@pytest.fixture
def train_two_steps(capsys):
    """``train_two_steps(example, *options)``: the example's command line (tiny, two steps, no check,
    ``options``) through its ``train``; asserts two finite losses and returns what it printed."""
    def run(example, *options):
        args = example.parse_args(example.__name__, ["--tiny", "--steps", "2", "--no-check", *options],
                                  extra=getattr(example, "_options", None))
        losses = example.train(args)
        assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses))), losses
        return capsys.readouterr().out

    return run
