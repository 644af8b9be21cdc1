"""What clora-table, clora-conv and clora-transformer share: a dense model per seed, compressed per cell.

A *cell* is one (variant, init, rank, seed). From the dense model of its seed, each variant compresses the
target layers to rank r:

- C-LoRA ``wds`` (decay only), ``bias`` (+ C), ``noise`` (+ scheduled noise), ``noise+bias``, each with ``init``
  random (the seed's) or svd: inject, train with the decay schedule, then :func:`lorakit.compress`;
- ``svd`` (truncated, no training), ``svd+finetune`` and ``asvd+finetune`` (activation-aware), whose factors,
  biases and head then train with the same :class:`Fit` as C-LoRA when the experiment says so (equal budget).

Every finished cell is a row of ``results.json``, written as soon as it exists: ``variant``, ``init``, ``rank``,
``seed``, ``accuracy``, ``compression_ratio``, ``file_ratio`` and what the experiment adds. ``--resume`` skips the
rows already there, ``--merge`` joins rows of other processes made the same way (:func:`run_cells`), and a cell's
training state can be saved every few steps so a killed cell continues where it stopped (:class:`Fit`).
"""
from __future__ import annotations

import copy
import functools
import json
import math
import statistics
import tempfile
import time
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

import lorakit as lk
from .. import parallel
from .._io import save_tensors
from ..targets import find_targets
from ..train import TrainConfig, TrainHistory, train
from ..train_state import discard_state
from .harness import check_same_protocol, clora_decay_hooks, flag

CLORA_VARIANTS = {"wds": ("none", False), "bias": ("none", True), "noise": ("scheduled", False),
                  "noise+bias": ("scheduled", True)}  # variant -> (noise mode, bias C)
BASELINES = ("svd", "svd+finetune", "asvd+finetune")
ALL_VARIANTS = ("dense", *CLORA_VARIANTS, *BASELINES)
Key = tuple[str, Optional[str], Optional[int], int]  # (variant, init, rank, seed)


@dataclass
class CellsConfig:
    """The fields every compression table has; an experiment's config adds its own (and its defaults)."""

    variants: list[str] = field(default_factory=lambda: list(ALL_VARIANTS))
    """Methods to run: dense, wds, bias, noise, noise+bias, svd, svd+finetune, asvd+finetune."""
    inits: list[str] = field(default_factory=lambda: ["random", "svd"])
    """C-LoRA initialisations of B A: 'random' (the seed's) and/or 'svd'."""
    ranks: list[int] = field(default_factory=lambda: [16, 32, 64])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    epochs: float = 30.0
    """C-LoRA training epochs (and, where the experiment says so, the SVD fine-tunes')."""
    dense_epochs: float = 30.0
    """Dense (pre-)training epochs."""
    batch_size: int = 30
    lr: float = 1e-3
    """Learning rate of C-LoRA and of the SVD fine-tunes."""
    alpha: float = 32.0
    """C-LoRA scale numerator: s = alpha / rank (the seed: 32)."""
    decay_start: float = 0.05
    decay_end: float = 0.85
    noise: str = flag("scheduled", choices=["scheduled", "always"])
    """Noise mode of the noise variants: 'scheduled' (the seed's, off once d < 0.3) or 'always'."""
    calibration_size: int = 2048
    """Training examples used to calibrate asvd."""
    threads: int = 1
    """torch threads."""
    resume: bool = False
    """Skip (variant, init, rank, seed) rows already in OUT/results.json."""
    merge: list[str] = flag([], action="store", nargs="*", metavar="RESULTS_JSON")
    """results.json files of other runs (e.g. seeds run in parallel processes) whose rows join this table."""
    report_only: bool = False
    """Train nothing: rewrite results.json, report.md and the figure from OUT's rows and the merged ones."""
    parallel: str = flag("none", choices=["none", "ddp", "fsdp"], help=(
        "under torchrun: each process trains on its slice of every batch (DDP, or FSDP2 on a sharded twin of the "
        "model gathered back after training); rank 0 writes"))

    def __post_init__(self) -> None:
        unknown = [v for v in self.variants if v not in ALL_VARIANTS]
        if unknown:
            raise ValueError(f"unknown variants {unknown}; choose from {', '.join(ALL_VARIANTS)}")
        bad = [i for i in self.inits if i not in ("random", "svd")]
        if bad:
            raise ValueError(f"unknown inits {bad}; choose from random, svd")
        if self.noise not in ("scheduled", "always"):
            raise ValueError(f"noise must be 'scheduled' or 'always', got {self.noise!r}")
        if not self.ranks or any(not isinstance(r, int) or r < 1 for r in self.ranks):
            raise ValueError(f"ranks must be integers >= 1, got {self.ranks}")
        if not self.seeds:
            raise ValueError("give at least one seed (e.g. --seeds 0,1,2)")


# -- the table of rows ------------------------------------------------------------------------------
def planned_rows(cfg: CellsConfig) -> list[Key]:
    """(variant, init, rank, seed) in the order they run: per seed, dense first, then per rank."""
    rows: list[Key] = []
    for seed in cfg.seeds:
        if "dense" in cfg.variants:
            rows.append(("dense", None, None, seed))
        for rank in cfg.ranks:
            for variant in cfg.variants:
                if variant in BASELINES:
                    rows.append((variant, None, rank, seed))
                elif variant in CLORA_VARIANTS:
                    rows += [(variant, init, rank, seed) for init in cfg.inits]
    return rows


def row_key(row: dict) -> Key:
    return row["variant"], row["init"], row["rank"], row["seed"]


def run_cells(cfg: CellsConfig, out: Path, protocol: tuple[str, ...], make_row: Callable[[Key], dict],
              write: Callable[[Any, list[dict], float, list[dict], bool], dict]) -> dict:
    """Make every planned row not made yet, writing the table after each; returns ``write``'s last results.

    Rows come back from OUT/results.json (with ``resume`` or ``report_only``) and from every ``merge`` file, each
    checked to have the same ``protocol`` fields. ``make_row(key)`` computes one row; ``write(cfg, rows, seconds,
    made_by, final)`` writes results.json and report.md, and with ``final`` (once, at the end) the figure too.
    Wall time adds up over resumed and merged runs.
    """
    torch.set_num_threads(cfg.threads)
    if not parallel.is_main():  # under torchrun every rank computes every row; rank 0 alone writes them
        write = lambda *_args: {}
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    own = out / "results.json"
    sources = [own] if (cfg.resume or cfg.report_only) and own.is_file() else []
    prior_seconds, made_by = 0.0, []
    defaults = {f.name: f.default for f in fields(cfg) if f.default is not MISSING}  # fields added since: default
    for path in sources + [Path(p) for p in cfg.merge]:
        previous = json.loads(Path(path).read_text())
        # rows from another run join this table only if they were made the same way
        check_same_protocol(path, previous["config"], {k: getattr(cfg, k) for k in protocol}, defaults)
        known = {row_key(r) for r in rows}
        rows += [r for r in previous["rows"] if row_key(r) not in known]
        prior_seconds += previous.get("wall_seconds", 0.0)
        made_by += previous.get("made_by") or [{"results": str(path), "rows": len(previous["rows"]),
                                                "command": previous.get("metadata", {}).get("command"),
                                                "wall_seconds": previous.get("wall_seconds")}]
    start = time.perf_counter() - prior_seconds
    if cfg.report_only:
        merged = replace(cfg, seeds=sorted({r["seed"] for r in rows}),
                         ranks=sorted({r["rank"] for r in rows if r["rank"] is not None}))
        return write(merged, rows, prior_seconds, made_by, True)
    done = {row_key(r) for r in rows}
    for key in planned_rows(cfg):
        if key in done:
            continue
        row = make_row(key)
        rows.append(row)
        variant, init, rank, seed = key
        if parallel.is_main():
            print(f"{variant:>14} {init or '':>6} rank {rank or '':>3} seed {seed}: {row['accuracy']:.2f} % "
                  f"at {100 * row['compression_ratio']:.1f} % ({row['train_seconds']:.0f} s)", flush=True)
        write(cfg, rows, time.perf_counter() - start, made_by, False)
    return write(cfg, rows, time.perf_counter() - start, made_by, True)


# -- training a cell --------------------------------------------------------------------------------
@dataclass
class Fit:
    """How a cell trains: ``train(model, data, config, **options)`` (options such as ``collate_fn``).

    With a ``state_path`` the full training state is saved every ``config.checkpoint_every`` steps; ``resume``
    continues from it, so a cell killed half-way ends with the weights of one that was never stopped.
    """

    data: Any
    config: TrainConfig
    options: dict = field(default_factory=dict)
    resume: bool = False
    parallel: str = "none"
    """'ddp' or 'fsdp' under torchrun: what the training loop sees (:func:`lorakit.parallel.training_copy`); the
    caller's model stays a plain module."""

    @property
    def steps(self) -> int:
        """Optimizer steps of one training run (what the decay schedule spans)."""
        size = len(self.data[0]) if isinstance(self.data, tuple) else len(self.data)
        return self.config.total_steps(math.ceil(size / self.config.batch_size))

    def __call__(self, model: nn.Module, params: Optional[list] = None, hooks=None,
                 state_path: Optional[Path] = None) -> TrainHistory:
        """Train ``model`` in place (``params``: of ``model``, default what requires grad). ``hooks(trained)`` returns
        ``train``'s ``on_step``/``stateful`` for the model that trains: ``model``, or under FSDP2 its sharded twin,
        whose state comes back into ``model`` at the end (:func:`lorakit.parallel.training_copy`)."""
        cfg = self.config
        if state_path is not None:
            cfg = replace(cfg, state_path=str(state_path), resume=self.resume)
        with parallel.training_copy(model, self.parallel) as trained:
            if params is not None:
                params = parallel.same_parameters(params, model, trained)
            history = train(trained, self.data, cfg, params=params, **(hooks(trained) if hooks else {}),
                            **self.options)
        if state_path is not None and parallel.is_main():
            discard_state(state_path)  # the cell is done; its row is the record
        return history


def clora_cell(dense: nn.Module, clora: lk.CLoRAConfig, init_seed: int, fit: Fit,
               state_path: Optional[Path] = None) -> tuple[nn.Module, TrainHistory]:
    """A copy of ``dense`` with C-LoRA injected, trained over ``fit.steps`` with the decay schedule, compressed."""
    model = copy.deepcopy(dense)
    torch.manual_seed(init_seed)  # the random init of A
    lk.inject(model, clora)

    history = fit(model, hooks=functools.partial(clora_decay_hooks, total_steps=fit.steps), state_path=state_path)
    return lk.compress(model), history


def svd_cell(dense: nn.Module, variant: str, rank: int, targets: list[str], fit: Optional[Fit], head: list[str],
             calibration=None, state_path: Optional[Path] = None) -> tuple[nn.Module, float]:
    """A copy of ``dense`` with ``targets`` replaced by their rank-r SVD (``asvd``: whitened by ``calibration``);
    ``+finetune`` then trains the factors, biases and the ``head`` modules with ``fit``. Returns (model, seconds)."""
    model, tuned = copy.deepcopy(dense), variant.endswith("+finetune")
    seconds = [0.0]

    def finetune(m: nn.Module, params: list) -> None:
        trained = params + [p for name in head for p in m.get_submodule(name).parameters()]
        for p in m.parameters():  # backward only through what trains
            p.requires_grad_(False)
        for p in trained:
            p.requires_grad_(True)
        seconds[0] = fit(m, trained, state_path=state_path).seconds
    start = time.perf_counter()
    lk.svd_compress(model, rank=rank, targets=targets, calibration=calibration if variant.startswith("asvd") else None,
                    finetune=finetune if tuned else None)
    return model, (seconds[0] if tuned else time.perf_counter() - start)


def calibration_batches(inputs, size: int, seed: int, batch: int = 256, collate: Optional[Callable] = None) -> list:
    """``size`` training inputs drawn with ``seed``, in batches: what asvd's calibration runs the model on. A batch
    is ``(inputs[picked],)`` of a tensor, or ``collate([inputs[i] for i in picked])``."""
    pick = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(seed))[:size]
    batches = [pick[i:i + batch] for i in range(0, len(pick), batch)]
    return [collate([inputs[int(i)] for i in b]) if collate else (inputs[b],) for b in batches]


# -- measuring a compressed model -------------------------------------------------------------------
def compressible_targets(model: nn.Module, targets, rank: int) -> list[str]:
    """The paths ``targets`` selects whose weight (out, in * kh * kw) a rank-r factorisation makes smaller,
    ``r (in + out) < in * out``; the others stay dense (e.g. a 1-channel 3x3 input conv, 32 x 9, at r >= 7)."""
    def smaller(path: str) -> bool:
        out_features, in_features = model.get_submodule(path).weight.flatten(1).shape
        return rank * (in_features + out_features) < in_features * out_features

    return [path for path in find_targets(model, targets) if smaller(path)]


def parameter_count(model: nn.Module, paths: list[str]) -> int:
    """Parameters of the modules at ``paths`` (after compression: A + B + C of each low-rank layer)."""
    return sum(p.numel() for name in paths for p in model.get_submodule(name).parameters())


def file_size(model: nn.Module) -> int:
    """Bytes of ``model.state_dict()`` as a safetensors file."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        save_tensors(path, model.state_dict())
        return path.stat().st_size


@torch.no_grad()
def inference_ratio(dense: nn.Module, compressed: nn.Module, run: Callable[[nn.Module], Any], rounds: int) -> float:
    """Median seconds of ``run(compressed)`` / median of ``run(dense)``, in eval mode without gradients, after one
    warm-up each, timed alternately (dense, compressed, dense, ...) so that load changes on the machine hit both."""
    models = (dense, compressed)
    modes = [m.training for m in models]
    samples: list[list[float]] = [[], []]
    try:
        for m in models:
            m.eval()
        for m in models:  # warm-up
            run(m)
        for _ in range(rounds):
            for times, m in zip(samples, models):
                start = time.perf_counter()
                run(m)
                times.append(time.perf_counter() - start)
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)
    return statistics.median(samples[1]) / statistics.median(samples[0])
