"""Triton kernels of docqa_fast (installed as ``docqa_fast.kernels``).

One module per op family, holding only ``@triton.jit`` kernels, their launchers and the
list of configurations each launcher can pick (registered in :mod:`.registry` so the
Hopper compile check covers every one of them). Autograd, validation and dispatch live
in ``docqa_fast/<family>/``.
"""

import pkgutil

# Modules that define no kernels of their own: the config registry, the tile tables, shared jit helpers.
_SUPPORT_MODULES = ("registry", "tuning", "exact_math")
# Every other module (or package) defines kernels; the Hopper check imports them all.
KERNEL_MODULES = tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in _SUPPORT_MODULES))
