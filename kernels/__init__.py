"""Triton kernels of docqa_fast (installed as ``docqa_fast.kernels``).

One module per op family, holding only ``@triton.jit`` kernels, their launchers and the
list of configurations each launcher can pick (registered in :mod:`.registry` so the
Hopper compile check covers every one of them). Autograd, validation and dispatch live
in ``docqa_fast/<family>/``.
"""

import pkgutil

# Every module here except the registry and the tile tables defines kernels; the Hopper check imports them all.
KERNEL_MODULES = tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in ("registry", "tuning")))
