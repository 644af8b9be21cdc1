"""``lorakit generate``: prints each completion, asked as finetune trained it; ``--adapter`` takes lorakit's and PEFT's
folders and refuses one made for another base, naming the layer; the real SmolLM2 knows the capital of France."""
import json

import pytest
import torch

from lorakit.cli import main
from lorakit.experiments.generate import complete
from lorakit.models.llm import load_causal_lm
from tiny_llama import write_tiny_llama

pytest.importorskip("transformers")
SIZE = dict(hidden_size=64, intermediate_size=128, initializer_range=0.2)
PAIRS = {f"w{i} w{i + 1}": f"w{i + 20} w{i + 30}" for i in range(8)}  # prompt -> completion


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("gen") / "llama", seed=3, **SIZE)


@pytest.fixture(scope="module")
def trained(llama, tmp_path_factory):
    """A LoRA adapter finetuned until it answers every training prompt."""
    folder = tmp_path_factory.mktemp("trained")
    data = folder / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in PAIRS.items()))
    torch.set_num_threads(1)
    assert main(["finetune", "--model", str(llama), "--data", str(data), "--steps", "40", "--batch-size", "4",
                 "--lr", "1e-2", "--out", str(folder / "out")]) == 0
    return folder / "out"


def generated(capsys, *args) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = main(["generate", "--max-new-tokens", "6", *args])
    return code, capsys.readouterr().out.strip().split("\n\n")


def test_a_finetuned_adapter_gives_the_trained_completions_and_the_base_does_not(llama, trained, capsys):
    prompts = list(PAIRS)[:3]
    code, with_adapter = generated(capsys, "--model", str(llama), "--adapter", str(trained), *prompts)
    assert code == 0 and with_adapter == [PAIRS[p] for p in prompts]
    code, base = generated(capsys, "--model", str(llama), *prompts)
    assert code == 0 and len(base) == 3 and all(b != PAIRS[p] for b, p in zip(base, prompts))


def test_no_chat_asks_the_raw_text(llama, capsys):
    model, tokenizer = load_causal_lm(llama)
    ids = tokenizer("w1 w2", return_tensors="pt")
    expected = tokenizer.decode(model.generate(**ids, max_new_tokens=6, do_sample=False)[0, ids["input_ids"].shape[1]:],
                                skip_special_tokens=True)
    assert generated(capsys, "--model", str(llama), "--no-chat", "w1 w2") == (0, [expected.strip()])
    assert complete(model, tokenizer, "w1 w2", 6, chat=True) != expected  # the template makes a difference here


def test_a_peft_adapter_loads_and_gives_peft_s_completion(llama, tmp_path, capsys):
    peft = pytest.importorskip("peft")
    model, tokenizer = load_causal_lm(llama)
    torch.manual_seed(5)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = peft.get_peft_model(model, config).eval()
    peft_model.save_pretrained(tmp_path / "peft")
    expected = complete(peft_model, tokenizer, "w3 w4", 6)
    assert generated(capsys, "--model", str(llama), "--adapter", str(tmp_path / "peft"), "w3 w4") == (0, [expected])
    assert generated(capsys, "--model", str(llama), "w3 w4")[1] != [expected]  # the adapter made the difference


def test_an_adapter_for_another_base_exits_non_zero_naming_the_layer_and_shapes(trained, tmp_path, capsys):
    other = write_tiny_llama(tmp_path / "other", seed=3, **{**SIZE, "intermediate_size": 192})
    capsys.readouterr()
    assert main(["generate", "--model", str(other), "--adapter", str(trained), "w1 w2"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "does not fit layer 'model.layers.0.mlp.gate_proj'" in captured.err
    assert "has shape (128, 8), the model needs (192, 8)" in captured.err


@pytest.mark.integration
def test_smollm2_names_the_capital_of_france(capsys):
    code, out = generated(capsys, "--model", "smollm2", "--max-new-tokens", "24", "What is the capital of France?")
    assert code == 0 and "Paris" in out[0]
