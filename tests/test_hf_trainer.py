"""lorakit.hf.Trainer: checkpoints are PEFT-layout adapter folders, and resuming from one ends where an
uninterrupted run ends; a quantised (bitsandbytes 8-bit) base trains. Accelerate's prepare() takes a lorakit model
as it is."""
import json

import pytest
import torch

pytest.importorskip("transformers")

import lorakit as lk  # noqa: E402
from lorakit.models.hf import tiny_bert_config  # noqa: E402
from tiny_llama import tiny_llama, token_batch, write_tiny_llama  # noqa: E402


ADAPTERS = {  # name -> the LoRAConfig fields beside rank, alpha and modules_to_save=["classifier"]
    "lora": {"targets": ["query", "value"]},
    "trainable-tokens": {"targets": ["query", "value"], "trainable_token_indices": [5, 9, 17]},
    "dora-with-embedding": {"targets": ["query", "value", "word_embeddings"], "dora": True},
}


def lora_bert(adapter="lora"):
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config(num_labels=3))
    return lk.inject(model, lk.LoRAConfig(rank=4, alpha=8, modules_to_save=["classifier"], **ADAPTERS[adapter]))


def examples(n=24):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 64, (n, 10), generator=g)
    return [{"input_ids": ids[i], "attention_mask": torch.ones(10, dtype=torch.long), "labels": int(ids[i, 1] % 3)}
            for i in range(n)]


def trainer(out, model):
    from transformers import TrainingArguments

    from lorakit.hf import Trainer

    args = TrainingArguments(output_dir=str(out), max_steps=6, save_steps=3, save_strategy="steps",
                             per_device_train_batch_size=4, learning_rate=1e-2, report_to=[], use_cpu=True, seed=0,
                             logging_steps=1, dataloader_num_workers=0, disable_tqdm=True)
    return Trainer(model=model, args=args, train_dataset=examples())


def adapter_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if "lora_" in k or "modules_to_save" in k or "trainable_tokens" in k}


@pytest.mark.parametrize("adapter", list(ADAPTERS))
def test_checkpoints_are_adapter_folders_and_resume_ends_where_an_uninterrupted_run_ends(tmp_path, adapter):
    model = lora_bert(adapter)
    trainer(tmp_path / "whole", model).train()
    expected = adapter_state(model)

    checkpoint = tmp_path / "whole" / "checkpoint-3"
    files = {p.name for p in checkpoint.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "scheduler.pt",
            "trainer_state.json"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin"}
    assert json.loads((checkpoint / "adapter_config.json").read_text())["peft_type"] == "LORA"

    resumed = lora_bert(adapter)
    trainer(tmp_path / "resumed", resumed).train(resume_from_checkpoint=str(checkpoint))
    state = adapter_state(resumed)
    assert state.keys() == expected.keys()
    for key, value in state.items():
        torch.testing.assert_close(value, expected[key], atol=1e-6, rtol=0, msg=key)
    untouched = adapter_state(lora_bert(adapter))
    must_move = {"lora": ("lora_B",), "trainable-tokens": ("trainable_tokens",),
                 "dora-with-embedding": ("word_embeddings", "lora_magnitude_vector")}[adapter]
    moved = [k for k in expected if all(m in k for m in must_move) and not torch.equal(untouched[k], expected[k])]
    assert moved, f"training moved no {must_move} tensor of {sorted(expected)}"


def test_the_checkpoint_loads_in_peft_with_the_same_outputs(tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import BertForSequenceClassification

    model = lora_bert()
    trainer(tmp_path / "run", model).train()
    torch.manual_seed(0)
    base = BertForSequenceClassification(tiny_bert_config(num_labels=3))
    loaded = peft.PeftModel.from_pretrained(base, str(tmp_path / "run" / "checkpoint-6")).eval()
    batch = {"input_ids": torch.stack([e["input_ids"] for e in examples(4)])}
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model.eval()(**batch).logits, atol=1e-5, rtol=0)


def test_accelerate_prepare_trains_and_saves_a_lorakit_model(tmp_path):
    accelerate = pytest.importorskip("accelerate")
    model = lora_bert()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loader = torch.utils.data.DataLoader(examples(), batch_size=4)
    accelerator = accelerate.Accelerator(cpu=True)
    prepared, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    before = adapter_state(model)
    for batch in loader:
        accelerator.backward(prepared(**batch).loss)
        optimizer.step()
        optimizer.zero_grad()
    assert any(not torch.equal(v, before[k]) for k, v in adapter_state(model).items())
    lk.save_adapter(accelerator.unwrap_model(prepared), tmp_path / "adapter")
    fresh = lora_bert()
    lk.load_adapter(fresh, tmp_path / "adapter", name="default")
    for key, value in adapter_state(model).items():
        assert torch.equal(adapter_state(fresh)[key], value), key


def trains_where_transformers_refuses(model, out, batch=4):
    """transformers.Trainer refuses ``model`` as purely quantized; lorakit.hf.Trainer trains every lora_B."""
    import transformers
    from transformers import TrainingArguments

    from lorakit.hf import Trainer

    rows = [{"input_ids": row, "labels": row} for row in token_batch(batch=2 * batch, length=6)]
    args = TrainingArguments(output_dir=str(out), max_steps=2, per_device_train_batch_size=batch,
                             learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    with pytest.raises(ValueError, match="purely quantized"):
        transformers.Trainer(model=model, args=args, train_dataset=rows)
    before = adapter_state(model)
    Trainer(model=model, args=args, train_dataset=rows).train()
    assert all(not torch.equal(v, before[k]) for k, v in adapter_state(model).items() if "lora_B" in k)


QUANTISED = {"8bit": (dict(load_in_8bit=True), "Linear8bitLt"),
             "4bit": (dict(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32), "Linear4bit")}


def quantised_llama(folder, kind):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=BitsAndBytesConfig(**QUANTISED[kind][0]),
                                                 device_map="cpu")
    return lk.inject(model, lk.LoRAConfig(rank=4, alpha=8, targets="all-linear"))


@pytest.mark.parametrize("kind", list(QUANTISED))
def test_a_bitsandbytes_base_trains_where_transformers_trainer_refuses_it(tmp_path, kind):
    model = quantised_llama(write_tiny_llama(tmp_path / "tiny", hidden_size=64, intermediate_size=128), kind)
    assert model.is_quantized and type(model.model.layers[0].mlp.up_proj.base_layer).__name__ == QUANTISED[kind][1]
    trains_where_transformers_refuses(model, tmp_path / "run")
    assert not model._hf_peft_config_loaded  # the flag was set for the constructor only


def untrainable_mark(model):
    """transformers' mark of a quantisation it cannot train through (its GGUF quantiser's is_trainable is False)."""
    from types import SimpleNamespace

    model.is_quantized = True
    model.hf_quantizer = SimpleNamespace(is_trainable=False, quantization_config=SimpleNamespace(quant_method="gguf"))
    return model


def test_a_gguf_load_dequantised_to_plain_weights_trains(tmp_path):
    model = untrainable_mark(lk.inject(tiny_llama(), lk.LoRAConfig(rank=4, targets="all-linear")))
    trains_where_transformers_refuses(model, tmp_path / "run")


def test_packed_weights_of_a_quantisation_transformers_cannot_train_through_are_refused(tmp_path):
    from transformers import TrainingArguments

    from lorakit.hf import Trainer

    folder = write_tiny_llama(tmp_path / "tiny", hidden_size=64, intermediate_size=128)
    model = untrainable_mark(quantised_llama(folder, "4bit"))
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=1, report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match="quantised with gguf"):
        Trainer(model=model, args=args, train_dataset=[{"input_ids": token_batch()[0]}])


@pytest.mark.integration
def test_smollm2_loaded_from_its_gguf_trains_where_transformers_trainer_refuses_it(tmp_path):
    """transformers marks a GGUF load quantised (its quantiser says untrainable) though it dequantises the weights."""
    from transformers import AutoModelForCausalLM

    from lorakit.models.llm import smollm2_gguf

    gguf = smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    assert model.is_quantized
    lk.inject(model, lk.LoRAConfig(rank=4, alpha=8, targets=["q_proj", "v_proj"]))
    trains_where_transformers_refuses(model, tmp_path / "run", batch=2)
