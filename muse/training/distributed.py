"""Training on several processes with PyTorch's own engine: the process group torchrun describes
(gloo on the CPU, NCCL on CUDA), the model wrapped for it (DDP, or FSDP2's `fully_shard`), the
full state a checkpoint holds, and `muse train --nproc N`, which re-launches itself through
torchrun on this host.

`batch_size` stays the global batch: every rank draws the same window starts from the same data
generator and keeps its own slice of them (`share`), so the batch, the gradient (DDP and FSDP
average it over ranks) and the generator state in a checkpoint are those of a one-process run,
and a run resumes on any number of ranks. Checkpoints hold plain (unsharded) state dicts in the
one-process form; rank 0 writes them."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from muse.errors import MuseError

PARALLEL = ("ddp", "fsdp")
# the shared machines need NCCL's NVLink multicast off; set for every process muse starts
LAUNCH_ENV = {"NCCL_NVLS_ENABLE": "0"}


def launched_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) outside it."""
    defaults = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    try:
        rank, world, local = (int(os.environ.get(n, d)) for n, d in defaults.items())
    except ValueError:
        shown = ", ".join(f"{n}={os.environ.get(n)!r}" for n in defaults)
        raise MuseError(f"torchrun's environment is not integers ({shown})") from None
    if world < 1 or not 0 <= rank < world:
        raise MuseError(f"RANK={rank} and WORLD_SIZE={world}: need 0 ≤ RANK < WORLD_SIZE")
    return rank, world, local


def check_share(batch_size: int, world: int) -> None:
    if batch_size % world:
        raise MuseError(f"batch_size {batch_size} does not split evenly over {world} ranks; "
                        f"use a multiple of {world} (batch_size is the global batch)")


def check_parallel(parallel: str, dtype: str, world: int) -> None:
    if world > 1 and parallel == "fsdp" and dtype == "fp16":
        raise MuseError("parallel = fsdp trains in fp32 or bf16: fp16's loss scaling would "
                        "skip steps on some shards and not on others; use dtype = bf16")


def check_nproc(nproc: int, device: str) -> None:
    """`--nproc` for a training on `device` (auto | cuda | cpu): one GPU per rank on CUDA."""
    if "WORLD_SIZE" in os.environ:
        raise MuseError("--nproc inside torchrun: torchrun has started the ranks already; drop "
                        "--nproc or run muse train --nproc N outside torchrun")
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    count = torch.cuda.device_count() if cuda else 0
    if cuda and count == 0:
        raise MuseError("device 'cuda' asked for, but no CUDA device is visible here; use "
                        "device = cpu (gloo) or auto")
    if cuda and nproc > count:
        raise MuseError(f"--nproc {nproc}: this host has {count} CUDA device(s) and each rank "
                        f"needs one; use --nproc ≤ {count}")


@dataclass
class Ranks:
    """Where this process stands: rank 0 of 1 outside torchrun."""

    rank: int = 0
    world: int = 1
    parallel: str | None = None  # ddp | fsdp with several ranks
    backend: str | None = None
    owns_group: bool = False  # this module started the process group and ends it

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def several(self) -> bool:
        return self.world > 1

    @property
    def fsdp(self) -> bool:
        return self.several and self.parallel == "fsdp"

    def describe(self) -> dict[str, Any]:
        return {"ranks": self.world, "parallel": self.parallel, "backend": self.backend}


def join(device: torch.device, parallel: str) -> tuple[Ranks, torch.device]:
    """This process's place in torchrun's group (joined here unless already), and its device:
    cuda:LOCAL_RANK on CUDA."""
    rank, world, local = launched_world()
    if world == 1:
        return Ranks(), device
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if local >= count:
            raise MuseError(f"rank {rank} has LOCAL_RANK {local}, but {count} CUDA device(s) "
                            f"are visible; start at most {count} processes on this host")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    os.environ.update(LAUNCH_ENV)  # NCCL reads it when its communicator starts, just below
    backend = "nccl" if device.type == "cuda" else "gloo"
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    return Ranks(rank, world, parallel, dist.get_backend(), owns), device


def leave(ranks: Ranks, finished: bool) -> None:
    if ranks.owns_group and dist.is_initialized():
        if finished:
            # no rank tears the group down while another still works in it: gloo aborts a
            # process whose peer closes the connections under it (a failed rank cannot wait)
            dist.barrier()
        dist.destroy_process_group()


def share(starts: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """This rank's slice of the global batch's window starts."""
    n = starts.numel() // ranks.world
    return starts[ranks.rank * n : (ranks.rank + 1) * n]


def wrap(model: nn.Module, ranks: Ranks, device: torch.device) -> nn.Module:
    """DDP, or FSDP2 with each block sharded on its own and the rest (embedding, head) at the
    root; the model itself with one rank. FSDP shards `model`'s parameters in place."""
    if not ranks.several:
        return model
    if ranks.fsdp:
        from torch.distributed.fsdp import fully_shard

        # the root returns logits as a view; the trainer's loss reads them out of place
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view")

        for block in getattr(model, "blocks", ()):
            fully_shard(block)
        return fully_shard(model)
    from torch.nn.parallel import DistributedDataParallel

    # top-k routing can leave an expert without tokens in a step: DDP must look for it
    moe = getattr(getattr(model, "config", None), "ffn", None) == "moe"
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                   else None, find_unused_parameters=moe)


@contextlib.contextmanager
def grad_sync(wrapped: nn.Module, ranks: Ranks, sync: bool) -> Iterator[None]:
    """Gradients are averaged over ranks only on the backward that `sync`s (the last
    micro-batch of an accumulated step)."""
    if not ranks.several:
        yield
    elif ranks.fsdp:
        wrapped.set_requires_gradient_sync(sync)
        yield
    else:
        with contextlib.nullcontext() if sync else wrapped.no_sync():
            yield


def mean(value: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """The mean over ranks (gloo has no AVG)."""
    if not ranks.several:
        return value
    total = value.clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total / ranks.world


def from_main(obj: Any, ranks: Ranks) -> Any:
    """Rank 0's `obj` on every rank, so decisions taken from it (best, diverged) agree."""
    if not ranks.several:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def replicated(value: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP's gradient norm) as the plain tensor it stands for."""
    full = getattr(value, "full_tensor", None)
    return full() if callable(full) else value


def _names(model: nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in model.named_parameters()}


def _by_index(state: dict[str, Any], optimizer, names: dict[int, str]) -> dict[str, Any]:
    """An optimizer state keyed by parameter name → keyed by position, as
    `Optimizer.state_dict()` gives it (positions run on over the groups)."""
    out: dict[str, Any] = {"state": {}, "param_groups": []}
    index = 0
    for group, saved in zip(optimizer.param_groups, state["param_groups"], strict=True):
        ids = []
        for p in group["params"]:
            if names[id(p)] in state["state"]:
                out["state"][index] = state["state"][names[id(p)]]
            ids.append(index)
            index += 1
        out["param_groups"].append({**saved, "params": ids})
    return out


def _by_name(state: dict[str, Any], optimizer, names: dict[int, str]) -> dict[str, Any]:
    out: dict[str, Any] = {"state": {}, "param_groups": []}
    for group, saved in zip(optimizer.param_groups, state["param_groups"], strict=True):
        if len(group["params"]) != len(saved["params"]):
            raise MuseError(f"the checkpoint's optimizer group has {len(saved['params'])} "
                            f"parameters, this model's {len(group['params'])}")
        fqns = [names[id(p)] for p in group["params"]]
        out["state"].update({fqn: state["state"][i] for fqn, i in zip(fqns, saved["params"],
                                                                      strict=True)
                             if i in state["state"]})
        out["param_groups"].append({**saved, "params": fqns})
    return out


def full_state(model: nn.Module, optimizer, ranks: Ranks) -> tuple[dict, dict]:
    """(model, optimizer) state dicts in the one-process form, whole on rank 0. Under FSDP
    every rank must call it (the shards are gathered); the other ranks get empty dicts."""
    if not ranks.fsdp:
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    moments = get_optimizer_state_dict(model, optimizer, options=options)
    if not ranks.main:
        return {}, {}
    return weights, _by_index(moments, optimizer, _names(model))


def load_optimizer(model: nn.Module, optimizer, state: dict[str, Any], ranks: Ranks) -> None:
    """A one-process optimizer state into `optimizer`, each rank taking its shard under FSDP."""
    if not ranks.fsdp:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_optimizer_state_dict,
    )

    set_optimizer_state_dict(model, optimizer, _by_name(state, optimizer, _names(model)),
                             options=StateDictOptions(full_state_dict=True))
    # its round trip turns tuples (betas) into lists: the groups' settings as they were saved
    for group, saved in zip(optimizer.param_groups, state["param_groups"], strict=True):
        group.update({k: v for k, v in saved.items() if k != "params"})


# ---------------------------------------------------------------------------------- launcher


@contextlib.contextmanager
def _env(values: dict[str, str]) -> Iterator[None]:
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def launch_env(nproc: int, cuda: bool) -> dict[str, str]:
    env = dict(LAUNCH_ENV)
    # torchrun would set 1 thread per rank, and warn; share the cores instead
    env["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS",
                                            str(max(1, (os.cpu_count() or 1) // nproc)))
    if not cuda and os.path.isdir("/sys/class/net/lo") and "GLOO_SOCKET_IFNAME" not in os.environ:
        env["GLOO_SOCKET_IFNAME"] = "lo"  # one host: gloo on the loopback, as the store is
    return env


def launch(nproc: int, argv: list[str], cuda: bool) -> int:
    """`python -m muse.cli ARGV` on `nproc` ranks of this host through torchrun's agent (a
    store on a free port of 127.0.0.1, no restarts). The exit status: 0, or that of the rank
    that failed first (128 + N for a signal N), so a user's mistake stays 2 and a divergence 3.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args([
        "--nnodes", "1", "--nproc-per-node", str(nproc), "--max-restarts", "0",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0",
        "--rdzv-id", uuid.uuid4().hex, "--module", "muse.cli", *argv,
    ])
    with _env(launch_env(nproc, cuda)), _quiet("torch.distributed.elastic"):
        try:
            run(args)
        except ChildFailedError as exc:
            rank, failure = min(exc.failures.items(), key=lambda kv: (kv[1].timestamp, kv[0]))
            if failure.exitcode > 0:  # the rank has said why (a line, or a traceback)
                return failure.exitcode
            name = signal.Signals(-failure.exitcode).name
            print(f"muse train: rank {rank} of {nproc} was ended by {name}", file=sys.stderr)
            return 128 - failure.exitcode
        except SignalException as exc:
            return 128 + int(exc.sigval)
    return 0


@contextlib.contextmanager
def _quiet(name: str) -> Iterator[None]:
    """The agent logs each rank's exit status and the signals it passes on; the ranks say what
    went wrong themselves. Each of its modules sets its logger's level, so each is raised."""
    loggers = [logging.getLogger(n) for n in list(logging.root.manager.loggerDict)
               if n == name or n.startswith(name + ".")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
