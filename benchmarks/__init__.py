"""Benchmark suite of docqa_fast: every op beside its peers, on the workloads README.md's Benchmarks table names.

Run it two ways (from the repository root):

* ``python -m benchmarks [--quick] [--filter SUBSTR] [--out DIR] [--no-hopper-report]``
  prints a table per case and writes ``results.json``, ``summary.md`` and PNG plots to
  ``benchmarks/results/local/<device-slug>/`` (``cpu``, ``nvidia-h100-80gb-hbm3``, ...;
  ignored by git), or to ``--out DIR``: committed runs live in ``benchmarks/results/<device-slug>/``.
* ``pytest benchmarks/ --benchmark-json=out.json``: the same cases at quick sizes
  through pytest-benchmark (``pytest tests/`` never collects them).

Adding a kernel family ``foo``:

1. Write ``benchmarks/foo.py`` with a function decorated ``@register_family("foo")``
   that takes ``quick: bool`` and returns a list of :class:`benchmarks.harness.Case`:
   a name, a group (cases differing only in the swept size), the parameters, a maker of
   random inputs ``make_inputs(params, device)`` (never all zeros), the providers
   (``ours_per_backend(docqa_fast.foo)`` then peers such as ``eager_provider(foo_ref)``
   and ``compiled_provider(foo_ref)``; the reference provider is named ``"eager"``
   unless the case says otherwise), and a work model: ``bytes_moved`` (reported as GB/s
   against the copy bandwidth) or ``flops`` (TFLOP/s against the bf16 matmul rate).
2. Nothing else: every module of this package other than the harness itself is a family
   (:data:`FAMILIES` lists them).

``benchmarks/merge_attention.py`` is the worked example.
"""

import pkgutil

# Family modules in this package, in the order they run: all but the harness's own modules.
_HARNESS_MODULES = {"harness", "report", "__main__"}
FAMILIES = tuple(sorted(m.name for m in pkgutil.iter_modules(__path__)
                        if m.name not in _HARNESS_MODULES and not m.name.startswith("test_")))
