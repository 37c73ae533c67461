# docqa_fast: everything a fresh clone needs, from one command.
#   make test    set up the virtualenv, build the extension, run the whole test suite
#   make check   the same set-up, then the quick tests (all but those marked slow): between edits
#   make bench   set up the same, run the benchmark suite on whatever device is here
#   make gpu     on a GPU machine: build for its architecture, tuning sweep, headline benchmarks,
#                tests, logs and tables in GPU_OUT (at most 8 files), under 10 minutes (docs/gpu_run.md)
# Variables: PYTHON (the interpreter that makes the venv), VENV, TORCH_SPEC (pip's arguments for
# PyTorch, installed only when the venv cannot import torch yet; split into words, so it can name
# an index: TORCH_SPEC="torch==2.14.1 --index-url https://download.pytorch.org/whl/cpu"; quote a
# specifier with < or > inside it: TORCH_SPEC="'torch>=2.11,<2.15'"), MAX_JOBS (compile jobs and test processes),
# TEST_JOBS, DOCQA_FAST_CUDA_ARCHS, DOCQA_FAST_NO_EXTENSION=1, PYTEST_ARGS (e.g. "-k merge -x"),
# BENCH_ARGS (e.g. "--quick --filter merge"), GPU_OUT.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.14.1
# Distribution names (pip's): pytest-xdist runs the suite in TEST_JOBS processes.
DEPS := pytest pytest-benchmark pytest-xdist ninja numpy matplotlib pillow tqdm transformers setuptools wheel
MAX_JOBS ?= $(shell nproc 2>/dev/null || echo 2)
export MAX_JOBS
TEST_JOBS ?= $(MAX_JOBS)
# tests/ times nothing: pytest-benchmark (for `pytest benchmarks/`) is left out rather than have
# every xdist worker warn that it disabled itself. The suite uses neither hypothesis nor anyio:
# their plugins (loaded whenever the packages are installed) cost ~1.7 s of CPU in every process.
PYTEST := DOCQA_FAST_REQUIRE_EXTENSION=$(if $(DOCQA_FAST_NO_EXTENSION),,1) $(PY) -m pytest tests -q -rs \
	-p no:benchmark -p no:hypothesispytest -p no:anyio $(if $(filter-out 0 1,$(TEST_JOBS)),-n $(TEST_JOBS)) \
	$(PYTEST_ARGS)

SETUP_STAMP := $(VENV)/.docqa_fast-deps
BUILD_STAMP := $(VENV)/.docqa_fast-built
SOURCES := setup.py pyproject.toml $(shell find csrc kernels docqa_fast -name '*.cpp' -o -name '*.cu' -o -name '*.h' 2>/dev/null)

GPU_OUT ?= gpu-run

.PHONY: test check bench gpu install hopper-report clean

# The venv sees the system's packages, so a machine that already has PyTorch (a GPU box
# with its own CUDA build, no network) reuses it; pip skips what is already satisfied.
$(SETUP_STAMP): Makefile
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	@# Only what is missing: a machine with everything already (the GPU box, which has no
	@# network) must not need pip to reach an index.
	missing="$$($(PY) -c 'import importlib.metadata as m, sys; print(" ".join(d for d in sys.argv[1:] if next(m.distributions(name=d), None) is None))' $(DEPS))"; \
	if [ -n "$$missing" ]; then $(PY) -m pip install -q $$missing; fi
	touch $@

# Editable install: builds docqa_fast._C in place (C++ always, CUDA when nvcc is found).
$(BUILD_STAMP): $(SETUP_STAMP) $(SOURCES)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	$(PY) -c "import docqa_fast; [print(f'  {k:9s} {v}') for k, v in docqa_fast.backends().items()]"
	touch $@

install: $(BUILD_STAMP)

test: install
	$(PYTEST) --durations=15

# Between edits (pytest --quick): everything but the tests marked slow (the sm_90 compile of
# every config, torch.compile, the interpreter on real vocabulary sizes) and the Triton
# interpreter's fp32 runs; make test and CI run them all. About 2.5 minutes on 2 quiet cores
# after the set-up (2026-12-01: 1,732 tests, 147 s wall, 237 s of CPU); its last line says so.
check: install
	$(PYTEST) --quick

bench: install
	$(PY) -m benchmarks $(BENCH_ARGS)

# setup.py builds the extension for this machine's GPU only (sm_90a on an H100 / H200): the
# two-architecture default of a GPU-less build takes twice as long, and GPU minutes are few.
gpu: install
	$(PY) -m docqa_fast.tools.gpu_run --out $(GPU_OUT)

hopper-report: install
	$(PY) -m docqa_fast.tools.hopper_check

clean:
	rm -rf build *.egg-info docqa_fast/_C*.so docqa_fast/_build_info.json $(BUILD_STAMP)
