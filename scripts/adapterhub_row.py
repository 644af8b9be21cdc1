"""AdapterHub's bottleneck adapter for ``lorakit run peft-compare``, run in its own environment (.venv-adapters).

AdapterHub's ``adapters`` pins transformers 4.57, so it cannot live beside lorakit's transformers 5; the
experiment runs this script with that environment's Python. It imports only torch, transformers, safetensors
and adapters (never lorakit), and does exactly what the job says, so both sides train alike:

    python scripts/adapterhub_row.py train  JOB.json RESULT.json   # one (seed, lr) cell: train, validate, test
    python scripts/adapterhub_row.py serve  JOB.json               # timing: reads "n" lines, prints seconds for n steps
    python scripts/adapterhub_row.py memory JOB.json               # prints {peak_memory_mb, training_memory_mb}

The job (JSON) gives the model folder, ``num_labels``, ``bottleneck``, ``threads``, ``seed``, ``pad_token_id``,
``head`` (a safetensors file with the initial ``classifier.weight``/``bias``, so the head starts as lorakit's),
token ids (``{"input_ids": [[...]], "labels": [...]}``, already truncated) and, for ``train``: ``batches`` (the
example indices of every step, in order), ``lr``, ``weight_decay``, ``lr_factors`` (the learning-rate factor of
every step), ``eval_steps`` (when to score the validation data), ``eval_batch_size``. For ``serve``/``memory``:
``batch`` and ``steps``.

The adapter is AdapterHub's ``SeqBnConfig`` (Pfeiffer et al. 2020: one bottleneck after each block's
feed-forward output) with ``reduction_factor = hidden_size / bottleneck``.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time
from importlib import metadata
from pathlib import Path

import torch

NAME = "bottleneck"


def build(job: dict):
    import adapters
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(job["seed"])
    model = AutoModelForSequenceClassification.from_pretrained(job["model"], num_labels=job["num_labels"],
                                                               local_files_only=True, use_safetensors=True)
    if job.get("head"):
        head = load_file(job["head"])
        with torch.no_grad():
            for name, tensor in model.classifier.named_parameters():
                tensor.copy_(head[f"classifier.{name}"])
    adapters.init(model)
    model.add_adapter(NAME, config=adapters.SeqBnConfig(reduction_factor=model.config.hidden_size / job["bottleneck"]))
    model.train_adapter(NAME)  # freezes the encoder; the adapter and the (static) classifier head train
    for p in model.classifier.parameters():
        p.requires_grad_(True)
    return model


def collate(data: dict, indices: list[int], pad_token_id: int) -> dict:
    """Right-padded (B, T) tensors, as a BERT tokenizer pads a batch of texts."""
    ids = [data["input_ids"][i] for i in indices]
    width = max(len(x) for x in ids)
    input_ids = torch.tensor([x + [pad_token_id] * (width - len(x)) for x in ids])
    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
    return {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(input_ids),
            "labels": torch.tensor([data["labels"][i] for i in indices])}


@torch.no_grad()
def evaluate(model, data: dict, job: dict) -> dict:
    was_training = model.training
    model.eval()
    wrong, total = [0] * job["num_labels"], [0] * job["num_labels"]
    size = job.get("eval_batch_size", 128)
    for start in range(0, len(data["labels"]), size):
        batch = collate(data, list(range(start, min(start + size, len(data["labels"])))), job["pad_token_id"])
        labels = batch.pop("labels")
        predicted = model(**batch).logits.argmax(dim=-1)
        for label, guess in zip(labels.tolist(), predicted.tolist()):
            total[label] += 1
            wrong[label] += int(guess != label)
    model.train(was_training)
    accuracy = 100.0 * (sum(total) - sum(wrong)) / sum(total)
    per_class = [100.0 * (t - w) / t if t else None for w, t in zip(wrong, total)]
    return {"accuracy": accuracy, "wrong_per_class": wrong, "total_per_class": total, "per_class_accuracy": per_class}


def checkpoint_bytes(model) -> int:
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as folder:
        model.save_adapter(folder, NAME, use_safetensors=True)
        save_file({f"classifier.{n}": t.detach().contiguous() for n, t in model.classifier.named_parameters()},
                  str(Path(folder) / "head.safetensors"))
        return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def train(job: dict) -> dict:
    model = build(job)
    params = [p for p in model.parameters() if p.requires_grad]
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    optimizer = torch.optim.AdamW(params, lr=job["lr"], weight_decay=job["weight_decay"], fused=True)
    factors = job["lr_factors"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: factors[min(step, len(factors) - 1)])
    eval_steps = set(job["eval_steps"])
    losses, val_steps, val_accuracies = [], [], []
    best_step, best_accuracy, best = None, None, None
    torch.manual_seed(job["seed"])  # dropout masks: as lorakit.train seeds the global RNG with the run's seed
    model.train()
    start = time.perf_counter()
    for step, indices in enumerate(job["batches"], 1):
        loss = model(**collate(job["train"], indices, job["pad_token_id"])).loss
        if not torch.isfinite(loss):
            raise RuntimeError(f"training diverged at step {step}: loss is {loss.item()}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if step in eval_steps:
            score = evaluate(model, job["validation"], job)["accuracy"]
            val_steps.append(step)
            val_accuracies.append(score)
            if best_accuracy is None or score > best_accuracy:
                best_step, best_accuracy = step, score
                best = {n: p.detach().clone() for n, p in trained.items()}
    seconds = time.perf_counter() - start
    if best is not None:
        with torch.no_grad():
            for n, p in trained.items():
                p.copy_(best[n])
    test = evaluate(model, job["test"], job)
    trainable = sum(p.numel() for p in params)
    return {**test, "losses": losses, "val_steps": val_steps, "val_accuracies": val_accuracies,
            "best_step": best_step, "best_val_accuracy": best_accuracy, "steps": len(losses),
            "train_seconds": seconds, "trainable_parameters": trainable, "total_parameters": total,
            "added_parameters": trainable, "checkpoint_bytes": checkpoint_bytes(model),
            "threads": torch.get_num_threads(), "versions": versions()}


def one_batch_model(job: dict):
    model = build(job)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    batch = collate(job["batch"], list(range(len(job["batch"]["labels"]))), job["pad_token_id"])

    def step() -> None:
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def serve(job: dict) -> None:
    """Timing: for each line "n" on stdin, run n training steps and print the seconds they took."""
    step = one_batch_model(job)
    print("ready", flush=True)
    for line in sys.stdin:
        n = int(line)
        start = time.perf_counter()
        for _ in range(n):
            step()
        print(time.perf_counter() - start, flush=True)


def memory(job: dict) -> dict:
    import gc

    step = one_batch_model(job)
    gc.collect()

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    before = rss()
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for _ in range(job["steps"]):
        step()
    done.set()
    sampler.join()
    peak[0] = max(peak[0], rss())
    return {"peak_memory_mb": peak[0] / 2**20, "training_memory_mb": (peak[0] - before) / 2**20}


def versions() -> dict:
    import adapters  # noqa: F401  (fails here, with its own message, when the environment is broken)

    return {name: metadata.version(name) for name in ("adapters", "transformers", "torch")}


def main(argv: list[str]) -> int:
    if argv[:1] == ["versions"]:  # the experiment's check that this environment works
        print(json.dumps(versions()))
        return 0
    if len(argv) < 2 or argv[0] not in ("train", "serve", "memory") or (argv[0] == "train" and len(argv) < 3):
        print(__doc__, file=sys.stderr)
        return 2
    job = json.loads(Path(argv[1]).read_text())
    torch.set_num_threads(job["threads"])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if argv[0] == "train":
        result = train(job)
        tmp = Path(argv[2]).with_suffix(".tmp")
        tmp.write_text(json.dumps(result))
        os.replace(tmp, argv[2])
    elif argv[0] == "serve":
        serve(job)
    else:
        print(json.dumps(memory(job)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
