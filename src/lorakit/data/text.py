"""Text classification data: WordNet supersenses (offline), CSV/JSONL files, Hugging Face ``datasets``.

Every loader returns a :class:`TextDataset`: parallel lists of texts and integer labels plus the label
names. :class:`TextCollator` turns a batch of ``(text, label)`` pairs into tokenizer tensors.

**WordNet supersenses.** Each noun synset in WordNet's ``data.noun`` has a gloss and sits in one
lexicographer file ("supersense", e.g. ``noun.animal``). The task: read ``"<first lemma>: <gloss>"`` and
predict the supersense. The lemma is kept because it is part of what is being classified and because
without it 285 glosses in the default classes are exact duplicates ("a genus of bacteria", ...); with
it, one is. Texts that still occur more than once among the chosen classes are dropped, so no text is
in both train and test and no text has two labels.

Synset counts per noun file in WordNet 3.0 (Debian ``wordnet-base``)::

    Tops 51  act 6650  animal 7509  artifact 11587  attribute 3039  body 2016  cognition 2964
    communication 5607  event 1074  feeling 428  food 2573  group 2624  location 3209  motive 42
    object 1545  person 11087  phenomenon 641  plant 8030  possession 1061  process 770
    quantity 1275  relation 437  shape 341  state 3544  substance 2983  time 1028

The default six classes (animal, artifact, food, location, person, plant) keep at least 2,573 synsets
each after de-duplication, far more than the default split of 300 train + 100 test per class.
"""
from __future__ import annotations

import csv
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import torch

WORDNET_NOUNS = Path("/usr/share/wordnet/data.noun")

# lex_filenum -> lexicographer file name, as in WordNet's lexnames file (noun files only).
NOUN_LEXNAMES = {
    3: "noun.Tops", 4: "noun.act", 5: "noun.animal", 6: "noun.artifact", 7: "noun.attribute",
    8: "noun.body", 9: "noun.cognition", 10: "noun.communication", 11: "noun.event", 12: "noun.feeling",
    13: "noun.food", 14: "noun.group", 15: "noun.location", 16: "noun.motive", 17: "noun.object",
    18: "noun.person", 19: "noun.phenomenon", 20: "noun.plant", 21: "noun.possession", 22: "noun.process",
    23: "noun.quantity", 24: "noun.relation", 25: "noun.shape", 26: "noun.state", 27: "noun.substance",
    28: "noun.time",
}
DEFAULT_CLASSES = ("noun.animal", "noun.artifact", "noun.food", "noun.location", "noun.person", "noun.plant")


@dataclass
class TextDataset:
    """Texts with integer labels in ``range(len(label_names))``; indexing gives ``(text, label)``."""

    texts: list[str]
    labels: list[int]
    label_names: list[str]
    ids: list[str] = field(default_factory=list)  # where each example came from (synset offset, line, ...)

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> tuple[str, int]:
        return self.texts[index], self.labels[index]

    def class_counts(self) -> list[int]:
        counts = Counter(self.labels)
        return [counts[i] for i in range(len(self.label_names))]

    def subset(self, indices: Sequence[int]) -> "TextDataset":
        """The examples at ``indices``, in that order, with their ids (if any) and the same label names."""
        ids = [self.ids[i] for i in indices] if self.ids else []
        return TextDataset([self.texts[i] for i in indices], [self.labels[i] for i in indices], self.label_names, ids)

    def first_per_class(self, n: int) -> tuple["TextDataset", "TextDataset"]:
        """``(first, rest)``: the first ``n`` examples of each class, in data order, and all the others."""
        taken = [0] * len(self.label_names)
        first, rest = [], []
        for i, label in enumerate(self.labels):
            (first if taken[label] < n else rest).append(i)
            taken[label] += 1
        return self.subset(first), self.subset(rest)


def encode(tokenizer, texts: Sequence[str], max_length: int = 128) -> dict:
    """Tokenize a batch: padded to its longest text, truncated to ``max_length``; tensors of (B, T)."""
    return dict(tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt"))


@dataclass
class TextCollator:
    """``DataLoader`` collate_fn: ``[(text, label), ...]`` -> ``encode(...)`` plus ``labels`` of shape (B,)."""

    tokenizer: Any
    max_length: int = 128

    def __call__(self, batch: Sequence[tuple[str, int]]) -> dict:
        texts, labels = zip(*batch)
        encoded = encode(self.tokenizer, texts, self.max_length)
        encoded["labels"] = torch.tensor(labels, dtype=torch.long)
        return encoded


# --- WordNet supersenses ------------------------------------------------------------------------------

class Synset(NamedTuple):
    offset: str      # 8-digit byte offset, WordNet's id for the synset
    lexname: str     # e.g. "noun.animal"
    lemma: str       # first word of the synset, underscores as spaces
    gloss: str       # definition and examples, as written

    @property
    def text(self) -> str:
        """What the classifier reads: ``"<lemma>: <gloss>"``."""
        return f"{self.lemma}: {self.gloss}"


def read_wordnet_nouns(path: str | Path | None = None) -> list[Synset]:
    """Parse a WordNet ``data.noun`` file (or a folder holding one), skipping the licence header."""
    path = Path(path) if path is not None else WORDNET_NOUNS
    if path.is_dir():
        path = path / "data.noun"
    if not path.is_file():
        raise FileNotFoundError(
            f"WordNet noun data not found at {path}; install it with `apt-get install wordnet-base` "
            "(Debian/Ubuntu) or pass path= to a WordNet 3.0 data.noun file")
    synsets = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line_number, line in enumerate(f, 1):
            if line.startswith("  ") or not line.strip():  # licence header lines start with two spaces
                continue
            head, sep, gloss = line.partition(" | ")
            fields = head.split()
            if not sep or len(fields) < 5 or not fields[1].isdigit() or int(fields[1]) not in NOUN_LEXNAMES:
                raise ValueError(f"{path}, line {line_number}: not a WordNet noun synset line: {line[:80]!r}")
            lemma = fields[4].replace("_", " ")
            synsets.append(Synset(fields[0], NOUN_LEXNAMES[int(fields[1])], lemma, gloss.strip()))
    return synsets


def _lexname(name: str) -> str:
    full = name if name.startswith("noun.") else f"noun.{name}"
    if full not in NOUN_LEXNAMES.values():
        raise ValueError(f"unknown WordNet noun class {name!r}; known: {', '.join(NOUN_LEXNAMES.values())}")
    return full


def load_wordnet_supersense(
    path: str | Path | None = None,
    classes: Sequence[str] = DEFAULT_CLASSES,
    per_class_train: int = 300,
    per_class_test: int = 100,
    seed: int = 0,
) -> tuple[TextDataset, TextDataset, list[str]]:
    """Gloss -> supersense classification, split per class: ``(train, test, label_names)``.

    ``classes`` are noun lexicographer files ("noun.animal" or just "animal"); label i is ``classes[i]``.
    Each class's synsets (in file order) are shuffled by a generator seeded with ``(seed, class)``; the
    first ``per_class_test`` become test, the next ``per_class_train`` train. So the split is the same
    on every machine, and the test set does not change when ``per_class_train`` does.
    """
    label_names = [_lexname(c) for c in classes]
    if len(set(label_names)) != len(label_names):
        raise ValueError(f"classes repeat: {list(classes)}")
    wanted = set(label_names)
    chosen = [s for s in read_wordnet_nouns(path) if s.lexname in wanted]
    text_counts = Counter(s.text for s in chosen)
    train_rows, test_rows = [], []  # (text, label, synset offset)
    for label, name in enumerate(label_names):
        pool = [s for s in chosen if s.lexname == name and text_counts[s.text] == 1]
        if len(pool) < per_class_train + per_class_test:
            raise ValueError(f"{name} has {len(pool)} usable synsets, fewer than "
                             f"per_class_train + per_class_test = {per_class_train + per_class_test}")
        random.Random(f"{seed}:{name}").shuffle(pool)
        rows = [(s.text, label, s.offset) for s in pool]
        test_rows += rows[:per_class_test]
        train_rows += rows[per_class_test:per_class_test + per_class_train]
    # Mix the classes, so that a loader that does not shuffle still sees all of them.
    random.Random(seed).shuffle(train_rows)
    random.Random(seed).shuffle(test_rows)
    train, test = (TextDataset([r[0] for r in rows], [r[1] for r in rows], label_names, [r[2] for r in rows])
                   for rows in (train_rows, test_rows))
    return train, test, label_names


# --- labels from files and hubs ----------------------------------------------------------------------

def _is_int_label(value) -> bool:
    if isinstance(value, str):
        return value.strip().lstrip("-").isdigit()
    return isinstance(value, int) and not isinstance(value, bool)


def _label_ids(raw: list, where: list[str], label_names: Sequence[str] | None) -> tuple[list[int], list[str]]:
    """Map raw labels (ints, digit strings or names) to ints; ``where[i]`` says where ``raw[i]`` was read."""
    if label_names is None:
        if raw and all(_is_int_label(v) for v in raw):
            top = max(int(v) for v in raw)
            label_names = [str(i) for i in range(top + 1)]
        else:
            label_names = sorted({v for v in raw if isinstance(v, str)})
    label_names = list(label_names)
    index = {name: i for i, name in enumerate(label_names)}
    ids = []
    for value, at in zip(raw, where):
        if isinstance(value, str) and value in index:
            ids.append(index[value])
        elif _is_int_label(value) and 0 <= int(value) < len(label_names):
            ids.append(int(value))
        else:
            raise ValueError(f"{at}: bad label {value!r}; expected an integer in 0..{len(label_names) - 1} "
                             f"or one of {label_names}")
    return ids, label_names


def json_object(line: str, where: str, expected: str = "a JSON object") -> dict:
    """One JSONL line as a dict; a ``ValueError`` naming ``where`` and ``expected`` when it is not one."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not valid JSON ({err}); expected {expected}") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected {expected}, got {line.strip()[:60]}")
    return record


def _missing_column(source: str, column: str, kind: str, found) -> ValueError:
    return ValueError(f"{source}: no {kind} column {column!r}; columns found: {list(found)}")


def load_text_file(path: str | Path, text_column: str = "text", label_column: str = "label",
                   label_names: Sequence[str] | None = None) -> TextDataset:
    """Read a ``.csv`` (header row) or ``.jsonl`` (one JSON object per line) file of labelled texts.

    Labels are integers in range or names in ``label_names``; without ``label_names``, integer labels
    keep their values and string labels are numbered in sorted order.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    rows: list[tuple[int, dict]] = []  # (line number, record)
    with open(path, encoding="utf-8", newline="") as f:
        if path.suffix.lower() == ".csv":
            reader = csv.DictReader(f)
            for column, kind in ((text_column, "text"), (label_column, "label")):
                if column not in (reader.fieldnames or []):
                    raise _missing_column(str(path), column, kind, reader.fieldnames or [])
            rows = [(reader.line_num, record) for record in reader]
        elif path.suffix.lower() in (".jsonl", ".ndjson"):
            for line_number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                record = json_object(line, f"{path}, line {line_number}")
                for column, kind in ((text_column, "text"), (label_column, "label")):
                    if column not in record:
                        raise _missing_column(f"{path}, line {line_number}", column, kind, record)
                rows.append((line_number, record))
        else:
            raise ValueError(f"{path}: unknown file type {path.suffix!r}; expected .csv or .jsonl")
    if not rows:
        raise ValueError(f"{path}: no examples")
    where = [f"{path}, line {n}" for n, _ in rows]
    labels, names = _label_ids([r[label_column] for _, r in rows], where, label_names)
    texts = [str(r[text_column]) for _, r in rows]
    return TextDataset(texts, labels, names, ids=[f"line {n}" for n, _ in rows])


def load_hf_dataset(name: str, split: str = "train", text_column: str = "text", label_column: str = "label",
                    config: str | None = None, label_names: Sequence[str] | None = None) -> TextDataset:
    """Load one split with Hugging Face ``datasets`` (e.g. ``"imdb"``; ``"glue", config="sst2"``,
    ``text_column="sentence"``). Needs the ``datasets`` package and network access or a warm cache.
    Label names come from the dataset's ``ClassLabel`` feature when it has one.
    """
    try:
        import datasets
    except ImportError as err:
        raise ImportError(f"loading {name!r} needs the Hugging Face `datasets` package and network access: "
                          "pip install datasets  (offline, use load_text_file on a CSV/JSONL copy)") from err
    try:
        data = datasets.load_dataset(name, config, split=split)
    except Exception as err:  # datasets raises many types (ConnectionError, DatasetNotFoundError, ...)
        raise RuntimeError(f"datasets.load_dataset({name!r}, {config!r}, split={split!r}) failed: {err}. "
                           "It needs network access (or a cached copy) and a valid name/config/split.") from err
    for column, kind in ((text_column, "text"), (label_column, "label")):
        if column not in data.column_names:
            raise _missing_column(f"{name} [{split}]", column, kind, data.column_names)
    if label_names is None:
        label_names = getattr(data.features.get(label_column), "names", None)
    raw = list(data[label_column])
    labels, names = _label_ids(raw, [f"{name} [{split}], row {i}" for i in range(len(raw))], label_names)
    return TextDataset([str(t) for t in data[text_column]], labels, names, ids=[str(i) for i in range(len(raw))])
