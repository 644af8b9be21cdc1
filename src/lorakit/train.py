"""The one training and evaluation loop that every experiment uses.

A batch is whatever the data loader yields: a pair ``(inputs, labels)`` for the vision models, or a
dict of tensors (``input_ids``, ``attention_mask``, ``labels``, ...) for Hugging Face models. The loss
and the prediction are hooks that take ``(model, batch)``, so both kinds go through the same loop.

Training is seeded and deterministic: the shuffling order comes from a ``torch.Generator`` seeded with
``cfg.seed``, and the global RNG (dropout, noise) is seeded inside a ``fork_rng`` block, so the caller's
random state is left as it was. The same config and the same initial model give the same weights.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset, default_collate
from tqdm import tqdm

from ._io import save_tensors
from .batches import BatchOrder
from .losses import Batch, LossFn, PredictFn, classification_loss, classify
from .losses import distillation_loss  # noqa: F401 (lorakit.train.distillation_loss, as before)
from .optim import LRMultiplier, make_optimizer as _make_optimizer, make_scheduler  # noqa: F401 (re-exported)
from .parallel import gathered, global_mean, rank_and_world
from .train_state import (LoopState, TrainHistory, fingerprint, is_sharded, load_state, rng_state, save_state,
                          set_rng_state, trained_tensors)
from .wrapped import reshard

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "linear", "cosine")


class TrainingDivergedError(RuntimeError):
    """The loss (or, at a checkpoint, a weight) became NaN or infinite; ``step`` is where it happened."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


@dataclass
class TrainConfig:
    """How to train; ``dataclasses.asdict(cfg)`` goes into every results file."""

    lr: float = 1e-3
    """Learning rate."""
    batch_size: int = 32
    """Examples per optimizer step."""
    epochs: float = 1.0
    """Passes over the data; fractions are fine (0.5 = half an epoch, rounded up to whole steps)."""
    steps: int | None = None
    """Exact number of optimizer steps; when set it overrides ``epochs`` (the data is cycled as needed)."""
    seed: int = 0
    """Seeds the shuffling order and the global RNG (dropout, noise) during training."""
    shuffle: bool = True
    """Reshuffle the data each epoch (seeded); False keeps the data set's order."""
    optimizer: str = "adam"
    """One of "adam", "adamw", "sgd"."""
    weight_decay: float = 0.0
    """Weight decay passed to the optimizer (L2 for adam/sgd, decoupled for adamw)."""
    momentum: float = 0.0
    """Momentum for "sgd" (ignored by the others)."""
    grad_clip: float | None = None
    """Clip the gradient norm of the trained parameters to this value; None = no clipping."""
    log_every: int = 10
    """Record the mean loss of every window of this many steps in the history (and the progress bar)."""
    checkpoint: str | None = None
    """Path of a safetensors file for the model's state_dict; None = no checkpoints."""
    checkpoint_every: int = 1000
    """Write the checkpoint and the training state every this many steps (and always at the end)."""
    state_path: str | None = None
    """File for the full training state (trained tensors, optimizer, schedules, RNG, data position); None = none."""
    resume: bool = False
    """Continue from ``state_path`` when that file exists (a killed run ends as if never stopped)."""
    progress: bool | None = None
    """Show a progress bar: True, False, or None = only when stderr is a terminal."""
    schedule: str = "constant"
    """Learning rate after warmup: "constant", "linear" (to 0 at the last step) or "cosine" (to 0)."""
    warmup_steps: int = 0
    """Steps of linear warmup from 0 to ``lr`` before the schedule."""
    eval_every: int | None = None
    """With validation data: evaluate every this many steps; None = at the end of every epoch (and the last step)."""
    patience: int | None = None
    """With validation data: stop after this many evaluations without a better validation accuracy; None = never."""
    keep_best: bool = True
    """With validation data: at the end, put back the weights of the best validation accuracy."""

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        for name in ("eval_every", "patience"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1 (or None), got {getattr(self, name)}")
        for name in ("batch_size", "log_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.steps is None and not self.epochs > 0:
            raise ValueError(f"epochs must be positive (or set steps), got {self.epochs}")
        if self.steps is not None and self.steps < 0:
            raise ValueError(f"steps must be non-negative, got {self.steps}")

    def total_steps(self, batches_per_epoch: int) -> int:
        """Optimizer steps to run: ``steps`` if set, otherwise ``ceil(epochs * batches_per_epoch)``."""
        if self.steps is not None:
            return self.steps
        return math.ceil(self.epochs * batches_per_epoch)


@dataclass
class EvalResult:
    """Classification metrics; accuracies are in percent, lists are indexed by class."""

    accuracy: float
    wrong_per_class: list[int]
    total_per_class: list[int]
    per_class_accuracy: list[float]  # NaN for a class with no examples

    @classmethod
    def from_counts(cls, wrong_per_class: list[int], total_per_class: list[int]) -> "EvalResult":
        total, wrong = sum(total_per_class), sum(wrong_per_class)
        if total == 0:
            raise ValueError("nothing to evaluate: the data set is empty")
        per_class = [100.0 * (t - w) / t if t else float("nan") for w, t in zip(wrong_per_class, total_per_class)]
        return cls(100.0 * (total - wrong) / total, list(wrong_per_class), list(total_per_class), per_class)

    @property
    def correct(self) -> int:
        return sum(self.total_per_class) - sum(self.wrong_per_class)

    def to_dict(self) -> dict:
        """JSON-ready (NaN per-class accuracies become None)."""
        out = asdict(self)
        out["per_class_accuracy"] = [None if math.isnan(a) else a for a in self.per_class_accuracy]
        return out


# Helpers ----------------------------------------------------------------------------------------------


def _as_dataset(data: Any) -> Dataset:
    if isinstance(data, Dataset):
        return data
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        return TensorDataset(*data)
    raise TypeError(f"data must be a torch Dataset or an (inputs, labels) pair of tensors, got {type(data).__name__}")


def _device_of(model: nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def _to_device(batch: Batch, device: torch.device) -> Batch:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {key: _to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(value, device) for value in batch)
    return batch


def _save_checkpoint(model: nn.Module, path: str, step: int) -> None:
    """Write the state_dict atomically, refusing non-finite weights so a good checkpoint is never replaced."""
    state = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise TrainingDivergedError(f"training diverged at step {step}: {bad[0]} holds NaN or inf; "
                                    f"the checkpoint {path} keeps the last good weights", step)
    save_tensors(path, state, metadata={"step": str(step)})


# Training and evaluation ------------------------------------------------------------------------------


def train(
    model: nn.Module,
    data: Dataset | tuple[torch.Tensor, torch.Tensor],
    cfg: TrainConfig,
    *,
    loss_fn: LossFn | None = None,
    on_step: Callable[[int], None] | None = None,
    params: Iterable[nn.Parameter] | None = None,
    collate_fn: Callable | None = None,
    validation: Dataset | tuple[torch.Tensor, torch.Tensor] | None = None,
    num_classes: int = 10,
    predict_fn: PredictFn | None = None,
    stateful: Mapping[str, Any] | None = None,
) -> TrainHistory:
    """Train ``model`` in place on ``data`` and return what happened.

    ``loss_fn(model, batch) -> scalar loss`` defaults to :func:`classification_loss`. ``params`` defaults
    to the parameters with ``requires_grad`` (after ``inject`` that is only the adapters). ``on_step(step)``
    runs after every optimizer step, steps counted from 1 (e.g. to advance a decay schedule).
    A NaN or infinite loss raises :class:`TrainingDivergedError` naming the step; the checkpoint file, if
    any, then still holds the last good weights. The model's train/eval mode is restored at the end.

    The learning rate follows ``cfg.schedule`` after ``cfg.warmup_steps`` (a ``LambdaLR``). With
    ``validation`` data, the model is scored (:func:`evaluate` with ``num_classes``, ``predict_fn``) every
    ``cfg.eval_every`` steps or every epoch; ``cfg.patience`` stops early, and ``cfg.keep_best`` leaves the
    best-scoring weights in the model. The test set is never seen here: score it once, afterwards.

    With ``cfg.state_path`` the full training state (see :mod:`lorakit.train_state`; ``stateful`` objects with
    ``state_dict``/``load_state_dict``, such as a ``DecaySchedule``, are included) is written every
    ``cfg.checkpoint_every`` steps; ``cfg.resume`` continues from it, giving the same weights as a run that
    was never stopped. In a process group of several ranks the model must be wrapped (DDP or FSDP2): each
    rank takes its slice of every global batch (:mod:`lorakit.batches`; the slices add up to the whole batch's
    loss when ``loss_fn`` is a mean over the batch's examples, not over a data-dependent subset of them), the
    logged loss is the global mean, a NaN on any rank stops every rank at the same step, and only rank 0 writes
    files and shows progress.
    """
    run = _Run(model, data, cfg, loss_fn=loss_fn, on_step=on_step, params=params, collate_fn=collate_fn,
               validation=validation, num_classes=num_classes, predict_fn=predict_fn, stateful=stateful)
    was_training = model.training
    start = time.perf_counter()
    model.train()
    try:
        with torch.random.fork_rng(devices=[]), run.bar:  # seeded dropout/noise; the caller's RNG is untouched
            torch.manual_seed(cfg.seed)
            if cfg.resume and cfg.state_path and Path(cfg.state_path).is_file():
                run.resume()
            while run.loop.history.steps < run.total_steps and not run.loop.history.stopped_early:
                step = run.one_step()
                at_checkpoint = step % cfg.checkpoint_every == 0 or step == run.total_steps
                if cfg.checkpoint and at_checkpoint:
                    run.save_checkpoint(step)
                if validation is not None and (step % run.eval_every == 0 or step == run.total_steps):
                    run.validate(step)
                if cfg.state_path and (at_checkpoint or run.loop.history.stopped_early):
                    run.save_state(step)
        run.finish()
    finally:
        model.train(was_training)
        run.loop.history.seconds += time.perf_counter() - start
    return run.loop.history


class _Run:
    """One call of :func:`train`: set up, resume, one step, validate, save state, finish."""

    def __init__(self, model: nn.Module, data, cfg: TrainConfig, *, loss_fn, on_step, params, collate_fn,
                 validation, num_classes, predict_fn, stateful) -> None:
        """Set up: the data order, optimizer, scheduler, trained tensors and their fingerprint, progress bar."""
        self.model, self.cfg, self.on_step = model, cfg, on_step
        self.loss_fn = loss_fn or classification_loss
        self.params = list(params) if params is not None else [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("nothing to train: no parameter has requires_grad=True")
        self.dataset = _as_dataset(data)
        self.rank, self.world = rank_and_world(model)
        self.order = BatchOrder(len(self.dataset), cfg.batch_size, cfg.seed, cfg.shuffle, self.rank, self.world)
        self.collate_fn = collate_fn
        self.total_steps = cfg.total_steps(self.order.batches_per_epoch)
        self.optimizer = _make_optimizer(self.params, cfg)
        self.scheduler = make_scheduler(self.optimizer, cfg, self.total_steps)
        self.validation, self.num_classes, self.predict_fn = validation, num_classes, predict_fn
        self.eval_every = cfg.eval_every or self.order.batches_per_epoch
        self.stateful = dict(stateful or {})
        self.tensors = trained_tensors(model, self.params)
        self.stamp = fingerprint(cfg, self.tensors)
        self.device = _device_of(model)
        self.loop = LoopState()
        self.bar = tqdm(total=self.total_steps, unit="step", desc="train", dynamic_ncols=True,
                        disable=self.rank != 0 or (None if cfg.progress is None else not cfg.progress))

    def resume(self) -> None:
        """Continue from ``cfg.state_path``: tensors, optimizer, scheduler, data position, RNG, stateful objects."""
        saved = load_state(self.cfg.state_path, self.stamp, self.model, self.optimizer, self.tensors)
        self.scheduler.load_state_dict(saved["scheduler"])
        self.order.load_state_dict(saved["order"])
        set_rng_state(saved["rng"][self.rank], self.device)
        for key, obj in self.stateful.items():
            obj.load_state_dict(saved["stateful"][key])
        self.loop = LoopState.from_saved(saved)
        self.bar.update(self.loop.history.steps)

    def one_step(self) -> int:
        """One optimizer step on the next global batch, logged; returns the step's number (from 1)."""
        cfg, loop = self.cfg, self.loop
        batch = self.order.next_batch()
        examples = (self.collate_fn or default_collate)(_fetch(self.dataset, batch.indices))
        loss = self.loss_fn(self.model, _to_device(examples, self.device))
        value = global_mean(loss.detach(), batch.weight, self.world)
        step = loop.history.steps + 1
        if not math.isfinite(value):
            raise _diverged(step, value, cfg.checkpoint, loop.last_checkpoint)
        self.optimizer.zero_grad(set_to_none=True)
        (loss if batch.weight == 1.0 else loss * batch.weight).backward()
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        if self.on_step is not None:
            self.on_step(step)

        loop.loss_sum += value
        loop.window.append(value)
        loop.history.steps, loop.history.average_loss = step, loop.loss_sum / step
        if len(loop.window) == cfg.log_every or step == self.total_steps:
            loop.history.loss_steps.append(step)
            loop.history.losses.append(sum(loop.window) / len(loop.window))
            self.bar.set_postfix(loss=f"{loop.history.losses[-1]:.4f}", refresh=False)
            loop.window = []
        self.bar.update(1)
        return step

    def save_checkpoint(self, step: int) -> None:
        if self.rank == 0:
            _save_checkpoint(self.model, self.cfg.checkpoint, step)
        self.loop.last_checkpoint = step

    def validate(self, step: int) -> None:
        """Score the validation data; keep the best weights, count evaluations without progress."""
        history, loop = self.loop.history, self.loop
        score = evaluate(self.model, self.validation, self.num_classes, predict_fn=self.predict_fn,
                         collate_fn=self.collate_fn).accuracy  # evaluate() restores train mode
        history.val_steps.append(step)
        history.val_accuracies.append(score)
        if history.best_val_accuracy is None or score > history.best_val_accuracy:
            history.best_step, history.best_val_accuracy, loop.stale = step, score, 0
            loop.best = {n: t.detach().clone() for n, t in self.tensors.items()} if self.cfg.keep_best else None
        else:
            loop.stale += 1
        history.stopped_early = self.cfg.patience is not None and loop.stale >= self.cfg.patience

    def save_state(self, step: int) -> None:
        entries = {"fingerprint": self.stamp, "scheduler": self.scheduler.state_dict(),
                   "order": self.order.state_dict(),
                   "rng": gathered(rng_state(self.device), self.world),  # every rank's: dropout streams may differ
                   **self.loop.saved_entries(),
                   "stateful": {key: obj.state_dict() for key, obj in self.stateful.items()}}
        self.loop.shard_folder = save_state(self.cfg.state_path, entries, self.model, self.optimizer, self.tensors,
                                            self.loop.best, step, self.rank, self.world, self.loop.shard_folder)

    def finish(self) -> None:
        """Put back the best validation weights, if kept."""
        if self.loop.best is None:
            return
        if is_sharded(self.tensors):
            reshard(self.model)  # so that the next forward gathers the restored weights
        with torch.no_grad():
            for name, tensor in self.tensors.items():
                tensor.copy_(self.loop.best[name])


def _fetch(dataset: Dataset, indices: list[int]) -> list:
    """The examples at ``indices``, as a DataLoader fetches them (``__getitems__`` when the data set has it)."""
    getitems = getattr(dataset, "__getitems__", None)
    return getitems(indices) if callable(getitems) else [dataset[i] for i in indices]


def _diverged(step: int, loss: float, checkpoint: str | None, last_checkpoint: int | None) -> TrainingDivergedError:
    where = (f"{checkpoint} holds the last good weights (step {last_checkpoint})" if last_checkpoint is not None
             else "no checkpoint had been written yet")
    return TrainingDivergedError(f"training diverged at step {step}: loss is {loss}; {where}", step)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: Dataset | tuple[torch.Tensor, torch.Tensor],
    num_classes: int = 10,
    batch_size: int = 1000,
    *,
    predict_fn: PredictFn | None = None,
    collate_fn: Callable | None = None,
) -> EvalResult:
    """Accuracy and per-class wrong/total counts of ``model`` on ``data``, in eval mode without gradients.

    ``predict_fn(model, batch) -> (predicted classes, labels)`` defaults to :func:`classify` (argmax of the
    logits). The model's previous train/eval mode is restored afterwards.
    """
    predict_fn = predict_fn or classify
    loader = DataLoader(_as_dataset(data), batch_size=batch_size, shuffle=False, collate_fn=collate_fn)
    device = _device_of(model)
    wrong = torch.zeros(num_classes, dtype=torch.long)
    total = torch.zeros(num_classes, dtype=torch.long)
    was_training = model.training
    model.eval()
    try:
        for batch in loader:
            predicted, labels = predict_fn(model, _to_device(batch, device))
            predicted, labels = predicted.reshape(-1).cpu(), labels.reshape(-1).cpu().long()
            if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
                raise ValueError(f"labels must lie in 0..{num_classes - 1}, got {labels.min()}..{labels.max()}")
            total += torch.bincount(labels, minlength=num_classes)
            wrong += torch.bincount(labels[predicted != labels], minlength=num_classes)
    finally:
        model.train(was_training)
    return EvalResult.from_counts(wrong.tolist(), total.tolist())
