"""Runtime of the rewritten convolutions: the ``reuse`` custom ops, their kernels, the naive
reference they are tested against, and per-layer state."""

from . import ops
from .geometry import Geometry
from .reference import lsh_planes, reference_reuse_conv2d
from .state import ReuseLayer

__all__ = ["ops", "Geometry", "lsh_planes", "reference_reuse_conv2d", "ReuseLayer"]
