"""Kernels: each fast path beside the plain reference that defines it."""

from muse.ops.bk_core import bk_core
from muse.ops.bk_core_reference import bk_core_reference

__all__ = ["bk_core", "bk_core_reference"]
