"""Models wrapped for training: the user's model inside a DDP / DataParallel / ``torch.compile`` wrapper, and the
FSDP2 units whose gathered parameters must be put back before a write into their shards.

Every public entry point of lorakit calls :func:`unwrap_model` first, so keys and attributes are those of the plain
model; every write into weights that may be sharded (merge, a loaded adapter, restored weights) calls
:func:`reshard` first.
"""
from __future__ import annotations

from torch import nn


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's model inside a DDP / DataParallel (``.module``) or ``torch.compile`` (``._orig_mod``) wrapper.

    FSDP2's ``fully_shard`` shards in place (same module, DTensor parameters), so it needs no unwrapping.
    """
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch._dynamo's OptimizedModule
            model = model._orig_mod
        else:
            return model


def reshard(model: nn.Module) -> None:
    """Put every FSDP2 unit of ``model`` back in its sharded state (nothing to do without FSDP2).

    A forward without a backward leaves the root unit's gathered parameters registered, and the next forward uses
    them as they are. A write into the shards (merge, a loaded adapter, restored weights) must come after this, or
    that forward would not see it.
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch built without distributed
        return
    for module in unwrap_model(model).modules():
        if isinstance(module, FSDPModule):
            module.reshard()
