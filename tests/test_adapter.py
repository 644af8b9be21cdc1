"""Bottleneck adapters: the invariants of every lorakit method, over a table of tiny seeded models."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit.layers.adapter import AdapterWrapper
from lorakit.params import adapter_added_parameters

transformers = pytest.importorskip("transformers")


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(6, 5)
        self.block = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 5))
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.block(self.layer(x))))


def mlp():
    torch.manual_seed(0)
    return MLP().eval()


def tiny_bert():
    from lorakit.models.hf import tiny_bert_config

    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(tiny_bert_config()).eval()


def tiny_t5():
    torch.manual_seed(0)
    config = transformers.T5Config(d_model=16, d_ff=32, num_layers=2, num_decoder_layers=2, num_heads=2, d_kv=8,
                                   vocab_size=40, decoder_start_token_id=0)
    return transformers.T5ForConditionalGeneration(config).eval()


def run(model):
    """The model's output on a fixed input, as one tensor."""
    gen = torch.Generator().manual_seed(1)
    if isinstance(model, MLP):
        return model(torch.randn(4, 6, generator=gen))
    ids = torch.randint(0, 40, (2, 6), generator=gen)
    if isinstance(model, transformers.T5ForConditionalGeneration):
        return model(input_ids=ids, decoder_input_ids=ids[:, :4]).logits
    return model(input_ids=ids).logits


# (name, model factory, targets, number of adapted modules, their width)
CASES = [
    ("mlp-linear", mlp, ["layer"], 1, 5),
    ("mlp-block", mlp, ["block"], 1, 5),
    ("bert-ffn", tiny_bert, r".*\.layer\.\d+\.output\.dense", 2, 16),
    ("t5-ffn", tiny_t5, r".*\.DenseReluDense", 4, 16),
]
IDS = [c[0] for c in CASES]


def perturb(model):
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)


@pytest.mark.parametrize("name, factory, targets, n, width", CASES, ids=IDS)
def test_unchanged_at_init_and_only_adapter_trainable(name, factory, targets, n, width):
    model = factory()
    base = run(model)
    cfg = lk.AdapterConfig(bottleneck=3, targets=targets)
    lk.inject(model, cfg)
    torch.testing.assert_close(run(model), base)
    wrappers = [m for m in model.modules() if isinstance(m, AdapterWrapper)]
    assert len(wrappers) == n
    count = lk.count_parameters(model)
    assert count.adapter == count.trainable == n * (2 * width * 3 + 3 + width) == adapter_added_parameters(factory(), cfg)
    assert all(("adapters." in k) == p.requires_grad for k, p in model.named_parameters())


@pytest.mark.parametrize("name, factory, targets, n, width", CASES, ids=IDS)
def test_disabled_is_base_and_save_load_round_trip(name, factory, targets, n, width, tmp_path):
    model = factory()
    base = run(model)
    lk.inject(model, lk.AdapterConfig(bottleneck=3, targets=targets, activation="gelu"))
    perturb(model)
    adapted = run(model)
    assert not torch.allclose(adapted, base)
    with lk.disabled(model):
        torch.testing.assert_close(run(model), base)
    lk.save_adapter(model, tmp_path)
    fresh = factory()
    lk.load_adapter(fresh, tmp_path)
    assert isinstance(fresh.lorakit_configs["default"], lk.AdapterConfig)
    assert fresh.lorakit_configs["default"].activation == "gelu"
    torch.testing.assert_close(run(fresh), adapted)


def test_merge_refuses_clearly_and_changes_nothing():
    model = tiny_bert()
    lk.inject(model, lk.LoRAConfig(rank=2, targets=["query"]), name="lora")
    lk.inject(model, lk.AdapterConfig(bottleneck=2, targets=r".*\.layer\.\d+\.output\.dense"), name="adapter")
    perturb(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="cannot be merged"):
        lk.merge(model)
    with pytest.raises(ValueError, match="cannot be merged"):
        lk.unload(model, merge=True)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    lk.set_active(model, "lora")  # the adapter is inactive now: LoRA merges as usual
    lk.merge(model)
    lk.unmerge(model)


def test_unload_without_merge_and_delete_give_the_base_back():
    model = tiny_bert()
    base = run(model)
    lk.inject(model, lk.AdapterConfig(bottleneck=2, targets=r".*\.layer\.\d+\.output\.dense"))
    perturb(model)
    lk.unload(model, merge=False)
    assert not any(isinstance(m, AdapterWrapper) for m in model.modules())
    torch.testing.assert_close(run(model), base)

    model = tiny_bert()
    lk.inject(model, lk.AdapterConfig(bottleneck=2, targets=r".*\.layer\.\d+\.output\.dense"), name="a")
    lk.inject(model, lk.AdapterConfig(bottleneck=4, targets=r".*\.layer\.\d+\.output\.dense"), name="b")
    assert lk.count_parameters(model).trainable == 2 * (2 * 16 * 4 + 4 + 16)
    lk.delete_adapter(model, "b")
    assert model.lorakit_active == "a"
    lk.delete_adapter(model, "a")
    assert type(model.bert.encoder.layer[0].output.dense) is nn.Linear
    torch.testing.assert_close(run(model), base)


@pytest.mark.parametrize("targets, message", [
    (r".*\.intermediate\.dense", "not the model's hidden size 16"),  # width 32
    (r".*\.attention\.self", "returns a tuple"),  # BertSelfAttention returns (context, weights)
    (r".*\.layer\.0\.output(\.dense)?", "nested"),
])
def test_bad_targets_leave_the_model_unchanged(targets, message):
    model = tiny_bert()
    names = [n for n, _ in model.named_modules()]
    grads = [p.requires_grad for p in model.parameters()]
    with pytest.raises(ValueError, match=message):
        lk.inject(model, lk.AdapterConfig(bottleneck=2, targets=targets))
    assert [n for n, _ in model.named_modules()] == names
    assert [p.requires_grad for p in model.parameters()] == grads
    assert not hasattr(model, "lorakit_configs")


def test_non_tensor_output_seen_only_at_run_time_is_a_clear_error():
    class Pair(nn.Module):  # no dummy_inputs to probe with: the forward names the problem
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Linear(4, 4)

        def forward(self, x):
            return self.inner(x), x

    model = nn.Sequential()
    model.add_module("pair", Pair())
    lk.inject(model, lk.AdapterConfig(bottleneck=2, targets=["pair"]))
    with pytest.raises(TypeError, match="returned tuple"):
        model(torch.randn(2, 4))


def test_load_into_a_model_of_another_width_is_refused_unchanged(tmp_path):
    from lorakit.models.hf import tiny_bert_config

    model = tiny_bert()
    lk.inject(model, lk.AdapterConfig(bottleneck=2, targets=r".*\.layer\.\d+\.output\.dense"))
    lk.save_adapter(model, tmp_path)
    torch.manual_seed(0)
    wider = transformers.BertForSequenceClassification(tiny_bert_config(hidden_size=32)).eval()
    names = [n for n, _ in wider.named_modules()]
    with pytest.raises(ValueError, match="does not fit"):
        lk.load_adapter(wider, tmp_path)
    assert [n for n, _ in wider.named_modules()] == names
    assert all(p.requires_grad for p in wider.parameters())
