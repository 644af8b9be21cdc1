"""AdapterHub's row of peft-compare: its environment, its jobs, and reading its results back.

AdapterHub's ``adapters`` pins transformers 4.57, so it lives in its own virtual environment (``make adapters-env``
creates ``.venv-adapters`` and logs the installer's output to ``.venv-adapters.log``). The row runs
``scripts/adapterhub_row.py`` there as a subprocess, with a JSON job that fixes everything lorakit's side fixes:
the token ids of the same split, the classifier head's initial weights, the example indices of every step (from
the same :class:`~lorakit.batches.BatchOrder`), the learning rate and its factor at every step, and when to
validate. If the environment is missing or broken the row is not run, and the report quotes why (the installer's
log, or the error of importing ``adapters``); nothing is ever filled in for it.
"""
from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch

from .._io import save_tensors
from ..batches import BatchOrder
from ..data.text import TextDataset
from ..models.hf import model_folder
from ..optim import LRMultiplier
from .text_task import pretrained_classifier

SCRIPT = Path(__file__).resolve().parents[3] / "scripts" / "adapterhub_row.py"


@dataclass
class AdapterHubEnv:
    """Where AdapterHub's environment is, and whether it works (``reason`` says why not)."""

    python: Path | None
    versions: dict | None
    reason: str | None

    @property
    def ready(self) -> bool:
        return self.python is not None and self.reason is None


def _tail(text: str, lines: int = 12) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def find_env(env: str | os.PathLike) -> AdapterHubEnv:
    """Check ``env`` (a virtual environment folder): its Python must import ``adapters`` and run the script."""
    env = Path(env)
    python = env / "bin" / "python"
    log = env.with_name(env.name + ".log")
    if not SCRIPT.is_file():
        return AdapterHubEnv(None, None, f"the job script {SCRIPT} is missing (run from a source checkout of lorakit)")
    if not python.exists():
        if log.is_file() and log.read_text(errors="replace").strip():
            return AdapterHubEnv(None, None, f"installing AdapterHub's environment failed; the end of {log}:\n"
                                 + _tail(log.read_text(errors="replace")))
        return AdapterHubEnv(None, None, f"no environment at {env} (create it with `make adapters-env`)")
    try:
        done = subprocess.run([str(python), str(SCRIPT), "versions"], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as err:
        return AdapterHubEnv(None, None, f"{python} could not run: {err}")
    if done.returncode != 0:
        return AdapterHubEnv(None, None, f"{python} cannot run AdapterHub:\n{_tail(done.stderr)}")
    return AdapterHubEnv(python, json.loads(done.stdout.strip().splitlines()[-1]), None)


def token_ids(tokenizer, data, max_length: int) -> dict:
    """``{"input_ids": [[...]], "labels": [...]}``, each text tokenized alone and truncated as the collator does."""
    encoded = tokenizer(list(data.texts), truncation=True, max_length=max_length)
    return {"input_ids": [list(ids) for ids in encoded["input_ids"]], "labels": list(data.labels)}


def batch_plan(num_examples: int, cfg) -> tuple[list[list[int]], list[int], list[float]]:
    """What ``lorakit.train`` does for ``cfg`` (a TrainConfig), written out: the example indices of every step,
    the steps at which it validates (every epoch and the last step), and the learning-rate factor of every step."""
    order = BatchOrder(num_examples, cfg.batch_size, cfg.seed, cfg.shuffle)
    steps = cfg.total_steps(order.batches_per_epoch)
    batches = [order.next_batch().indices for _ in range(steps)]
    every = cfg.eval_every or order.batches_per_epoch
    eval_steps = [s for s in range(1, steps + 1) if s % every == 0 or s == steps]
    multiplier = LRMultiplier(cfg.schedule, cfg.warmup_steps, steps)
    return batches, eval_steps, [multiplier(s) for s in range(steps + 1)]


def save_initial_head(settings: dict, seed: int, path: Path) -> Path:
    """The classifier head lorakit's rows start from for ``seed``, as safetensors for the job."""
    model, _ = pretrained_classifier(settings["model"], settings["num_labels"], seed)
    save_tensors(path, {f"classifier.{n}": t.detach() for n, t in model.classifier.named_parameters()})
    return path


def common_job(settings: dict, tokenizer, threads: int, seed: int, head: Path) -> dict:
    """The fields every job has; ``model`` as a folder (the other environment's Python cannot resolve 'minilm')."""
    return {"model": str(model_folder(settings["model"]).resolve()), "num_labels": settings["num_labels"],
            "bottleneck": settings["bottleneck"], "threads": threads, "seed": seed,
            "pad_token_id": tokenizer.pad_token_id or 0, "head": str(head)}


def run_cell(env: AdapterHubEnv, job: dict, folder: Path, key: str) -> dict:
    """Train one (seed, lr) cell in AdapterHub's environment; its result as written by the script."""
    job_path, result_path = folder / f"{key}.job.json", folder / f"{key}.result.json"
    job_path.write_text(json.dumps(job))
    done = subprocess.run([str(env.python), str(SCRIPT), "train", str(job_path), str(result_path)],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"AdapterHub's training subprocess failed:\n{_tail(done.stderr, 20)}")
    result = json.loads(result_path.read_text())
    job_path.unlink()
    result_path.unlink()
    return result


class StepServer:
    """AdapterHub's model kept in its process for the interleaved timing: ``server(n)`` runs n steps there and
    returns the seconds that process measured (only one side runs at a time: this process waits)."""

    def __init__(self, env: AdapterHubEnv, job: dict, folder: Path) -> None:
        self.job_path = folder / "adapterhub-timing.job.json"
        self.job_path.write_text(json.dumps(job))
        self.process = subprocess.Popen([str(env.python), str(SCRIPT), "serve", str(self.job_path)], text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if self.process.stdout.readline().strip() != "ready":
            self.close()
            raise RuntimeError("AdapterHub's timing process did not start")

    def __call__(self, steps: int) -> float:
        self.process.stdin.write(f"{steps}\n")
        self.process.stdin.flush()
        return float(self.process.stdout.readline())

    def close(self) -> None:
        if self.process.stdin:
            self.process.stdin.close()
        self.process.wait(timeout=60)
        self.job_path.unlink(missing_ok=True)


def measure_memory(env: AdapterHubEnv, job: dict, folder: Path) -> dict:
    path = folder / "adapterhub-memory.job.json"
    path.write_text(json.dumps(job))
    done = subprocess.run([str(env.python), str(SCRIPT), "memory", str(path)], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    path.unlink()
    if done.returncode != 0:
        raise RuntimeError(f"AdapterHub's memory probe failed:\n{_tail(done.stderr)}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def batch_job(common: dict, tokenizer, texts, labels, max_length: int, steps: int = 0) -> dict:
    batch = token_ids(tokenizer, TextDataset(list(texts), list(labels), []), max_length)
    return {**common, "batch": batch, "steps": steps, "threads": torch.get_num_threads()}
