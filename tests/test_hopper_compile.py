"""Every registered Triton kernel config compiles for Hopper (sm_90) cleanly, with no GPU.

Kernels join this check by registering their configs in docqa_fast.kernels.registry;
nothing here names a kernel. The resources of each config are written to
``hopper_report.json`` in pytest's temporary directory and printed with ``-s``.
"""

import json

import pytest
import triton
import triton.language as tl

from docqa_fast.kernels import KERNEL_MODULES
from docqa_fast.kernels.registry import KernelConfig, registered_configs
from docqa_fast.tools import hopper_check


@pytest.fixture(scope="module")
def reports():
    return hopper_check.check_all()


def test_every_kernel_module_registers_configs():
    configs = registered_configs()
    modules = {config.fn.fn.__module__ if hasattr(config.fn, "fn") else config.fn.__module__ for config in configs}
    for module in KERNEL_MODULES:  # a module, or a package whose submodules hold the kernels
        assert any(m == f"docqa_fast.kernels.{module}" or m.startswith(f"docqa_fast.kernels.{module}.")
                   for m in modules), f"kernels/{module} registers no config"


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


def _compile_natively(config):
    # Under the interpreter these functions are not compilable; check_all's workers would be,
    # but these test kernels are not registered, so compile in a spawned worker directly.
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                             initializer=hopper_check._compile_natively) as pool:
        return pool.submit(_compile_test_kernel, config.name).result()


def _compile_test_kernel(name):
    kernels = {
        "elementwise claiming tensor cores": KernelConfig(
            name, _elementwise_kernel, {"x_ptr": "*fp16", "BLOCK": "constexpr"}, {"BLOCK": 1024},
            uses_tensor_cores=True),
        "matmul": KernelConfig(
            name, _matmul_kernel, {"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp32", "BLOCK": "constexpr"},
            {"BLOCK": 64}, uses_tensor_cores=True),
        "descriptor copy": KernelConfig(
            name, _descriptor_copy_kernel, {"desc": "tensordesc<fp16[64, 64]>", "out_ptr": "*fp16",
                                            "BLOCK": "constexpr"}, {"BLOCK": 64}, uses_tma=True),
        "elementwise claiming TMA": KernelConfig(
            name, _elementwise_kernel, {"x_ptr": "*fp16", "BLOCK": "constexpr"}, {"BLOCK": 1024}, uses_tma=True),
        "spilling matmul": KernelConfig(  # a 128 x 128 fp32 accumulator on one warp: 512 values a thread
            name, _matmul_kernel, {"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp32", "BLOCK": "constexpr"},
            {"BLOCK": 128}, num_warps=1, num_stages=1, uses_tensor_cores=True),
        "too much shared memory": KernelConfig(
            name, _matmul_kernel, {"a_ptr": "*fp32", "b_ptr": "*fp32", "c_ptr": "*fp32", "BLOCK": "constexpr"},
            {"BLOCK": 256}, num_warps=8, uses_tensor_cores=True),
    }
    return hopper_check.compile_config(kernels[name])


def test_check_flags_missing_tensor_cores():
    report = _compile_natively(KernelConfig("elementwise claiming tensor cores", None, {}))
    assert not report.ok and "no tensor-core instruction" in report.problems[0]


def test_check_sees_hgmma_in_a_matmul():
    report = _compile_natively(KernelConfig("matmul", None, {}))
    assert report.ok, report.problems
    assert report.hgmma_count > 0


def test_check_flags_shared_memory_overflow():
    report = _compile_natively(KernelConfig("too much shared memory", None, {}))
    assert not report.ok
    assert any("shared memory" in p for p in report.problems), report.problems


def test_check_reports_spills_without_failing():
    """Tiles are chosen by GPU measurement: a spilling config is a figure in the report, not a problem."""
    report = _compile_natively(KernelConfig("spilling matmul", None, {}))
    assert report.stack_bytes + report.local_bytes > 0, "the test kernel should spill"
    assert report.ok, report.problems
    assert "1 of 1 configs spill" in hopper_check.spill_summary([report])


def test_check_sees_tma_loads_and_flags_their_absence():
    report = _compile_natively(KernelConfig("descriptor copy", None, {}))
    assert report.ok and report.tma_count > 0, report.problems
    report = _compile_natively(KernelConfig("elementwise claiming TMA", None, {}))
    assert not report.ok and "no TMA instruction" in report.problems[0]


def test_command_line_filters_configs_by_name(capsys):
    assert hopper_check.main(["--filter", "attention_backward_delta[bf16,D=80,grad_lse=False]"]) == 0
    table = capsys.readouterr().out
    assert "attention_backward_delta[bf16,D=80,grad_lse=False]" in table and "grad_lse=True" not in table
    with pytest.raises(SystemExit):
        hopper_check.main(["--filter", "no config has this name"])
