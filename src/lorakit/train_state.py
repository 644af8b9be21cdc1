"""The full state of a training run, saved atomically so that ``--resume`` continues a killed run exactly.

What is saved: the trained parameters and every buffer of the model (not the frozen base, which the caller
rebuilds), the optimizer, the learning-rate scheduler, the data position (:class:`~lorakit.batches.BatchOrder`),
the RNG states, the loss history so far, the best-validation weights, and the state of any extra object the caller
passes (e.g. a C-LoRA :class:`~lorakit.DecaySchedule`). A fingerprint of the config and of the trained tensors'
names and shapes is saved too: resuming with another model or config is refused, naming the difference.

The file is written by :func:`torch.save` through an atomic rename and read back with ``weights_only=True``: it
holds only tensors, numbers, strings, lists and dicts, so nothing is unpickled.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ._io import atomic_write
from .inject import reshard

# Config fields that do not change the computation; a resumed run may differ in these.
_FREE_FIELDS = {"progress", "resume", "state_path", "checkpoint", "checkpoint_every", "log_every"}


def fingerprint(cfg, named_tensors: dict[str, torch.Tensor]) -> dict:
    """What must match between the run that saved a state and the run that resumes it."""
    config = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _FREE_FIELDS}
    return {"config": config, "tensors": {name: list(t.shape) for name, t in named_tensors.items()}}


def check_fingerprint(saved: dict, current: dict, path: str | Path) -> None:
    for field in sorted(set(saved["config"]) | set(current["config"])):
        was, now = saved["config"].get(field), current["config"].get(field)
        if was != now:
            raise ValueError(f"cannot resume from {path}: it was saved with {field}={was!r}, this run has "
                             f"{field}={now!r}; resume with the same settings, or start afresh without resume")
    if saved["tensors"] != current["tensors"]:
        missing = sorted(set(saved["tensors"]) ^ set(current["tensors"]))
        differ = missing or [n for n in saved["tensors"] if saved["tensors"][n] != current["tensors"][n]]
        name = differ[0]
        raise ValueError(f"cannot resume from {path}: the model differs at {name!r} (saved "
                         f"{saved['tensors'].get(name)}, this model {current['tensors'].get(name)}); "
                         "resume with the model and adapter the state was saved from")


def trained_tensors(model: torch.nn.Module, params: list[torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    """The tensors training changes, by state-dict name: the trained parameters and every buffer."""
    trained = {id(p) for p in params}
    named = {n: p for n, p in model.named_parameters(remove_duplicate=True) if id(p) in trained}
    named.update(dict(model.named_buffers(remove_duplicate=True)))
    return named


def save_state(path: str | Path, state: dict) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_state(path: str | Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{path} is not a readable lorakit training state (truncated or corrupted?): {err}") from err


def discard_state(path: str | Path) -> None:
    """Remove a finished run's state file and the DCP folders of its sharded states (``<path>.step<N>.dcp``)."""
    import shutil

    path = Path(path)
    path.unlink(missing_ok=True)
    for folder in path.parent.glob(f"{path.name}.step*.dcp"):
        shutil.rmtree(folder, ignore_errors=True)


def rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# -- sharded models (FSDP2): torch.distributed.checkpoint, every rank writes its shards ----------------
def is_sharded(tensors: dict[str, torch.Tensor]) -> bool:
    return any(type(t).__name__ == "DTensor" for t in tensors.values())


def save_sharded(folder: str, model: torch.nn.Module, optimizer, tensors: dict[str, torch.Tensor],
                 best: dict[str, torch.Tensor] | None) -> None:
    """The trained tensors, the optimizer and the best weights as a DCP checkpoint (a collective call)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    reshard(model)
    state = {"model": dict(tensors), "optimizer": get_optimizer_state_dict(model, optimizer)}
    if best is not None:
        state["best"] = best
    dcp.save(state, checkpoint_id=folder)


def load_sharded(folder: str, model: torch.nn.Module, optimizer, tensors: dict[str, torch.Tensor],
                 has_best: bool) -> dict[str, torch.Tensor] | None:
    """Load :func:`save_sharded`'s checkpoint in place; returns the best weights (sharded) or None."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    reshard(model)
    state = {"model": dict(tensors), "optimizer": get_optimizer_state_dict(model, optimizer)}
    if has_best:
        state["best"] = {n: t.detach().clone() for n, t in tensors.items()}
    with torch.no_grad():
        dcp.load(state, checkpoint_id=folder)
    set_optimizer_state_dict(model, optimizer, state["optimizer"])
    return state.get("best")
