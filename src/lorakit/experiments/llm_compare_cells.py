"""One cell of llm-compare: a (method, implementation, seed, learning rate) trained, then scored by generation.

A lorakit cell is ``lorakit finetune`` itself (:func:`.finetune.run_finetune`) on the task's JSONL, writing its
adapter (``full``: its model) into ``<out>/cells/<key>/``. A PEFT cell starts from the same adapter: lorakit's
seeded initial adapter is saved in PEFT's layout and loaded by ``peft.PeftModel.from_pretrained``; it then trains
with the same loop, loss, batches, optimizer and schedule (:func:`.finetune.train_config`), so the two per-step
loss traces start from the same point. Each trained model is loaded back from its folder and scored on the
validation split when it takes part in choosing a rate, and on the test split when it makes a row of the table
(never while choosing a rate).

The record of a cell is ``<out>/cells/<key>.json`` (a :class:`~.harness.CellStore`), written after training and
again after each scoring; ``--resume`` reads it back, or continues the training from its saved state. A finished
record needs nothing else: the trained weights in ``<out>/cells/<key>/`` are only read while the cell is scored.
"""
from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .. import parallel
from . import finetune
from .harness import CellStore
from .llm_compare_task import score
from .peft_compare_measure import sample_peak_rss

ROWS = [("zero-shot", "base"), ("lora", "lorakit"), ("lora", "peft"), ("dora", "lorakit"), ("dora", "peft"),
        ("qlora", "lorakit"), ("qlora", "peft"), ("prompt", "lorakit"), ("prompt", "peft"), ("adapter", "lorakit"),
        ("full", "lorakit")]
LIBRARY = {"lora": "peft", "dora": "peft", "qlora": "peft", "prompt": "peft"}  # the library row each is paired with
CONTRASTS = [("dora", "lora")]  # lorakit rows compared seed by seed: does the variant beat its base method?
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_config.json", "model.safetensors", "config.json")


@dataclass
class Setup:
    """What every cell of a run shares."""

    cells: Path
    train_file: Path
    validation: object
    test: object
    settings: dict
    """model, steps, batch_size, max_length, rank, alpha, num_tokens, bottleneck, save_every (+ data sizes)."""
    resume: bool = False
    eval_batch_size: int = 16
    done: dict = field(default_factory=dict)

    @property
    def store(self) -> CellStore:
        return CellStore(self.cells, {"settings": self.settings}, self.resume)


def cell_key(method: str, implementation: str, seed: int, lr: float | None) -> str:
    return "zero-shot" if method == "zero-shot" else f"{method}-{implementation}-seed{seed}-lr{lr:g}"


def finetune_config(setup: Setup, method: str, seed: int, lr: float, out: Path) -> finetune.FinetuneConfig:
    s = setup.settings
    return finetune.FinetuneConfig(data=str(setup.train_file), out=str(out), model=s["model"], method=method,
                                   rank=s["rank"], alpha=s["alpha"], num_tokens=s["num_tokens"],
                                   bottleneck=s["bottleneck"], steps=s["steps"], lr=lr, batch_size=s["batch_size"],
                                   max_length=s["max_length"], seed=seed, save_every=s["save_every"],
                                   resume=setup.resume)


def _load(model: str, method: str):
    from ..models.llm import load_causal_lm

    return load_causal_lm(model, quantize="4bit" if method == "qlora" else None)


def train_lorakit(cfg: finetune.FinetuneConfig) -> dict:
    """``lorakit finetune`` with ``cfg``: the per-step losses, training time and trainable parameters."""
    results = finetune.run_finetune(cfg)
    return {"losses": results["losses"], "train_seconds": results["train_seconds"], "steps": results["steps"],
            "trainable_parameters": results["parameters"]["trainable"]}


def lorakit_start(cfg: finetune.FinetuneConfig):
    """``(model, tokenizer)``: the base with lorakit's seeded initial adapter for ``cfg``, as `lorakit finetune`
    draws it (``full``: every weight trainable)."""
    model, tokenizer = _load(cfg.model, cfg.method)
    finetune.prepare_model(model, cfg)
    return model, tokenizer


def peft_start(cfg: finetune.FinetuneConfig):
    """``(model, tokenizer)``: a PEFT model holding lorakit's initial adapter for ``cfg`` (saved in PEFT's layout,
    read back by PEFT), so that both rows start from the same point."""
    import peft
    from safetensors.torch import load_file

    from .. import save_adapter

    start, _ = lorakit_start(cfg)
    with tempfile.TemporaryDirectory() as initial:
        save_adapter(start, initial, is_main_process=True)
        del start
        base, tokenizer = _load(cfg.model, cfg.method)
        config = peft.PeftConfig.from_pretrained(initial)
        config.inference_mode = False  # PEFT loads a prompt only frozen; so: a fresh PEFT model, then its weights
        model = peft.get_peft_model(base, config)
        peft.set_peft_model_state_dict(model, load_file(Path(initial) / "adapter_model.safetensors"))
    return model, tokenizer


def train_peft(cfg: finetune.FinetuneConfig) -> dict:
    """PEFT's row from lorakit's initial adapter for ``cfg.seed``, trained by the same loop; saved in ``cfg.out``."""
    from ..data.chat import SFTCollator, SFTDataset, read_jsonl
    from ..train import train
    from ..train_state import discard_state

    model, tokenizer = peft_start(cfg)
    data = SFTDataset(read_jsonl(cfg.data), tokenizer, cfg.max_length)
    train_cfg = finetune.train_config(cfg)
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    history = train(model, data, train_cfg, loss_fn=finetune.causal_lm_loss,
                    collate_fn=SFTCollator(tokenizer.pad_token_id, cfg.padding_side))
    model.save_pretrained(cfg.out)
    discard_state(Path(train_cfg.state_path))
    return {"losses": history.losses, "train_seconds": history.seconds, "steps": history.steps,
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def load_trained(setup: Setup, method: str, implementation: str, folder: Path):
    """``(model, tokenizer)`` of a cell as it was saved (the zero-shot row: the base model)."""
    from .. import load_adapter
    from ..models.llm import load_causal_lm

    model_name = setup.settings["model"]
    if method == "zero-shot":
        return _load(model_name, method)
    if method == "full":
        return load_causal_lm(folder)
    base, tokenizer = _load(model_name, method)
    if implementation == "peft":
        import peft

        return peft.PeftModel.from_pretrained(base, folder).eval(), tokenizer
    return load_adapter(base, folder).eval(), tokenizer


def weights_bytes(folder: Path) -> int:
    """Bytes of what a user must keep for this row: the adapter (config and tensors), or the model."""
    return sum((folder / name).stat().st_size for name in WEIGHT_FILES if (folder / name).is_file())


def run_cell(setup: Setup, method: str, implementation: str, seed: int, lr: float | None, *, validate: bool = False,
             test: bool = False) -> dict:
    """Train (or read back) one cell, score it on validation when ``validate`` (choosing a rate) and on test when
    ``test`` (a row of the table); returns its record, saved after each of these steps."""
    key = cell_key(method, implementation, seed, lr)
    store = setup.store
    record = setup.done.get(key) or store.load(key)
    folder = setup.cells / key
    if record is None:
        print(f"[llm-compare] {key}", flush=True)
        record = {"key": key, "method": method, "implementation": implementation, "seed": seed, "lr": lr,
                  "settings": setup.settings}
        if method != "zero-shot":
            cfg = finetune_config(setup, method, seed, lr, folder)
            trainer = train_lorakit if implementation == "lorakit" else train_peft
            trained = {}
            record.update(sample_peak_rss(lambda: trained.update(trainer(cfg))))
            record.update(trained, weights_bytes=weights_bytes(folder),
                          step_seconds=trained["train_seconds"] / max(trained["steps"], 1))
        record = store.save(key, record, write=parallel.is_main())
    for split, data, wanted in (("validation", setup.validation, validate), ("test", setup.test, test)):
        if wanted and split not in record:
            record[split] = _score(setup, record, data, folder)
            record = store.save(key, record, write=parallel.is_main())
            print(f"[llm-compare] {key}: {split} {record[split]['accuracy']:.2f} %", flush=True)
    setup.done[key] = record
    return record


def _score(setup: Setup, record: dict, data, folder: Path) -> dict:
    """Score a cell's saved model: the zero-shot row is told the categories, and a soft prompt (which comes before
    the text) is run without the shared prefix (:func:`.llm_compare_task.generate_answers`)."""
    import time

    model, tokenizer = load_trained(setup, record["method"], record["implementation"], folder)
    started = time.perf_counter()
    result = score(model, tokenizer, data, setup.eval_batch_size, choices=record["method"] == "zero-shot",
                   share_prefix=record["method"] != "prompt")
    return {**result, "seconds": time.perf_counter() - started}


def release_weights(setup: Setup, record: dict) -> None:
    """Remove a full fine-tuning cell's model folder once it is no longer needed (its size stays recorded)."""
    if record["method"] == "full":
        shutil.rmtree(setup.cells / record["key"], ignore_errors=True)
