"""What every experiment shares when it runs: the command (flags -> config -> run), the parsing of list flags, the
store of finished cells, the check that a saved cell or table was made the same way, the cache of dense and
pre-trained models, and the hooks that make a C-LoRA run resumable."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import typing
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional

import torch
from torch import nn

import lorakit as lk
from .. import parallel
from .._io import load_tensors, save_tensors, write_json
from ..train_state import discard_state
from . import config_from_args, output_dir


# -- the command ----------------------------------------------------------------------------------------
def add_out_argument(parser: argparse.ArgumentParser, experiment: str) -> None:
    """``--out DIR``: where :func:`run_experiment` writes (default ``runs/<experiment>-<time>``)."""
    parser.add_argument("--out", default=None, help=f"output folder (default: runs/{experiment}-<time>)")


def comma_list(kind: type) -> Callable[[str], list]:
    """argparse type: ``"a,b,c"`` -> ``[kind(a), kind(b), kind(c)]``; a bad item is an error naming the list."""
    def parse(text: str) -> list:
        try:
            return [kind(item) for item in text.split(",") if item.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}, got {text!r}")
    return parse


def flag(default: Any = None, help: Optional[str] = None, **argparse_options: Any) -> Any:
    """A config field that :func:`add_config_flags` turns into a flag with this ``help`` text and these argparse
    options (``choices=...``, ``action="append"``), as transformers' ``HfArgumentParser`` reads ``metadata``."""
    metadata = {"help": help, **argparse_options}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def add_config_flags(parser: argparse.ArgumentParser, defaults: Any, *names: str,
                     help: Optional[Mapping[str, str]] = None) -> None:
    """One flag per named field of the config dataclass ``defaults`` (``--batch-size`` for ``batch_size``; no names:
    every field), in the order given, with the field's value there as its default and its type from the
    annotation: a number or a string takes one value (``Optional[...]``: the same, default None), a list a
    comma-separated one, a bool that defaults to False is a switch and one that defaults to True also takes
    ``--no-<name>``, and a dict of strings (e.g. a learning-rate grid per method) one flag per key,
    ``--<name>-<key>``, whose help is the field's with ``{}`` filled by the key. The help text is ``help[name]`` or
    the field's :func:`flag` help; its other options override."""
    hints = typing.get_type_hints(type(defaults))
    fields = {f.name: f for f in dataclasses.fields(defaults)}
    for name in names or list(fields):
        if name not in fields:
            raise ValueError(f"{type(defaults).__name__} has no field {name!r}")
        kind, default = hints[name], getattr(defaults, name)
        options: dict[str, Any] = {"default": default, **fields[name].metadata}
        if help and name in help:
            options["help"] = help[name]
        if options.get("help") is None:
            options.pop("help", None)
        if typing.get_origin(kind) is dict:
            for key, value in default.items():
                parser.add_argument(f"--{name}-{key}".replace("_", "-"), default=value,
                                    help=options.get("help", "").format(key))
            continue
        if "action" not in options:  # an action (e.g. "append") parses the values itself
            options.update(_parsing(kind, default))
        parser.add_argument("--" + name.replace("_", "-"), **options)


def _parsing(kind: Any, default: Any) -> dict[str, Any]:
    """The argparse ``type`` or ``action`` of a field annotated ``kind``."""
    if kind is bool:
        return {"action": argparse.BooleanOptionalAction if default else "store_true"}
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if typing.get_origin(kind) is list:
        return {"type": comma_list(args[0])}
    if kind is str:
        return {}
    return {"type": args[0] if args else kind}  # Optional[int] -> int


def run_experiment(args: argparse.Namespace, config_class: type, experiment: str,
                   run: Callable[[Any, Path], dict], wrote: str) -> int:
    """``main(args)`` of an experiment whose run succeeds once it finishes: its config from the flags, ``run(cfg,
    out)`` into ``--out``, then (on rank 0) a line naming what it ``wrote`` there. Returns the exit code, 0."""
    cfg = config_from_args(config_class, args)
    out = output_dir(args.out, experiment)
    run(cfg, out)
    if parallel.is_main():
        print(f"wrote {out}/{wrote}")
    return 0


def start_hf_run(args: argparse.Namespace, config_class: type, experiment: str) -> tuple[Any, Path]:
    """The config from the flags and the output folder of an experiment on Hugging Face models: offline (no hub
    access unless ``HF_HUB_OFFLINE`` says otherwise), with the config's torch ``threads``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = config_from_args(config_class, args)
    torch.set_num_threads(cfg.threads)
    return cfg, output_dir(cfg.out, experiment)


def parse_names(text: str, known: Iterable[str], what: str) -> list[str]:
    """``"a,b"`` -> ``["a", "b"]``, each one of ``known``; a ValueError names the unknown ones (``what``: "methods")."""
    known = list(known)
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = sorted(set(names) - set(known))
    if unknown or not names:
        raise ValueError(f"unknown or no {what} {unknown}; choose from {', '.join(known)}")
    return names


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``: the seeds of ``--seeds``, at least one, each an integer, none twice."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError as err:
        raise ValueError(f"--seeds must be comma-separated integers, got {text!r}") from err
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds needs at least one seed and none twice, got {text!r}")
    return seeds


def parse_rates(text: str, method: str) -> list[float]:
    """``"1e-3,3e-3"`` -> ``[0.001, 0.003]``: the learning rates of ``--lr-<method>``, each positive."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise ValueError(f"--lr-{method} must be comma-separated numbers, got {text!r}") from err
    if not values or any(v <= 0 for v in values):
        raise ValueError(f"--lr-{method} needs positive learning rates, got {text!r}")
    return values


# -- resuming -------------------------------------------------------------------------------------------
def protocol_differences(saved: Mapping, expected: Mapping, defaults: Optional[Mapping] = None,
                         prefix: str = "") -> list[str]:
    """``"name=saved (now expected)"`` for every field of ``expected`` whose value in ``saved`` differs. A field
    that ``saved`` lacks counts as its ``defaults`` value (a field added since that file was written). Fields that
    are mappings on both sides are compared field by field, both ways (``settings.max_length=12 (now 10)``)."""
    defaults = defaults or {}
    differ = []
    for name, value in expected.items():
        old = saved.get(name, defaults.get(name))
        if isinstance(old, Mapping) and isinstance(value, Mapping):
            differ += protocol_differences(old, value, prefix=f"{prefix}{name}.")
            differ += [f"{prefix}{name}.{k}={v!r} (now absent)" for k, v in old.items() if k not in value]
        elif old != value:
            differ.append(f"{prefix}{name}={old!r} (now {value!r})")
    return differ


def check_same_protocol(path: Path, saved: Mapping, expected: Mapping, defaults: Optional[Mapping] = None) -> None:
    """A ValueError naming every field in which ``saved`` (read from ``path``) differs from ``expected``."""
    differ = protocol_differences(saved, json.loads(json.dumps(expected)), defaults)
    if differ:
        raise ValueError(f"{path} was made with other options: {', '.join(differ)}; pass the same options, or "
                         "choose another --out")


class CellStore:
    """The finished cells of a run, one JSON file a key (``<folder>/<key>.json``), each written atomically: a run
    killed at any moment leaves every cell whole or absent.

    With ``resume``, :meth:`load` reads a finished cell back instead of it being made again, once it is checked
    to have been made with this run's ``protocol`` (fields of the saved record, compared value by value); a cell
    made otherwise is an error that names the fields that differ.
    """

    def __init__(self, folder: Path, protocol: Mapping[str, Any], resume: bool) -> None:
        self.folder, self.protocol, self.resume = Path(folder), dict(protocol), resume

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.json"

    def load(self, key: str) -> Optional[dict]:
        """The saved record of ``key`` if resuming and there is one, else None."""
        path = self.path(key)
        if not self.resume or not path.is_file():
            return None
        record = json.loads(path.read_text())
        check_same_protocol(path, record, self.protocol)
        return record

    def save(self, key: str, record: dict, write: bool = True) -> dict:
        """Write ``record`` (which holds the protocol's fields) as the cell ``key``, where ``write`` (under torchrun:
        rank 0 alone); returns it as it reads back, so a run and its resumed twin see the same values."""
        if write:
            write_json(self.path(key), record)
        return json.loads(json.dumps(record))


# -- the model cache ------------------------------------------------------------------------------------
def cached_model(path: Path, model: nn.Module, fit: Callable[..., Any],
                 state_path: Optional[Path] = None, metadata: Optional[dict[str, str]] = None) -> float:
    """Load ``model``'s weights from ``path``, or train it and save them there; returns the seconds trained (0 when
    loaded). The one cache of dense and pre-trained models, for every experiment.

    ``fit(model, state_path=state_path)`` (e.g. a compression experiment's ``Fit``) trains ``model`` in place and
    returns its :class:`~lorakit.train.TrainHistory`; with ``state_path`` it saves its training state there, so a resumed run continues it, and the state is removed once
    the weights are saved. A file that does not load (stale or damaged) is trained again and overwritten, atomically.
    Under torchrun every rank trains and rank 0 writes."""
    path = Path(path)
    if path.is_file():
        try:
            model.load_state_dict(load_tensors(path))
            return 0.0
        except (ValueError, RuntimeError):
            pass
    history = fit(model, state_path=state_path)
    if parallel.is_main():
        save_tensors(path, model.state_dict(), metadata=metadata)
        if state_path is not None:
            discard_state(state_path)  # and its DCP folders (FSDP2)
    parallel.barrier()
    return history.seconds


# -- training -------------------------------------------------------------------------------------------
def clora_decay_hooks(model: nn.Module, total_steps: int) -> dict:
    """``train``'s ``on_step`` and ``stateful`` for a C-LoRA model: its :class:`lorakit.DecaySchedule` over
    ``total_steps``, advanced after every optimizer step and saved in the training state, so that a run resumed
    mid-way continues its decay where it stopped instead of starting again from d = 1.

    ``model`` is the one that trains (under FSDP2 a sharded twin): the schedule drives its C-LoRA layers."""
    schedule = lk.DecaySchedule(model, total_steps)
    return {"on_step": lambda step: schedule.step(), "stateful": {"decay": schedule}}
