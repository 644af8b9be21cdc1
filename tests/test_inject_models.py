"""Real model shapes (issue 8, item 4): nn.MultiheadAttention, PEFT's "all-linear", shared and tied weights,
modules_to_save on a container head.

References are independent of lorakit's forward: a plain copy of the base with ``W + s B A`` written into
its weights, PEFT's own target expansion, and the base model itself.
"""
from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
from torch import nn

import lorakit as lk
from conftest import assert_same_state, lorakit_leftovers, perturb_adapters, state_snapshot
from lorakit.inject import adapter_layers, parametrizations

pytestmark = pytest.mark.usefixtures("single_thread")


def close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


# -- nn.MultiheadAttention / nn.TransformerEncoderLayer ----------------------------------------------
def encoder_layer():
    torch.manual_seed(0)
    return nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True).eval()


X = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(3))

# targets -> the (module path, parameter) pairs that get a LoRA, all in parametrize form
ATTENTION_CASES = {
    "none": (None, {("self_attn", "in_proj_weight"), ("self_attn.out_proj", "weight"), ("linear1", "weight"),
                    ("linear2", "weight")}),
    "all-linear": ("all-linear", {("self_attn.out_proj", "weight"), ("linear1", "weight"), ("linear2", "weight")}),
    "attention": (["self_attn"], {("self_attn", "in_proj_weight"), ("self_attn.out_proj", "weight")}),
    "out_proj": (["self_attn.out_proj"], {("self_attn.out_proj", "weight")}),
    "both-named": (["self_attn", "out_proj"], {("self_attn", "in_proj_weight"), ("self_attn.out_proj", "weight")}),
}


def with_deltas_written(base: nn.Module, adapted: nn.Module) -> nn.Module:
    """The reference: a plain copy of ``base`` whose adapted weights are ``W + s B A`` (fp64 product)."""
    ref = copy.deepcopy(base)
    for path, module, pname, lora in parametrizations(adapted):
        delta = (lora.lora_B.double() @ lora.lora_A.double()) * lora.scale
        with torch.no_grad():
            weight = getattr(ref.get_submodule(path), pname)
            weight += delta.view_as(weight).to(weight.dtype)
    return ref


def outputs(model: nn.Module) -> dict[str, torch.Tensor]:
    """Training-mode forward, and eval under no_grad (TransformerEncoderLayer's fast path reads the weights)."""
    model.train()
    train = model(X).detach()
    model.eval()
    with torch.no_grad():
        fast = model(X)
    return {"train": train, "eval": fast}


@pytest.mark.parametrize("mode", ["module", "parametrize"])
@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_attention_targets_adapt_the_weights_mha_reads(case, mode, tmp_path):
    targets, expected = ATTENTION_CASES[case]
    base = encoder_layer()
    model = lk.inject(encoder_layer(), lk.LoRAConfig(rank=2, alpha=4, targets=targets, mode=mode))
    assert {(p, pn) for p, _, pn, _ in parametrizations(model)} == expected
    assert not adapter_layers(model)  # no wrapper: MHA and the encoder's fast path would bypass it
    for key, value in outputs(model).items():
        close(value, outputs(base)[key])  # B = 0 at init
    perturb_adapters(model, std=0.3)
    adapted = outputs(model)
    reference = outputs(with_deltas_written(base, model))
    for key in adapted:
        close(adapted[key], reference[key])
        assert not torch.allclose(adapted[key], outputs(base)[key], atol=1e-3)
    with lk.disabled(model):
        close(outputs(model)["eval"], outputs(base)["eval"], tol=0)
    lk.merge(model)
    close(outputs(model)["eval"], adapted["eval"])
    lk.unmerge(model)
    close(outputs(model)["train"], adapted["train"])
    # lorakit's own checkpoint round trip
    lk.save_adapter(model, tmp_path)
    loaded = lk.load_adapter(encoder_layer(), tmp_path)
    close(outputs(loaded)["eval"], adapted["eval"])
    # named adapters: a second one, then back
    lk.inject(model, lk.LoRAConfig(rank=1, targets=targets, mode=mode), name="b")
    close(outputs(model)["eval"], outputs(base)["eval"])
    lk.set_active(model, "default")
    close(outputs(model)["eval"], adapted["eval"])
    lk.delete_adapter(model, "b")
    close(outputs(model)["eval"], adapted["eval"])
    plain = lk.unload(loaded, merge=True)  # not a deepcopy: torch shares a parametrized class between copies
    assert not lorakit_leftovers(plain)
    close(outputs(plain)["eval"], adapted["eval"])
    plain = lk.unload(model, merge=False)
    assert not lorakit_leftovers(plain)
    close(outputs(plain)["eval"], outputs(base)["eval"], tol=1e-6)  # W + d - d after the merge/unmerge above


def test_attention_checkpoint_keys(tmp_path):
    """The key names an attention adapter saves under (parametrize layout: ``<path>.<param>.lora_A.weight``)."""
    from safetensors.torch import load_file

    model = lk.inject(encoder_layer(), lk.LoRAConfig(rank=2, targets=["self_attn"]))
    lk.save_adapter(model, tmp_path)
    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in keys.items()} == {
        "base_model.model.self_attn.in_proj_weight.lora_A.weight": (2, 8),
        "base_model.model.self_attn.in_proj_weight.lora_B.weight": (24, 2),
        "base_model.model.self_attn.out_proj.lora_A.weight": (2, 8),
        "base_model.model.self_attn.out_proj.lora_B.weight": (8, 2),
    }


def test_attention_in_proj_matches_peft():
    """PEFT's own MultiheadAttention LoRA (target 'self_attn') with the same in_proj factors: the same outputs.

    out_proj's B stays zero on both sides: PEFT 0.21.2 adds out_proj's delta twice in a training forward (its
    forward merges out_proj, then merges the wrapped Linear again), so it is no reference there; the closed
    form ``W + s B A`` is (test above).
    """
    base = encoder_layer().train()
    ours = lk.inject(encoder_layer().train(), lk.LoRAConfig(rank=2, alpha=4, targets=["self_attn"]))
    perturb_adapters(ours, std=0.3)
    factors = {(p, pn): lora for p, _, pn, lora in parametrizations(ours)}
    with torch.no_grad():
        factors["self_attn.out_proj", "weight"].lora_B.zero_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["self_attn"]))
    attention = theirs.base_model.model.self_attn
    with torch.no_grad():
        attention.lora_A["default"].weight.copy_(factors["self_attn", "in_proj_weight"].lora_A)
        attention.lora_B["default"].weight.copy_(factors["self_attn", "in_proj_weight"].lora_B)
        out_proj = attention.base_layer.out_proj
        out_proj.lora_A["default"].weight.copy_(factors["self_attn.out_proj", "weight"].lora_A)
        out_proj.lora_B["default"].weight.copy_(factors["self_attn.out_proj", "weight"].lora_B)
    close(ours(X), theirs(X))


class CrossAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, kdim=6, vdim=4, batch_first=True)

    def forward(self, q, k, v):
        return self.attn(q, k, v)[0]


def test_attention_with_separate_qkv_widths():
    torch.manual_seed(0)
    base = CrossAttention()
    model = lk.inject(copy.deepcopy(base), lk.LoRAConfig(rank=2, targets=None))
    assert {(p, pn) for p, _, pn, _ in parametrizations(model)} == {
        ("attn", "q_proj_weight"), ("attn", "k_proj_weight"), ("attn", "v_proj_weight"), ("attn.out_proj", "weight")}
    perturb_adapters(model)
    q, k, v = torch.randn(2, 3, 8), torch.randn(2, 4, 6), torch.randn(2, 4, 4)
    close(model(q, k, v), with_deltas_written(base, model)(q, k, v))


@pytest.mark.parametrize("cfg, message", [
    (lk.LoRAConfig(targets=["self_attn"], dropout=0.1), "dropout needs the layer's own forward.*self_attn"),
    (lk.LoRAConfig(targets=["self_attn"], init="svd"), "init='svd' needs a wrapped layer.*self_attn"),
    (lk.AdapterConfig(targets=["self_attn.out_proj"]), "reads out_proj.weight directly"),
    (lk.CLoRAConfig(rank=2, targets=["linear1"]), "reads linear1.weight directly"),
], ids=["dropout", "svd", "adapter", "clora"])
def test_attention_refusals_name_the_module_and_change_nothing(cfg, message):
    model = encoder_layer()
    before = state_snapshot(model)
    with pytest.raises(ValueError, match=message):
        lk.inject(model, cfg)
    assert_same_state(model, before)


# -- "all-linear": only a real output head is left out (PEFT's rule) ----------------------------------
class TwoLinears(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear1, self.linear2 = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.linear2(torch.relu(self.linear1(x)))


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=20, n_positions=16)).eval()


class WithHead(TwoLinears):
    def get_output_embeddings(self):
        return self.linear2


@pytest.mark.parametrize("factory", [TwoLinears, tiny_gpt2], ids=["plain", "gpt2"])
def test_all_linear_takes_what_peft_takes(factory):
    ours = lk.inject(factory(), lk.LoRAConfig(rank=2, targets="all-linear"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(factory(), peft.LoraConfig(r=2, target_modules="all-linear"))
    expected = sorted(n.removeprefix("base_model.model.") for n, m in theirs.named_modules() if hasattr(m, "lora_A"))
    assert sorted(n for n, _ in adapter_layers(ours)) == expected
    assert "linear2" in expected or "lm_head" not in expected


def test_all_linear_leaves_out_a_declared_output_head():
    """Any model's get_output_embeddings() names its head (PEFT looks at it on transformers models only)."""
    ours = lk.inject(WithHead(), lk.LoRAConfig(rank=2, targets="all-linear"))
    assert [n for n, _ in adapter_layers(ours)] == ["linear1"]


# -- a module reachable at two paths ------------------------------------------------------------------
class SharedBlock(nn.Module):
    """One Linear used twice, reachable as ``first`` and ``second.inner``."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.second = nn.Sequential()
        self.second.inner = self.first
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.second.inner(torch.tanh(self.first(x))))


def shared():
    torch.manual_seed(0)
    return SharedBlock()


@pytest.mark.parametrize("targets", [None, ["first"], ["second.inner"], ["inner"]])
def test_shared_module_is_adapted_once_at_every_path(targets, tmp_path):
    base, x = shared(), torch.randn(3, 4)
    model = lk.inject(shared(), lk.LoRAConfig(rank=2, targets=targets))
    assert model.first is model.second.inner and type(model.first).__name__ == "LoRALinear"
    perturb_adapters(model)
    layer = model.first
    reference = copy.deepcopy(base)
    with torch.no_grad():
        reference.first.weight += layer.delta_weight("default")
        if targets is None:
            reference.head.weight += model.head.delta_weight("default")
    close(model(x), reference(x))
    assert lk.count_parameters(model).adapter == 2 * 8 + (2 * 6 if targets is None else 0)
    lk.save_adapter(model, tmp_path)
    close(lk.load_adapter(shared(), tmp_path)(x), reference(x))
    merged = lk.merge(copy.deepcopy(model))
    close(merged(x), reference(x))
    lk.delete_adapter(model, "default")
    assert model.first is model.second.inner and isinstance(model.first, nn.Linear) and not lorakit_leftovers(model)
    close(model(x), base(x), tol=0)


# -- tied weights -------------------------------------------------------------------------------------
class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.mix = nn.Linear(6, 6)
        self.head = nn.Linear(6, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.mix(self.emb(ids))))


def tied():
    torch.manual_seed(0)
    return TiedLM()


IDS = torch.randint(0, 10, (2, 5), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("targets, mode", [(None, "module"), (["head"], "module"), (["emb"], "module"),
                                           (None, "parametrize"), (["head"], "parametrize")])
def test_merging_a_tied_weight_is_refused_naming_both_modules(targets, mode):
    model = lk.inject(tied(), lk.LoRAConfig(rank=2, targets=targets, mode=mode))
    perturb_adapters(model)
    adapted = model(IDS).detach()
    before = state_snapshot(model)
    for call in (lk.merge, lambda m: lk.unload(m, merge=True)):
        with pytest.raises(ValueError, match=r"tied to .*'(emb|head)'") as err:
            call(model)
        assert "'emb'" in str(err.value) and "'head'" in str(err.value)
        assert_same_state(model, before)
        close(model(IDS), adapted, tol=0)
    plain = lk.unload(model, merge=False)
    assert plain.head.weight is plain.emb.weight  # the tie survives
    close(plain(IDS), tied()(IDS), tol=0)


def test_untied_twin_merges_and_tied_svd_is_refused():
    model = tied()
    model.head.weight = nn.Parameter(model.emb.weight.detach().clone())  # the same values, untied
    lk.inject(model, lk.LoRAConfig(rank=2, targets=None))
    perturb_adapters(model)
    adapted = model(IDS).detach()
    close(lk.merge(model)(IDS), adapted, tol=1e-4)
    model = tied()
    before = state_snapshot(model)
    with pytest.raises(ValueError, match="init='svd'.*'head'.*tied.*'emb'"):
        lk.inject(model, lk.LoRAConfig(rank=2, targets=["head", "mix"], init="svd"))
    assert_same_state(model, before)


# -- modules_to_save on a container head --------------------------------------------------------------
class ClassificationHead(nn.Module):
    """RoBERTa's head: a container of two Linears."""

    def __init__(self) -> None:
        super().__init__()
        self.dense, self.out_proj = nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, h):
        return self.out_proj(torch.tanh(self.dense(h)))


class RobertaLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8))
        self.classifier = ClassificationHead()

    def forward(self, x):
        return self.classifier(self.encoder(x))


def roberta_like():
    torch.manual_seed(0)
    return RobertaLike()


@pytest.mark.parametrize("cfg", [
    lk.LoRAConfig(rank=2, targets=None, modules_to_save=["classifier"]),
    lk.LoRAConfig(rank=2, targets="all-linear", modules_to_save=["classifier"]),
    lk.LoRAConfig(rank=2, targets=["0", "2", "dense", "out_proj"], modules_to_save=["classifier"], mode="parametrize"),
    lk.CLoRAConfig(rank=2, targets=None, modules_to_save=["classifier"]),
], ids=["lora-none", "lora-all-linear", "lora-parametrize", "clora"])
def test_modules_to_save_takes_the_whole_subtree(cfg, tmp_path):
    base, x = roberta_like(), torch.randn(4, 6, generator=torch.Generator().manual_seed(2))
    model = lk.inject(roberta_like(), cfg)
    assert type(model.classifier).__name__ == "ModulesToSave"
    inside = [n for n, m in model.classifier.named_modules()
              if type(m).__module__.startswith("lorakit.layers") and n] + \
             [p for p, *_ in parametrizations(model) if p.startswith("classifier")]
    assert inside == [] or inside == ["modules_to_save"], inside  # only the ModuleDict of copies
    assert {n for n, m in model.classifier.named_modules() if "LoRA" in type(m).__name__} == set()
    perturb_adapters(model)
    adapted = model(x).detach()
    with lk.disabled(model):
        close(model(x), base(x), tol=0)
    lk.save_adapter(model, tmp_path)
    close(lk.load_adapter(roberta_like(), tmp_path)(x), adapted)
