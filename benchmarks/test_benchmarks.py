"""pytest-benchmark entry: one test per (case, provider) of every registered case, at quick sizes.

    pytest benchmarks/ -q --benchmark-json=out.json

Providers that cannot run here are skipped with the reason. pytest-benchmark times with
``time.perf_counter``, so on a GPU each timed call ends with a synchronize; the CLI
(``python -m benchmarks``) is the precise path there (``do_bench`` with L2 flushes).
The repository's pytest configuration collects ``tests/`` only, so a plain ``pytest`` or
``pytest tests/`` never runs these.
"""

import itertools

import pytest

from . import harness

DEVICE = harness.default_device()
ROUNDS = 10

PARAMS = [pytest.param(case, provider, id=f"{case.id}-{provider.name}")
          for case in harness.collect_cases(quick=True) for provider in case.providers]


@pytest.mark.parametrize(("case", "provider"), PARAMS)
def test_benchmark(benchmark, case, provider):
    reason = provider.unavailable(DEVICE)
    if reason is not None:
        pytest.skip(reason)
    benchmark.group = case.id
    benchmark.extra_info.update(case=case.id, provider=provider.name, ours=provider.ours, params=case.params,
                                device=str(DEVICE), metric=case.metric, bytes_moved=case.bytes_moved,
                                flops=case.flops)
    input_sets = harness.make_input_sets(case, DEVICE)
    with harness.environment(provider.env):
        try:
            fn = harness.prepare(provider, input_sets[0], DEVICE)[0]  # compiles and warms up, untimed
        except harness.Unavailable as exc:
            pytest.skip(str(exc))
        rotation = itertools.cycle(input_sets)

        def call(*inputs):
            fn(*inputs)
            harness.synchronize(DEVICE)

        # setup hands each round the next input set, so no round reuses warm caches.
        benchmark.pedantic(call, setup=lambda: (next(rotation), {}), rounds=ROUNDS, warmup_rounds=1)
    stats = getattr(benchmark.stats, "stats", None)  # None under --benchmark-disable
    if stats is not None:
        benchmark.extra_info["rate_at_median"] = case.rate(stats.median * 1e3)
