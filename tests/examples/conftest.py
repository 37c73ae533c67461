"""The examples (examples/) import as a package of the repository root, not of the installed
distribution: a plain ``pytest tests`` would not find them otherwise."""

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
