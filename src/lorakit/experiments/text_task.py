"""The text-classification task peft-compare and clora-transformer share: its data, its split, its model.

The data: WordNet noun glosses -> supersense (stratified per class by ``load_wordnet_supersense``), or a .csv/.jsonl
file of which every fourth example is test; a validation split is carved from the training data per class. The
model: a pretrained BERT-like encoder with a new classification head seeded by the run's seed.
"""
from __future__ import annotations

import torch

from ..data.text import DEFAULT_CLASSES, load_text_file, load_wordnet_supersense
from ..models.hf import load_hf_model

BERT_TARGETS = {"lora": ["query", "value"], "adapter": r".*\.layer\.\d+\.output\.dense",
                "clora": ["query", "key", "value", "attention.output.dense"]}
HEAD = ["classifier"]


def load_data(args):
    """``(train, test, label_names)`` as :class:`~lorakit.data.text.TextDataset`s (validation not yet carved).

    ``args`` needs ``dataset``, ``per_class_train``, ``per_class_test`` and may give ``classes`` (a comma list).
    """
    if args.dataset == "wordnet-supersense":
        classes = getattr(args, "classes", None)
        classes = [c.strip() for c in classes.split(",") if c.strip()] if classes else list(DEFAULT_CLASSES)
        return load_wordnet_supersense(classes=classes, per_class_train=args.per_class_train,
                                       per_class_test=args.per_class_test)
    data = load_text_file(args.dataset)
    test = range(0, len(data), 4)  # every fourth example is test: fixed and documented
    train = [i for i in range(len(data)) if i % 4 != 0]
    return data.subset(train), data.subset(test), data.label_names


def split_validation(train, per_class: int):
    """``(train, validation)``: the first ``per_class`` training examples of each class (in data order, which
    the loaders have already shuffled with a fixed seed) become validation; the rest stay training data."""
    if per_class < 1:
        raise ValueError(f"per_class_val must be >= 1 (the sweep and best-epoch selection need it), got {per_class}")
    short = [name for name, n in zip(train.label_names, train.class_counts()) if n <= per_class]
    if short:
        raise ValueError(f"classes {short} have at most {per_class} training examples; lower --per-class-val "
                         "or raise --per-class-train")
    validation, rest = train.first_per_class(per_class)
    return rest, validation


class Examples(torch.utils.data.Dataset):
    """A ``TextDataset`` seen as a torch ``Dataset`` (``train``/``evaluate`` accept only those)."""

    def __init__(self, data) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        return self.data[index]


def pretrained_classifier(model: str, num_labels: int, seed: int):
    """``(model, tokenizer)``: the pretrained ``model`` (a name or folder) with a new classification head of
    ``num_labels`` outputs, drawn after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)  # the new classifier head (and adapter inits) come from the global RNG
    return load_hf_model(model, "sequence-classification", num_labels)
