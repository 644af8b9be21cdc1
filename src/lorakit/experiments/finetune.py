"""``lorakit finetune``: a causal language model and a JSONL file in, a trained adapter (or model) folder out.

    lorakit finetune --model smollm2 --data train.jsonl --eval eval.jsonl --method lora --steps 200 --out runs/ft

The data are TRL's chat or prompt/completion lines (:mod:`lorakit.data.chat`); the loss is on the answers only.
Methods: ``lora`` (every linear layer but the output head, by default), ``dora`` (DoRA on the same layers),
``qlora`` (LoRA on a 4-bit NF4 base), ``adapter`` (a bottleneck adapter after each block's MLP), ``prompt`` (a soft
prompt) and ``full`` (every weight).
Training is the one loop, :func:`lorakit.train.train` (progress bar, NaN stop, resumable state); the loss of a
batch is the mean over its examples of each example's mean loss per answer token, so the slices of a batch under
``torchrun ... --parallel ddp|fsdp`` add up to the whole batch's loss.

``--out`` receives the adapter in PEFT's layout (:func:`lorakit.save_adapter`; for ``full`` a Hugging Face model
folder), the tokenizer, ``results.json`` and ``loss.png``. While it trains the folder also holds the loop's state
(``train_state.pt``) and the run's settings (``finetune_state.json``); ``--resume`` continues from them exactly and
refuses other settings, naming the first that differs. The data are read and checked before anything is written.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import config_from_args
from .. import parallel
from ..data.chat import IGNORE, SFTCollator, SFTDataset, read_jsonl
from .params_command import method_config, parse_targets

DESCRIPTION = "fine-tune a causal LM on a JSONL file (chat or prompt/completion) and write the adapter"
METHODS = ("lora", "dora", "qlora", "prompt", "adapter", "full")
DEFAULT_LR = {"lora": 2e-4, "dora": 2e-4, "qlora": 2e-4, "adapter": 5e-4, "prompt": 3e-2, "full": 2e-5}
STATE_FILE, SETTINGS_FILE = "train_state.pt", "finetune_state.json"
FREE_FIELDS = ("out", "resume", "save_every")  # a resumed run may change these: they leave the numbers alone


@dataclass
class FinetuneConfig:
    """One fine-tuning run; every field is the command-line flag of the same name."""

    data: str
    """Training JSONL file."""
    out: str
    """Output folder."""
    model: str = "smollm2"
    """'smollm2' or a local causal-LM folder."""
    eval: str | None = None
    """JSONL file whose loss is reported (at the end, and every ``eval_every`` steps)."""
    method: str = "lora"
    """One of lora, dora, qlora, prompt, adapter, full."""
    rank: int = 8
    """LoRA rank."""
    alpha: float = 16.0
    """LoRA scale numerator (scale = alpha / rank)."""
    targets: str | None = None
    """Modules to adapt: comma-separated names or one regex; default all-linear (LoRA), mlp (adapters)."""
    num_tokens: int = 10
    """Soft prompt length."""
    bottleneck: int = 16
    """Adapter bottleneck width."""
    steps: int | None = None
    """Optimizer steps; default one pass over the data."""
    lr: float | None = None
    """Learning rate; default per method (DEFAULT_LR)."""
    batch_size: int = 8
    """Examples per optimizer step (over all processes)."""
    max_length: int = 512
    """Tokens kept per example (the rest is cut)."""
    seed: int = 0
    """Seeds the adapter's initial values, the data order and dropout."""
    eval_every: int | None = None
    """Also score --eval every this many steps."""
    padding_side: str = "right"
    """Where a batch is padded: right or left (positions count real tokens either way)."""
    save_every: int = 50
    """Write the resumable training state every this many steps."""
    parallel: str = "none"
    """none, or ddp / fsdp under torchrun."""
    resume: bool = False
    """Continue the run in --out from its last saved state."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {list(METHODS)}, got {self.method!r}")
        for name in ("rank", "num_tokens", "bottleneck", "batch_size", "max_length", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")

    @property
    def learning_rate(self) -> float:
        return DEFAULT_LR[self.method] if self.lr is None else self.lr


# -- the loss ------------------------------------------------------------------------------------
def example_losses(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Each example's mean next-token loss over its answer tokens, shape (B,).

    Token t's logits predict token t+1. A soft prompt puts its positions in front of the text, so only the last T
    positions of the logits (T the batch's length) are read.
    """
    labels = batch["labels"]  # (B, T)
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    logits = model(**inputs).logits[:, -labels.shape[1]:]  # (B, T, V)
    targets = labels[:, 1:]
    per_token = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets,
                                                  ignore_index=IGNORE, reduction="none")  # (B, T-1)
    counts = (targets != IGNORE).sum(dim=1)
    return per_token.sum(dim=1) / counts.clamp(min=1)


def causal_lm_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """The training loss of a batch: the mean of :func:`example_losses` (a mean over examples, as train() needs)."""
    return example_losses(model, batch).mean()


@torch.no_grad()
def mean_loss(model: torch.nn.Module, data: SFTDataset, collate: SFTCollator, batch_size: int) -> float:
    """The mean of :func:`example_losses` over ``data``, in eval mode (the model's mode is restored)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = 0.0
    try:
        for start in range(0, len(data), batch_size):
            batch = collate([data[i] for i in range(start, min(start + batch_size, len(data)))])
            total += example_losses(model, {k: v.to(device) for k, v in batch.items()}).sum().item()
    finally:
        model.train(was_training)
    return total / len(data)


class EvalLog:
    """The eval loss of ``model`` every ``every`` steps and at the last step; its ``state_dict`` goes into the
    training state, so a resumed run's log is the uninterrupted run's. ``model`` may be replaced by the one the
    training loop sees (wrapped or sharded), which every rank then scores alike."""

    def __init__(self, model: torch.nn.Module, data: SFTDataset | None, collate: SFTCollator, batch_size: int,
                 every: int | None, last_step: int) -> None:
        self.model, self.data, self.collate, self.batch_size = model, data, collate, batch_size
        self.every, self.last_step = every, last_step
        self.steps: list[int] = []
        self.losses: list[float] = []

    def record(self, step: int) -> None:
        if self.data is None:
            return
        loss = mean_loss(self.model, self.data, self.collate, self.batch_size)
        self.steps.append(step)
        self.losses.append(loss)
        if parallel.is_main():
            print(f"[finetune] step {step}: eval loss {loss:.4f}", flush=True)

    def on_step(self, step: int) -> None:
        if step == self.last_step or (self.every and step % self.every == 0):
            self.record(step)

    def state_dict(self) -> dict:
        return {"steps": list(self.steps), "losses": list(self.losses)}

    def load_state_dict(self, state: dict) -> None:
        self.steps, self.losses = list(state["steps"]), list(state["losses"])


# -- the run -------------------------------------------------------------------------------------
def _digest(path: str | None) -> str | None:
    return None if path is None else hashlib.sha256(Path(path).read_bytes()).hexdigest()


def run_settings(cfg: FinetuneConfig) -> dict:
    """What a resumed run must share with the run it continues: the config and the data files' contents."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in FREE_FIELDS}
    settings.update(data_sha256=_digest(cfg.data), eval_sha256=_digest(cfg.eval))
    return json.loads(json.dumps(settings))  # as it reads back from the file


def check_resume(cfg: FinetuneConfig, settings: dict) -> dict | None:
    """With ``--resume``: refuse a run in ``--out`` that had other settings, naming the first field that differs.

    Returns the finished run's results when ``--out`` holds one (nothing is left to do), else None.
    """
    out = Path(cfg.out)
    results = out / "results.json"
    if not cfg.resume:
        return None
    if (out / SETTINGS_FILE).is_file():
        saved, finished = json.loads((out / SETTINGS_FILE).read_text()), None
    elif results.is_file():
        finished = json.loads(results.read_text())
        saved = finished.get("settings", {})
    else:
        return None  # nothing to continue: start from the beginning
    for field in list(settings) + [k for k in saved if k not in settings]:
        if saved.get(field) != settings.get(field):
            raise ValueError(f"cannot resume the run in {out}: it was started with {field}={saved.get(field)!r}, "
                             f"this run has {field}={settings.get(field)!r}; resume with the same settings, or "
                             "start afresh without --resume")
    return finished


def prepare_model(model: torch.nn.Module, cfg: FinetuneConfig):
    """Make ``cfg.method`` trainable on ``model``: inject its adapter (seeded) or, for ``full``, every weight.
    Returns the adapter's config (None for ``full``)."""
    from .. import inject

    method = "lora" if cfg.method == "qlora" else cfg.method
    adapter = method_config(method, model, cfg.rank, cfg.bottleneck, cfg.num_tokens, parse_targets(cfg.targets),
                            task="causal-lm", alpha=cfg.alpha)
    if adapter is None:
        for p in model.parameters():
            p.requires_grad_(True)
        return None
    with torch.random.fork_rng(devices=[]):  # the adapter's initial values come from the seed alone
        torch.manual_seed(cfg.seed)
        inject(model, adapter)
    return adapter


def train_config(cfg: FinetuneConfig):
    """The training loop's settings for ``cfg``: AdamW, a constant rate, every step's loss logged, the resumable
    state in ``cfg.out``. (llm-compare trains its PEFT rows with these too.)"""
    from ..train import TrainConfig

    return TrainConfig(lr=cfg.learning_rate, batch_size=cfg.batch_size, steps=cfg.steps, seed=cfg.seed,
                       optimizer="adamw", log_every=1, checkpoint_every=cfg.save_every,
                       state_path=str(Path(cfg.out) / STATE_FILE), resume=cfg.resume)


def run_finetune(cfg: FinetuneConfig) -> dict:
    """Train as ``cfg`` says and write ``cfg.out`` (see the module docstring); returns the results."""
    from .. import count_parameters
    from .._io import write_json
    from ..models.llm import load_causal_lm
    from ..train import train

    started = time.perf_counter()
    settings = run_settings(cfg)
    finished = check_resume(cfg, settings)
    if finished is not None:
        if parallel.is_main():
            print(f"[finetune] {cfg.out} holds a finished run with these settings; nothing to do", flush=True)
        return finished
    train_examples = read_jsonl(cfg.data)
    eval_examples = read_jsonl(cfg.eval) if cfg.eval else None
    model, tokenizer = load_causal_lm(cfg.model, quantize="4bit" if cfg.method == "qlora" else None)
    train_set = SFTDataset(train_examples, tokenizer, cfg.max_length)
    eval_set = SFTDataset(eval_examples, tokenizer, cfg.max_length) if eval_examples else None
    adapter = prepare_model(model, cfg)
    collate = SFTCollator(tokenizer.pad_token_id, cfg.padding_side)
    out = Path(cfg.out)
    train_cfg = train_config(cfg)
    last_step = train_cfg.total_steps(-(-len(train_set) // cfg.batch_size))
    evaluation = EvalLog(model, eval_set, collate, cfg.batch_size, cfg.eval_every, last_step)
    evaluation.record(0)
    if parallel.is_main():
        write_json(out / SETTINGS_FILE, settings)
    parallel.barrier()
    with parallel.training_copy(model, cfg.parallel) as trained:  # afterwards every rank's plain model is trained
        evaluation.model = trained
        history = train(trained, train_set, train_cfg, loss_fn=causal_lm_loss, collate_fn=collate,
                        on_step=evaluation.on_step, stateful={"eval": evaluation})
    results = {
        "command": "finetune", "settings": settings, "train_config": asdict(train_cfg),
        "adapter_config": None if adapter is None else asdict(adapter),
        "examples": {"train": len(train_set), "eval": None if eval_set is None else len(eval_set)},
        "parameters": asdict(count_parameters(model)),
        "steps": history.steps, "loss_steps": history.loss_steps, "losses": history.losses,
        "average_loss": history.average_loss,
        "eval_steps": evaluation.steps, "eval_losses": evaluation.losses,
        "eval_loss": evaluation.losses[-1] if evaluation.losses else None,
        # the training loop's time over every continuation; this command's whole time (loading, writing too)
        "train_seconds": history.seconds, "wall_seconds": time.perf_counter() - started,
    }
    write_outputs(model, tokenizer, cfg, results)
    return results


def write_outputs(model: torch.nn.Module, tokenizer, cfg: FinetuneConfig, results: dict) -> None:
    """The adapter (or, for ``full``, the model), the tokenizer, the loss curve and results.json, which comes last;
    then the training state goes. Every rank calls this (the adapter's tensors may be sharded)."""
    from .. import save_adapter
    from ..report import line_plot, write_results
    from ..train_state import discard_state

    out = Path(cfg.out)
    if cfg.method != "full":
        save_adapter(model, out)
    if parallel.is_main():
        if cfg.method == "full":
            model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        series = {"train": (results["loss_steps"], results["losses"])}
        if results["eval_steps"]:
            series["eval"] = (results["eval_steps"], results["eval_losses"])
        line_plot(out / "loss.png", series, xlabel="step", ylabel="loss per answer token",
                  title=f"{cfg.method} on {Path(cfg.data).name}")
        write_results(out, results)
        discard_state(out / STATE_FILE)
        (out / SETTINGS_FILE).unlink(missing_ok=True)
        print(f"[finetune] wrote {out}", flush=True)
    parallel.barrier()


# -- the command ---------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = asdict(FinetuneConfig(data="", out=""))
    parser.add_argument("--model", default=defaults["model"], help="'smollm2' or a local causal-LM folder")
    parser.add_argument("--data", required=True, help="training JSONL: chat {'messages': [...]} or "
                                                      "{'prompt': ..., 'completion': ...} lines")
    parser.add_argument("--eval", default=None, help="JSONL whose loss is reported (same formats)")
    parser.add_argument("--method", choices=METHODS, default=defaults["method"])
    parser.add_argument("--rank", type=int, default=defaults["rank"], help="LoRA rank r")
    parser.add_argument("--alpha", type=float, default=defaults["alpha"], help="LoRA alpha (scale alpha/r)")
    parser.add_argument("--targets", default=None, help="modules to adapt: comma-separated names or one regex; "
                                                        "default all-linear for LoRA, mlp for adapters")
    parser.add_argument("--num-tokens", type=int, default=defaults["num_tokens"], help="soft prompt length")
    parser.add_argument("--bottleneck", type=int, default=defaults["bottleneck"], help="adapter bottleneck width")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: one pass over the data)")
    per_method = ", ".join(f"{method} {lr:g}" for method, lr in DEFAULT_LR.items())
    parser.add_argument("--lr", type=float, default=None, help=f"learning rate (default per method: {per_method})")
    parser.add_argument("--batch-size", type=int, default=defaults["batch_size"])
    parser.add_argument("--max-length", type=int, default=defaults["max_length"], help="tokens kept per example")
    parser.add_argument("--seed", type=int, default=defaults["seed"])
    parser.add_argument("--eval-every", type=int, default=None, help="also score --eval every N steps")
    parser.add_argument("--padding-side", choices=["right", "left"], default=defaults["padding_side"])
    parser.add_argument("--save-every", type=int, default=defaults["save_every"],
                        help="write the resumable training state every N steps")
    parser.add_argument("--parallel", choices=list(parallel.MODES), default="none",
                        help="ddp or fsdp under `torchrun --nproc_per_node N -m lorakit finetune ...`")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its saved state")


def main(args: argparse.Namespace) -> int:
    run_finetune(config_from_args(FinetuneConfig, args))
    return 0
