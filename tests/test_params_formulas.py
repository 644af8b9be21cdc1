"""Closed-form parameter counts: seed 004's T5-small table, exactly, by formula and by injecting.

T5-small's architecture is built on the meta device: shapes only, no weights, instant.
"""
from __future__ import annotations

import pytest
import torch

import lorakit as lk
from lorakit.params import added_parameters, describe, formula, full_parameters

transformers = pytest.importorskip("transformers")

T5_SMALL = dict(d_model=512, d_ff=2048, num_layers=6, num_decoder_layers=6, num_heads=8, d_kv=64,
                vocab_size=32128, tie_word_embeddings=True)

# (config, seed 004's added parameters, seed 004's formula)
REFERENCE_004 = [
    (lk.PromptConfig(num_tokens=10), 5_120, "10 x 512"),
    (lk.AdapterConfig(bottleneck=8, targets=r".*\.DenseReluDense"), 104_544, "12 x (512*8 + 8 + 8*512 + 512)"),
    (lk.LoRAConfig(rank=8, alpha=16, targets=["q", "v"]), 294_912, "36 x 8 x (512 + 512)"),
]


def t5_small():
    with torch.device("meta"):
        return transformers.T5ForConditionalGeneration(transformers.T5Config(**T5_SMALL))


def test_t5_small_full_count():
    assert full_parameters(t5_small()) == 60_506_624
    assert lk.count_parameters(t5_small()).total == 60_506_624


@pytest.mark.parametrize("cfg, added, closed_form", REFERENCE_004, ids=["prompt", "adapter", "lora"])
def test_t5_small_added_counts_by_formula_and_by_injecting(cfg, added, closed_form):
    model = t5_small()
    assert added_parameters(model, cfg) == added
    assert formula(model, cfg) == closed_form
    with torch.device("meta"):
        lk.inject(model, cfg)
    count = lk.count_parameters(model)
    assert count.adapter == count.trainable == added
    assert count.total == 60_506_624 + added


def test_describe_prints_formula_and_count():
    text = describe(t5_small(), REFERENCE_004[2][0])
    assert "36 x 8 x (512 + 512) = 294,912" in text and "60,506,624" in text
    assert "60,506,624" in describe(t5_small(), None)


@pytest.mark.parametrize("method, expected", [("full", "60,506,624"), ("prompt", "5,120"),
                                              ("adapter", "104,544"), ("lora", "294,912")])
def test_lorakit_params_command(method, expected, capsys):
    from lorakit.cli import main

    assert main(["params", "--model", "t5-small-config", "--method", method]) == 0
    out = capsys.readouterr().out
    assert expected in out
    if method != "full":
        assert f"counted after inject: {expected} (matches the formula)" in out


@pytest.mark.parametrize("bottleneck, rank, tokens", [(1, 1, 1), (3, 2, 7), (8, 4, 10)])
def test_formulas_match_counts_on_tiny_bert(bottleneck, rank, tokens):
    from lorakit.models.hf import tiny_bert_config

    configs = [lk.AdapterConfig(bottleneck=bottleneck, targets=r".*\.layer\.\d+\.output\.dense"),
               lk.LoRAConfig(rank=rank, targets=["query", "key", "value", "word_embeddings"]),
               lk.PromptConfig(num_tokens=tokens)]
    for cfg in configs:
        torch.manual_seed(0)
        model = transformers.BertModel(tiny_bert_config())
        expected = added_parameters(model, cfg)
        lk.inject(model, cfg)
        assert lk.count_parameters(model).adapter == expected > 0


def test_formula_refuses_what_inject_refuses():
    with pytest.raises(ValueError, match="hidden size"):
        added_parameters(t5_small(), lk.AdapterConfig(bottleneck=8, targets=r".*\.DenseReluDense\.wi"))


@pytest.mark.parametrize("rank", [2, 8])
def test_lorakit_params_causal_lm_defaults_to_all_linear_and_matches_peft(rank, tmp_path, capsys):
    import re

    peft = pytest.importorskip("peft")
    from lorakit.cli import main
    from tiny_llama import tiny_llama, write_tiny_llama

    folder = write_tiny_llama(tmp_path / "tiny")
    assert main(["params", "--model", str(folder), "--task", "causal-lm", "--rank", str(rank)]) == 0
    out = capsys.readouterr().out
    base = int(re.search(r"model: LlamaForCausalLM, ([\d,]+) parameters", out).group(1).replace(",", ""))
    counted = int(re.search(r"counted after inject: ([\d,]+) \(matches", out).group(1).replace(",", ""))
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear",
                                                                task_type="CAUSAL_LM"))
    trainable, total = theirs.get_nb_trainable_parameters()
    assert (counted, base + counted) == (trainable, total)
