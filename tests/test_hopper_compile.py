"""Every registered Triton kernel config compiles for Hopper (sm_90) cleanly, with no GPU.

Kernels join this check by registering their configs in docqa_fast.kernels.registry;
nothing here names a kernel. The resources of each config are written to
``hopper_report.json`` in pytest's temporary directory and printed with ``-s``. Configs whose
kernel sources are unchanged come from hopper_check's cache (``DOCQA_FAST_CACHE_DIR``); the
compiling of the others is reported on the terminal as it goes.
"""

import dataclasses
import json
import re
import subprocess
import tempfile

import pytest
import triton
import triton.language as tl

from docqa_fast.kernels import KERNEL_MODULES
from docqa_fast.kernels.registry import KernelConfig, registered_configs
from docqa_fast.tools import hopper_check


@pytest.fixture(scope="module")
def reports(pytestconfig):
    capture = pytestconfig.pluginmanager.getplugin("capturemanager")

    def progress(message):
        # A cold run compiles for minutes: say so past pytest's capture, as `capsys.disabled()` does.
        with capture.global_and_fixture_disabled():
            print("\n" + message, end="", flush=True)

    return hopper_check.check_all(progress=progress)


def test_every_kernel_module_registers_configs():
    configs = registered_configs()
    modules = {config.fn.fn.__module__ if hasattr(config.fn, "fn") else config.fn.__module__ for config in configs}
    for module in KERNEL_MODULES:  # a module, or a package whose submodules hold the kernels
        assert any(m == f"docqa_fast.kernels.{module}" or m.startswith(f"docqa_fast.kernels.{module}.")
                   for m in modules), f"kernels/{module} registers no config"


@pytest.mark.slow
def test_every_config_compiles_clean_for_hopper(reports, tmp_path_factory):
    assert len(reports) == len(registered_configs())
    path = tmp_path_factory.mktemp("hopper") / "hopper_report.json"
    path.write_text(json.dumps([r.as_dict() for r in reports], indent=1))
    print("\n" + hopper_check.format_table(reports))
    bad = [f"{r.name}: {'; '.join(r.problems)}" for r in reports if not r.ok]
    assert not bad, "Hopper compile problems:\n" + "\n".join(bad)
    for report in reports:
        assert report.registers > 0


@triton.jit
def _elementwise_kernel(x_ptr, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    tl.store(x_ptr + offsets, tl.load(x_ptr + offsets) * 2)


@triton.jit
def _matmul_kernel(a_ptr, b_ptr, c_ptr, BLOCK: tl.constexpr):
    rows = tl.arange(0, BLOCK)
    a = tl.load(a_ptr + rows[:, None] * BLOCK + rows[None, :])
    b = tl.load(b_ptr + rows[:, None] * BLOCK + rows[None, :])
    tl.store(c_ptr + rows[:, None] * BLOCK + rows[None, :], tl.dot(a, b))


@triton.jit
def _descriptor_copy_kernel(desc, out_ptr, BLOCK: tl.constexpr):
    rows = tl.arange(0, BLOCK)
    tl.store(out_ptr + rows[:, None] * BLOCK + rows[None, :], desc.load([0, 0]))


def _test_configs() -> dict[str, KernelConfig]:
    configs = [
        KernelConfig("elementwise claiming tensor cores", _elementwise_kernel, {"x_ptr": "*fp16", "BLOCK": "constexpr"},
                     {"BLOCK": 1024}, uses_tensor_cores=True),
        KernelConfig("matmul", _matmul_kernel, {"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp32", "BLOCK": "constexpr"},
                     {"BLOCK": 64}, uses_tensor_cores=True),
        KernelConfig("descriptor copy", _descriptor_copy_kernel,
                     {"desc": "tensordesc<fp16[64, 64]>", "out_ptr": "*fp16", "BLOCK": "constexpr"}, {"BLOCK": 64},
                     uses_tma=True),
        KernelConfig("elementwise claiming TMA", _elementwise_kernel, {"x_ptr": "*fp16", "BLOCK": "constexpr"},
                     {"BLOCK": 1024}, uses_tma=True),
        KernelConfig(  # a 128 x 128 fp32 accumulator on one warp: 512 values a thread
            "spilling matmul", _matmul_kernel, {"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp32", "BLOCK": "constexpr"},
            {"BLOCK": 128}, num_warps=1, num_stages=1, uses_tensor_cores=True),
        KernelConfig("too much shared memory", _matmul_kernel,
                     {"a_ptr": "*fp32", "b_ptr": "*fp32", "c_ptr": "*fp32", "BLOCK": "constexpr"}, {"BLOCK": 256},
                     num_warps=8, uses_tensor_cores=True),
    ]
    return {config.name: config for config in configs}


def _sass_counts(cubin: bytes) -> tuple[int, int, int]:
    """HGMMA, HMMA, UTMALDG in cuobjdump's disassembly of one whole cubin: the oracle for the batched count."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        sass = subprocess.run([hopper_check.cuobjdump_path(), "-sass", file.name],
                              capture_output=True, text=True, check=True).stdout
    return tuple(len(re.findall(rf"\b{op}\b", sass)) for op in ("HGMMA", "HMMA", "UTMALDG"))


def _compile_test_kernels():
    """Runs in a spawned worker: every test kernel's report, and the matmul, elementwise and
    descriptor-copy kernels counted in one batch beside cuobjdump's count of each."""
    configs = _test_configs()
    reports = {name: hopper_check.compile_config(config) for name, config in configs.items()}
    cubins = [hopper_check.compile_for_hopper(configs[name]).asm["cubin"]
              for name in ("matmul", "elementwise claiming TMA", "descriptor copy", "matmul")]
    batched = hopper_check.count_instructions([b"".join(hopper_check.text_sections(c)) for c in cubins])
    return reports, [(c["hgmma_count"], c["hmma_count"], c["tma_count"]) for c in batched], \
        [_sass_counts(c) for c in cubins]


@pytest.fixture(scope="module")
def own_kernels():
    # Under the interpreter these functions are not compilable, and they are not registered for
    # check_all's workers: compile them all in one spawned worker (one start-up for every test).
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                             initializer=hopper_check._compile_natively) as pool:
        return pool.submit(_compile_test_kernels).result()


def test_check_flags_missing_tensor_cores(own_kernels):
    report = own_kernels[0]["elementwise claiming tensor cores"]
    assert not report.ok and "no tensor-core instruction" in report.problems[0]


def test_check_sees_hgmma_in_a_matmul(own_kernels):
    report = own_kernels[0]["matmul"]
    assert report.ok, report.problems
    assert report.hgmma_count > 0


def test_check_flags_shared_memory_overflow(own_kernels):
    report = own_kernels[0]["too much shared memory"]
    assert not report.ok
    assert any("shared memory" in p for p in report.problems), report.problems


def test_check_reports_spills_without_failing(own_kernels):
    """Tiles are chosen by GPU measurement: a spilling config is a figure in the report, not a problem."""
    report = own_kernels[0]["spilling matmul"]
    assert report.stack_bytes + report.local_bytes > 0, "the test kernel should spill"
    assert report.ok, report.problems
    assert "1 of 1 configs spill" in hopper_check.spill_summary([report])


def test_check_sees_tma_loads_and_flags_their_absence(own_kernels):
    report = own_kernels[0]["descriptor copy"]
    assert report.ok and report.tma_count > 0, report.problems
    report = own_kernels[0]["elementwise claiming TMA"]
    assert not report.ok and "no TMA instruction" in report.problems[0]


def test_batched_disassembly_counts_each_kernel_as_cuobjdump_does(own_kernels):
    """Several kernels disassembled as one binary: each instruction is counted for its own kernel."""
    _, batched, one_by_one = own_kernels
    assert batched == one_by_one
    assert batched[0][0] > 0 and batched[2][2] > 0 and batched[1] == (0, 0, 0), batched
    with pytest.raises(ValueError, match="not a 64-bit little-endian ELF"):
        hopper_check.text_sections(b"PTX, not a cubin")


def _cheap_config():
    # An elementwise kernel (no matrix multiply, no TMA) compiles in a fraction of a second.
    return next(c for c in registered_configs() if not c.uses_tensor_cores and not c.uses_tma)


def test_cache_reuses_figures_and_judges_problems_afresh(tmp_path, monkeypatch):
    monkeypatch.setenv(hopper_check.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(hopper_check, "RECORD", tmp_path / "no_record.json")  # the cache alone
    config = _cheap_config()
    messages = []
    (first,) = hopper_check.check_all([config.name], progress=messages.append)
    assert not first.cached and first.ok, first.problems
    assert "compiling 1 of 1 configs" in messages[0] and "1/1 compiled" in messages[-1], messages
    entries = list((tmp_path / "hopper_check").glob("*.json"))
    assert len(entries) == 1, entries

    messages.clear()
    (second,) = hopper_check.check_all([config.name], progress=messages.append)
    assert second.cached and dataclasses.replace(second, cached=False) == first
    assert messages == [], "nothing to compile, nothing to say"

    # An entry holds figures, not verdicts: a cached figure over the limit is judged a problem.
    figures = json.loads(entries[0].read_text())
    entries[0].write_text(json.dumps({**figures, "shared_bytes": hopper_check.HOPPER_MAX_SHARED_BYTES + 1}))
    (third,) = hopper_check.check_all([config.name], progress=None)
    assert third.cached and not third.ok and "shared memory" in third.problems[0]

    # A damaged entry is not trusted: the config is compiled again and the entry rewritten.
    entries[0].write_text("{\"registers\": ")
    (fourth,) = hopper_check.check_all([config.name], progress=None)
    assert not fourth.cached and fourth == first
    assert json.loads(entries[0].read_text()) == figures


def test_cache_key_covers_the_kernel_sources_the_config_and_triton(monkeypatch):
    config = next(c for c in registered_configs() if c.constexprs and c.divisible_by_16)
    key = hopper_check.cache_key(config)
    assert key == hopper_check.cache_key(config)
    name, value = next(iter(config.constexprs.items()))
    for change in ({"num_warps": config.num_warps * 2}, {"num_stages": config.num_stages + 1},
                   {"divisible_by_16": ()}, {"constexprs": {**config.constexprs, name: f"{value}x"}}):
        assert hopper_check.cache_key(dataclasses.replace(config, **change)) != key, change
    # A config's name is not part of what it compiles to: a renamed config keeps its entry.
    assert hopper_check.cache_key(dataclasses.replace(config, name="renamed")) == key
    for path in hopper_check.kernel_source_files(config):
        assert hopper_check.cache_key(config, {path: "an edited file"}) != key, path
    monkeypatch.setattr(triton, "__version__", triton.__version__ + ".other")
    assert hopper_check.cache_key(config) != key


def test_cache_follows_the_jit_helpers_a_kernel_imports():
    """Kernels call jit helpers kept in other files (exact_math.py, attention/common.py): an edit
    there must recompile them, so those files are among the keyed sources."""
    files = set()
    for config in registered_configs():
        own = [path.as_posix() for path in hopper_check.kernel_source_files(config)]
        module = getattr(config.fn, "fn", config.fn).__module__.removeprefix("docqa_fast.").replace(".", "/")
        assert any(path.endswith(f"/{module}.py") for path in own), (config.name, own)
        files.update(own)
    for helper in ("/kernels/exact_math.py", "/kernels/attention/common.py"):
        assert any(path.endswith(helper) for path in files), (helper, sorted(files))


def test_cache_location_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(hopper_check.CACHE_ENV, str(tmp_path))
    assert hopper_check.cache_dir() == tmp_path / "hopper_check"
    monkeypatch.setenv(hopper_check.CACHE_ENV, "off")
    assert hopper_check.cache_dir() is None
    monkeypatch.delenv(hopper_check.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hopper_check.cache_dir() == tmp_path / "xdg" / "docqa_fast" / "hopper_check"


def test_command_line_filters_configs_by_name(capsys):
    assert hopper_check.main(["--filter", "attention_backward_delta[bf16,D=80,grad_lse=False]"]) == 0
    table = capsys.readouterr().out
    assert "attention_backward_delta[bf16,D=80,grad_lse=False]" in table and "grad_lse=True" not in table
    with pytest.raises(SystemExit):
        hopper_check.main(["--filter", "no config has this name"])


def test_a_fresh_clone_takes_the_recorded_figures_and_compiles_only_what_changed(tmp_path, monkeypatch):
    monkeypatch.setenv(hopper_check.CACHE_ENV, str(tmp_path / "empty_cache"))
    monkeypatch.setattr(hopper_check, "RECORD", tmp_path / "record.json")
    config = _cheap_config()
    figures = {"registers": 40, "stack_bytes": 0, "local_bytes": 0, "shared_bytes": 0, "hgmma_count": 0,
               "hmma_count": 0, "tma_count": 0}
    report = hopper_check.make_report(config, figures)
    hopper_check.write_record([report], {config.name: hopper_check.cache_key(config)})
    messages = []
    (found,) = hopper_check.check_all([config.name], progress=messages.append)
    assert found.cached and found.registers == 40 and messages == []
    # Not under another key (an edited kernel, another Triton): compiled, the record ignored.
    hopper_check.write_record([report], {config.name: "0" * 64})
    (compiled,) = hopper_check.check_all([config.name], progress=messages.append)
    assert not compiled.cached and "compiling 1 of 1" in messages[0]
    # Nor when asked to compile everything, nor when the record is damaged.
    hopper_check.write_record([report], {config.name: hopper_check.cache_key(config)})
    (again,) = hopper_check.check_all([config.name], cache=False, progress=None)
    assert not again.cached
    (tmp_path / "record.json").write_text('{"figures": {"' + hopper_check.cache_key(config) + '": {"registers": 4')
    assert hopper_check.recorded_figures() == {}


@pytest.mark.slow
def test_the_committed_record_matches_a_fresh_compile():
    """The record saves a fresh clone's compile only if it says what the compiler says: recompile a
    sample of it (spread over the kernels) and compare every figure."""
    record = hopper_check.recorded_figures()
    sources: dict = {}
    held = sorted((key, c) for c in registered_configs() if (key := hopper_check.cache_key(c, sources)) in record)
    assert held, f"no config's figures are in {hopper_check.RECORD.name}: run python -m docqa_fast.tools.hopper_check --record"
    sample = held[:: max(1, len(held) // 6)][:6]
    reports = {r.name: r for r in hopper_check.check_all([c.name for _, c in sample], cache=False, progress=None)}
    for key, config in sample:
        assert {k: getattr(reports[config.name], k) for k in hopper_check._FIGURES} == record[key], config.name
