"""docqa_fast.testing's helpers (assert_close_by_rule is exercised by every family's tests).

capture_cuda_graph: its argument checks and, with torch.cuda's streams and graphs replaced by
recording fakes, the order it runs things in (so the CPU suite checks the logic every GPU capture
test relies on); the real capture and replay on a GPU. tuned_tables: the setting it makes and the
reloads around it. long_sum_terms: the drift it promises."""

import contextlib
import os

import pytest
import torch

from docqa_fast.kernels import tuning
from docqa_fast.testing import capture_cuda_graph, long_sum_terms, tuned_tables


class _FakeCuda:
    """torch.cuda's stream and graph API, recording what happens on which stream."""

    def __init__(self, monkeypatch):
        self.log = []
        self.current = self._stream("current")
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "Stream", lambda: self._stream("side"))
        monkeypatch.setattr(torch.cuda, "current_stream", lambda: self.current)
        monkeypatch.setattr(torch.cuda, "stream", self._use)
        monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: self._graph())
        monkeypatch.setattr(torch.cuda, "graph", self._capture)
        self.capturing = None

    def _stream(self, name):
        fake = self

        class Stream:
            def wait_stream(self, other):
                fake.log.append(("wait", name, other.name))

        stream = Stream()
        stream.name = name
        return stream

    def _graph(self):
        fake = self

        class Graph:
            def replay(self):
                fake.log.append(("replay", self))

        return Graph()

    @contextlib.contextmanager
    def _use(self, stream):
        saved, self.current = self.current, stream
        try:
            yield
        finally:
            self.current = saved

    @contextlib.contextmanager
    def _capture(self, graph, stream=None):
        assert stream is not None, "the capture must run on the warm-up's stream"
        self.capturing = graph
        with self._use(stream):
            self.log.append(("capture begins", stream.name))
            yield
            self.log.append(("capture ends", stream.name))
        self.capturing = None

    def call(self):
        """A function to capture: records its calls, returns a new object each time."""
        output = object()
        self.log.append(("call", self.current.name, self.capturing is not None, output))
        return output


@pytest.mark.parametrize("warmup", [1, 3])
def test_warms_up_on_the_capture_stream_then_captures_once_and_replays(monkeypatch, warmup):
    fake = _FakeCuda(monkeypatch)
    fn = fake.call
    captured = capture_cuda_graph(fn, warmup=warmup)
    side = fake.log[0][1]
    assert side != "current"
    calls = [entry for entry in fake.log if entry[0] == "call"]
    assert len(calls) == warmup + 1
    assert [entry[:3] for entry in fake.log] == (
        [("wait", side, "current")]  # the side stream starts after the work queued so far
        + [("call", side, False)] * warmup  # warm-up calls on it, outside any capture
        + [("wait", "current", side)]  # the caller's stream waits for them
        + [("capture begins", side), ("call", side, True), ("capture ends", side)])
    assert captured.outputs is calls[-1][3]  # the captured call's outputs, not a warm-up's
    assert captured.fn is fn  # kept: it holds the input buffers the graph reads

    before = len(fake.log)
    for _ in range(2):
        assert captured.replay() is captured.outputs
    assert fake.log[before:] == [("replay", captured.graph)] * 2  # a replay never calls fn again


@pytest.mark.parametrize(("fn", "warmup", "error", "message"), [
    ("not callable", 1, TypeError, "expected fn to be callable, got str"),
    (lambda: None, 0, ValueError, "expected warmup >= 1"),
    (lambda: None, -2, ValueError, "expected warmup >= 1"),
    (lambda: None, True, TypeError, "expected warmup to be an int, got bool"),
    (lambda: None, 1.0, TypeError, "expected warmup to be an int, got float"),
])
def test_bad_arguments_are_refused_before_any_cuda_call(monkeypatch, fn, warmup, error, message):
    fake = _FakeCuda(monkeypatch)
    with pytest.raises(error, match=message):
        capture_cuda_graph(fn, warmup=warmup)
    assert fake.log == []


def test_no_cuda_device_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        capture_cuda_graph(lambda: None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_real_capture_replays_on_new_values():
    x = torch.randn(1000, device="cuda")
    captured = capture_cuda_graph(lambda: x * 2 + 1, warmup=2)
    for _ in range(2):
        x.normal_()
        out = captured.replay()
        torch.testing.assert_close(out, x * 2 + 1, rtol=0, atol=0)


def test_tuned_tables_sets_the_setting_and_forgets_what_was_loaded_on_entry_and_exit(monkeypatch):
    reloads = []  # the setting each reload saw
    monkeypatch.setattr(tuning, "reload", lambda: reloads.append(os.environ.get(tuning.TABLE_ENV)))
    monkeypatch.setenv(tuning.TABLE_ENV, "sm90")
    with pytest.MonkeyPatch.context() as patch:
        with tuned_tables(patch):
            assert os.environ[tuning.TABLE_ENV] == "off" and reloads == ["off"]
        assert reloads == ["off", "off"]
        with tuned_tables(patch, None):
            assert tuning.TABLE_ENV not in os.environ
        with pytest.raises(KeyError), tuned_tables(patch, "sm80"):
            raise KeyError("a failing test")
        assert reloads == ["off", "off", None, None, "sm80", "sm80"]  # a failing test's exit reloads too
    assert os.environ[tuning.TABLE_ENV] == "sm90"  # the setting before, once the test's monkeypatch undoes


def test_long_sum_terms_are_lost_block_by_block_and_kept_by_a_pairwise_sum():
    n = 8192
    terms = long_sum_terms(n, "cpu")
    assert terms.dtype == torch.float32 and terms[0] == 1
    exact = 1 + (n - 1) * terms[1].double()
    running = torch.tensor(1.0)
    for block in terms[1:].split(32):  # fp32 blocks of 32 added in sequence, as a K loop does
        running = running + block.sum()
    assert running == 1  # every block's 0.4 ulp rounded away
    ulp = torch.finfo(torch.float32).eps
    assert abs(exact - 1) > 90 * ulp  # ~100 ulp lost: what the tests using these terms detect
    assert abs(terms.sum().double() - exact) < 10 * ulp  # torch's (pairwise, vectorised) sum keeps most
