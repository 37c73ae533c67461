"""docqa_fast.testing's helpers (assert_close_by_rule is exercised by every family's tests).

capture_cuda_graph: its argument checks and, with torch.cuda's streams and graphs replaced by
recording fakes, the order it runs things in (so the CPU suite checks the logic every GPU capture
test relies on); the real capture and replay on a GPU. tuned_tables: the setting it makes and the
reloads around it. long_sum_terms: the drift it promises. assert_close_by_rule: its rounding floor
(with and without the reduced terms' magnitude) passes rounding and catches an error a few ulps
past it. no_host_sync: its mode set and restored (torch.cuda's calls recorded). OpLog: what it logs."""

import contextlib
import os

import pytest
import torch

from docqa_fast.kernels import tuning
from docqa_fast.testing import (OpLog, allowed_error, assert_close_by_rule, capture_cuda_graph, long_sum_terms,
                                no_host_sync, tuned_tables)


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


EPS32 = torch.finfo(torch.float32).eps


@pytest.mark.parametrize("magnitude", [None, 8.0, torch.tensor([8.0, float("-inf"), float("nan")])],
                         ids=["result", "number", "tensor"])
def test_the_floor_passes_rounding_and_catches_a_few_ulps_past_it(magnitude):
    """An fp32 result whose plain computation rounds exactly: the floor is all a kernel may add, 4 ulp
    at the larger of the result's magnitude (here 0.5 -> 1) and the reduced terms' (8, finite only)."""
    exact = torch.tensor([0.5, -0.25, 0.125], dtype=torch.float64)
    plain = exact.float()
    scale = 1.0 if magnitude is None else 8.0
    floor = 4 * EPS32 * scale
    assert allowed_error(exact, plain, torch.float32, magnitude=magnitude) == pytest.approx(floor, rel=1e-12)
    within = (exact + torch.tensor([0.9 * floor, 0, 0], dtype=torch.float64)).float()
    assert_close_by_rule(within, exact, plain, magnitude=magnitude)
    # A real error 3 ulp (at the floor's scale) past the floor fails, whichever element holds it.
    past = (exact + torch.tensor([0, 0, -(floor + 3 * EPS32 * scale)], dtype=torch.float64)).float()
    with pytest.raises(AssertionError, match="lse: max error"):
        assert_close_by_rule(past, exact, plain, magnitude=magnitude, name="lse")


def test_the_floor_follows_the_terms_of_a_cancelling_sum():
    """fp32 dot products that cancel to ~0.01 from products of ~4: the kernel's rounding is at the terms'
    scale, which the result's magnitude alone does not allow; the terms' magnitude does, and no more."""
    x = torch.tensor([4.0, -4.0 + 2 ** -6, 1e-3], dtype=torch.float64)
    exact = x.sum(0, keepdim=True)
    rounded_at_terms = exact + 6 * EPS32 * 4  # 6 ulp of the terms: what two fp32 adds may lose there
    with pytest.raises(AssertionError):
        assert_close_by_rule(rounded_at_terms.float(), exact, exact.float())
    terms = x.abs().sum()
    assert_close_by_rule(rounded_at_terms.float(), exact, exact.float(), magnitude=terms)
    with pytest.raises(AssertionError):
        assert_close_by_rule((exact + 4 * EPS32 * terms + 3 * EPS32 * terms).float(), exact, exact.float(),
                             magnitude=terms)


def test_no_host_sync_sets_the_mode_and_restores_the_one_before(monkeypatch):
    modes = [1]  # the mode before: "warn", say
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: modes[-1])
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    with no_host_sync():
        assert modes[-1] == "error"
    assert modes == [1, "error", 1]
    with pytest.raises(KeyError), no_host_sync("warn"):
        raise KeyError("a failing block")
    assert modes == [1, "error", 1, "warn", 1]
    with pytest.raises(ValueError, match="mode 'error' or 'warn'"), no_host_sync("default"):
        pass
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="needs a CUDA device"), no_host_sync():
        pass
    assert modes == [1, "error", 1, "warn", 1]


def test_op_log_logs_outermost_ops_by_name_and_keeps_what_it_is_told():
    x = torch.arange(6.0)
    with OpLog() as log:
        (x * 2).sum().item()
    assert log.ops == ["aten.mul.Tensor", "aten.sum.default", "aten._local_scalar_dense.default"]
    with OpLog(keep=lambda name, args: name.startswith("aten._local_scalar_dense")) as reads:
        (x > 2).nonzero()
        int(x.sum())
    assert reads.ops == ["aten._local_scalar_dense.default"]
