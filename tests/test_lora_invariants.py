"""LoRA invariants over one table of (layer type x mode x variant) cases on tiny seeded models.

Each case goes through the same checks: output unchanged at init, only the adapter trains, parameter counts
match a closed form and a hand-written one, disabled == base, merge == unmerged, unmerge restores, unload,
save -> load round trip. Then named adapters, modules_to_save, the fused autograd function and the seeds' count.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit as lk
from conftest import FACTORIES, lorakit_leftovers, perturb_adapters
from lorakit.layers.lora import _FusedLoRALinear
from lorakit.params import dora_layer_parameters, lora_added_parameters, lora_layer_parameters

pytestmark = pytest.mark.usefixtures("single_thread")

ADAPTER_NAME = re.compile(r"(^|\.)lora_(A|B|embedding_A|embedding_B|magnitude_vector)(\.|$)")
TARGETS = ["layer", "head"]


@dataclass
class Case:
    id: str
    model: str  # key of conftest.FACTORIES
    cfg: lk.LoRAConfig

    @property
    def svd(self) -> bool:
        return self.cfg.init == "svd"


def _case(model: str, mode: str = "module", **kw) -> Case:
    extra = "-".join(f"{k}={v}" for k, v in kw.items())
    cfg = lk.LoRAConfig(**{"rank": 2, "alpha": 4.0, "targets": TARGETS, "mode": mode, **kw})
    return Case("-".join(filter(None, [model, mode, extra])), model, cfg)


CASES = [_case(model, mode) for model in FACTORIES for mode in ("module", "parametrize")] + [
    _case("linear", init="gaussian"),
    _case("conv2d", "parametrize", init="gaussian"),
    _case("embedding", init="gaussian"),
    _case("hf_conv1d", init="gaussian"),
    _case("linear", init="svd"),
    _case("hf_conv1d", init="svd"),
    _case("linear", rslora=True, rank=4),
    _case("conv2d", rslora=True),
    _case("embedding", "parametrize", rslora=True),
    _case("linear", dropout=0.3),
    _case("conv1d", dropout=0.3),
    _case("hf_conv1d", dropout=0.3),
    _case("embedding", dropout=0.3),
    *[_case(model, mode, dora=True) for model in ("linear", "conv1d", "conv2d") for mode in ("module", "parametrize")],
    _case("hf_conv1d", dora=True),
    _case("embedding", dora=True),
    _case("embedding", dora=True, rslora=True, init="gaussian"),
    _case("conv2d_circular", dora=True),
    _case("linear", dora=True, rslora=True, init="gaussian"),
    _case("linear", dora=True, dropout=0.3),
    _case("conv2d", dora=True, dropout=0.3),
    _case("linear", lora_bias=True),
    _case("conv1d", lora_bias=True),
    _case("hf_conv1d", lora_bias=True, dropout=0.3),
    # parametrize mode refuses dropout > 0 (it never sees x): tests/test_base_layer.py::test_parametrize_refuses_dropout
]
cases = pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])


def close(a, b, atol=1e-6, rtol=1e-5):
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


def build(case: Case):
    base = FACTORIES[case.model]()
    model = lk.inject(FACTORIES[case.model](), case.cfg)
    return base, model, base.example_input()


def hand_count(module: nn.Module, rank: int, dora: bool = False) -> int:
    """r (in + out) written out per layer type, independently of lorakit.params; DoRA (or lora_bias) adds one per
    output."""
    if isinstance(module, nn.Linear):
        return rank * (module.in_features + module.out_features) + dora * module.out_features
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return rank * (module.in_channels * math.prod(module.kernel_size) + module.out_channels) + \
            dora * module.out_channels
    if isinstance(module, nn.Embedding):  # DoRA's m: one per embedding coordinate (PEFT's convention)
        return rank * (module.num_embeddings + module.embedding_dim) + dora * module.embedding_dim
    if isinstance(module, Conv1D):
        return rank * (module.nx + module.nf) + dora * module.nf
    raise AssertionError(type(module))


def base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The (possibly merged) base weights of the targets, whatever the mode."""
    out = {}
    for t in TARGETS:
        m = model.get_submodule(t)
        if hasattr(m, "base_layer"):
            out[t] = m.base_layer.weight.detach().clone()
        elif hasattr(m, "parametrizations"):
            out[t] = m.parametrizations.weight.original.detach().clone()
        else:
            out[t] = m.weight.detach().clone()
    return out


# -- the invariants ----------------------------------------------------------------------------------
@cases
def test_output_unchanged_at_init(case):
    base, model, x = build(case)
    y = model(x)
    close(y, base(x), atol=1e-5 if case.svd else 1e-6)
    assert lorakit_leftovers(model), "inject must have added something"


@cases
def test_only_adapter_parameters_trainable(case):
    _, model, _ = build(case)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    by_name = {n for n, _ in model.named_parameters() if ADAPTER_NAME.search(n)}
    assert trainable == by_name and len(trainable) == (2 + case.cfg.dora + case.cfg.lora_bias) * len(TARGETS)
    layers = [model.get_submodule(t) for t in TARGETS]
    ids = set()
    for layer in layers:
        if hasattr(layer, "adapter_parameters"):
            ids |= {id(p) for p in layer.adapter_parameters()}
        else:
            ids |= {id(p) for plist in layer.parametrizations.values() for lora in plist for p in lora.adapter_parameters()}
    assert ids == {id(p) for p in model.parameters() if p.requires_grad}


@cases
def test_parameter_counts(case):
    base, model, _ = build(case)
    count = lk.count_parameters(model)
    extra = case.cfg.dora or case.cfg.lora_bias  # DoRA's magnitude or lora_bias: one per output (never both)
    hand = sum(hand_count(base.get_submodule(t), case.cfg.rank, extra) for t in TARGETS)
    closed = sum(lora_layer_parameters(base.get_submodule(t), case.cfg.rank)
                 + (dora_layer_parameters(base.get_submodule(t)) if extra else 0) for t in TARGETS)
    assert count.adapter == hand == closed == lora_added_parameters(base, case.cfg)
    assert count.trainable == count.adapter
    assert count.total == sum(p.numel() for p in base.parameters()) + count.adapter
    assert count.base == sum(p.numel() for p in base.parameters())


def test_parameter_count_literal():
    """LinearNet 6-5-3, rank 2 on both Linears: 2 (6 + 5) + 2 (5 + 3) = 38, by hand."""
    model = lk.inject(FACTORIES["linear"](), lk.LoRAConfig(rank=2, targets=TARGETS))
    assert lk.count_parameters(model) == lk.ParamCount(total=6 * 5 + 5 + 5 * 3 + 3 + 38, trainable=38, adapter=38)


@cases
def test_disabled_equals_base(case):
    base, model, x = build(case)
    perturb_adapters(model)
    adapted = model(x)
    assert not torch.allclose(adapted, base(x), atol=1e-3), "perturbed adapter must change the output"
    with lk.disabled(model):
        off = model(x)
    assert torch.equal(model(x), adapted), "the adapter is back on after the block"
    if not case.svd:
        assert torch.equal(off, base(x))
        return
    # svd: W holds the residual W0 - s B0 A0; the layer keeps B0, A0 and adds them back while disabled, so the
    # base comes back within rounding (tests/test_base_layer.py checks it to 1e-6 in float32).
    close(off, base(x), atol=1e-5)
    restored = base_weights(lk.unload(model, merge=False))
    for t in TARGETS:
        close(restored[t], base.get_submodule(t).weight, atol=1e-6)


@cases
def test_merge_equals_unmerged(case):
    base, model, x = build(case)
    perturb_adapters(model)
    adapted = model(x)
    before = base_weights(model)
    lk.merge(model)
    merged = base_weights(model)
    assert all(not torch.equal(merged[t], before[t]) for t in TARGETS), "merge must change the base weights"
    close(model(x), adapted, atol=1e-5)
    lk.merge(model)  # twice is harmless
    assert all(torch.equal(base_weights(model)[t], merged[t]) for t in TARGETS)
    close(model(x), adapted, atol=1e-5)
    with lk.disabled(model):
        close(model(x), base(x), atol=1e-5)
    for t in TARGETS:  # DoRA's g is computed again from the unmerged W, which is W within one rounding
        again = base_weights(model)[t]
        assert torch.equal(again, merged[t]) or (case.cfg.dora and torch.allclose(again, merged[t], atol=1e-6)), \
            "disabled() re-merges on exit"
    close(model(x), adapted, atol=1e-5)


@cases
def test_unmerge_restores_weights(case):
    _, model, x = build(case)
    perturb_adapters(model)
    adapted = model(x)
    before = base_weights(model)
    lk.merge(model)
    lk.unmerge(model)
    lk.unmerge(model)  # twice is harmless
    after = base_weights(model)
    for t in TARGETS:
        close(after[t], before[t], atol=1e-6)
    close(model(x), adapted, atol=1e-5)


@cases
def test_unload_without_merge_gives_base_back(case):
    base, model, x = build(case)
    perturb_adapters(model)
    plain = lk.unload(model, merge=False)
    assert lorakit_leftovers(plain) == []
    assert [type(m) for m in plain.modules()] == [type(m) for m in base.modules()]
    got, want = plain.state_dict(), base.state_dict()
    assert sorted(got) == sorted(want)  # parametrize mode re-registers the weight last
    if case.svd:  # W0 = residual + s B0 A0, restored within one rounding
        for key in want:
            close(got[key], want[key], atol=1e-6)
        return
    for key in want:
        assert torch.equal(got[key], want[key]), key
    assert torch.equal(plain(x), base(x))


@cases
def test_unload_without_merge_after_merge(case):
    base, model, x = build(case)
    perturb_adapters(model)
    lk.merge(model)
    plain = lk.unload(model, merge=False)
    assert lorakit_leftovers(plain) == []
    close(plain(x), base(x), atol=1e-5)


@cases
def test_unload_with_merge_keeps_adapted_output(case):
    base, model, x = build(case)
    perturb_adapters(model)
    adapted = model(x)
    plain = lk.unload(model, merge=True)
    assert lorakit_leftovers(plain) == []
    assert sorted(plain.state_dict()) == sorted(base.state_dict())
    close(plain(x), adapted, atol=1e-5)


@cases
def test_save_load_round_trip(case, tmp_path):
    _, model, x = build(case)
    perturb_adapters(model)
    adapted = model(x)
    lk.save_adapter(model, tmp_path)
    if not case.svd:  # an svd adapter is relative to the residual base, which is not in the adapter file
        fresh = lk.load_adapter(FACTORIES[case.model](), tmp_path)
        close(fresh(x), adapted)
        assert {n for n, p in fresh.named_parameters() if p.requires_grad} == \
               {n for n, p in model.named_parameters() if p.requires_grad}
    again = lk.inject(FACTORIES[case.model](), case.cfg)  # already has an adapter of that name
    assert not torch.allclose(again(x), adapted, atol=1e-3)
    lk.load_adapter(again, tmp_path)
    close(again(x), adapted)
    assert list(again.lorakit_configs) == ["default"]


# -- target selection --------------------------------------------------------------------------------
class Blocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(9, 4)
        self.blocks = nn.ModuleList(nn.ModuleDict({"q": nn.Linear(4, 4), "v": nn.Linear(4, 4), "norm": nn.LayerNorm(4)})
                                    for _ in range(2))
        self.lm_head = nn.Linear(4, 9)


def adapted_names(model: nn.Module) -> list[str]:
    return sorted(n for n, m in model.named_modules() if type(m).__module__.startswith("lorakit"))


@pytest.mark.parametrize("targets, exclude, expected", [
    (["q"], None, ["blocks.0.q", "blocks.1.q"]),
    (["blocks.1.q", "v"], None, ["blocks.0.v", "blocks.1.q", "blocks.1.v"]),
    (r"blocks\.\d\.(q|v)", r"blocks\.0\..*", ["blocks.1.q", "blocks.1.v"]),
    ("q", None, None),  # a regex must match the whole name: 'q' alone matches nothing
    # PEFT's rule: only get_output_embeddings() is an output head; this plain model has none (tests/test_inject_models.py)
    ("all-linear", None, ["blocks.0.q", "blocks.0.v", "blocks.1.q", "blocks.1.v", "lm_head"]),
    (None, ["lm_head", "emb"], ["blocks.0.q", "blocks.0.v", "blocks.1.q", "blocks.1.v"]),
    (None, None, ["blocks.0.q", "blocks.0.v", "blocks.1.q", "blocks.1.v", "emb", "lm_head"]),
])
def test_target_selection(targets, exclude, expected):
    model = Blocks()
    cfg = lk.LoRAConfig(rank=1, targets=targets, exclude=exclude)
    if expected is None:
        with pytest.raises(ValueError, match="match no supported module; modules that exist include: emb, blocks.0.q"):
            lk.inject(model, cfg)
        return
    assert adapted_names(lk.inject(model, cfg)) == expected


# -- named adapters -----------------------------------------------------------------------------------
NAMED = [c for c in CASES if c.id in {"linear-module", "linear-parametrize", "embedding-module", "conv2d-module",
                                      "hf_conv1d-parametrize"}]


@pytest.mark.parametrize("case", NAMED, ids=[c.id for c in NAMED])
def test_named_adapters(case):
    base = FACTORIES[case.model]()
    x = base.example_input()
    model = lk.inject(FACTORIES[case.model](), case.cfg, name="a")
    perturb_adapters(model, seed=1)
    y_a = model(x)
    lk.inject(model, case.cfg, name="b")
    assert model.lorakit_active == "b"
    close(model(x), base(x))  # only b is active, and it starts at zero
    perturb_adapters(model, seed=2)  # only b is trainable now
    y_b = model(x)
    assert not torch.allclose(y_a, y_b, atol=1e-3)
    trainable_b = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable_b and all(re.search(r"(\.b\.|\.b$|weight\.1\.)", n) for n in trainable_b), trainable_b

    lk.set_active(model, "a")
    close(model(x), y_a)
    trainable_a = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable_a and not trainable_a & trainable_b
    lk.merge(model)
    close(model(x), y_a, atol=1e-5)
    lk.set_active(model, "b")  # switching away from a merged adapter takes it out first
    close(model(x), y_b, atol=1e-5)
    lk.set_active(model, "a")

    with pytest.raises(KeyError, match="'zzz'.*'a', 'b'"):
        lk.set_active(model, "zzz")
    with pytest.raises(KeyError, match="zzz"):
        lk.delete_adapter(model, "zzz")

    lk.delete_adapter(model, "a")
    assert list(model.lorakit_configs) == ["b"] and model.lorakit_active == "b"
    close(model(x), y_b, atol=1e-5)
    lk.delete_adapter(model, "b")
    assert lorakit_leftovers(model) == []
    assert [type(m) for m in model.modules()] == [type(m) for m in base.modules()]
    for key, value in base.state_dict().items():
        close(model.state_dict()[key], value, atol=1e-6)
    close(model(x), base(x))


# -- modules_to_save ----------------------------------------------------------------------------------
def test_modules_to_save_trains_copy_and_round_trips(tmp_path):
    factory = FACTORIES["linear"]
    base = factory()
    x = base.example_input()
    cfg = lk.LoRAConfig(rank=2, targets=["layer"], modules_to_save=["head"])
    model = lk.inject(factory(), cfg)
    copy = model.head.modules_to_save["default"]
    assert all(p.requires_grad for p in copy.parameters())
    assert not any(p.requires_grad for p in model.head.original_module.parameters())
    assert lk.count_parameters(model).adapter == 2 * (6 + 5) + 5 * 3 + 3

    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        model(x).square().sum().backward()
        opt.step()
    assert not torch.equal(copy.weight, base.head.weight), "the copy trains"
    assert torch.equal(model.head.original_module.weight, base.head.weight), "the original does not"
    adapted = model(x)
    with lk.disabled(model):
        assert torch.equal(model(x), base(x))

    lk.save_adapter(model, tmp_path)
    fresh = lk.load_adapter(factory(), tmp_path)
    close(fresh(x), adapted)
    assert torch.equal(fresh.head.modules_to_save["default"].weight, copy.weight)
    assert torch.equal(lk.unload(fresh, merge=False)(x), base(x))
    merged = lk.unload(model, merge=True)
    assert lorakit_leftovers(merged) == []
    close(merged(x), adapted, atol=1e-5)


# -- the fused autograd function ----------------------------------------------------------------------
def _reference(x, w, bias, a, b, s):
    return F.linear(x, w, bias) + s * F.linear(F.linear(x, a), b)


@pytest.mark.parametrize("x_shape", [(5, 4), (2, 3, 4), (4,)], ids=["2d", "3d", "1d"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_fused_linear_gradcheck_and_reference(x_shape, with_bias):
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)

    x, w, a, b = rand(*x_shape), rand(3, 4), rand(2, 4), rand(3, 2)
    bias = rand(3) if with_bias else None
    s = 1.7
    inputs = (x, w, bias, a, b, s)
    assert torch.autograd.gradcheck(_FusedLoRALinear.apply, inputs)

    fused = _FusedLoRALinear.apply(*inputs)
    ref = _reference(*inputs)
    close(fused, ref, atol=1e-12, rtol=1e-12)
    grad_out = torch.randn(fused.shape, generator=gen, dtype=torch.float64)
    wrt = [t for t in (x, w, bias, a, b) if t is not None]
    for got, want in zip(torch.autograd.grad(fused, wrt, grad_out), torch.autograd.grad(ref, wrt, grad_out)):
        close(got, want, atol=1e-12, rtol=1e-12)


def test_fused_linear_skips_unneeded_gradients():
    """The frozen base (and an input that needs no grad) get no gradient; A and B match the reference."""
    gen = torch.Generator().manual_seed(0)
    x, w, bias = (torch.randn(*s, generator=gen, dtype=torch.float64) for s in [(2, 3, 4), (3, 4), (3,)])
    w_t = torch.randn(4, 3, generator=gen, dtype=torch.float64).t()  # non-contiguous, as Conv1D's view
    a = torch.randn(2, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    for weight in (w, w_t):
        fused = _FusedLoRALinear.apply(x, weight, bias, a, b, 0.5)
        got = torch.autograd.grad(fused.sum(), (a, b))
        want = torch.autograd.grad(_reference(x, weight, bias, a, b, 0.5).sum(), (a, b))
        for g, r in zip(got, want):
            close(g, r, atol=1e-12, rtol=1e-12)
        assert torch.autograd.gradcheck(lambda a_, b_: _FusedLoRALinear.apply(x, weight, bias, a_, b_, 0.5), (a, b))


def test_lora_linear_module_gradients_match_reference():
    """Through the wrapper (fused path in eval and no-dropout train; dropout path in train)."""
    torch.manual_seed(0)
    layer = nn.Linear(4, 3).double()
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    for dropout in (0.0, 0.5):
        model = lk.inject(nn.Sequential(layer).double(), lk.LoRAConfig(rank=2, alpha=3.0, dropout=dropout))
        perturb_adapters(model)
        wrapper = model[0]
        a, b = wrapper.lora_A["default"].weight, wrapper.lora_B["default"].weight
        assert a.dtype == torch.float64, "factors follow the base layer's dtype"
        model.train()
        torch.manual_seed(7)
        got = torch.autograd.grad(model(x).sum(), (a, b))
        torch.manual_seed(7)
        drop = nn.Dropout(dropout) if dropout else nn.Identity()
        ref = F.linear(x, layer.weight, layer.bias) + 1.5 * F.linear(F.linear(drop(x), a), b)
        for g, r in zip(got, torch.autograd.grad(ref.sum(), (a, b))):
            close(g, r, atol=1e-12, rtol=1e-12)
        assert layer.weight.grad is None
        model = lk.unload(model, merge=False)


# -- property test on Linear shapes -------------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(d_in=st.integers(1, 12), d_out=st.integers(1, 12), rank=st.integers(1, 6), batch=st.integers(1, 5),
       rslora=st.booleans())
def test_linear_shapes_property(d_in, d_out, rank, batch, rslora):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(d_in, d_out))
    model = lk.inject(nn.Sequential(nn.Linear(d_in, d_out)), lk.LoRAConfig(rank=rank, alpha=2.0, rslora=rslora))
    model[0].base_layer.load_state_dict(base[0].state_dict())
    x = torch.randn(batch, d_in)
    close(model(x), base(x))
    assert lk.count_parameters(model).adapter == rank * (d_in + d_out)
    perturb_adapters(model)
    a, b = model[0].lora_A["default"].weight, model[0].lora_B["default"].weight
    s = 2.0 / (math.sqrt(rank) if rslora else rank)
    expected = base(x) + s * (x @ a.t() @ b.t())
    close(model(x), expected, atol=1e-5)
    with lk.disabled(model):
        assert torch.equal(model(x), base(x))
    lk.merge(model)
    close(model(x), expected, atol=1e-5)


# -- the seeds' count ---------------------------------------------------------------------------------
def test_richboynet_rank_one_adds_6794_parameters():
    """784-1000-2000-10, rank 1 on the three Linears: (784+1000) + (1000+2000) + (2000+10) = 6,794 = 0.242 %."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 1000), nn.ReLU(), nn.Linear(1000, 2000), nn.ReLU(),
                          nn.Linear(2000, 10))
    cfg = lk.LoRAConfig(rank=1, alpha=1.0)
    assert lora_added_parameters(model, cfg) == 6_794
    for mode in ("module", "parametrize"):
        count = lk.count_parameters(lk.inject(model, lk.LoRAConfig(rank=1, alpha=1.0, mode=mode), name=mode))
        lk.delete_adapter(model, mode)
        assert count.adapter == 6_794 and count.base == 2_807_010
        assert round(count.increment_percent, 3) == 0.242


def test_modules_to_save_are_not_also_lora_targets():
    """As in PEFT: a module trained whole is not wrapped with LoRA as well, even when ``targets=None``."""
    model = lk.inject(FACTORIES["linear"](), lk.LoRAConfig(rank=2, modules_to_save=["head"]))
    assert type(model.head).__name__ == "ModulesToSave" and type(model.head.original_module) is nn.Linear
    assert type(model.layer).__name__ == "LoRALinear"
    assert lk.count_parameters(model).adapter == 2 * (6 + 5) + 5 * 3 + 3


class WithNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.norm = nn.LayerNorm(4)
        self.conv = nn.Conv1d(4, 3, 2)
        self.out = nn.Linear(3, 2)


@pytest.mark.parametrize("mode", ["module", "parametrize"])
def test_closed_form_count_with_every_layer_targeted(mode):
    """targets=None: the closed form and the live count agree and skip the LayerNorm's 1-D weight."""
    cfg = lk.LoRAConfig(rank=3, mode=mode)
    hand = 3 * (7 + 4) + 3 * (4 * 2 + 3) + 3 * (3 + 2)
    assert lora_added_parameters(WithNorm(), cfg) == hand
    assert lk.count_parameters(lk.inject(WithNorm(), cfg)).adapter == hand


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_inject_keeps_the_training_mode(training):
    """No hidden mode switches: new layers (and their dropout) follow the module they wrap."""
    model = FACTORIES["linear"]().train(training)
    lk.inject(model, lk.LoRAConfig(rank=2, dropout=0.5, targets=TARGETS))
    lk.inject(model, lk.LoRAConfig(rank=2, dropout=0.5, targets=["layer"]), name="second")
    assert {m.training for m in model.modules()} == {training}
