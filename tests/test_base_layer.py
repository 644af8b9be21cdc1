"""The base layer is always called; devices; no host syncs in any forward; C-LoRA train/eval; PiSSA's exact base.

- A subclass of ``nn.Linear`` with its own forward and a forward hook on the base layer: the LoRA output at init
  is the subclass's output exactly, and the hook fires once per forward, with and without dropout, train and eval.
- The fused fast path is taken for a plain ``nn.Linear`` / HF ``Conv1D`` and for nothing else.
- Every tensor lorakit creates lives on the base weight's device (``meta``), and ``to_empty`` + ``load_state_dict``
  gives the same model as building it for real.
- No forward of any lorakit layer reads a tensor back to the host (``.item()``, ``float()``, ``bool()``, ...).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from transformers.pytorch_utils import Conv1D

import lorakit as lk
from conftest import assert_same_state, state_snapshot
from lorakit.layers._fused import FusedLoRALinear, fused_path_applies

pytestmark = pytest.mark.usefixtures("single_thread")


class FakeQuantLinear(nn.Linear):
    """A quantised-layer stand-in: its forward rounds W to a grid and adds a constant, so skipping it shows."""

    def forward(self, x):
        w = torch.round(self.weight * 8) / 8
        return F.linear(x, w, self.bias) + 0.25


def _net(linear_cls=nn.Linear):
    torch.manual_seed(0)
    return nn.Sequential(linear_cls(6, 5), nn.Tanh(), nn.Linear(5, 3))


@pytest.fixture
def count_fused(monkeypatch):
    """How many times the fused autograd function runs."""
    calls = []
    original = FusedLoRALinear.apply

    def counting(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(FusedLoRALinear, "apply", counting)
    return calls


# -- the base layer is always called ---------------------------------------------------------------
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("subclass", [True, False], ids=["fake-quant-subclass", "plain-linear"])
def test_base_layer_and_its_hook_are_called(subclass, training, dropout, count_fused):
    base = _net(FakeQuantLinear if subclass else nn.Linear).train(training)
    model = copy.deepcopy(base)
    fired = []
    model[0].register_forward_hook(lambda module, args, out: fired.append(out.shape))
    lk.inject(model, lk.LoRAConfig(rank=2, targets=["0"], dropout=dropout))
    x = torch.randn(4, 6)
    assert torch.equal(model(x), base(x)), "at init the output is the base layer's own, exactly"
    assert fired == [(4, 5)], "the hook on the base layer fires once per forward"
    assert count_fused == [], "a hooked base never takes the fused path"


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_subclass_output_plus_low_rank(training):
    """With trained factors too: subclass(x) + s B A x, not the plain Linear formula."""
    model = lk.inject(_net(FakeQuantLinear).train(training), lk.LoRAConfig(rank=2, alpha=4.0, targets=["0"]))
    layer = model[0]
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    x = torch.randn(4, 6)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = layer.base_layer(x) + 2.0 * (x @ a.t() @ b.t())
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("kind", ["linear", "hf_conv1d"])
def test_fast_path_taken_for_plain_layers_and_equal_to_the_base_call(kind, count_fused):
    torch.manual_seed(0)
    plain = nn.Linear(6, 5) if kind == "linear" else Conv1D(5, 6)
    model = lk.inject(nn.Sequential(plain), lk.LoRAConfig(rank=2, alpha=4.0))
    with torch.no_grad():
        model[0].lora_B["default"].weight.normal_()
    x = torch.randn(2, 3, 6, requires_grad=True)
    fused = model(x)
    assert len(count_fused) == 1
    grads_fused = torch.autograd.grad(fused.sum(), [x, *model[0].adapter_parameters()])
    handle = model[0].base_layer.register_forward_hook(lambda *args: None)  # a no-op hook forces the base call
    unfused = model(x)
    assert len(count_fused) == 1
    handle.remove()
    torch.testing.assert_close(fused, unfused)
    for got, want in zip(grads_fused, torch.autograd.grad(unfused.sum(), [x, *model[0].adapter_parameters()])):
        torch.testing.assert_close(got, want)


def test_fast_path_predicate_refuses_every_other_case():
    torch.manual_seed(0)
    linear, x = nn.Linear(4, 3), torch.randn(2, 4)
    a, b = torch.randn(2, 4), torch.randn(3, 2)

    def applies(base=linear, x=x, a=a, b=b, dropout_active=False):
        return fused_path_applies(base, x, base.weight, base.bias, a, b, dropout_active)

    assert applies()
    assert not applies(dropout_active=True)
    assert not applies(base=FakeQuantLinear(4, 3))
    assert not applies(x=x.bfloat16()), "dtypes differ"
    assert not applies(a=a.double(), b=b.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not applies()
    for register in (nn.modules.module.register_module_forward_hook,
                     nn.modules.module.register_module_forward_pre_hook):
        handle = register(lambda *args: None)
        assert not applies(), register.__name__
        handle.remove()
    handle = linear.register_forward_pre_hook(lambda *args: None)
    assert not applies()
    handle.remove()
    handle = linear.register_full_backward_hook(lambda *args: None)
    assert not applies()
    handle.remove()
    assert applies()


def test_parametrize_refuses_dropout():
    model = _net()
    before = state_snapshot(model)
    with pytest.raises(ValueError, match=r"dropout=0.1 is not available with mode='parametrize'.*mode='module'"):
        lk.inject(model, lk.LoRAConfig(rank=2, dropout=0.1, mode="parametrize"))
    assert_same_state(model, before)


# -- devices: meta, then to_empty ----------------------------------------------------------------------
def _all_kinds():
    torch.manual_seed(0)
    return nn.ModuleDict({"lin": nn.Linear(6, 5), "conv": nn.Conv2d(3, 4, 3), "emb": nn.Embedding(10, 6),
                          "c1d": Conv1D(5, 6), "out": nn.Linear(5, 5)})


CONFIGS = {
    "lora-module": lambda: lk.LoRAConfig(rank=2, targets=["lin", "conv", "emb", "c1d"]),
    "lora-parametrize": lambda: lk.LoRAConfig(rank=2, targets=["lin", "conv", "emb", "c1d"], mode="parametrize"),
    "clora": lambda: lk.CLoRAConfig(rank=2, targets=["lin", "conv"]),
    "adapter": lambda: lk.AdapterConfig(bottleneck=2, targets=["out"]),
}


@pytest.mark.parametrize("method", list(CONFIGS))
def test_meta_device_inject_then_to_empty_and_load(method):
    real = lk.inject(_all_kinds(), CONFIGS[method]())
    with torch.device("meta"):
        meta = _all_kinds()
    lk.inject(meta, CONFIGS[method]())
    tensors = dict(meta.named_parameters()) | dict(meta.named_buffers())
    assert all(t.is_meta for t in tensors.values()), [n for n, t in tensors.items() if not t.is_meta]
    meta.to_empty(device="cpu")
    assert all(t.device.type == "cpu" for t in list(meta.parameters()) + list(meta.buffers()))
    meta.load_state_dict(real.state_dict())
    x = torch.randn(3, 6)
    torch.testing.assert_close(meta["lin"](x), real["lin"](x))
    if method == "clora":  # the noise statistics follow the loaded W, not the meta garbage
        for name in ("noise_mean", "noise_std"):
            torch.testing.assert_close(getattr(meta["lin"], name), getattr(real["lin"], name))
        assert meta["lin"].decay_value() == 1.0


# -- no host syncs -------------------------------------------------------------------------------------
class NoHostSync(TorchFunctionMode):
    """Raises on every way a forward could read a tensor's value back to the host."""

    FORBIDDEN = {torch.Tensor.item, torch.Tensor.__float__, torch.Tensor.__bool__, torch.Tensor.__int__,
                 torch.Tensor.tolist, torch.Tensor.__index__}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.FORBIDDEN:
            raise AssertionError(f"host sync in a forward: {func.__name__}")
        return func(*args, **(kwargs or {}))


def test_the_no_host_sync_guard_catches_syncs():
    t = torch.ones(())
    for read in (float, bool, int, torch.Tensor.item, torch.Tensor.tolist):
        with NoHostSync(), pytest.raises(AssertionError, match="host sync"):
            read(t)


def _sync_cases():
    torch.manual_seed(0)
    lora_kinds = lk.inject(_all_kinds(), lk.LoRAConfig(rank=2, targets=["lin", "conv", "emb", "c1d"], dropout=0.1))
    param = lk.inject(_all_kinds(), lk.LoRAConfig(rank=2, targets=["lin", "conv", "emb", "c1d"], mode="parametrize"))
    pissa = lk.inject(_all_kinds(), lk.LoRAConfig(rank=2, targets=["lin", "c1d"], init="svd"))
    clora = lk.inject(_all_kinds(), lk.CLoRAConfig(rank=2, targets=["lin", "conv"], noise="always", init="svd"))
    schedule = lk.DecaySchedule(clora, total_steps=10)
    for _ in range(3):
        schedule.step()  # d = 0.8125, with noise
    adapter = lk.inject(_all_kinds(), lk.AdapterConfig(bottleneck=2, targets=["out"]))
    return {"lora": lora_kinds, "parametrize": param, "pissa": pissa, "clora": clora, "adapter": adapter}


def _forward_all(model: nn.ModuleDict) -> None:
    model["lin"](torch.randn(2, 6))
    model["conv"](torch.randn(1, 3, 5, 5))
    model["emb"](torch.tensor([[1, 2, 3]]))
    model["c1d"](torch.randn(2, 6))
    model["out"](torch.randn(2, 5))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_no_host_sync_in_any_forward(training):
    for name, model in _sync_cases().items():
        model.train(training)
        for disabled in (False, True):
            with (lk.disabled(model) if disabled else torch.no_grad()), NoHostSync():
                _forward_all(model)


def test_decay_mirror_follows_the_buffer_however_it_is_written():
    model = lk.inject(_all_kinds(), lk.CLoRAConfig(rank=2, targets=["lin"]))
    layer = model["lin"]
    layer.decay.fill_(0.4)  # behind set_decay's back: read once, then mirrored
    assert layer.decay_value() == pytest.approx(0.4)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    layer.set_decay(0.9)
    model.load_state_dict(state)
    with NoHostSync():  # the load hook refreshed the mirror: no read in the forward
        assert layer.decay_value() == pytest.approx(0.4)
    clone = copy.deepcopy(model)
    assert clone["lin"].decay_value() == pytest.approx(0.4)


# -- C-LoRA follows train/eval ---------------------------------------------------------------------------
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_clora_starts_in_the_base_mode_and_follows_the_model(training):
    model = _net().train(training)
    lk.inject(model, lk.CLoRAConfig(rank=2, targets=["0"], noise="always"))
    assert {m.training for m in model.modules()} == {training}
    model[0].set_decay(0.5)
    x = torch.randn(4, 6)
    model.eval()
    assert torch.equal(model(x), model(x)), "no noise at inference"
    model.train()
    assert not torch.equal(model(x), model(x)), "fresh noise at every training forward"


# -- PiSSA gives the exact base back ---------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["linear", "hf_conv1d"])
def test_pissa_disabled_and_unload_give_the_original_base(kind):
    torch.manual_seed(0)
    make = (lambda: nn.Linear(8, 6)) if kind == "linear" else (lambda: Conv1D(6, 8))
    torch.manual_seed(0)
    base = nn.Sequential(make(), nn.Tanh(), nn.Linear(6, 2))
    original = base[0].weight.detach().clone()
    model = lk.inject(copy.deepcopy(base), lk.LoRAConfig(rank=3, alpha=6.0, targets=["0"], init="svd"))
    layer = model[0]
    a0, b0 = layer.pissa_initial("default")
    assert torch.equal(a0, layer.lora_A["default"].weight) and torch.equal(b0, layer.lora_B["default"].weight)
    assert not any(k.startswith("0.pissa") for k in model.state_dict()), "starts are not checkpointed"
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(5, 8)
    for _ in range(3):
        optimizer.zero_grad()
        model(x).pow(2).sum().backward()
        optimizer.step()
    assert not torch.allclose(layer.lora_A["default"].weight, a0), "training moved the factors"
    assert torch.equal(layer.pissa_initial("default")[0], a0), "the start stays as it was"
    with lk.disabled(model):
        torch.testing.assert_close(model(x), base(x), atol=1e-6, rtol=1e-6)
    lk.merge(model)
    with lk.disabled(model):
        torch.testing.assert_close(model(x), base(x), atol=1e-6, rtol=1e-6)
    lk.unmerge(model)
    plain = lk.unload(model, merge=False)
    torch.testing.assert_close(plain[0].weight, original, atol=1e-6, rtol=0)


def test_pissa_initial_is_none_for_other_inits_and_delete_restores():
    base = _net()
    model = lk.inject(copy.deepcopy(base), lk.LoRAConfig(rank=2, targets=["0"]))
    assert model[0].pissa_initial("default") is None
    lk.inject(model, lk.LoRAConfig(rank=2, targets=["0"], init="svd"), name="pissa")
    x = torch.randn(3, 6)
    lk.set_active(model, "default")  # the other adapter is active: the PiSSA residual must not leak into it
    torch.testing.assert_close(model(x), base(x), atol=1e-6, rtol=1e-6)
    lk.delete_adapter(model, "pissa")
    torch.testing.assert_close(model[0].base_layer.weight, base[0].weight, atol=1e-6, rtol=0)
