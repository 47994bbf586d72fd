"""What backward keeps of a call under bf16 autocast on the CPU, one tensor per storage."""

import torch


def saved_storages(fn, *args) -> list[torch.Tensor]:
    kept = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16):
        fn(*args)
    return list(kept.values())
