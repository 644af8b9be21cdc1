"""``lorakit finetune`` on a tiny random Llama folder and a tiny JSONL: each format learns, each method writes what
it should (and it loads back, in PEFT too), a stopped run resumes to the same adapter, bad input writes nothing."""
import json
import os
import subprocess
import sys

import pytest
import torch

import lorakit as lk
from lorakit.cli import main
from lorakit.data.chat import SFTCollator, SFTDataset, read_jsonl
from lorakit.experiments import finetune
from lorakit.models.llm import load_causal_lm
from tiny_llama import token_batch, write_tiny_llama

pytest.importorskip("transformers")
SIZE = dict(hidden_size=64, intermediate_size=128, initializer_range=0.2)  # bitsandbytes blocks are 64 wide
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "results.json", "loss.png"}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("ft") / "llama", seed=3, **SIZE)


def write_jsonl(path, chat: bool = False, n: int = 8):
    """Each prompt's answer is a fixed function of it: w<i> w<i+1> -> w<i+20> w<i+30>."""
    with open(path, "w") as f:
        for i in range(n):
            prompt, answer = f"w{i} w{i + 1}", f"w{i + 20} w{i + 30}"
            record = {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]} \
                if chat else {"prompt": prompt, "completion": answer}
            f.write(json.dumps(record) + "\n")
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl")


def finetune_args(llama, data, out, *extra):
    return ["finetune", "--model", str(llama), "--data", str(data), "--eval", str(data), "--steps", "12",
            "--batch-size", "4", "--lr", "1e-2", "--out", str(out), *extra]


def results(out) -> dict:
    return json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("chat", [False, True], ids=["prompt-completion", "chat"])
def test_each_format_trains_and_the_loss_falls(tmp_path, llama, chat, single_thread):
    data = write_jsonl(tmp_path / "data.jsonl", chat=chat)
    assert main(finetune_args(llama, data, tmp_path / "out", "--steps", "20", "--eval-every", "10")) == 0
    found = results(tmp_path / "out")
    assert found["eval_steps"] == [0, 10, 20] and found["steps"] == 20 and len(found["losses"]) == 20
    assert found["eval_loss"] < 0.5 * found["eval_losses"][0]
    assert sum(found["losses"][-5:]) < 0.5 * sum(found["losses"][:5])


def reloaded_eval_loss(llama, out, method) -> float:
    """The eval loss of what ``out`` holds, loaded afresh (a base and the adapter, or the whole model)."""
    if method == "full":
        model, tokenizer = load_causal_lm(out)
    else:
        model, tokenizer = load_causal_lm(llama, quantize="4bit" if method == "qlora" else None)
        lk.load_adapter(model, out)
    data = SFTDataset(read_jsonl(results(out)["settings"]["data"]), tokenizer)
    return finetune.mean_loss(model, data, SFTCollator(tokenizer.pad_token_id), 4)


@pytest.mark.parametrize("method", ["lora", "dora", "qlora", "prompt", "adapter", "full"])
def test_each_method_writes_its_outputs_and_they_load_back_to_the_trained_loss(tmp_path, llama, data, method,
                                                                              single_thread):
    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    out = tmp_path / "out"
    assert main(finetune_args(llama, data, out, "--method", method, "--rank", "4", "--num-tokens", "3")) == 0
    files = {p.name for p in out.iterdir()}
    found = results(out)
    if method == "full":
        assert {"config.json", "model.safetensors", "tokenizer.json", "results.json", "loss.png"} <= files
        assert "adapter_config.json" not in files
        assert found["parameters"]["trainable"] == found["parameters"]["total"]
    else:
        assert ADAPTER_FILES <= files and "model.safetensors" not in files
        assert 0 < found["parameters"]["trainable"] == found["parameters"]["adapter"] < found["parameters"]["total"]
    assert not [name for name in files if "state" in name]  # the training state is gone once the run is done
    assert found["settings"]["method"] == method and found["steps"] == 12
    assert found["wall_seconds"] >= found["train_seconds"] > 0  # one continuation: the command's time holds the loop's
    assert reloaded_eval_loss(llama, out, method) == pytest.approx(found["eval_loss"], abs=1e-5)
    assert found["eval_loss"] < found["eval_losses"][0]
    if method == "qlora":  # generate takes it on a 4-bit base too
        assert main(["generate", "--model", str(llama), "--quantize", "4bit", "--adapter", str(out), "w1 w2"]) == 0


def test_qlora_trains_the_same_with_and_without_evaluations(tmp_path, llama, data, single_thread):
    """finetune scores --eval at step 0, before training: on CPUs with AVX512-BF16 that packs every 4-bit weight for
    bitsandbytes' inference kernel, which has no backward, and training then reached only the top adapters (lorakit
    keeps the standard layout for training: layers/base.keep_4bit_training_exact)."""
    pytest.importorskip("bitsandbytes")
    command = ["finetune", "--model", str(llama), "--data", str(data), "--steps", "6", "--batch-size", "4",
               "--lr", "1e-2", "--method", "qlora", "--rank", "4"]
    assert main([*command, "--out", str(tmp_path / "plain")]) == 0
    assert main([*command, "--eval", str(data), "--eval-every", "2", "--out", str(tmp_path / "evaluated")]) == 0
    plain, evaluated = results(tmp_path / "plain"), results(tmp_path / "evaluated")
    assert evaluated["eval_steps"] == [0, 2, 4, 6] and plain["eval_steps"] == []
    assert evaluated["losses"] == pytest.approx(plain["losses"], abs=1e-6, rel=0)


def test_peft_loads_the_written_lora_adapter_with_the_same_logits(tmp_path, llama, data, single_thread):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    assert main(finetune_args(llama, data, tmp_path / "out")) == 0
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["lora_alpha"] == 16
    ids = token_batch(seed=4)
    base = AutoModelForCausalLM.from_pretrained(llama).eval()
    with torch.no_grad():
        plain = base(ids).logits
        ours = lk.load_adapter(AutoModelForCausalLM.from_pretrained(llama).eval(), tmp_path / "out")(ids).logits
        theirs = peft.PeftModel.from_pretrained(base, tmp_path / "out").eval()(ids).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    assert (ours - plain).abs().max() > 1e-3  # the adapter was trained: it changes the output


class Killed(BaseException):
    """Stands in for SIGKILL: nothing in lorakit catches it."""


def stop_at(monkeypatch, step: int) -> None:
    real = finetune.EvalLog.on_step

    def on_step(self, at):
        real(self, at)
        if at == step:
            raise Killed(at)

    monkeypatch.setattr(finetune.EvalLog, "on_step", on_step)


def adapter_tensors(out) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "adapter_model.safetensors"))


def test_a_run_stopped_between_two_states_resumes_to_the_uninterrupted_adapter(tmp_path, llama, data, monkeypatch,
                                                                             single_thread):
    args = ["--save-every", "4", "--eval-every", "3", "--padding-side", "left"]
    assert main(finetune_args(llama, data, tmp_path / "whole", *args)) == 0
    with monkeypatch.context() as patch:
        stop_at(patch, 10)  # the last state is step 8's
        with pytest.raises(Killed):
            main(finetune_args(llama, data, tmp_path / "stopped", *args))
    assert (tmp_path / "stopped" / finetune.STATE_FILE).is_file()
    assert not (tmp_path / "stopped" / "results.json").exists()
    assert main(finetune_args(llama, data, tmp_path / "stopped", *args, "--resume")) == 0
    whole, resumed = results(tmp_path / "whole"), results(tmp_path / "stopped")
    assert resumed["losses"] == pytest.approx(whole["losses"], abs=1e-6)
    assert resumed["eval_steps"] == whole["eval_steps"] == [0, 3, 6, 9, 12]
    assert resumed["eval_losses"] == pytest.approx(whole["eval_losses"], abs=1e-6)
    expected = adapter_tensors(tmp_path / "whole")
    for key, value in adapter_tensors(tmp_path / "stopped").items():
        torch.testing.assert_close(value, expected[key], atol=1e-6, rtol=0, msg=key)
    assert main(finetune_args(llama, data, tmp_path / "stopped", *args, "--resume")) == 0  # finished: nothing to do


@pytest.mark.parametrize("change, field", [(["--rank", "4"], "rank=8"), (["--lr", "0.02"], "lr=0.01"),
                                           (["--method", "adapter"], "method='lora'"), ("data", "data_sha256=")])
def test_resume_with_another_setting_is_refused_naming_the_field(tmp_path, llama, monkeypatch, capsys, change, field,
                                                                 single_thread):
    data = write_jsonl(tmp_path / "data.jsonl")
    with monkeypatch.context() as patch:
        stop_at(patch, 5)
        with pytest.raises(Killed):
            main(finetune_args(llama, data, tmp_path / "out", "--save-every", "4"))
    if change == "data":
        write_jsonl(data, n=7)
        change = []
    capsys.readouterr()
    assert main(finetune_args(llama, data, tmp_path / "out", "--save-every", "4", "--resume", *change)) == 1
    error = capsys.readouterr().err
    assert "cannot resume" in error and f"it was started with {field}" in error
    assert not (tmp_path / "out" / "results.json").exists()


@pytest.mark.parametrize("line, words", [("{oops", "not valid JSON"), ('{"text": "w1"}', "neither format"),
                                         ('{"prompt": "w1", "completion": 5}', "expected 'completion' to be")])
def test_a_malformed_line_is_refused_by_line_number_and_nothing_is_written(tmp_path, llama, capsys, line, words):
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "w1", "completion": "w2"}\n' + line + "\n")
    assert main(finetune_args(llama, data, tmp_path / "out")) == 1
    error = capsys.readouterr().err
    assert f"{data}, line 2: " in error and words in error and "expected" in error
    assert not (tmp_path / "out").exists()


def test_an_example_whose_prompt_fills_max_length_is_refused_and_nothing_is_written(tmp_path, llama, data, capsys):
    assert main(finetune_args(llama, data, tmp_path / "out", "--max-length", "5")) == 1
    assert f"{data}, line 1: no answer token is left within max_length=5" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_qlora_without_bitsandbytes_names_the_package(tmp_path, llama, data, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    assert main(finetune_args(llama, data, tmp_path / "out", "--method", "qlora")) == 1
    assert "needs the `bitsandbytes` package: pip install bitsandbytes" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_train_the_same_adapter_as_one(tmp_path, llama, data, parallel, single_thread):
    from distributed_workers import free_port

    assert main(finetune_args(llama, data, tmp_path / "one", "--steps", "6")) == 0
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), "-m", "lorakit",
         *finetune_args(llama, data, tmp_path / "two", "--steps", "6", "--parallel", parallel)],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("[finetune] wrote") == 1  # rank 0 alone writes
    one, two = results(tmp_path / "one"), results(tmp_path / "two")
    assert two["losses"] == pytest.approx(one["losses"], abs=1e-5)
    assert two["eval_losses"] == pytest.approx(one["eval_losses"], abs=1e-5)
    expected = adapter_tensors(tmp_path / "one")
    for key, value in adapter_tensors(tmp_path / "two").items():
        torch.testing.assert_close(value, expected[key], atol=1e-4, rtol=0, msg=key)  # Adam amplifies fp32 sum order
