"""PEFT is the reference: an adapter written by lorakit loads in PEFT, and one written by PEFT loads in lorakit,
with identical outputs. Custom models of every supported layer type, and a tiny random BERT."""
from __future__ import annotations

import warnings
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import BertConfig, BertForSequenceClassification, BertModel

import lorakit as lk
from conftest import FACTORIES, Conv2dNet, assert_same_state, seeded, lorakit_leftovers, perturb_adapters, state_snapshot

pytestmark = pytest.mark.usefixtures("single_thread")

BERT_CONFIG = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37)



def bert_classifier():
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(**BERT_CONFIG, num_labels=3)).eval()


def bert_encoder():
    torch.manual_seed(0)
    return BertModel(BertConfig(**BERT_CONFIG)).eval()


def bert_input():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 100, (2, 7), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def run(model, x) -> torch.Tensor:
    if isinstance(x, dict):
        out = model(**x)
        if hasattr(out, "logits"):
            return out.logits
        return torch.cat([out.last_hidden_state.flatten(), out.pooler_output.flatten()])
    return model(x)


def example(factory):
    base = factory()
    return base, (base.example_input() if hasattr(base, "example_input") else bert_input())


def close(a, b):
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


# (id, factory, lorakit config kwargs); PEFT gets the same settings under its names.
CASES = [
    ("linear", FACTORIES["linear"], dict(targets=["layer", "head"])),
    ("conv1d", FACTORIES["conv1d"], dict(targets=["layer", "head"])),
    ("conv2d", FACTORIES["conv2d"], dict(targets=["layer", "head"])),
    ("embedding", FACTORIES["embedding"], dict(targets=["layer", "head"])),
    ("hf_conv1d", FACTORIES["hf_conv1d"], dict(targets=["layer", "head"])),
    ("conv2d-strided", seeded(Conv2dNet, padding=2, stride=(1, 2)),  # PEFT ignores dilation and padding_mode
     dict(targets=["layer", "head"])),
    ("linear-rslora-save-head", FACTORIES["linear"], dict(targets=["layer"], rslora=True, rank=4, modules_to_save=["head"])),
    ("bert-cls", bert_classifier, dict(targets=["query", "value"], rslora=True, modules_to_save=["classifier"])),
    ("bert-encoder", bert_encoder, dict(targets=["query", "key", "value", "dense"], dropout=0.1)),
]
PARAMETRIZE_CASES = [c for c in CASES if c[0] in {"linear", "conv1d", "conv2d", "embedding", "hf_conv1d"}]


def lorakit_config(kw, mode="module") -> lk.LoRAConfig:
    return lk.LoRAConfig(**{"rank": 2, "alpha": 4.0, "mode": mode, **kw})


def peft_config(kw, **extra) -> peft.LoraConfig:
    cfg = lorakit_config(kw)
    return peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=cfg.targets,
                           use_rslora=cfg.rslora, modules_to_save=cfg.modules_to_save, **extra)


def lorakit_to_peft(factory, kw, directory: Path, mode="module"):
    base, x = example(factory)
    model = lk.inject(factory(), lorakit_config(kw, mode))
    perturb_adapters(model)
    expected = run(model, x)
    assert not torch.allclose(expected, run(base, x), atol=1e-3)
    lk.save_adapter(model, directory)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's notes about fan_in_fan_out and unknown lorakit keys
        loaded = peft.PeftModel.from_pretrained(factory(), str(directory)).eval()
    return run(loaded, x), expected


@pytest.mark.parametrize("case_id, factory, kw", CASES, ids=[c[0] for c in CASES])
def test_lorakit_adapter_loads_in_peft(case_id, factory, kw, tmp_path):
    got, expected = lorakit_to_peft(factory, kw, tmp_path)
    close(got, expected)


@pytest.mark.parametrize("case_id, factory, kw", PARAMETRIZE_CASES, ids=[c[0] for c in PARAMETRIZE_CASES])
def test_parametrize_mode_adapter_loads_in_peft(case_id, factory, kw, tmp_path):
    got, expected = lorakit_to_peft(factory, kw, tmp_path, mode="parametrize")
    close(got, expected)


def peft_to_dir(factory, kw, directory: Path, **save_kw):
    """PEFT model with random LoRA factors (B nonzero), saved; returns its output on the example input."""
    base, x = example(factory)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(factory(), peft_config(kw)).eval()
    perturb_adapters(model)
    expected = run(model, x)
    assert not torch.allclose(expected, run(base, x), atol=1e-3)
    model.save_pretrained(str(directory), **save_kw)
    return expected, x


def load_quietly(model, directory):
    """lorakit.load_adapter, failing on lorakit's own warning about unknown config keys."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lk.load_adapter(model, directory)
    assert not [w for w in caught if "lorakit does not know" in str(w.message)]
    return model


@pytest.mark.parametrize("case_id, factory, kw", CASES, ids=[c[0] for c in CASES])
def test_peft_adapter_loads_in_lorakit(case_id, factory, kw, tmp_path):
    expected, x = peft_to_dir(factory, kw, tmp_path)
    model = load_quietly(factory(), tmp_path)
    close(run(model, x), expected)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "modules_to_save" in n for n in trainable)
    # and back out again: lorakit re-saves exactly the tensors PEFT wrote
    lk.save_adapter(model, tmp_path / "again")
    theirs, ours = load_file(tmp_path / "adapter_model.safetensors"), load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert sorted(theirs) == sorted(ours)
    assert all(torch.equal(theirs[k], ours[k]) for k in theirs)


@pytest.mark.parametrize("peft_kw", [
    dict(target_modules=r".*\.(query|value)", exclude_modules=r".*layer\.0\..*"),
    dict(target_modules="all-linear"),
], ids=["regex-exclude", "all-linear"])
def test_peft_target_spellings_load(peft_kw, tmp_path):
    """PEFT's regex targets and exclusions, and 'all-linear' (which PEFT expands to names before saving)."""
    _, x = example(bert_encoder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(bert_encoder(), peft.LoraConfig(r=2, lora_alpha=4, **peft_kw)).eval()
    perturb_adapters(model)
    expected = run(model, x)
    model.save_pretrained(str(tmp_path))
    loaded = load_quietly(bert_encoder(), tmp_path)
    close(run(loaded, x), expected)
    ours = sorted(n for n, m in loaded.named_modules() if type(m).__name__.startswith("LoRA"))
    theirs = sorted(n.removeprefix("base_model.model.") for n, m in model.named_modules() if hasattr(m, "lora_A"))
    assert ours == theirs and ours


def test_peft_sequence_classification_task_loads(tmp_path):
    """task_type='SEQ_CLS' makes PEFT add the classifier to modules_to_save by itself."""
    base, x = example(bert_classifier)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(bert_classifier(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query"],
                                                                       task_type="SEQ_CLS")).eval()
    perturb_adapters(model)
    expected = run(model, x)
    model.save_pretrained(str(tmp_path))
    loaded = load_quietly(bert_classifier(), tmp_path)
    close(run(loaded, x), expected)
    assert type(loaded.classifier).__name__ == "ModulesToSave"
    with lk.disabled(loaded):
        assert torch.equal(run(loaded, x), run(base, x))


def test_peft_bin_file_loads_with_weights_only(tmp_path):
    factory, kw = bert_classifier, dict(targets=["query", "value"], modules_to_save=["classifier"])
    expected, x = peft_to_dir(factory, kw, tmp_path / "peft", safe_serialization=False)
    assert (tmp_path / "peft" / "adapter_model.bin").is_file()
    assert not (tmp_path / "peft" / "adapter_model.safetensors").exists()
    close(run(load_quietly(factory(), tmp_path / "peft"), x), expected)

    # a .bin written by hand: torch.save of a plain dict of tensors
    state = torch.load(tmp_path / "peft" / "adapter_model.bin", weights_only=True)
    (tmp_path / "hand").mkdir()
    torch.save(state, tmp_path / "hand" / "adapter_model.bin")
    (tmp_path / "hand" / "adapter_config.json").write_text((tmp_path / "peft" / "adapter_config.json").read_text())
    close(run(load_quietly(factory(), tmp_path / "hand"), x), expected)


class _Payload:
    """Unpickling this with plain pickle would create ``marker``: the test checks that it never happens."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_malicious_bin_is_refused_without_running(tmp_path):
    factory = FACTORIES["linear"]
    lk.save_adapter(lk.inject(factory(), lorakit_config(dict(targets=["layer"]))), tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    marker = tmp_path / "pwned"
    torch.save({"base_model.model.layer.lora_A.weight": _Payload(marker),
                "base_model.model.layer.lora_B.weight": torch.zeros(5, 2)}, tmp_path / "adapter_model.bin")
    model = factory()
    before = state_snapshot(model)
    with pytest.raises(ValueError, match=r"(?s)adapter_model.bin cannot be read as plain tensors.*never unpickles"):
        lk.load_adapter(model, tmp_path)
    assert not marker.exists(), "the pickle payload ran"
    assert_same_state(model, before)
    assert lorakit_leftovers(model) == []
