"""``lorakit run peft-compare``: full fine-tuning, LoRA, bottleneck adapters and soft prompts on a pretrained
transformer, each written by lorakit and, where a library offers it, by that library (PEFT), side by side.

Every (method, implementation) row starts from the same pretrained weights and the same classifier head
(seeded), sees the same data in the same order and trains for the same number of steps with the same
hyperparameters. Three measurements, each in its own phase so they do not disturb one another:

1. **accuracy**: train, then test accuracy (percent), trainable/total parameters, checkpoint bytes;
2. **step time**: all rows built at once, then timed in interleaved rounds (A B C ... / B C ... A / ...) on one
   fixed batch; a row's ratio is the median over rounds of (its time / lorakit-LoRA's time in that round);
3. **peak memory**: each row in a fresh subprocess; a thread samples the resident set size (RSS, from
   ``/proc/self/statm``) every millisecond during a few training steps; ``peak_memory_mb`` is the highest RSS,
   ``training_memory_mb`` its increase over the RSS just before the first step (gradients, optimizer state,
   activations; the model itself is in both).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from . import output_dir

DESCRIPTION = ("full fine-tuning, LoRA, bottleneck adapters and soft prompts (+ C-LoRA) on a pretrained "
               "transformer, lorakit beside PEFT: accuracy, parameters, checkpoint size, step time, memory")
ROWS = [("full", "lorakit"), ("lora", "lorakit"), ("lora", "peft"), ("adapter", "lorakit"),
        ("prompt", "lorakit"), ("prompt", "peft"), ("clora", "lorakit")]
# Seed 004 (T5-small on IMDB, 10 epochs, best validation accuracy): hand-written and library numbers.
SEED_004 = {"full": (90.0, None, None), "prompt": (86.8, 87.1, "OpenDelta"), "adapter": (90.6, 90.3, "AdapterHub"),
            "lora": (88.9, 89.0, "PEFT"), "clora": (None, None, None)}
SEED_004_PARAMS = {"full": 60_506_624, "prompt": 5_120, "adapter": 104_544, "lora": 294_912}
BERT_TARGETS = {"lora": ["query", "value"], "adapter": r".*\.layer\.\d+\.output\.dense",
                "clora": ["query", "key", "value", "attention.output.dense"]}
HEAD = ["classifier"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="minilm", help="'minilm' or a Hugging Face model folder (BERT-like)")
    parser.add_argument("--dataset", default="wordnet-supersense",
                        help="'wordnet-supersense' or a .csv/.jsonl file with text,label columns (split 75/25)")
    parser.add_argument("--per-class-train", type=int, default=150, help="WordNet: training glosses per class")
    parser.add_argument("--per-class-test", type=int, default=50, help="WordNet: test glosses per class")
    parser.add_argument("--methods", default="full,lora,adapter,prompt,clora",
                        help="comma-separated subset of full,lora,adapter,prompt,clora")
    parser.add_argument("--implementations", default="lorakit,peft", help="comma-separated subset of lorakit,peft")
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds")
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=48, help="tokens per text (truncated)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (alpha = 2 x rank), on query and value")
    parser.add_argument("--clora-rank", type=int, default=16, help="C-LoRA rank on Q, K, V and O")
    parser.add_argument("--bottleneck", type=int, default=8, help="adapter size, after each block's FFN output")
    parser.add_argument("--num-tokens", type=int, default=10, help="soft prompt length")
    parser.add_argument("--lr-full", type=float, default=1e-4)
    parser.add_argument("--lr-lora", type=float, default=2e-3)
    parser.add_argument("--lr-adapter", type=float, default=2e-3)
    parser.add_argument("--lr-prompt", type=float, default=1e-2)
    parser.add_argument("--lr-clora", type=float, default=2e-3)
    parser.add_argument("--timing-rounds", type=int, default=6, help="interleaved rounds of the step-time phase")
    parser.add_argument("--timing-steps", type=int, default=2, help="training steps per row per round")
    parser.add_argument("--memory-steps", type=int, default=3, help="training steps per row in the memory phase")
    parser.add_argument("--skip-training", action="store_true",
                        help="only the step-time and memory phases (results.json only; see --combine)")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--combine", default=None,
                        help="comma-separated run folders of this experiment (e.g. rows trained in parallel "
                             "processes, and one --skip-training run): merge their rows into --out and report")
    parser.add_argument("--note", action="append", default=[], help="a line for the report's notes (repeatable)")
    parser.add_argument("--out", default=None, help="output folder (default runs/peft-compare-<time>)")


# -- building one row's model -----------------------------------------------------------------------
def clora_available() -> bool:
    import lorakit
    from ..config import CLoRAConfig
    from ..inject import METHODS

    return CLoRAConfig in METHODS and hasattr(lorakit, "DecaySchedule")


def method_config(method: str, settings: dict):
    """lorakit's config for ``method`` (None for full fine-tuning); the classifier head always trains."""
    from .. import AdapterConfig, CLoRAConfig, LoRAConfig, PromptConfig

    if method == "full":
        return None
    if method == "lora":
        return LoRAConfig(rank=settings["rank"], alpha=2.0 * settings["rank"], targets=BERT_TARGETS["lora"],
                          modules_to_save=HEAD)
    if method == "adapter":
        return AdapterConfig(bottleneck=settings["bottleneck"], targets=BERT_TARGETS["adapter"], modules_to_save=HEAD)
    if method == "prompt":
        return PromptConfig(num_tokens=settings["num_tokens"], init="vocab", modules_to_save=HEAD)
    if method == "clora":
        return CLoRAConfig(rank=settings["clora_rank"], alpha=2.0 * settings["clora_rank"],
                           targets=BERT_TARGETS["clora"], modules_to_save=HEAD)
    raise ValueError(f"unknown method {method!r}")


def peft_config(method: str, settings: dict):
    """PEFT's config with the same hyperparameters as :func:`method_config` (SEQ_CLS trains the classifier)."""
    import peft

    if method == "lora":
        return peft.LoraConfig(task_type=peft.TaskType.SEQ_CLS, r=settings["rank"], lora_alpha=2.0 * settings["rank"],
                               lora_dropout=0.0, target_modules=BERT_TARGETS["lora"])
    if method == "prompt":
        return peft.PromptTuningConfig(task_type=peft.TaskType.SEQ_CLS, num_virtual_tokens=settings["num_tokens"],
                                       prompt_tuning_init=peft.PromptTuningInit.SAMPLE_VOCAB)
    raise ValueError(f"PEFT has no {method!r} row here")


def build(method: str, implementation: str, settings: dict, seed: int):
    """``(model, tokenizer)`` for one row: the pretrained model, a head seeded by ``seed``, the method applied."""
    from .. import inject
    from ..models.hf import load_hf_model

    torch.manual_seed(seed)  # the new classifier head (and adapter inits) come from the global RNG
    model, tokenizer = load_hf_model(settings["model"], "sequence-classification", settings["num_labels"])
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    elif implementation == "lorakit":
        inject(model, method_config(method, settings))
    elif implementation == "peft":
        import peft

        model = peft.get_peft_model(model, peft_config(method, settings))
    else:
        raise ValueError(f"unknown implementation {implementation!r}")
    return model, tokenizer


def checkpoint_bytes(model, method: str, implementation: str) -> int:
    """Bytes on disk of what this row must store: the adapter (+ head), or the whole model for full fine-tuning."""
    from .. import save_adapter
    from .._io import save_tensors

    with tempfile.TemporaryDirectory() as folder:
        if method == "full":
            save_tensors(Path(folder) / "model.safetensors", dict(model.state_dict()))
        elif implementation == "lorakit":
            save_adapter(model, folder)
        else:
            model.save_pretrained(folder)
        return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def clora_step_hook(model, total_steps: int):
    """C-LoRA's decay schedule advanced after every optimizer step (None when the method needs none)."""
    from .. import DecaySchedule  # provided with C-LoRA

    schedule = DecaySchedule(model, total_steps)

    def advance(step: int) -> None:
        schedule.step()

    return advance


# -- data -------------------------------------------------------------------------------------------
def load_data(args):
    """``(train, test, label_names)`` as :class:`~lorakit.data.text.TextDataset`s."""
    from ..data.text import TextDataset, load_text_file, load_wordnet_supersense

    if args.dataset == "wordnet-supersense":
        return load_wordnet_supersense(per_class_train=args.per_class_train, per_class_test=args.per_class_test)
    data = load_text_file(args.dataset)
    test = [i % 4 == 0 for i in range(len(data))]  # every fourth example is test: fixed and documented

    def subset(want_test: bool) -> TextDataset:
        keep = [i for i in range(len(data)) if test[i] == want_test]
        return TextDataset([data.texts[i] for i in keep], [data.labels[i] for i in keep], data.label_names)

    return subset(False), subset(True), data.label_names


class _Examples(torch.utils.data.Dataset):
    """A ``TextDataset`` seen as a torch ``Dataset`` (``train``/``evaluate`` accept only those)."""

    def __init__(self, data) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        return self.data[index]


# -- phase 1: accuracy ------------------------------------------------------------------------------
def run_row(method, implementation, settings, train_data, test_data, train_cfg, seed) -> dict:
    from .. import count_parameters
    from ..data.text import TextCollator
    from ..train import evaluate, train

    model, tokenizer = build(method, implementation, settings, seed)
    collator = TextCollator(tokenizer, settings["max_length"])
    steps = train_cfg.total_steps(-(-len(train_data) // train_cfg.batch_size))
    on_step = clora_step_hook(model, steps) if method == "clora" else None
    history = train(model, _Examples(train_data), train_cfg, collate_fn=collator, on_step=on_step)
    result = evaluate(model, _Examples(test_data), settings["num_labels"], batch_size=128, collate_fn=collator)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    row = {"method": method, "implementation": implementation, "seed": seed, "accuracy": result.accuracy,
           "trainable_parameters": trainable, "total_parameters": total,
           "added_parameters": count_parameters(model).adapter if implementation == "lorakit" else None,
           "checkpoint_bytes": checkpoint_bytes(model, method, implementation),
           "train_seconds": history.seconds, "steps": history.steps, "final_loss": history.losses[-1],
           "lr": train_cfg.lr, "per_class_accuracy": result.per_class_accuracy}
    if implementation == "peft":
        row["added_parameters"] = total - settings["base_parameters"]
    return row


def static_row(method, implementation, settings, seed) -> dict:
    """What a row is without training it: parameter counts and checkpoint size (both depend on shapes only)."""
    from .. import count_parameters

    model, _ = build(method, implementation, settings, seed)
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    added = count_parameters(model).adapter if implementation == "lorakit" else total - settings["base_parameters"]
    return {"trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "total_parameters": total, "added_parameters": added,
            "checkpoint_bytes": checkpoint_bytes(model, method, implementation)}


def rows_from_log(path: Path) -> list[dict]:
    """Rows (method, implementation, seed, accuracy, train_seconds) from a run's log, for a process that was
    stopped after its first row had finished (its results.json is then never written)."""
    import re

    rows, current = [], None
    for line in path.read_text(errors="replace").splitlines():
        started = re.match(r"\[peft-compare\] (\w+)/(\w+) seed (\d+)$", line.strip())
        finished = re.match(r"\[peft-compare\]\s+accuracy ([\d.]+) % in (\d+) s$", line.strip())
        if started:
            current = {"method": started[1], "implementation": started[2], "seed": int(started[3])}
        elif finished and current is not None:
            rows.append({**current, "accuracy": float(finished[1]), "train_seconds": float(finished[2]),
                         "recovered_from_log": str(path.name)})
            current = None
    return rows


# -- phase 2: interleaved step time -----------------------------------------------------------------
def _training_step(model, optimizer, batch) -> None:
    loss = model(**batch).loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def step_time_ratios(rows, settings, batch, rounds: int, steps: int, seed: int) -> dict:
    """Median over rounds of (row's time for ``steps`` steps / lorakit-LoRA's, same round); order rotates."""
    models = {}
    for method, implementation in rows:
        model, _ = build(method, implementation, settings, seed)
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
        for _ in range(1):  # warm-up: allocator, optimizer state
            _training_step(model, optimizer, batch)
        models[(method, implementation)] = (model, optimizer)
    keys = list(models)
    seconds = {key: [] for key in keys}
    for r in range(rounds):
        for key in keys[r % len(keys):] + keys[:r % len(keys)]:
            model, optimizer = models[key]
            start = time.perf_counter()
            for _ in range(steps):
                _training_step(model, optimizer, batch)
            seconds[key].append((time.perf_counter() - start) / steps)
    reference = seconds[("lora", "lorakit")]
    return {key: {"step_time_ratio": statistics.median(t / ref for t, ref in zip(times, reference)),
                  "step_seconds_median": statistics.median(times)} for key, times in seconds.items()}


# -- phase 3: peak memory, one fresh process per row ------------------------------------------------
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_probe(method: str, implementation: str, settings: dict, texts: list[str], labels: list[int],
                 steps: int, seed: int) -> dict:
    """In this (fresh) process: build the row, then sample RSS every millisecond during ``steps`` steps."""
    import gc

    model, tokenizer = build(method, implementation, settings, seed)
    from ..data.text import encode

    batch = encode(tokenizer, texts, settings["max_length"])
    batch["labels"] = torch.tensor(labels)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    gc.collect()
    before = _rss_bytes()
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for _ in range(steps):
        _training_step(model, optimizer, batch)
    done.set()
    sampler.join()
    peak[0] = max(peak[0], _rss_bytes())
    return {"peak_memory_mb": peak[0] / 2**20, "training_memory_mb": (peak[0] - before) / 2**20}


def _memory_probe_main() -> None:  # entry point of the subprocess
    job = json.loads(sys.argv[1])
    torch.set_num_threads(job.pop("threads"))
    print(json.dumps(memory_probe(**job)))


def measure_memory(method, implementation, settings, texts, labels, steps, seed) -> dict:
    job = json.dumps({"method": method, "implementation": implementation, "settings": settings, "texts": texts,
                      "labels": labels, "steps": steps, "seed": seed, "threads": torch.get_num_threads()})
    code = "from lorakit.experiments.peft_compare import _memory_probe_main; _memory_probe_main()"
    done = subprocess.run([sys.executable, "-c", code, job], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"memory probe for {method}/{implementation} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- report -----------------------------------------------------------------------------------------
def report_markdown(results: dict) -> str:
    from ..report import markdown_table

    rows = results["rows"]
    by_key = {(r["method"], r["implementation"], r["seed"]): r for r in rows}
    headers = ["method", "implementation", "accuracy %", "Δ vs library (pp)", "trainable params", "added params",
               "total params", "checkpoint", "step time / lorakit-LoRA", "peak RSS MB", "training memory MB",
               "seed 004 (T5-small, IMDB)"]
    table = []
    for r in rows:
        library = next((by_key[(r["method"], impl, r["seed"])] for impl in ("peft", "adapters")
                        if (r["method"], impl, r["seed"]) in by_key), None)
        delta = r["accuracy"] - library["accuracy"] if library and r["implementation"] == "lorakit" else None
        ours, theirs, name = SEED_004[r["method"]]
        seed_cell = "—" if ours is None else (f"{ours}" if r["implementation"] == "lorakit" or theirs is None
                                               else f"{theirs} ({name})")
        table.append([r["method"], r["implementation"], r["accuracy"], delta, f"{r['trainable_parameters']:,}",
                      None if r.get("added_parameters") is None else f"{r['added_parameters']:,}",
                      f"{r['total_parameters']:,}", _size(r["checkpoint_bytes"]), r.get("step_time_ratio"),
                      r.get("peak_memory_mb"), r.get("training_memory_mb"), seed_cell])
    config = results["config"]
    lines = [
        "# peft-compare", "",
        f"{config['model']} ({results['base_parameters']:,} parameters) on {config['dataset']}: "
        f"{results['train_examples']} training and {results['test_examples']} test examples, "
        f"{len(results['label_names'])} classes, {config['epochs']:g} epochs, batch {config['batch_size']}, "
        f"max length {config['max_length']}, seeds {config['seeds']}. Same data, order, steps and hyperparameters for "
        "a method's lorakit and PEFT rows; the classifier head trains in every row.", "",
        markdown_table(headers, table, floatfmt=".2f"), "",
        "- *trainable params* include the classifier head (and the pooler for full fine-tuning); *added* is what "
        "the method adds to the pretrained model (for lorakit, `count_parameters(model).adapter`, which counts "
        "the head copy too).",
        "- *step time*: median over interleaved rounds of this row's time per training step divided by "
        "lorakit-LoRA's in the same round (one fixed batch; forward, backward, AdamW step).",
        "- *peak RSS*: highest resident set size sampled every 1 ms during a few training steps, each row in a "
        "fresh process; *training memory* is its rise over the RSS just before the first step.",
        "- *seed 004*: T5-small on IMDB, 10 epochs: the seed's hand-written number, or the library's in its row; "
        "a different model and task, shown for the shape of the comparison, not as a target.", "",
        "Seed 004's parameter counts, reproduced exactly by `lorakit params` on T5-small's architecture: "
        + ", ".join(f"{k} {v:,}" for k, v in SEED_004_PARAMS.items()) + ".", "",
    ]
    lines += ["## Targets (issue 5)", "", *targets_met(rows), ""]
    lines += ["## Notes", ""] + [f"- {note}" for note in results.get("notes", [])]
    lines += ["", "![accuracy vs trainable parameters](accuracy_vs_params.png)", ""]
    return "\n".join(lines)


def targets_met(rows: list[dict]) -> list[str]:
    """Issue 5's targets, each checked against the rows (seed 0 where there are several)."""
    seed = min(r["seed"] for r in rows)
    row = {(r["method"], r["implementation"]): r for r in rows if r["seed"] == seed}

    def verdict(ok: bool) -> str:
        return "**met**" if ok else "**missed**"

    lines = []
    for method in ("lora", "adapter", "prompt"):
        ours, theirs = row.get((method, "lorakit")), row.get((method, "peft")) or row.get((method, "adapters"))
        if ours and theirs:
            delta = ours["accuracy"] - theirs["accuracy"]
            lines.append(f"- {method}: lorakit {ours['accuracy']:.2f} % vs {theirs['implementation']} "
                         f"{theirs['accuracy']:.2f} % (Δ {delta:+.2f} pp; target |Δ| <= 1.0): {verdict(abs(delta) <= 1.0)}")
        elif ours:
            lines.append(f"- {method}: no library row to compare with (see the notes)")
    lora, peft_lora, full = row.get(("lora", "lorakit")), row.get(("lora", "peft")), row.get(("full", "lorakit"))
    if lora and full:
        gap = full["accuracy"] - lora["accuracy"]
        lines.append(f"- LoRA within 3 pp of full fine-tuning: {lora['accuracy']:.2f} vs {full['accuracy']:.2f} % "
                     f"(gap {gap:+.2f} pp): {verdict(gap <= 3.0)}")
    if lora and peft_lora and peft_lora.get("step_time_ratio") is not None:
        ratio = 1.0 / peft_lora["step_time_ratio"]
        lines.append(f"- lorakit-LoRA step time / PEFT-LoRA's = {ratio:.3f} (target <= 1.0): {verdict(ratio <= 1.0)}")
    if lora and full and lora.get("peak_memory_mb") is not None and full.get("peak_memory_mb") is not None:
        lines.append(f"- lorakit-LoRA peak RSS {lora['peak_memory_mb']:.0f} MB vs full fine-tuning "
                     f"{full['peak_memory_mb']:.0f} MB: {verdict(lora['peak_memory_mb'] < full['peak_memory_mb'])}")
    return lines


def _size(n: int | None) -> str | None:
    if n is None:
        return None
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def plot(out: Path, rows: list[dict]) -> None:
    """Accuracy vs trainable parameters (log), one marker per implementation, each point named by its method.

    A local helper rather than ``report.line_plot``: points need labels, and lorakit and PEFT points that
    coincide (same parameters, same accuracy) must both stay visible (hollow circle vs cross).
    """
    from matplotlib.figure import Figure

    from ..report import save_figure

    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    styles = {"lorakit": dict(marker="o", s=90, facecolors="none", edgecolors="tab:blue"),
              "peft": dict(marker="x", s=60, color="tab:orange"), "adapters": dict(marker="+", s=60, color="tab:green")}
    for implementation, style in styles.items():
        mine = [r for r in rows if r["implementation"] == implementation]
        if mine:
            ax.scatter([r["trainable_parameters"] for r in mine], [r["accuracy"] for r in mine], label=implementation,
                       zorder=3, **style)
    for r in rows:
        if r["implementation"] == "lorakit":
            ax.annotate(r["method"], (r["trainable_parameters"], r["accuracy"]), textcoords="offset points",
                        xytext=(7, -12), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("accuracy vs trainable parameters")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, out / "accuracy_vs_params.png")


# -- main -------------------------------------------------------------------------------------------
def main(args: argparse.Namespace) -> int:
    from ..report import run_metadata, write_report, write_results
    from ..train import TrainConfig

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    out = output_dir(args.out, "peft-compare")
    if args.combine:
        return combine([Path(p) for p in args.combine.split(",") if p], out, args.note)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    implementations = [i.strip() for i in args.implementations.split(",") if i.strip()]
    seeds = [int(s) for s in args.seeds.split(",")]
    unknown = set(methods) - {m for m, _ in ROWS} or set(implementations) - {"lorakit", "peft"}
    if unknown:
        raise ValueError(f"unknown methods/implementations {sorted(unknown)}; methods: full, lora, adapter, prompt, "
                         "clora; implementations: lorakit, peft")
    notes = list(args.note)
    if "peft" in implementations and importlib.util.find_spec("peft") is None:
        raise ValueError("the PEFT rows need peft: pip install peft (or pass --implementations lorakit)")
    if "clora" in methods and not clora_available():
        methods.remove("clora")
        notes.append("C-LoRA was not run: lorakit's C-LoRA layer is not registered in this installation.")
    rows = [(m, i) for m, i in ROWS if m in methods and i in implementations]
    if not args.skip_timing and ("lora", "lorakit") not in rows:
        raise ValueError("the lorakit LoRA row is the step-time reference; keep 'lora' and 'lorakit'")
    notes.append("AdapterHub's `adapters` was not run: it pins transformers 4.57 and this project uses transformers "
                 f"{_version('transformers')}; they cannot be installed side by side.")

    train_data, test_data, label_names = load_data(args)
    settings = {"model": args.model, "num_labels": len(label_names), "max_length": args.max_length,
                "rank": args.rank, "clora_rank": args.clora_rank, "bottleneck": args.bottleneck,
                "num_tokens": args.num_tokens}
    base, _ = build("full", "lorakit", settings, seeds[0])
    settings["base_parameters"] = sum(p.numel() for p in base.parameters())
    del base
    lrs = {m: getattr(args, f"lr_{m}") for m in ("full", "lora", "adapter", "prompt", "clora")}

    results_rows = [{"method": m, "implementation": i, "seed": seeds[0], **static_row(m, i, settings, seeds[0])}
                    for m, i in rows] if args.skip_training else []
    for seed in [] if args.skip_training else seeds:
        for method, implementation in rows:
            cfg = TrainConfig(lr=lrs[method], batch_size=args.batch_size, epochs=args.epochs, seed=seed,
                              optimizer="adamw")
            print(f"[peft-compare] {method}/{implementation} seed {seed}", file=sys.stderr, flush=True)
            row = run_row(method, implementation, settings, train_data, test_data, cfg, seed)
            print(f"[peft-compare]   accuracy {row['accuracy']:.2f} % in {row['train_seconds']:.0f} s",
                  file=sys.stderr, flush=True)
            results_rows.append(row)

    texts, labels = zip(*[train_data[i] for i in range(min(args.batch_size, len(train_data)))])
    if not args.skip_timing:
        print("[peft-compare] interleaved step-time phase", file=sys.stderr, flush=True)
        from ..data.text import encode

        _, tokenizer = build("full", "lorakit", settings, seeds[0])
        batch = encode(tokenizer, texts, args.max_length)
        batch["labels"] = torch.tensor(labels)
        timing = step_time_ratios(rows, settings, batch, args.timing_rounds, args.timing_steps, seeds[0])
        for row in results_rows:
            row.update(timing[(row["method"], row["implementation"])])
    if not args.skip_memory:
        print("[peft-compare] peak-memory phase (one process per row)", file=sys.stderr, flush=True)
        memory = {key: measure_memory(*key, settings, list(texts), list(labels), args.memory_steps, seeds[0])
                  for key in rows}
        for row in results_rows:
            row.update(memory[(row["method"], row["implementation"])])

    results = {
        "experiment": "peft-compare", "config": vars(args) | {"command": None, "handler": None},
        "settings": settings, "base_parameters": settings["base_parameters"], "label_names": label_names,
        "train_examples": len(train_data), "test_examples": len(test_data),
        "train_config": {m: dataclasses.asdict(TrainConfig(lr=lrs[m], batch_size=args.batch_size, epochs=args.epochs,
                                                           optimizer="adamw")) for m in methods},
        "seed_004": {"accuracy": SEED_004, "added_parameters": SEED_004_PARAMS},
        "notes": notes, "rows": results_rows, "wall_seconds": time.perf_counter() - started,
        "metadata": run_metadata() | {"transformers": _version("transformers"), "peft": _version("peft")},
    }
    results["config"] = {k: v for k, v in results["config"].items() if k not in ("command", "handler", "experiment")}
    out.mkdir(parents=True, exist_ok=True)
    write_results(out, results)
    if not args.skip_training:
        plot(out, results_rows)
        write_report(out, report_markdown(results))
    print(f"[peft-compare] wrote {out}", file=sys.stderr)
    return 0


def combine(parts: list[Path], out: Path, notes: list[str] = ()) -> int:
    """Merge the rows of several runs (same settings; e.g. rows trained in parallel processes, and the
    timing/memory phases from a ``--skip-training`` run) into one results.json, report.md and figure."""
    from ..report import write_report, write_results

    logs = [part for part in parts if part.suffix == ".log"]
    parts = [part for part in parts if part.suffix != ".log"]
    loaded = [json.loads((part / "results.json").read_text()) for part in parts]
    if logs:
        loaded.append({"rows": [row for log in logs for row in rows_from_log(log)], "metadata": {"command": None},
                       "notes": ["Rows marked recovered_from_log come from the log of a process stopped once that row "
                                 "had finished (accuracy and training time as logged; their parameter counts and "
                                 "checkpoint sizes from a --skip-training run, which builds the same models)."]})
        parts = parts + [Path(",".join(str(log) for log in logs))]
    trained = [r for r in loaded if "config" in r and any(row.get("accuracy") is not None for row in r["rows"])]
    trained = trained or [r for r in loaded if "config" in r]
    if not trained or not any(row.get("accuracy") is not None for r in loaded for row in r["rows"]):
        raise ValueError(f"none of {[str(p) for p in parts]} holds trained rows")
    merged: dict[tuple, dict] = {}
    for results in loaded:
        for row in results["rows"]:
            key = (row["method"], row["implementation"], row["seed"])
            merged[key] = {**merged.get(key, {}), **{k: v for k, v in row.items() if v is not None}}
    order = {key: i for i, key in enumerate(ROWS)}
    rows = sorted(merged.values(), key=lambda r: (r["seed"], order[(r["method"], r["implementation"])]))
    unfinished = [f"{r['method']}/{r['implementation']}" for r in rows if r.get("accuracy") is None]
    rows = [r for r in rows if r.get("accuracy") is not None]
    results = dict(trained[0])
    results["rows"] = rows
    results["config"] = dict(results["config"], methods=",".join(dict.fromkeys(r["method"] for r in rows)))
    results["notes"] = list(dict.fromkeys(n for r in loaded for n in r.get("notes", [])))
    results["notes"] += list(notes)
    if unfinished:
        results["notes"].append(f"Timed but not trained (their training did not finish in time): {', '.join(unfinished)}.")
    results["parts"] = [{"folder": str(p), "rows": [f"{r['method']}/{r['implementation']}" for r in res["rows"]],
                         "wall_seconds": res.get("wall_seconds"), "command": res["metadata"].get("command")}
                        for p, res in zip(parts, loaded)]
    results["wall_seconds"] = sum(res.get("wall_seconds") or 0 for res in loaded)
    out.mkdir(parents=True, exist_ok=True)
    write_results(out, results)
    plot(out, [r for r in rows if r.get("accuracy") is not None])
    write_report(out, report_markdown(results))
    print(f"[peft-compare] combined {len(parts)} runs into {out}", file=sys.stderr)
    return 0


def _version(package: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None
