"""One module per experiment: ``DESCRIPTION``, ``add_arguments(parser)``, ``main(args) -> int`` (see cli.py)."""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path


def config_from_args(config_class: type, args: argparse.Namespace):
    """The experiment's config dataclass from parsed flags (a flag maps 1:1 to a field)."""
    names = {f.name for f in dataclasses.fields(config_class)}
    return config_class(**{k: v for k, v in vars(args).items() if k in names})


def output_dir(out: str | None, experiment: str) -> Path:
    """``--out`` if given, else ``runs/<experiment>-<time>``."""
    return Path(out or f"runs/{experiment}-{time.strftime('%Y%m%d-%H%M%S')}")
