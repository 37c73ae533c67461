"""fp32 configs of the fused-loss and reward kernels compile for Hopper (sm_90) into exact math.

The CPU tests run these kernels under the Triton interpreter, which multiplies with numpy
and exponentiates with numpy's exp: what the GPU compiles can only be seen in the compiled
code. For every registered fp32 config of kernels/losses.py (the chunk kernels too: they exponentiate
and divide) and kernels/reward.py (the reward kernels reuse the fused loss' fp32 helpers),
compiled for sm_90 with no GPU:

- no tensor-core instruction (HGMMA/HMMA): fp32 multiplies with IEEE FMAs, never TF32;
- every ``tt.dot`` starts from a zero accumulator: the compensated K-block sums survived
  Triton's rewrite of ``acc + dot(a, b)`` into one FMA chain over the whole reduction;
- no ``ex2.approx.f32`` applied to x log2(e) (``tl.exp``): the kernels that exponentiate use
  libdevice's expf, recognisable by its reduced-argument ``ex2.approx.ftz.f32``;
- no ``div.full.f32`` (Triton's approximate ``/``): divisions are correctly rounded.
"""

import multiprocessing
import re
from concurrent.futures import ProcessPoolExecutor

import pytest

from docqa_fast.kernels.registry import registered_configs
from docqa_fast.tools import hopper_check

FP32_CONFIG = re.compile(r"(logit_stats|logits_grad|scaled_matmul|chunk_stats|chunk_grad|reward_forward|"
                         r"reward_backward)\[fp32")
EXPONENTIATING = ("logit_stats", "logits_grad", "chunk_stats", "chunk_grad")
# The chunk kernels read logits a library matmul wrote: they multiply nothing themselves.
MULTIPLYING = ("logit_stats", "logits_grad", "scaled_matmul", "reward_forward", "reward_backward")


def _compile(name):
    """(Hopper report, PTX, TTGIR) of one registered config; runs in a worker that compiles natively."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    config = next(c for c in registered_configs() if c.name == name)
    report = hopper_check.compile_config(config)
    # The same compilation as compile_config's (a cache hit), for the code it does not return.
    names = list(config.signature)
    attrs = {(names.index(arg),): [["tt.divisibility", 16]] for arg in config.divisible_by_16}
    compiled = triton.compile(ASTSource(config.fn, config.signature, constexprs=config.constexprs, attrs=attrs),
                              target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": config.num_warps, "num_stages": config.num_stages})
    return report, compiled.asm["ptx"], compiled.asm["ttgir"]


@pytest.fixture(scope="module")
def compiled():
    names = [c.name for c in registered_configs() if FP32_CONFIG.match(c.name)]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(min(len(names), multiprocessing.cpu_count()), mp_context=context,
                             initializer=hopper_check._compile_natively) as pool:
        return dict(zip(names, pool.map(_compile, names)))


def _accumulating_dots(ttgir: str) -> list[str]:
    """The ``tt.dot`` lines whose accumulator is not a zero constant."""
    zeros = set(re.findall(r"(%[\w#]+) = arith\.constant dense<0\.0+e\+00> : tensor<[^>]*xf32", ttgir))
    return [line.strip() for line in ttgir.splitlines()
            if (m := re.search(r"tt\.dot %[\w#]+, %[\w#]+, (%[\w#]+)", line)) and m.group(1) not in zeros]


def test_every_fp32_kernel_is_checked(compiled):
    kernels = {name.split("[")[0] for name in compiled}
    assert kernels == {"logit_stats", "logits_grad", "scaled_matmul", "chunk_stats", "chunk_grad", "reward_forward",
                       "reward_backward"}


def test_fp32_multiplies_without_tensor_cores(compiled):
    for name, (report, _, _) in compiled.items():
        assert report.ok, (name, report.problems)
        assert report.hgmma_count + report.hmma_count == 0, f"{name} uses tensor cores (TF32)"


def test_fp32_dots_start_from_zero(compiled):
    for name, (_, _, ttgir) in compiled.items():
        assert ("tt.dot" in ttgir) == name.startswith(MULTIPLYING), name
        assert not _accumulating_dots(ttgir), f"{name}: a dot accumulates in one chain: {_accumulating_dots(ttgir)}"


def test_fp32_exp_and_division_are_accurate(compiled):
    for name, (_, ptx, _) in compiled.items():
        assert not re.search(r"\bex2\.approx\.f32\b", ptx), f"{name}: tl.exp's ex2.approx of x log2(e)"
        assert not re.search(r"\bdiv\.full\.f32\b", ptx), f"{name}: approximate division"
        if name.startswith(EXPONENTIATING):
            assert re.search(r"\bex2\.approx\.ftz\.f32\b", ptx), f"{name}: libdevice's expf not found"


def test_dot_check_sees_an_accumulating_dot():
    """The TTGIR reading itself: a dot fed a loop-carried accumulator is found, a zero-started one is not."""
    ttgir = ("%cst = arith.constant dense<0.000000e+00> : tensor<32x64xf32, #blocked>\n"
             "%part = tt.dot %a, %b, %cst : tensor<32x32xf32> * tensor<32x64xf32> -> tensor<32x64xf32>\n"
             "%acc_1 = tt.dot %a, %b, %arg11 : tensor<32x32xf32> * tensor<32x64xf32> -> tensor<32x64xf32>\n")
    assert _accumulating_dots(ttgir) == [ttgir.splitlines()[2]]
