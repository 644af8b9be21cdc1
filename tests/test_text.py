"""Text data: WordNet supersense parsing and split, CSV/JSONL files, Hugging Face datasets (faked, offline)."""
import json
import sys
import types
from pathlib import Path

import pytest
import torch

from lorakit.data.text import (DEFAULT_CLASSES, NOUN_LEXNAMES, TextCollator, TextDataset, encode, load_hf_dataset,
                               load_text_file, load_wordnet_supersense, read_wordnet_nouns)

LICENCE = [
    "  1 This software and database is being provided to you, the LICENSEE, by  ",
    "  2 Princeton University under the following license.  ",
    "  3   ",
]
FAKE_CLASSES = {5: "animal", 13: "food", 18: "person"}  # lex_filenum -> short name
PER_CLASS = 20


def synset_line(offset: int, lexnum: int, lemma: str, gloss: str) -> str:
    return f"{offset:08d} {lexnum:02d} n 02 {lemma} 0 other_word 0 001 @ 00001740 n 0000 | {gloss}  "


@pytest.fixture
def data_noun(tmp_path) -> Path:
    """A small data.noun: a licence header and PER_CLASS synsets in each of FAKE_CLASSES."""
    lines, offset = list(LICENCE), 1000
    for lexnum, short in FAKE_CLASSES.items():
        for i in range(PER_CLASS):
            lines.append(synset_line(offset, lexnum, f"{short}_word_{i}", f"a {short} thing number {i}; \"an example\""))
            offset += 100
    path = tmp_path / "data.noun"
    path.write_text("\n".join(lines) + "\n")
    return path


# --- WordNet -----------------------------------------------------------------------------------------

def test_noun_lexnames_cover_files_03_to_28():
    assert sorted(NOUN_LEXNAMES) == list(range(3, 29))
    assert NOUN_LEXNAMES[5] == "noun.animal" and NOUN_LEXNAMES[28] == "noun.time"
    assert set(DEFAULT_CLASSES) <= set(NOUN_LEXNAMES.values())


def test_read_wordnet_nouns_parses_and_skips_licence(data_noun):
    synsets = read_wordnet_nouns(data_noun)
    assert len(synsets) == PER_CLASS * len(FAKE_CLASSES)
    first = synsets[0]
    assert first.offset == "00001000"
    assert first.lexname == "noun.animal"
    assert first.lemma == "animal word 0"  # underscores become spaces
    assert first.gloss == 'a animal thing number 0; "an example"'  # trailing spaces stripped
    assert read_wordnet_nouns(data_noun.parent) == synsets  # a folder holding data.noun works too


def test_missing_wordnet_says_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install wordnet-base"):
        read_wordnet_nouns(tmp_path / "nowhere" / "data.noun")
    with pytest.raises(FileNotFoundError, match="apt-get install wordnet-base"):
        load_wordnet_supersense(tmp_path / "nowhere")


def test_malformed_synset_line_names_its_line(tmp_path):
    path = tmp_path / "data.noun"
    path.write_text("\n".join(LICENCE + [synset_line(1, 5, "dog", "a dog"), "00000002 99 n 01 x 0 000 | bad"]))
    with pytest.raises(ValueError, match="line 5"):
        read_wordnet_nouns(path)


def test_supersense_split_is_stratified_and_disjoint(data_noun):
    classes = ["animal", "noun.food", "person"]
    train, test, names = load_wordnet_supersense(data_noun, classes, per_class_train=12, per_class_test=5)
    assert names == ["noun.animal", "noun.food", "noun.person"]
    assert train.class_counts() == [12, 12, 12] and test.class_counts() == [5, 5, 5]
    assert not set(train.ids) & set(test.ids)
    assert not set(train.texts) & set(test.texts)
    for text, label in list(train) + list(test):  # each text carries its own class
        assert text.split(":")[0].startswith(FAKE_CLASSES[[5, 13, 18][label]])
    assert train.texts[0].count(": ") >= 1  # "<lemma>: <gloss>"


def test_supersense_split_is_deterministic(data_noun):
    a_train, a_test, _ = load_wordnet_supersense(data_noun, ["animal", "food"], 10, 5, seed=0)
    b_train, b_test, _ = load_wordnet_supersense(data_noun, ["animal", "food"], 10, 5, seed=0)
    assert (a_train.texts, a_test.texts) == (b_train.texts, b_test.texts)
    c_train, c_test, _ = load_wordnet_supersense(data_noun, ["animal", "food"], 10, 5, seed=1)
    assert set(c_test.ids) != set(a_test.ids)
    # The test set does not depend on the training size.
    d_train, d_test, _ = load_wordnet_supersense(data_noun, ["animal", "food"], 3, 5, seed=0)
    assert d_test.texts == a_test.texts and set(d_train.ids) <= set(a_train.ids)


def test_supersense_bad_classes_and_sizes(data_noun):
    with pytest.raises(ValueError, match="unknown WordNet noun class 'animals'"):
        load_wordnet_supersense(data_noun, ["animals"], 1, 1)
    with pytest.raises(ValueError, match="repeat"):
        load_wordnet_supersense(data_noun, ["animal", "noun.animal"], 1, 1)
    with pytest.raises(ValueError, match=f"noun.animal has {PER_CLASS} usable synsets"):
        load_wordnet_supersense(data_noun, ["animal", "food"], PER_CLASS, 1)


def test_duplicate_texts_are_dropped(tmp_path):
    lines = LICENCE + [synset_line(i, 5, f"dog_{i}", "a dog") for i in range(6)]
    lines += [synset_line(100, 5, "twin", "same gloss"), synset_line(101, 13, "twin", "same gloss")]
    lines += [synset_line(200 + i, 13, f"bun_{i}", "a bun") for i in range(3)]
    path = tmp_path / "data.noun"
    path.write_text("\n".join(lines) + "\n")
    train, test, _ = load_wordnet_supersense(path, ["animal", "food"], per_class_train=2, per_class_test=1)
    assert all("twin" not in text for text in train.texts + test.texts)
    with pytest.raises(ValueError, match="noun.food has 3 usable"):
        load_wordnet_supersense(path, ["animal", "food"], per_class_train=3, per_class_test=1)


# --- TextDataset and encoding ------------------------------------------------------------------------

class FakeTokenizer:
    """Splits on spaces; ids are word lengths; pads with 0. Enough to check shapes and truncation."""

    def __call__(self, texts, padding, truncation, max_length, return_tensors):
        assert padding and truncation and return_tensors == "pt"
        ids = [[len(word) for word in text.split()][:max_length] for text in texts]
        width = max(len(row) for row in ids)
        input_ids = torch.tensor([row + [0] * (width - len(row)) for row in ids])
        return {"input_ids": input_ids, "attention_mask": (input_ids > 0).long()}


def test_text_dataset_and_collator():
    data = TextDataset(["a bb", "ccc dddd eeeee"], [1, 0], ["neg", "pos"])
    assert len(data) == 2 and data[1] == ("ccc dddd eeeee", 0)
    assert data.class_counts() == [1, 1]
    assert encode(FakeTokenizer(), data.texts, max_length=2)["input_ids"].tolist() == [[1, 2], [3, 4]]
    batch = TextCollator(FakeTokenizer(), max_length=8)([data[0], data[1]])
    assert batch["input_ids"].shape == (2, 3)
    assert batch["labels"].tolist() == [1, 0] and batch["labels"].dtype == torch.long


def test_text_dataset_subset_keeps_order_ids_and_label_names():
    data = TextDataset(["a", "b", "c"], [0, 1, 1], ["neg", "pos"], ids=["x", "y", "z"])
    part = data.subset([2, 0])
    assert (part.texts, part.labels, part.ids, part.label_names) == (["c", "a"], [1, 0], ["z", "x"], ["neg", "pos"])
    assert TextDataset(["a", "b"], [0, 1], ["neg", "pos"]).subset([1]).ids == []


def test_first_per_class_keeps_data_order():
    data = TextDataset([f"t{i}" for i in range(7)], [0, 1, 0, 0, 1, 1, 0], ["a", "b"])
    first, rest = data.first_per_class(2)
    assert first.texts == ["t0", "t1", "t2", "t4"] and rest.texts == ["t3", "t5", "t6"]
    assert data.first_per_class(0)[1].texts == data.texts


# --- CSV / JSONL -------------------------------------------------------------------------------------

def write_csv(path, rows):
    path.write_text("\n".join(rows) + "\n")
    return path


def write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    return path


def test_csv_with_integer_labels(tmp_path):
    path = write_csv(tmp_path / "d.csv", ["id,text,label", '1,"good, really",1', "2,bad,0", "3,fine,2"])
    data = load_text_file(path)
    assert data.texts == ["good, really", "bad", "fine"]
    assert data.labels == [1, 0, 2] and data.label_names == ["0", "1", "2"]


def test_csv_with_string_labels_and_other_columns(tmp_path):
    path = write_csv(tmp_path / "d.csv", ["sentence,sentiment", "great,pos", "awful,neg", "nice,pos"])
    data = load_text_file(path, text_column="sentence", label_column="sentiment")
    assert data.label_names == ["neg", "pos"] and data.labels == [1, 0, 1]
    given = load_text_file(path, "sentence", "sentiment", label_names=["pos", "neg"])
    assert given.label_names == ["pos", "neg"] and given.labels == [0, 1, 0]


def test_jsonl_mixes_names_and_ints_when_names_given(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "x", "label": "pos"}, {"text": "y", "label": 0},
                                              {"text": "z", "label": "1"}])
    data = load_text_file(path, label_names=["neg", "pos"])
    assert data.texts == ["x", "y", "z"] and data.labels == [1, 0, 1]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
@pytest.mark.parametrize("missing", ["text", "label"])
def test_missing_column_names_expected_and_found(tmp_path, suffix, missing):
    record = {"text": "hello", "label": 0, "extra": 1}
    del record[missing]
    if suffix == ".csv":
        path = write_csv(tmp_path / "d.csv", [",".join(record), ",".join(str(v) for v in record.values())])
    else:
        path = write_jsonl(tmp_path / "d.jsonl", [record])
    with pytest.raises(ValueError, match=rf"no {missing} column '{missing}'; columns found: .*'extra'"):
        load_text_file(path)


@pytest.mark.parametrize("rows, names, bad", [
    (["text,label", "a,0", "b,7"], ["neg", "pos"], "'7'"),          # out of range
    (["text,label", "a,pos", "b,meh"], ["neg", "pos"], "'meh'"),    # not a known name
    (["text,label", "a,0", "b,-1"], None, "'-1'"),                  # negative, no names given
    (["text,label", "a,0", "b,"], ["neg", "pos"], "''"),            # empty
])
def test_bad_csv_label_names_label_and_line(tmp_path, rows, names, bad):
    path = write_csv(tmp_path / "d.csv", rows)
    with pytest.raises(ValueError, match=rf"line 3: bad label {bad}"):
        load_text_file(path, label_names=names)


@pytest.mark.parametrize("value", [1.5, None, True, 2])
def test_bad_jsonl_label_names_label_and_line(tmp_path, value):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": value}])
    with pytest.raises(ValueError, match=rf"line 2: bad label {value!r}"):
        load_text_file(path, label_names=["neg", "pos"])


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_text_file(tmp_path / "absent.csv")
    (tmp_path / "d.txt").write_text("text,label\n")
    with pytest.raises(ValueError, match="expected .csv or .jsonl"):
        load_text_file(tmp_path / "d.txt")
    with pytest.raises(ValueError, match="no examples"):
        load_text_file(write_csv(tmp_path / "e.csv", ["text,label"]))
    (tmp_path / "f.jsonl").write_text('{"text": "a", "label": 0}\n{"text": oops}\n')
    with pytest.raises(ValueError, match="line 2: not valid JSON"):
        load_text_file(tmp_path / "f.jsonl")
    (tmp_path / "g.jsonl").write_text('["a", 0]\n')
    with pytest.raises(ValueError, match="line 1: expected a JSON object"):
        load_text_file(tmp_path / "g.jsonl")


# --- Hugging Face datasets, faked ------------------------------------------------------------------

class FakeDataset:
    def __init__(self, columns: dict, label_names=None):
        self.columns = columns
        self.column_names = list(columns)
        self.features = {"label": types.SimpleNamespace(names=label_names)} if label_names else {}

    def __getitem__(self, column):
        return self.columns[column]


def fake_datasets_module(result=None, error=None):
    module = types.ModuleType("datasets")
    module.calls = []

    def load_dataset(name, config=None, split=None):
        module.calls.append((name, config, split))
        if error is not None:
            raise error
        return result

    module.load_dataset = load_dataset
    return module


def test_hf_dataset_with_class_label(monkeypatch):
    fake = fake_datasets_module(FakeDataset({"sentence": ["good", "bad"], "label": [1, 0], "idx": [0, 1]},
                                            label_names=["negative", "positive"]))
    monkeypatch.setitem(sys.modules, "datasets", fake)
    data = load_hf_dataset("glue", "validation", text_column="sentence", config="sst2")
    assert fake.calls == [("glue", "sst2", "validation")]
    assert data.texts == ["good", "bad"] and data.labels == [1, 0]
    assert data.label_names == ["negative", "positive"]


def test_hf_dataset_errors(monkeypatch):
    unlabeled = FakeDataset({"text": ["a"], "label": [-1]}, label_names=["neg", "pos"])
    monkeypatch.setitem(sys.modules, "datasets", fake_datasets_module(unlabeled))
    with pytest.raises(ValueError, match=r"imdb \[test\], row 0: bad label -1"):
        load_hf_dataset("imdb", "test")
    with pytest.raises(ValueError, match=r"no text column 'sentence'; columns found: \['text', 'label'\]"):
        load_hf_dataset("imdb", "test", text_column="sentence")
    monkeypatch.setitem(sys.modules, "datasets", fake_datasets_module(error=ConnectionError("offline")))
    with pytest.raises(RuntimeError, match="needs network access"):
        load_hf_dataset("imdb")


def test_hf_dataset_without_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(ImportError, match="pip install datasets"):
        load_hf_dataset("imdb")


# --- the real WordNet ------------------------------------------------------------------------------

@pytest.mark.integration
def test_real_wordnet_supersense():
    path = Path("/usr/share/wordnet/data.noun")
    if not path.is_file():
        pytest.skip("WordNet not installed (apt-get install wordnet-base)")
    synsets = read_wordnet_nouns(path)
    counts = {name: sum(s.lexname == name for s in synsets) for name in DEFAULT_CLASSES}
    assert len(synsets) == 82115  # WordNet 3.0
    assert all(count > 300 + 100 for count in counts.values()), counts
    train, test, names = load_wordnet_supersense(path)
    assert names == list(DEFAULT_CLASSES)
    assert train.class_counts() == [300] * 6 and test.class_counts() == [100] * 6
    assert not set(train.ids) & set(test.ids)
    assert not set(train.texts) & set(test.texts)
