"""A bounds check for Triton kernels run by the interpreter (TRITON_INTERPRET=1): every address a
masked-in load or store touches must lie inside the storage of a tensor the launch was given.
A read past the end of a buffer is silent on the interpreter and on most GPU launches, and an
illegal memory access on the launch whose buffer ends at a page the process does not own."""

from __future__ import annotations

import numpy as np
from triton.runtime import interpreter

_ranges: list[tuple[int, int]] = []
violations: list[str] = []


def _check(kind: str, ptrs, mask) -> None:
    addr = np.asarray(ptrs.data)[np.asarray(mask.data, dtype=bool)].astype(np.uint64)
    if not addr.size:
        return
    size = ptrs.get_element_ty().primitive_bitwidth // 8
    inside = np.zeros(addr.shape, dtype=bool)
    for lo, hi in _ranges:
        inside |= (addr >= lo) & (addr + size <= hi)
    if not inside.all():
        bad = addr[~inside]
        violations.append(f"{kind} of {bad.size} element(s) outside every argument, first at "
                          f"{int(bad[0]):#x} (arguments: {[(hex(a), b - a) for a, b in _ranges]})")


def install() -> None:
    """Patch the interpreter (call once, after TRITON_INTERPRET=1 and before any launch)."""
    init = interpreter.GridExecutor._init_args_hst

    def init_and_record(self, args_dev, kwargs):
        args_hst, kwargs_hst = init(self, args_dev, kwargs)
        _ranges.clear()
        for arg in [*args_hst, *kwargs_hst.values()]:
            if hasattr(arg, "untyped_storage"):
                storage = arg.untyped_storage()
                _ranges.append((storage.data_ptr(), storage.data_ptr() + storage.nbytes()))
        return args_hst, kwargs_hst

    load = interpreter.InterpreterBuilder.create_masked_load
    store = interpreter.InterpreterBuilder.create_masked_store

    def checked_load(self, ptrs, mask, other, *rest):
        _check("load", ptrs, mask)
        return load(self, ptrs, mask, other, *rest)

    def checked_store(self, ptrs, value, mask, *rest):
        _check("store", ptrs, mask)
        return store(self, ptrs, value, mask, *rest)

    interpreter.GridExecutor._init_args_hst = init_and_record
    interpreter.InterpreterBuilder.create_masked_load = checked_load
    interpreter.InterpreterBuilder.create_masked_store = checked_store
