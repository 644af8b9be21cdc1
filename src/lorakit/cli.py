"""The ``lorakit`` command: ``lorakit run <experiment> [options]``, ``params``, ``finetune`` and ``generate``.

Each experiment, and each other command, is a module in ``lorakit.experiments`` with ``DESCRIPTION``,
``add_arguments(parser)`` and ``main(args) -> int``; heavy libraries (transformers) are imported only when a
command runs, so ``--help`` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from . import parallel

EXPERIMENTS = {
    "digit-finetune": "lorakit.experiments.digit_finetune",
    "digit-stream": "lorakit.experiments.digit_stream",
    "svd-demo": "lorakit.experiments.svd_demo",
    "clora-table": "lorakit.experiments.clora_table",
    "clora-conv": "lorakit.experiments.clora_conv",
    "clora-transformer": "lorakit.experiments.clora_transformer",
    "peft-compare": "lorakit.experiments.peft_compare",
    "llm-compare": "lorakit.experiments.llm_compare",
}
COMMANDS = {
    "params": "lorakit.experiments.params_command",
    "finetune": "lorakit.experiments.finetune",
    "generate": "lorakit.experiments.generate",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorakit", description="Low-rank adaptation and compression for PyTorch.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run an experiment and write results.json, report.md and figures")
    experiments = run.add_subparsers(dest="experiment", required=True, metavar="EXPERIMENT")
    for name, module_name in EXPERIMENTS.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            experiments.add_parser(name, help=f"(unavailable: {err})")
            continue
        sub = experiments.add_parser(name, help=module.DESCRIPTION, description=module.DESCRIPTION,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        module.add_arguments(sub)
        sub.set_defaults(handler=module.main)
    for name, module_name in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            commands.add_parser(name, help=f"(unavailable: {err})").set_defaults(
                handler=lambda args, name=name, err=err: _unavailable(name, err))
            continue
        sub = commands.add_parser(name, help=module.DESCRIPTION, description=module.DESCRIPTION,
                                  formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        module.add_arguments(sub)
        sub.set_defaults(handler=module.main)
    return parser


def _unavailable(name: str, err: Exception) -> int:
    print(f"lorakit {name} is unavailable: {err}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.error(f"experiment {args.experiment!r} is unavailable in this installation")
    try:
        if hasattr(args, "parallel"):  # joins torchrun's process group, or refuses before any work
            parallel.start(args.parallel)
        return int(handler(args) or 0)
    except (ValueError, TypeError, KeyError, OSError, RuntimeError, ImportError) as err:
        print(f"lorakit: error: {err}", file=sys.stderr)
        return 1
    finally:
        parallel.stop()


if __name__ == "__main__":
    sys.exit(main())
