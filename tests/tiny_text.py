"""A tiny random BERT folder and a tiny two-class CSV, written by the tests that need a text task."""
from __future__ import annotations

import random
from pathlib import Path

WORDS = ["cat", "dog", "bird", "fish", "car", "bus", "train", "boat", "red", "blue", "green", "small", "big"]


def write_tiny_bert(folder: Path, dropout: float | None = None) -> Path:
    """A seeded BertForSequenceClassification (hidden 16, 2 layers, 2 labels) and its tokenizer over WORDS;
    ``dropout`` replaces BERT's 0.1 (0: the same losses however a batch is split across processes)."""
    import torch
    from transformers import BertForSequenceClassification, BertTokenizer

    from lorakit.models.hf import tiny_bert_config

    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    torch.manual_seed(0)
    config = tiny_bert_config(vocab_size=5 + len(WORDS), hidden_size=16, num_layers=2, max_position_embeddings=64,
                              num_labels=2)
    if dropout is not None:
        config.hidden_dropout_prob = config.attention_probs_dropout_prob = dropout
    BertForSequenceClassification(config).save_pretrained(folder)
    BertTokenizer(vocab_file=str(vocab)).save_pretrained(folder)
    return folder


def write_tiny_csv(path: Path, rows: int = 48) -> Path:
    """``text,label`` rows: label 0 draws animals, label 1 vehicles, both with colour/size words."""
    rng = random.Random(0)
    lines = ["text,label"]
    for _ in range(rows):
        label = rng.randrange(2)
        words = rng.sample(WORDS[:4] if label == 0 else WORDS[4:8], 2) + rng.sample(WORDS[8:], 2)
        lines.append(f"{' '.join(words)},{label}")
    path.write_text("\n".join(lines) + "\n")
    return path
