"""Training under torchrun with DDP or FSDP2: the few steps lorakit takes, and no engine of its own.

    torchrun --nproc_per_node 2 -m lorakit run digit-finetune --parallel ddp

:func:`start` joins the process group that torchrun describes in the environment (NCCL on GPUs, gloo on CPU);
:func:`wrap` wraps a model for the training loop, which then gives each rank its slice of every global batch
(:mod:`lorakit.batches`). Under FSDP2 every adapter layer and every transformer block is sharded as a whole
(``fully_shard``), then the root: a frozen weight is never sharded on its own, so a wrapper's base layer is
gathered together with its factors. For FSDP2 with bf16, pass ``mp_policy=MixedPrecisionPolicy(
param_dtype=torch.bfloat16, reduce_dtype=torch.float32)``.
"""
from __future__ import annotations

import copy
import gc
import os
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .wrapped import unwrap_model

MODES = ("none", "ddp", "fsdp")


def start(parallel: str) -> tuple[int, int]:
    """Join torchrun's process group for ``parallel`` ("ddp"/"fsdp"); returns (rank, world size).

    Refuses, before any work, ``--parallel ddp|fsdp`` outside torchrun, and several torchrun processes
    with ``--parallel none`` (every rank would train on all the data and write the same files).
    """
    if parallel not in MODES:
        raise ValueError(f"--parallel {parallel!r} is not supported; choose one of {list(MODES)}")
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if parallel == "none":
        if launched and world > 1:
            raise ValueError(f"{world} processes were launched (torchrun) with --parallel none: each would train on "
                             "all the data and write the same files; pass --parallel ddp or --parallel fsdp")
        return 0, 1
    if not launched:
        raise ValueError(f"--parallel {parallel} needs a process group, and there is none: launch with "
                         f"`torchrun --nproc_per_node N -m lorakit run ... --parallel {parallel}`")
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def stop() -> None:
    """Leave the process group, if any. Sharded modules hold reference cycles that only the garbage collector frees;
    collecting them first frees their communication buffers while the group is still alive, not at interpreter
    exit, where gloo can abort the process."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        gc.collect()
        torch.distributed.destroy_process_group()


def is_main() -> bool:
    """Whether this process writes files and prints: rank 0, or the only process."""
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or \
        torch.distributed.get_rank() == 0


def wrap(model: nn.Module, parallel: str) -> nn.Module:
    """The model as the training loop should see it: itself, DDP-wrapped, or sharded in place by FSDP2."""
    if parallel == "none":
        return model
    if parallel == "ddp":
        device = next(model.parameters()).device
        return nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard

    from .inject import adapter_layers

    # A soft prompt is read by the model's forward pre-hook and never called, so FSDP2 would never gather it as a
    # unit of its own: it stays in the root's group, which FSDP2 gathers before the model's own pre-hooks run.
    blocks = [m for _, m in adapter_layers(model) if _computes_in_forward(m)] + _transformer_blocks(model)
    for block in _outermost(model, blocks):
        fully_shard(block)
    return fully_shard(model)


@contextmanager
def training_copy(model: nn.Module, parallel: str) -> Iterator[nn.Module]:
    """What the training loop should see, for code that goes on using ``model`` as a plain module afterwards
    (compress it, evaluate it, save it with another library).

    'none': ``model``; 'ddp': ``model`` DDP-wrapped; 'fsdp': a sharded twin (:func:`wrap` on a deep copy), whose
    trained state is gathered back into ``model`` on every rank when the block ends. Under FSDP2 the twin costs a
    copy of the model, so this is for models that fit on one device; hooks that act on the trained layers (a decay
    schedule) and an explicit parameter list must come from the yielded model (:func:`same_parameters`).
    """
    if parallel != "fsdp":
        yield wrap(model, parallel)
        return
    twin = wrap(copy.deepcopy(model), "fsdp")
    yield twin
    model.load_state_dict(full_state_dict(twin))


def same_parameters(params: list, model: nn.Module, other: nn.Module) -> list:
    """``other``'s parameters at the paths where ``params`` sit in ``model`` (``other`` may be wrapped)."""
    path = {id(p): name for name, p in unwrap_model(model).named_parameters()}
    missing = [p for p in params if id(p) not in path]
    if missing:
        raise ValueError(f"{len(missing)} of the parameters to train are not in the model being trained")
    by_name = dict(unwrap_model(other).named_parameters())
    return [by_name[path[id(p)]] for p in params]


def _computes_in_forward(module: nn.Module) -> bool:
    """Whether an adapter layer computes in its own forward (a soft prompt does not: a hook reads it)."""
    from .layers.prompt import SoftPrompt

    return not isinstance(module, SoftPrompt)


def _transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a transformer: the items of a ``ModuleList`` named ``layer``/``layers``/``h``/``block``."""
    return [block for name, module in model.named_modules() if isinstance(module, nn.ModuleList)
            and name.rpartition(".")[2] in ("layer", "layers", "h", "block") for block in module]


def _outermost(model: nn.Module, blocks: list[nn.Module]) -> list[nn.Module]:
    """``blocks`` without those inside another block (a LoRA layer inside a transformer block goes with it)."""
    chosen = {id(b) for b in blocks}
    inner = {id(m) for b in blocks for m in b.modules() if m is not b and id(m) in chosen}
    return [b for b in {id(b): b for b in blocks}.values() if id(b) not in inner]


def on_main(fn: Callable[[], Any]) -> Any:
    """``fn()`` run by rank 0 alone, its result on every rank: for work done once (a subprocess, a measurement).

    Every rank must call it. An exception on rank 0 is raised there and, as a RuntimeError naming it, on the others.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return fn()
    box: list = [None]
    error = None
    if is_main():
        try:
            box[0] = ("ok", fn())
        except Exception as err:  # noqa: BLE001 - every rank must hear of it, then rank 0 raises it as it was
            error, box[0] = err, ("error", f"{type(err).__name__}: {err}")
    torch.distributed.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    status, value = box[0]
    if status == "error":
        raise RuntimeError(f"rank 0 failed: {value}")
    return value


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The plain model's state dict with every sharded (DTensor) entry gathered whole; call it on every rank."""
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in unwrap_model(model).state_dict().items()}


# -- used by the training loop ----------------------------------------------------------------------
def rank_and_world(model: nn.Module) -> tuple[int, int]:
    """(rank, world size) of the default process group, or (0, 1); several ranks need a wrapped model."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 0, 1
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    wrapped = isinstance(model, nn.parallel.DistributedDataParallel) or any(
        type(p).__name__ == "DTensor" or type(getattr(p, "data", None)).__name__ == "DTensor" for p in model.parameters())
    if world > 1 and not wrapped:
        raise ValueError(f"train() runs in a process group of {world} ranks, but the model is neither wrapped in "
                         "DistributedDataParallel nor sharded with fully_shard, so its gradients would not be "
                         "averaged; wrap it first (or train in one process)")
    return rank, world


def gathered(value: Any, world: int) -> list:
    """``[value of rank 0, value of rank 1, ...]`` on every rank (a list of one in a single process)."""
    if world == 1:
        return [value]
    values = [None] * world
    torch.distributed.all_gather_object(values, value)
    return values


def global_mean(loss: torch.Tensor, weight: float, world: int) -> float:
    """The mean loss of the global batch (one host sync per step); NaN on any rank is NaN on every rank."""
    if world == 1:
        return loss.item()
    total = (loss * weight).reshape(1).float()
    torch.distributed.all_reduce(total)
    return total.item() / world
