"""Shared test setup: which backends run here, on which device and dtypes.

Tests that take a ``backend`` argument (and optionally ``dtype``) are run once per backend
this machine can execute -- on a GPU machine on CUDA tensors (bf16 included), elsewhere on
CPU tensors: the Triton kernels under the interpreter (fp16/fp32: the interpreter
miscomputes bf16) and the extension's C++ twins of the CUDA kernels. Backends that cannot
run here appear as skipped, with the reason docqa_fast.backends() gives.
"""

import atexit
import functools
import inspect
import os
import shutil
import tempfile
import zlib

# A fresh compile cache per run: AOTAutograd's cache keys on the forward graph, not on a
# custom op's Python backward, so a cache left by an older checkout can replay a stale backward.
# Removed when the run ends (each pytest-xdist worker has its own); one set by the caller is kept.
# A run killed before its atexit (timeout's SIGTERM, SIGKILL) leaves its folder: the name carries
# the run's process id, and the next run removes the folders of processes that are gone.
def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # another user's process: alive
        pass
    return False


if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    for _stale in os.scandir(tempfile.gettempdir()):
        _pid = _stale.name.removeprefix("docqa_fast_inductor_").split("_")[0]
        if _stale.name.startswith("docqa_fast_inductor_") and _pid.isdigit() and _process_gone(int(_pid)):
            shutil.rmtree(_stale.path, ignore_errors=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix=f"docqa_fast_inductor_{os.getpid()}_")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)

# Under pytest-xdist (make test / make check: a worker per core) each worker gets its share of
# the cores: torch's and BLAS's default pools (a thread per core in every worker) oversubscribe
# the machine, and their spin-waiting threads take CPU from the other workers' tests.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_THREADS = max(1, (os.cpu_count() or 1) // _WORKERS)
if _WORKERS > 1:
    for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_variable, str(_THREADS))

import pytest  # noqa: E402
import torch  # noqa: E402

if _WORKERS > 1:
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    # Must happen before any Triton kernel module is imported: Triton decides then.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _patch_the_language_once_per_launch():
    """Triton's interpreter (3.6 and 3.8) patches triton.language for a kernel launch and restores it
    when the launch ends; but every call of a @triton.jit helper inside the kernel, in every program,
    patches it again (~200 attributes found by inspect.getmembers) and never restores that. While
    the launch's patch is in place the helper's finds nothing left to replace and only sets the
    same wrappers again: half of the interpreted kernels' time. Skip it then; what runs is the same."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    original, scope_type = getattr(interpreter, "_patch_lang", None), getattr(interpreter, "_LangPatchScope", None)
    language = getattr(interpreter, "tl", None)
    if original is None or scope_type is None or language is None:
        return
    languages = (language, language.core)
    in_launch = []  # the modules patched in the launch in progress (at most one launch runs at a time)
    modules_of = {}  # function -> the language modules its globals hold (what the interpreter patches)

    def patch_lang(fn):
        modules = modules_of.get(fn)
        if modules is None:
            modules = modules_of[fn] = frozenset(
                id(value) for value in fn.__globals__.values() if any(value is m for m in languages))
        if in_launch and modules <= in_launch[-1]:
            return scope_type()  # a helper inside the launch: its modules are patched already
        scope = original(fn)
        if in_launch:  # a helper reaching another module (tl.core from tl.standard): never restored
            in_launch[-1] |= modules
        else:  # a launch: the interpreter restores its scope when the grid is done
            in_launch.append(modules)
            restore = scope.restore

            def restore_and_end_launch():
                in_launch.pop()
                restore()

            scope.restore = restore_and_end_launch
        return scope

    interpreter._patch_lang = patch_lang


# DOCQA_FAST_PLAIN_INTERPRETER=1 runs Triton's interpreter as it ships.
if os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("DOCQA_FAST_PLAIN_INTERPRETER") != "1":
    _patch_the_language_once_per_launch()

import docqa_fast  # noqa: E402

DEVICE = torch.device("cuda" if ON_GPU else "cpu")
ALL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# Left out by `make check` (pytest --quick), run by `make test` and CI: tests of more than ~3 s
# each on a 2-core CPU machine. A file may say @pytest.mark.slow itself; these are marked here by
# node-id prefix, for files whose family marks nothing: the Triton interpreter on real vocabulary
# sizes and long reductions, sm_90 compiles in spawned processes.
SLOW_TESTS = (
    "tests/losses/test_fp32_kernels_compile_exact.py::",
    "tests/losses/test_linear_logprobs.py::test_vocabulary_sizes[triton-float16-32000]",
    "tests/losses/test_linear_logprobs.py::test_vocabulary_sizes[triton-float32-32000]",
    "tests/losses/test_linear_logprobs.py::test_vocabulary_sizes[triton-float16-50257]",
    "tests/losses/test_linear_logprobs.py::test_vocabulary_sizes[triton-float16-152064]",
    "tests/losses/test_linear_logprobs.py::test_odd_token_counts[triton-float32-113-1000]",
    "tests/losses/test_linear_logprobs.py::test_backward_in_several_vocabulary_chunks[triton-float32]",
    "tests/attention/test_attention.py::test_varlen_matches_reference[triton-33]",
    "tests/attention/test_attention.py::test_tma_and_pointer_loads_give_the_same_result[",
    "tests/reward/test_reward.py::test_fp32_long_sequence_reduction_of_weight_gradient_is_compensated",
    "tests/merge_attention/test_merge_attention.py::test_stacked_matches_reference[triton-float32-(203, 4, 128)-16]",
    "tests/merge_attention/test_merge_attention.py::test_stacked_matches_reference[triton-float16-(203, 4, 128)-16]",
    # Measured under load (2026-12-01, a 1-in-8 sample of the quick subset): the costliest quick
    # tests that check tools and cross-family sweeps rather than a family's own paths.
    "tests/test_hopper_compile.py::test_check_",  # a spawned sm_90 compile of the test kernels (module fixture)
    "tests/test_hopper_compile.py::test_batched_disassembly",
    "tests/bad_input/test_bad_input.py::test_bad_input_is_refused_clearly[",  # a spawned worker per family
    "tests/test_tune_tool.py::test_every_tunable_builds_and_runs[",  # every tunable under the interpreter
    "tests/attention/test_tuned_tiles.py::test_vit_head_dim_80_with_tuned_tiles[triton]",
    "tests/losses/test_fused_paths.py::test_library_products_in_many_chunks[triton-float16-vocabulary outside]",
    # The whole quick subset on a quieter moment (2026-12-01, -n 2): 221 s, 307 s of CPU; these
    # 3-11 s each check tools, a second variant of a path the subset runs, or the run itself.
    "tests/bad_input/test_bad_input.py::test_the_harness_attributes_a_crash_and_a_hang_to_their_case",
    "tests/attention/test_flash_attn_surface.py::test_dropout_is_reproducible_and_deterministic[triton]",
    "tests/attention/test_flash_attn_surface.py::test_alibi_varlen_with_empty_sequences[triton-False]",
    "tests/test_hopper_compile.py::test_cache_reuses_figures_and_judges_problems_afresh",
    "tests/test_hopper_compile.py::test_command_line_filters_configs_by_name",
    "tests/test_install.py::test_a_test_run_leaves_no_temporary_folder",
    "tests/attention/test_backward_variants.py::test_longest_first_across_heads_changes_no_bit[packed]",
    "tests/attention/test_tuned_tiles.py::test_llm_head_dim_128_with_tuned_tiles[triton-203-113-False]",
    "tests/attention/test_tuned_tiles.py::test_llm_head_dim_128_with_tuned_tiles[triton-113-203-True]",
    "tests/inference/test_paged_varlen.py::test_matches_reference[triton-[1, 113, 0, 5]-[1, 113, 40, 70]-28-4-64-16-full-",
    # Per-test times of the whole quick subset (528 s of worker time, 78% the interpreter): sweeps
    # whose main cases the subset keeps (decode and num_splits against the reference, the
    # integrations through the reference backend and Qwen2.5-VL through Triton), a fresh process
    # per family for the tuned tables' import order.
    "tests/inference/test_kvcache.py::test_fused_append_every_split[triton",
    "tests/inference/test_decode_splits.py::test_split_sweep[triton",
    "tests/integrations/test_transformers.py::test_qwen_vl_several_images_match_eager[triton",
    "tests/integrations/test_transformers.py::test_llama_padded_batch[triton",
    "tests/attention/test_backward_variants.py::test_longest_first_across_heads_changes_no_bit",
    "tests/test_tuning.py::test_every_committed_entry_survives_any_import_order[",
    # The quick subset again at load 10 (2026-12-01 01:50, -n 2: 672 s wall, 370 s of CPU): a second
    # or third case of a path whose other cases the subset keeps (kept: lengths 1, 17, 113 and 203,
    # GQA 7/1 and 28/4, head dims 1/40/59/80/160/256, windows on both sides, empty sequences, 16
    # merged states, every backend), processes spawned only to read kernel flags, and the tuning
    # tool's and the benchmark plots' own checks. With these out and the interpreter's repatching
    # skipped (above): 1,529 tests in 82 s wall, 157 s of CPU (03:19, -n 2, load below 1.7).
    "tests/attention/test_attention.py::test_dense_matches_reference[triton-113-113-128-8-1-True-",
    "tests/attention/test_attention.py::test_band_stages_match_reference[triton-300-300-False-(-1, -1)]",
    "tests/attention/test_attention.py::test_band_stages_match_reference[triton-300-300-False-(200, -1)]",
    "tests/attention/test_attention.py::test_band_stages_match_reference[triton-300-300-True-(150, -1)]",
    "tests/attention/test_attention.py::test_band_stages_match_reference[triton-150-300-True-(-1, -1)]",
    "tests/attention/test_attention.py::test_lengths_are_never_compiled_as_constants",  # a spawned process
    "tests/reward/test_reward.py::test_one_head_compiles_for_the_gpu",  # a spawned process
    "tests/attention/test_flash_attn_surface.py::test_any_head_dim_forward_and_backward[triton-8]",
    "tests/attention/test_flash_attn_surface.py::test_any_head_dim_forward_and_backward[triton-111]",
    "tests/attention/test_flash_attn_surface.py::test_any_head_dim_forward_and_backward[triton-224]",
    "tests/attention/test_flash_attn_surface.py::test_any_head_dim_varlen_and_kvcache[triton-111]",
    "tests/attention/test_flash_attn_surface.py::test_any_head_dim_varlen_and_kvcache[triton-256]",
    "tests/attention/test_flash_attn_surface.py::test_alibi_dense[triton-False-True]",
    "tests/attention/test_flash_attn_surface.py::test_alibi_dense[triton-True-False]",
    "tests/attention/test_flash_attn_surface.py::test_alibi_kvcache[triton-False]",
    "tests/attention/test_flash_attn_surface.py::test_dropout_forward_and_backward_match_the_reference[triton-True-False]",
    "tests/attention/test_backward_variants.py::test_one_pass_packed_with_empty_sequences[fp32-",
    "tests/inference/test_kvcache.py::test_chunked_prefill_matches_reference[triton-128-64-True]",
    "tests/inference/test_kvcache.py::test_chunked_prefill_matches_reference[reference-128-64-True]",
    "tests/inference/test_kvcache.py::test_decode_matches_reference[triton-2-7-1-64-64-[4097, 5]-",
    "tests/inference/test_kvcache.py::test_every_num_splits_matches_one_split[triton-None-1-{}]",
    "tests/inference/test_kvcache.py::test_every_num_splits_matches_one_split[triton-16-1-{}]",
    "tests/inference/test_kvcache.py::test_rotary[triton-True-3-halves]",
    "tests/inference/test_kvcache.py::test_rotary[triton-False-1-interleaved]",
    "tests/inference/test_kvcache.py::test_rotary[triton-False-3-interleaved]",
    "tests/inference/test_kvcache.py::test_rotary[triton-False-3-halves]",
    "tests/inference/test_kvcache.py::test_rotary_head_dim_256_prefill[triton-halves]",
    "tests/inference/test_kvcache.py::test_cache_batch_idx_and_leftpad[triton-splits1]",
    "tests/inference/test_decode_splits.py::test_gqa_28_4_tiny_contexts[triton-contiguous]",
    "tests/inference/test_decode_splits.py::test_gqa_28_4_tiny_contexts[triton-page256]",
    "tests/merge_attention/test_merge_attention.py::test_stacked_matches_reference[triton-float16-(2, 113, 3, 80)-16]",
    "tests/merge_attention/test_merge_attention.py::test_stacked_matches_reference[triton-float16-(203, 4, 128)-3]",
    "tests/bad_input/test_agreement.py::test_varlen_attention_agrees[triton-1]",
    "tests/bad_input/test_agreement.py::test_varlen_attention_agrees[triton-2]",
    "tests/bad_input/test_agreement.py::test_kvcache_attention_agrees[triton-1]",
    "tests/bad_input/test_agreement.py::test_kvcache_attention_agrees[triton-2]",
    "tests/integrations/test_transformers.py::test_generate_with_a_static_cache_matches_eager[triton-False]",
    "tests/examples/test_longpo_step.py::test_step_matches_the_plain_loss[0.01-0.01]",
    "tests/test_tune_tool.py::test_command_line_writes_a_table_the_launchers_can_read",
    "tests/test_tune_tool.py::test_the_attention_forward_case_measured_end_to_end",
    "tests/test_attention_benchmarks.py::test_the_sequence_length_overview_is_drawn_only_with_data",
    "tests/test_benchmark_harness.py::test_blockwise_flex_mask_attends_within_documents",
    "tests/attention/test_attention.py::test_dense_matches_reference[triton-33-33-256-2-2-False-",
    "tests/attention/test_attention.py::test_sliding_windows[triton-(8, -1)-False]",
    "tests/attention/test_backward_variants.py::test_one_pass_packed_with_empty_sequences[fp16-causal]",
    "tests/inference/test_paged_varlen.py::test_matches_reference[triton-[64, 1]-[300, 1]-7-1-128-256-full-",
    "tests/integrations/test_transformers.py::test_vision_attention_is_one_varlen_call_per_layer[triton-",
    "tests/reward/test_reward.py::test_dense_gradient_of_many_short_packed_sequences[triton-False]",
    "tests/losses/test_linear_logprobs.py::test_backward_in_row_groups[triton-float16-True]",
    "tests/losses/test_fused_paths.py::test_skip_filter_switched_off[triton-ignored]",
    "tests/examples/test_longpo_step.py::test_the_check_sees_the_dpo_term",
    "tests/attention/test_backward_variants.py::test_one_pass_dense_matches_reference[203-203-80-1-1-False-",
    "tests/attention/test_backward_variants.py::test_one_pass_with_every_option[causal_window]",
    "tests/attention/test_backward_variants.py::test_one_pass_with_every_option[window]",
    "tests/attention/test_backward_variants.py::test_one_pass_with_every_option[softcap_alibi]",
    "tests/inference/test_paged_varlen.py::test_matches_reference[reference-[1, 113, 0, 5]-[1, 113, 40, 70]-28-4-64-16-full-",
    # Through Triton the subset keeps Qwen2.5-VL (text, vision, left padding) and generate(); the
    # reference backend runs the other models' plumbing.
    "tests/integrations/test_transformers.py::test_qwen2_padded_batch[triton]",
    "tests/integrations/test_transformers.py::test_llama_sliding_window_matches_eager[triton]",
    "tests/integrations/test_transformers.py::test_llama_packed_documents_match_separate_forwards[triton]",
    "tests/integrations/test_transformers.py::test_qwen_vl_several_images_match_eager[reference-qwen2_vl]",
    # The reference on real vocabulary sizes: bf16 at Qwen's 152,064 and fp32 in chunks stay.
    "tests/losses/test_linear_logprobs.py::test_vocabulary_sizes[reference-float16-152064]",
    "tests/losses/test_linear_logprobs.py::test_vocabulary_sizes[reference-float32-152064]",
    "tests/losses/test_linear_logprobs.py::test_vocabulary_sizes[reference-float16-50257]",
    "tests/losses/test_linear_logprobs.py::test_vocabulary_sizes[reference-float16-32000]",
    "tests/losses/test_linear_logprobs.py::test_backward_in_several_vocabulary_chunks[reference-float16]",
    "tests/losses/test_linear_logprobs.py::test_backward_in_several_vocabulary_chunks[reference-bfloat16]",
)


@functools.lru_cache(maxsize=None)
def _calls_torch_compile(function) -> bool:
    # Once per test function, not per parametrized case: reading the source of all ~1,800 items
    # took 1-2 s of every worker's collection.
    try:
        return "torch.compile(" in inspect.getsource(function)
    except (OSError, TypeError):
        return False


def _compiles_with_torch_compile(item) -> bool:
    """torch.compile's start-up (TorchInductor, ~10 s) is paid by the first test that compiles in
    each process: leaving every such test out of `make check` saves it entirely."""
    function = getattr(item, "function", None)
    return function is not None and _calls_torch_compile(function)


def pytest_addoption(parser):
    parser.addoption("--quick", action="store_true", default=False,
                     help="the quick subset (make check): leave out the tests marked slow and, on CPU, the "
                          "Triton interpreter's fp32 runs (make test and CI run everything)")


def _left_out_when_quick(item) -> bool:
    if item.get_closest_marker("slow"):
        return True
    params = getattr(getattr(item, "callspec", None), "params", {})
    # Interpreted fp32 costs as much as fp16 and runs the same kernels' logic; its own paths
    # (exact fp32 math) are what make test adds.
    return not ON_GPU and params.get("backend") == "triton" and params.get("dtype") == torch.float32


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.nodeid.startswith(SLOW_TESTS) or _compiles_with_torch_compile(item):
            item.add_marker(pytest.mark.slow)
    if config.getoption("quick"):
        left_out = [item for item in items if _left_out_when_quick(item)]
        if left_out:
            config.hook.pytest_deselected(items=left_out)
            items[:] = [item for item in items if not _left_out_when_quick(item)]


def pytest_unconfigure(config):
    # The last line of the run, so that a passing `make check` is not mistaken for the whole suite passing.
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None and config.getoption("quick") and not hasattr(config, "workerinput"):
        reporter.write_line("That was the quick subset (pytest --quick, make check): the tests marked slow and, "
                            "on CPU, the Triton interpreter's fp32 runs were left out; make test (CI) runs them all.")


def dtypes_for(backend: str) -> tuple[torch.dtype, ...]:
    if backend == "triton" and not ON_GPU:
        return (torch.float16, torch.float32)
    return ALL_DTYPES


def _backend_param(backend: str, status):
    marks = () if status.available else pytest.mark.skip(reason=f"{backend} backend {status}")
    return backend, marks


def pytest_generate_tests(metafunc):
    if "backend" not in metafunc.fixturenames:
        return
    statuses = docqa_fast.backends()
    # A family whose op lacks a backend says so: pytestmark = pytest.mark.backends("reference", "triton").
    marker = metafunc.definition.get_closest_marker("backends")
    implemented = marker.args if marker else docqa_fast.BACKENDS
    params = []
    for backend in implemented:
        name, marks = _backend_param(backend, statuses[backend])
        if "dtype" in metafunc.fixturenames:
            params += [pytest.param(name, dtype, marks=marks, id=f"{name}-{str(dtype)[6:]}")
                       for dtype in dtypes_for(name)]
        else:
            params.append(pytest.param(name, marks=marks, id=name))
    argnames = ("backend", "dtype") if "dtype" in metafunc.fixturenames else "backend"
    metafunc.parametrize(argnames, params)


@pytest.fixture(autouse=True)
def _force_backend(request, monkeypatch):
    """A test parametrized by ``backend`` runs every op call through exactly that backend."""
    callspec = getattr(request.node, "callspec", None)
    backend = callspec.params.get("backend") if callspec else None
    if backend is not None:
        monkeypatch.setenv("DOCQA_FAST_BACKEND", backend)
    else:
        monkeypatch.delenv("DOCQA_FAST_BACKEND", raising=False)


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed(request):
    # Different random inputs in every test, the same ones on every run of that test.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
