"""One module per experiment: ``DESCRIPTION``, ``add_arguments(parser)``, ``main(args) -> int`` (see cli.py)."""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path


def config_from_args(config_class: type, args: argparse.Namespace):
    """The experiment's config dataclass from parsed flags: a flag per field, or per key of a dict field
    (``--lr-lora`` -> ``lr["lora"]``, as :func:`.harness.add_config_flags` makes them)."""
    flags, values = vars(args), {}
    for f in dataclasses.fields(config_class):
        if f.name in flags:
            values[f.name] = flags[f.name]
        elif f.default_factory is not dataclasses.MISSING and isinstance(default := f.default_factory(), dict):
            values[f.name] = {key: flags.get(f"{f.name}_{key}", value) for key, value in default.items()}
    return config_class(**values)


def output_dir(out: str | None, experiment: str) -> Path:
    """``--out`` if given, else ``runs/<experiment>-<time>``."""
    return Path(out or f"runs/{experiment}-{time.strftime('%Y%m%d-%H%M%S')}")
