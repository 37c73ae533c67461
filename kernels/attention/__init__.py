"""Triton flash attention for training: forward with LSE, and backward (delta, dK/dV, dQ).

:mod:`.common` holds the helpers the inference kernels share (sequence bounds, the score tile
and its mask), :mod:`.training` the kernels (how they work is its docstring), :mod:`.launch`
their launchers, tiles (per-GPU tuned tables) and the configs of the Hopper compile check.
"""

from .launch import (  # noqa: F401  (registers the configs)
    DEFAULT_ORDER,
    DEFAULT_PASSES,
    TUNABLE,
    backward,
    backward_passes,
    backward_variant,
    causal_order,
    default_tiles,
    forward,
    tile_key,
)
