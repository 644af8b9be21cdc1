"""AdapterHub's row of peft-compare: the job plan mirrors lorakit.train, and (when `.venv-adapters` exists) the real
subprocess trains AdapterHub's bottleneck adapter with as many parameters as lorakit's.

The real run is skipped, saying so in pytest's summary, when the environment is absent (`make adapters-env`
creates it; LORAKIT_ADAPTERS_ENV may point to another one)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from lorakit.experiments import peft_compare_adapterhub as adapterhub  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ENV = Path(os.environ.get("LORAKIT_ADAPTERS_ENV", ROOT / ".venv-adapters"))


def test_batch_plan_is_what_train_does():
    import torch

    from lorakit.train import TrainConfig, train

    cfg = TrainConfig(lr=0.1, batch_size=4, epochs=2.5, seed=3, optimizer="sgd", schedule="linear", warmup_steps=2,
                      log_every=1, progress=False)
    batches, eval_steps, factors = adapterhub.batch_plan(10, cfg)
    seen = []
    data = (torch.arange(10.0).unsqueeze(1), torch.zeros(10, dtype=torch.long))
    model = torch.nn.Linear(1, 2)

    def loss_fn(model, batch):
        seen.append(batch[0].squeeze(1).long().tolist())
        return model(batch[0]).sum()

    history = train(model, data, cfg, loss_fn=loss_fn, validation=data, num_classes=2)
    lrs = [cfg.lr * f for f in factors[:len(batches)]]
    assert batches == seen and len(batches) == history.steps == 8
    assert eval_steps == history.val_steps == [3, 6, 8]
    assert lrs[0] == pytest.approx(0.1 / 3) and factors[len(batches)] == 0.0


def test_missing_env_names_the_installer_error(tmp_path):
    env = adapterhub.find_env(tmp_path / "venv")
    assert not env.ready and "make adapters-env" in env.reason
    (tmp_path / "venv.log").write_text("Collecting adapters\nERROR: Could not find a version that satisfies adapters\n")
    env = adapterhub.find_env(tmp_path / "venv")
    assert not env.ready and "ERROR: Could not find a version that satisfies adapters" in env.reason


def test_broken_env_quotes_the_import_error(tmp_path):
    python = tmp_path / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text("#!/bin/sh\necho 'ModuleNotFoundError: No module named adapters' >&2\nexit 1\n")
    python.chmod(0o755)
    env = adapterhub.find_env(tmp_path / "venv")
    assert not env.ready and "No module named adapters" in env.reason


@pytest.mark.integration
def test_real_adapterhub_row(tmp_path):
    env = adapterhub.find_env(ENV)
    if not env.ready:
        pytest.skip(f"AdapterHub's environment is not usable, so its real run was NOT tested: {env.reason.splitlines()[0]}")
    import torch
    from transformers import BertForSequenceClassification, BertTokenizer

    from lorakit import AdapterConfig, count_parameters, inject
    from lorakit.data.text import TextDataset
    from lorakit.models.hf import tiny_bert_config
    from lorakit.train import TrainConfig

    words = ["cat", "dog", "car", "bus", "red", "big"]
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config(vocab_size=11, max_position_embeddings=32, num_labels=2))
    model.save_pretrained(tmp_path)
    tokenizer = BertTokenizer(vocab_file=str(tmp_path / "vocab.txt"))
    tokenizer.save_pretrained(tmp_path)
    data = TextDataset(["cat dog red", "car bus big", "dog cat", "bus car red", "cat big", "car"] * 2, [0, 1] * 6,
                       ["a", "b"])
    settings = {"model": str(tmp_path), "num_labels": 2, "bottleneck": 2}
    cfg = TrainConfig(lr=1e-2, batch_size=4, epochs=2, seed=0, optimizer="adamw", schedule="linear", log_every=1)
    head = adapterhub.save_initial_head(settings, 0, tmp_path / "head.safetensors")
    batches, eval_steps, factors = adapterhub.batch_plan(len(data), cfg)
    ids = adapterhub.token_ids(tokenizer, data, 12)
    job = {**adapterhub.common_job(settings, tokenizer, 1, 0, head), "train": ids, "validation": ids, "test": ids,
           "lr": cfg.lr, "weight_decay": 0.0, "batches": batches, "eval_steps": eval_steps, "lr_factors": factors}
    result = adapterhub.run_cell(env, job, tmp_path, "cell")
    assert result["steps"] == len(result["losses"]) == 6 and result["val_steps"] == [3, 6]
    assert all(0 < loss < 10 for loss in result["losses"]) and 0 <= result["accuracy"] <= 100
    assert result["versions"]["adapters"] and result["versions"]["transformers"].startswith("4.")
    # Same size as lorakit's adapter after each block's FFN output, plus the same head.
    ours = BertForSequenceClassification.from_pretrained(tmp_path)
    inject(ours, AdapterConfig(bottleneck=2, targets=r".*\.layer\.\d+\.output\.dense", modules_to_save=["classifier"]))
    assert result["trainable_parameters"] == count_parameters(ours).trainable
