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

import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ._io import atomic_write
from .wrapped import reshard


@dataclass
class TrainHistory:
    """What a training run did. ``losses[i]`` is the mean loss of the window ending at ``loss_steps[i]``."""

    steps: int = 0
    seconds: float = 0.0
    average_loss: float = float("nan")
    loss_steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    val_steps: list[int] = field(default_factory=list)
    """Steps at which the validation data was scored (empty without validation data)."""
    val_accuracies: list[float] = field(default_factory=list)
    best_step: int | None = None
    """Step of the best validation accuracy; with ``keep_best`` the model holds that step's weights."""
    best_val_accuracy: float | None = None
    stopped_early: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LoopState:
    """What the loop changes as it runs, besides the model, optimizer, scheduler, data position and RNG.

    The state file holds it: ``history``, ``loop`` (the four counters below), ``best`` (or, for a sharded
    model, ``has_best`` and the DCP folder ``sharded`` that holds the tensors)."""

    history: TrainHistory = field(default_factory=TrainHistory)
    loss_sum: float = 0.0
    """Sum of every step's loss so far (``history.average_loss`` is its mean)."""
    window: list[float] = field(default_factory=list)
    """Losses of the steps since the last logged window."""
    stale: int = 0
    """Evaluations since the best validation accuracy (for ``patience``)."""
    last_checkpoint: int | None = None
    """Step of the last checkpoint written (named when training diverges)."""
    best: dict[str, torch.Tensor] | None = None
    """The trained tensors at the best validation accuracy (with ``keep_best``)."""
    shard_folder: str | None = None
    """The DCP folder of the last sharded state written (removed once the next one is in)."""

    def saved_entries(self) -> dict:
        loop = {"loss_sum": self.loss_sum, "window": self.window, "stale": self.stale,
                "last_checkpoint": self.last_checkpoint}
        return {"history": self.history.to_dict(), "loop": loop}

    @classmethod
    def from_saved(cls, saved: dict) -> "LoopState":
        return cls(TrainHistory(**saved["history"]), **saved["loop"], best=saved["best"],
                   shard_folder=saved.get("sharded"))


# Config fields that do not change the computation; a resumed run may differ in these.
_FREE_FIELDS = {"progress", "resume", "state_path", "checkpoint", "checkpoint_every", "log_every"}


def fingerprint(cfg, named_tensors: dict[str, torch.Tensor]) -> dict:
    """What must match between the run that saved a state and the run that resumes it."""
    config = {k: v for k, v in asdict(cfg).items() if k not in _FREE_FIELDS}
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


def save_state(path: str | Path, entries: dict, model: torch.nn.Module, optimizer, tensors: dict[str, torch.Tensor],
               best: dict[str, torch.Tensor] | None, step: int, rank: int, world: int,
               previous_folder: str | None) -> str | None:
    """Write the state file: ``entries`` (everything but the tensors) plus the trained tensors, the optimizer and the
    best weights. A plain model's go into the file itself; a sharded model's into a new DCP folder
    ``<path>.step<step>.dcp`` that every rank writes and the file names (``sharded``, ``has_best``). Only rank 0 writes
    the file, then removes ``previous_folder``. Returns the new folder (None for a plain model)."""
    state = dict(entries)
    folder = None
    if is_sharded(tensors):
        folder = f"{path}.step{step}.dcp"
        save_sharded(folder, model, optimizer, tensors, best)
        state.update(sharded=folder, has_best=best is not None)
    else:
        state.update(model={n: t.detach() for n, t in tensors.items()}, optimizer=optimizer.state_dict(), best=best)
    if rank == 0:
        atomic_write(path, lambda tmp: torch.save(state, tmp))
        if previous_folder and previous_folder != folder:  # only once the new one is in
            shutil.rmtree(previous_folder, ignore_errors=True)
    if world > 1:
        torch.distributed.barrier()
    return folder


def load_state(path: str | Path, stamp: dict, model: torch.nn.Module, optimizer,
               tensors: dict[str, torch.Tensor]) -> dict:
    """Read :func:`save_state`'s file, refuse it if its fingerprint is not ``stamp``, and load the trained tensors and
    the optimizer in place; returns the file's entries, with ``best`` the best weights (sharded ones for a sharded
    model) or None."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{path} is not a readable lorakit training state (truncated or corrupted?): {err}") from err
    check_fingerprint(saved["fingerprint"], stamp, path)
    if is_sharded(tensors):
        saved["best"] = load_sharded(saved["sharded"], model, optimizer, tensors, saved["has_best"])
    else:
        with torch.no_grad():
            for name, tensor in tensors.items():
                tensor.copy_(saved["model"][name])
        optimizer.load_state_dict(saved["optimizer"])
    return saved


def discard_state(path: str | Path) -> None:
    """Remove a finished run's state file and the DCP folders of its sharded states (``<path>.step<N>.dcp``)."""
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
