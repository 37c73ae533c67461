"""fp32 arithmetic as accurate as PyTorch's, for Triton kernels that take fp32 inputs (the
log-prob and reward kernels); 16-bit inputs keep the fast forms.

On the GPU an fp32 ``tl.dot`` accumulating in place compiles to one sequential FMA chain over
the whole reduction, ``tl.exp`` to ``ex2.approx`` of a rounded product, and ``/`` to an
approximate division: each fine for 16-bit inputs, each several to tens of ulps for fp32 ones,
where the tolerance rule compares with torch (cuBLAS reduces in trees, expf and division are
correctly rounded). The interpreter, computing with numpy, shows none of it.
"""

import triton
import triton.language as tl
from triton.language.extra import libdevice

# The interpreter cannot call libdevice (extern functions raise there); it computes exp
# with numpy's accurate one anyway. Fixed when this module is imported, as Triton decides
# then whether a kernel is interpreted.
_INTERPRETED = tl.constexpr(triton.knobs.runtime.interpret)


@triton.jit
def dot_accumulate(a, b, acc, err):
    """One K block of ``acc += a @ b``; returns the new (acc, err). Finish with :func:`dot_result`.

    16-bit operands: tensor cores accumulate straight into ``acc`` (``err`` is unused and
    compiled away). fp32 operands (IEEE FMAs, no TF32): the block's product starts from
    zero -- a chain of only BLOCK_K FMAs -- and joins the running sum through TwoSum, whose
    exact rounding error collects in ``err``. Without it ``tl.dot(a, b, acc)`` (and ``acc +=
    tl.dot(a, b)``, which Triton rewrites into it) compiles to one sequential FMA chain over
    the whole reduction: every step rounds at the running sum's magnitude and the errors
    add up (~sqrt(K) ulps at random, up to K / 2 when they share a sign), where cuBLAS
    splits K or reduces in trees. The interpreter (a numpy matmul per block) never showed
    it; fp32 results on the H200 failed the tolerance rule. Cost: 7 adds per K block of 32 FMAs.
    """
    if a.dtype == tl.float32:
        part = tl.dot(a, b, input_precision="ieee")
        total = acc + part
        part_rounded = total - acc
        err += (acc - (total - part_rounded)) + (part - part_rounded)
        return total, err
    else:
        return tl.dot(a, b, acc), err


@triton.jit
def dot_result(acc, err, ACCURATE: tl.constexpr):
    """The sum :func:`dot_accumulate` accumulated: acc + err for fp32 operands (ACCURATE), acc otherwise.

    An overflowed sum makes TwoSum's error NaN (inf - inf); the sum then stands alone.
    """
    if ACCURATE:
        return tl.where(err == err, acc + err, acc)
    else:
        return acc


@triton.jit
def exact_exp(x, ACCURATE: tl.constexpr):
    """exp(x). ACCURATE (fp32 inputs): libdevice's expf, as torch computes it.

    ``tl.exp`` is ``ex2.approx(x * log2(e))``: rounding the product costs |x| x 2^-24 of
    relative error (tens of ulps for probabilities far below the max), which expf avoids by
    splitting log2(e) in two and reducing the argument first.
    """
    if ACCURATE and not _INTERPRETED:
        return libdevice.exp(x)
    else:
        return tl.exp(x)


@triton.jit
def exact_div(a, b, ACCURATE: tl.constexpr):
    """a / b, correctly rounded when ACCURATE (Triton's ``/`` is div.full.f32: up to 2 ulp)."""
    if ACCURATE:
        return tl.math.div_rn(a, b)
    else:
        return a / b
