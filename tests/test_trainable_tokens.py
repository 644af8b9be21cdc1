"""Trainable token rows (PEFT's ``trainable_token_indices``): the invariants LoRA has (init, merge, disabled,
unload, training, several adapters) and the refusals. Loading both ways with PEFT (tied and untied tiny Llamas, a
plain torch model, with other settings) is in tests/test_peft_combinations.py."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import lorakit as lk
from conftest import FACTORIES, assert_same_state, perturb_adapters, state_snapshot
from lorakit.layers.trainable_tokens import TrainableTokens
from tiny_llama import tiny_llama, token_batch

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.filterwarnings("ignore")]


def llama(tie: bool):
    def factory():
        return tiny_llama(tie_word_embeddings=tie)
    return factory


def embedding_net():
    return FACTORIES["embedding"]()


def run(model, x):
    with torch.no_grad():
        out = model(x)
    return getattr(out, "logits", out)


def tokens_model(tie: bool = True, rows=(5, 7, 9)):
    model = lk.inject(tiny_llama(tie_word_embeddings=tie),
                      lk.LoRAConfig(rank=2, alpha=4.0, targets=["q_proj"], trainable_token_indices=list(rows)))
    return model


def test_at_init_the_rows_equal_the_base_and_only_they_and_lora_train():
    base, model = tiny_llama(), tokens_model()
    x = token_batch()
    torch.testing.assert_close(run(model, x), run(base, x), atol=0, rtol=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "model.embed_tokens.trainable_tokens_delta.default" in trainable
    assert not any("base_layer" in n or "lm_head" in n for n in trainable), trainable
    assert lk.count_parameters(model).adapter == lk.params.lora_added_parameters(tiny_llama(), model.lorakit_configs["default"])
    assert lk.params.lora_added_parameters(tiny_llama(), lk.LoRAConfig(targets=["q_proj"], trainable_token_indices=[1])) \
        == lk.params.lora_added_parameters(tiny_llama(), lk.LoRAConfig(targets=["q_proj"])) + 32, "one row of width 32"


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_a_training_step_changes_only_the_chosen_rows_and_a_tied_head_follows(tie):
    model = tokens_model(tie)
    before = model.model.embed_tokens.base_layer.weight.detach().clone()
    optimiser = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    x = token_batch(length=9)
    x[0, :3] = torch.tensor([5, 7, 9])
    model.train()
    model(x, labels=x).loss.backward()
    optimiser.step()
    model.eval()
    embedding = model.model.embed_tokens
    assert torch.equal(embedding.base_layer.weight, before), "the base weight stays frozen"
    changed = (embedding.weight - before).abs().sum(1).nonzero().flatten().tolist()
    assert changed == [5, 7, 9]
    head = model.lm_head
    assert isinstance(head, TrainableTokens) == tie
    if tie:
        torch.testing.assert_close(head.weight, embedding.weight, atol=0, rtol=0)


def test_merge_unmerge_disabled_and_unload_are_exact():
    base, model = tiny_llama(), tokens_model()
    perturb_adapters(model, std=0.3)
    x = token_batch()
    trained, plain = run(model, x), run(base, x)
    weight = model.model.embed_tokens.base_layer.weight.detach().clone()
    lk.merge(model)
    torch.testing.assert_close(run(model, x), trained, atol=1e-5, rtol=1e-5)
    assert torch.equal(model.lm_head.base_layer.weight[[5, 7, 9]], model.model.embed_tokens.trainable_tokens_delta["default"])
    with lk.disabled(model):
        torch.testing.assert_close(run(model, x), plain, atol=1e-5, rtol=1e-5)
    lk.unmerge(model)
    assert torch.equal(model.model.embed_tokens.base_layer.weight, weight), "unmerge restores the rows bit for bit"
    kept = lk.unload(tokens_model_like(model), merge=False)
    torch.testing.assert_close(run(kept, x), plain, atol=1e-5, rtol=1e-5)
    assert type(kept.model.embed_tokens) is nn.Embedding and kept.lm_head.weight is kept.model.embed_tokens.weight
    merged = lk.unload(model, merge=True)
    torch.testing.assert_close(run(merged, x), trained, atol=1e-5, rtol=1e-5)
    assert type(merged.lm_head) is nn.Linear and merged.lm_head.weight is merged.model.embed_tokens.weight


def tokens_model_like(model):
    """A second model with the same trained rows (loaded through a state dict)."""
    twin = tokens_model()
    twin.load_state_dict(model.state_dict())
    return twin


def test_two_adapters_switch_and_delete_their_own_rows():
    model = tokens_model(rows=(5, 7))
    lk.inject(model, lk.LoRAConfig(rank=2, targets=["q_proj"], trainable_token_indices=[8]), name="other")
    perturb_adapters(model, std=0.3)  # "other" is active: only its rows move
    embedding = model.model.embed_tokens
    assert embedding.adapter_names == ["default", "other"] and not embedding.trainable_tokens_delta["default"].requires_grad
    x = token_batch()
    lk.set_active(model, "default")
    first = run(model, x)
    lk.delete_adapter(model, "other")
    torch.testing.assert_close(run(model, x), first, atol=0, rtol=0)
    lk.delete_adapter(model, "default")
    assert type(model.model.embed_tokens) is nn.Embedding and type(model.lm_head) is nn.Linear


def test_the_embedding_weight_the_model_reads_has_the_rows_and_generate_runs():
    model = tokens_model()
    perturb_adapters(model, std=0.3)
    embedding = model.get_input_embeddings()
    assert torch.equal(embedding.weight[[5, 7, 9]], embedding.trainable_tokens_delta["default"])
    x = token_batch(1, 4)
    cached = model.generate(x, max_new_tokens=4, do_sample=False)
    uncached = model.generate(x, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


# -- refusals ---------------------------------------------------------------------------------------
BAD_SPECS = [(-1, TypeError), ([], TypeError), ([1, 1], ValueError), ([1, -2], TypeError), ({"": [1]}, TypeError),
             ({"embed_tokens": []}, TypeError), ("5", TypeError), ([True], TypeError), ({}, TypeError)]


@pytest.mark.parametrize("spec, error", BAD_SPECS, ids=[repr(s) for s, _ in BAD_SPECS])
def test_a_bad_index_spec_is_refused_by_the_config(spec, error):
    with pytest.raises(error, match="trainable_token_indices"):
        lk.LoRAConfig(trainable_token_indices=spec)


INJECT_REFUSALS = [
    ("no module", llama(True), dict(targets=["q_proj"], trainable_token_indices={"wte": [1]}), "no module path ends"),
    ("out of range", llama(True), dict(targets=["q_proj"], trainable_token_indices=[96]), "out of range"),
    ("tied, other rows", llama(True),
     dict(targets=["q_proj"], trainable_token_indices={"embed_tokens": [1], "lm_head": [2]}), "share one weight"),
    ("LoRA on it too", llama(True), dict(targets=["q_proj", "embed_tokens"], trainable_token_indices=[1]),
     "already holds a LoRAEmbedding"),
    ("LoRA on the tied head", llama(True), dict(targets=["q_proj", "lm_head"], trainable_token_indices=[1]),
     "'lm_head' shares the embedding's weight but already holds a LoRALinear"),
    ("not an embedding", llama(True), dict(targets=["q_proj"], trainable_token_indices={"input_layernorm": [0]}),
     "expected an nn.Embedding"),
    ("no embed_tokens", embedding_net, dict(targets=["head"], trainable_token_indices=[1]), "no module path ends"),
]


@pytest.mark.parametrize("case, factory, settings, message", INJECT_REFUSALS, ids=[c[0] for c in INJECT_REFUSALS])
def test_inject_refuses_rows_it_cannot_train_and_changes_nothing(case, factory, settings, message):
    model = factory()
    before = state_snapshot(model)
    with pytest.raises(ValueError, match=message):
        lk.inject(model, lk.LoRAConfig(**settings))
    assert_same_state(model, before)
    assert not any(isinstance(m, TrainableTokens) for m in model.modules())


def test_mixed_batches_refuse_trainable_tokens_by_name():
    model = tokens_model()
    with pytest.raises(ValueError, match="trainable_token_indices"):
        with lk.mixed_batch(model, ["default", None, None]):
            pass


def test_loading_other_rows_into_an_existing_adapter_is_refused(tmp_path):
    lk.save_adapter(tokens_model(rows=(5, 7)), tmp_path)
    model = tokens_model(rows=(5, 8))
    before = state_snapshot(model)
    with pytest.raises(lk.AdapterLoadError, match="token rows"):
        lk.load_adapter(model, tmp_path, name="default")
    assert_same_state(model, before)


def test_peft_rows_on_a_biased_linear_head_are_written_in_lorakit_s_format(tmp_path):
    """PEFT's trainable tokens drop a Linear's bias; lorakit keeps it, so its file says so instead."""
    class Biased(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_tokens, self.head = nn.Embedding(10, 6), nn.Linear(6, 10)

        def forward(self, x):
            return self.head(self.embed_tokens(x))

    torch.manual_seed(0)
    model = lk.inject(Biased(), lk.LoRAConfig(targets=["embed_tokens"], trainable_token_indices={"head": [1, 2]}))
    lk.save_adapter(model, tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["peft_type"] == "LORAKIT_LORACONFIG" and "bias" in written["lorakit_reason"]
