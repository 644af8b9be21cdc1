"""lorakit.hf.SFTTrainer: TRL's SFTTrainer on a lorakit tiny Llama, chat data, loss on completions only, gradient
checkpointing on. Checkpoints are PEFT-layout adapter folders; resuming ends where an uninterrupted run ends; the
trained adapter equals PEFT's ``peft_config=`` run. Without TRL, ``import lorakit.hf`` still works."""
import json
import subprocess
import sys

import pytest
import torch

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

import lorakit as lk  # noqa: E402
from lorakit.checkpoint import adapter_tensors  # noqa: E402
from tiny_llama import tiny_llama, tiny_tokenizer  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def words(seed: int, n: int) -> str:
    return " ".join(f"w{(seed * 7 + i * 3) % 80}" for i in range(n))


def chats(n: int = 16):
    """Conversational prompt/completion rows: TRL applies the chat template and masks the prompt."""
    return datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": words(i, 4)}],
                                        "completion": [{"role": "assistant", "content": words(i + 1, 3)}]}
                                       for i in range(n)])


def lora_llama():
    return lk.inject(tiny_llama(), lk.LoRAConfig(rank=4, alpha=8, targets=TARGETS))


def sft_args(out, **overrides):
    from trl import SFTConfig

    fields = dict(output_dir=str(out), max_steps=4, save_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                  completion_only_loss=True, activation_checkpointing=True, report_to=[], use_cpu=True, seed=0,
                  logging_steps=1, disable_tqdm=True, dataloader_num_workers=0)
    return SFTConfig(**{**fields, **overrides})


def trainer(out, model, **kwargs):
    from lorakit.hf import SFTTrainer

    return SFTTrainer(model=model, args=sft_args(out), train_dataset=chats(), processing_class=tiny_tokenizer(),
                      **kwargs)


def adapter_state(model):
    return {key: tensor.detach().clone() for key, (tensor, _) in adapter_tensors(model, "default").items()}


def test_the_loss_covers_the_completion_only():
    sft = trainer("unused", lora_llama())
    batch = sft.data_collator([sft.train_dataset[0]])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    text = tiny_tokenizer().apply_chat_template([{"role": "user", "content": words(0, 4)}], tokenize=False,
                                                add_generation_prompt=True)
    prompt_length = len(tiny_tokenizer()(text, add_special_tokens=False)["input_ids"])
    assert (labels[:prompt_length] == -100).all()
    assert torch.equal(labels[prompt_length:], ids[prompt_length:])
    assert tiny_tokenizer().decode(ids[prompt_length:]) == f"{words(1, 3)} </s>"


def test_checkpoints_are_adapter_folders_and_resume_ends_where_an_uninterrupted_run_ends(tmp_path):
    model = lora_llama()
    sft = trainer(tmp_path / "whole", model)
    sft.train()
    assert model.is_activation_checkpointing
    expected = adapter_state(model)

    checkpoint = tmp_path / "whole" / "checkpoint-2"
    files = {p.name for p in checkpoint.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "trainer_state.json"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin"}
    assert json.loads((checkpoint / "adapter_config.json").read_text())["peft_type"] == "LORA"

    resumed = lora_llama()
    trainer(tmp_path / "resumed", resumed).train(resume_from_checkpoint=str(checkpoint))
    for key, value in adapter_state(resumed).items():
        torch.testing.assert_close(value, expected[key], atol=1e-6, rtol=0, msg=key)
    untouched = adapter_state(lora_llama())
    assert all(not torch.equal(untouched[k], expected[k]) for k in expected if "lora_B" in k)


def test_the_trained_adapter_equals_peft_trained_by_peft_config(tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import set_seed

    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM")
    base = tiny_llama()
    set_seed(0)  # SFTTrainer seeds with args.seed, then initialises PEFT's adapter: the same start, saved
    peft.get_peft_model(base, config).save_pretrained(tmp_path / "start")
    ours = lk.load_adapter(tiny_llama(), tmp_path / "start")
    trainer(tmp_path / "ours", ours).train()

    from trl import SFTTrainer

    theirs = SFTTrainer(model=tiny_llama(), args=sft_args(tmp_path / "theirs"), train_dataset=chats(),
                        processing_class=tiny_tokenizer(), peft_config=config)
    theirs.train()
    trained = peft.get_peft_model_state_dict(theirs.model)
    for key, value in adapter_state(ours).items():
        assert torch.equal(value, trained[key]), key


def test_import_lorakit_hf_without_trl_and_the_error_that_names_it():
    code = ("import sys; import lorakit.hf; assert 'trl' not in sys.modules, 'imported eagerly'\n"
            "sys.modules['trl'] = None  # as if it were not installed\n"
            "try:\n    lorakit.hf.SFTTrainer\nexcept ImportError as err:\n    print(err)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "pip install trl" in done.stdout
