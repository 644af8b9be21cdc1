"""Mixed precision: one dtype matrix {precision} x {layer kind} x {mode}, checked against float64 references.

Every cell runs forward and backward, matches ``W x + s B A x`` computed in float64 from the same (rounded)
tensors within the dtype's tolerance, keeps factors in the dtype the ``adapter_dtype`` rule says, round-trips
merge/unmerge within one rounding of W's dtype, and lowers the loss in 20 steps on a fixed batch (fp16 through
``torch.amp.GradScaler``, which refuses half-precision gradients). Then the adapter-dtype rule for the other
methods, the issue's "only 8 % of A changed" failure, and train()'s fused-Adam fallback.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit as lk
from lorakit import train as train_module

pytestmark = pytest.mark.usefixtures("single_thread")


@dataclass(frozen=True)
class Precision:
    id: str
    model_dtype: torch.dtype
    adapter_dtype: str  # the LoRAConfig field
    factor_dtype: torch.dtype  # what the rule must give
    autocast: bool = False
    scaler: bool = False
    tol: float = 1e-5  # relative to the output's scale

    def context(self):
        return torch.autocast("cpu", dtype=torch.bfloat16) if self.autocast else contextlib.nullcontext()


PRECISIONS = [
    Precision("fp32", torch.float32, "float32", torch.float32),
    Precision("bf16-base-fp32-adapter", torch.bfloat16, "float32", torch.float32, tol=3e-2),
    Precision("bf16-both", torch.bfloat16, "base", torch.bfloat16, tol=3e-2),
    Precision("fp16-gradscaler", torch.float16, "float32", torch.float32, scaler=True, tol=4e-3),
    Precision("fp32-autocast-bf16", torch.float32, "float32", torch.float32, autocast=True, tol=3e-2),
]
KINDS = ["linear", "conv2d", "embedding", "hf_conv1d"]
MODES = ["module", "parametrize"]


def make_layer(kind: str) -> nn.Module:
    torch.manual_seed(0)
    return {"linear": lambda: nn.Linear(6, 5), "conv2d": lambda: nn.Conv2d(3, 4, 3, padding=1),
            "embedding": lambda: nn.Embedding(10, 6), "hf_conv1d": lambda: Conv1D(5, 6)}[kind]()


def make_input(kind: str, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    if kind == "embedding":
        return torch.randint(0, 10, (2, 5), generator=gen)
    shape = {"linear": (4, 6), "conv2d": (2, 3, 6, 5), "hf_conv1d": (2, 3, 6)}[kind]
    return torch.randn(*shape, generator=gen).to(dtype)


def build(kind: str, mode: str, p: Precision) -> nn.Sequential:
    model = nn.Sequential(make_layer(kind)).to(p.model_dtype)
    return lk.inject(model, lk.LoRAConfig(rank=2, alpha=4.0, mode=mode, adapter_dtype=p.adapter_dtype))


def parts(model: nn.Sequential, mode: str):
    """(base weight, bias, A, B) of the one adapted layer, whatever the mode."""
    layer = model[0]
    if mode == "parametrize":
        lora = layer.parametrizations.weight[0]
        return layer.parametrizations.weight.original, getattr(layer, "bias", None), lora.lora_A, lora.lora_B
    base = layer.base_layer
    if hasattr(layer, "lora_embedding_A"):
        return base.weight, None, layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
    return base.weight, base.bias, layer.lora_A["default"].weight, layer.lora_B["default"].weight


def reference(kind: str, mode: str, model: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """The adapted layer in float64, written out from its tensors: (W + s dW) applied as the layer type does."""
    w, bias, a, b = (t.detach().double() if t is not None else None for t in parts(model, mode))
    s = 2.0  # alpha / rank
    if mode == "parametrize":  # the parametrization adds (B A) viewed as W, whatever W's layout
        delta = (b @ a).view(w.shape)
    elif kind == "conv2d":
        delta = (b.flatten(1) @ a.flatten(1)).view(w.shape)
    elif kind in ("embedding", "hf_conv1d"):  # tables (num, dim) and Conv1D's (in, out) layout
        delta = (b @ a).t()
    else:
        delta = b @ a
    w = w + s * delta
    if kind == "linear":
        return x.double() @ w.t() + bias
    if kind == "hf_conv1d":
        return x.double() @ w + bias
    if kind == "conv2d":
        return F.conv2d(x.double(), w, bias, padding=1)
    return w[x]


def perturb(model: nn.Sequential, mode: str) -> None:
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for t in parts(model, mode)[2:]:
            t.copy_(torch.randn(t.shape, generator=gen) * 0.3)


def assert_close_scaled(got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    scale = want.abs().max().item() + 1e-12
    torch.testing.assert_close(got.double(), want, atol=tol * scale, rtol=tol)


matrix = pytest.mark.parametrize("p", PRECISIONS, ids=[p.id for p in PRECISIONS])
kinds = pytest.mark.parametrize("kind", KINDS)
modes = pytest.mark.parametrize("mode", MODES)


@matrix
@kinds
@modes
def test_forward_backward_match_float64(p, kind, mode):
    model = build(kind, mode, p)
    w, _, a, b = parts(model, mode)
    assert w.dtype == p.model_dtype and a.dtype == b.dtype == p.factor_dtype
    perturb(model, mode)
    x = make_input(kind, p.model_dtype)
    with p.context():
        y = model(x)
    if not p.autocast:
        assert y.dtype == p.model_dtype, "the output keeps the base output's dtype"
    assert_close_scaled(y, reference(kind, mode, model, x), p.tol)
    loss = y.float().pow(2).mean()
    if p.scaler:
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        optimizer = torch.optim.SGD([a, b], lr=0.0)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)  # raises "Attempting to unscale FP16 gradients" on half-precision factors
    else:
        loss.backward()
    for t in (a, b):
        assert t.grad is not None and t.grad.dtype == p.factor_dtype and torch.isfinite(t.grad).all()
    assert w.grad is None, "the base stays frozen"


@matrix
@kinds
@modes
def test_merge_round_trip_within_one_rounding(p, kind, mode):
    model = build(kind, mode, p)
    perturb(model, mode)
    x = make_input(kind, p.model_dtype)
    with torch.no_grad(), p.context():
        adapted = model(x)
    before = parts(model, mode)[0].detach().clone()
    lk.merge(model)
    with torch.no_grad(), p.context():
        assert_close_scaled(model(x), adapted.double(), p.tol)
    lk.unmerge(model)
    after = parts(model, mode)[0].detach()
    eps = torch.finfo(p.model_dtype).eps
    merged_scale = before.abs().max().item() + parts(model, mode)[3].abs().max().item() * 4.0
    assert (after.double() - before.double()).abs().max().item() <= 2 * eps * merged_scale


@matrix
@kinds
@modes
def test_twenty_steps_lower_the_loss(p, kind, mode):
    model = build(kind, mode, p)
    _, _, a, b = parts(model, mode)
    x = make_input(kind, p.model_dtype)
    with torch.no_grad(), p.context():
        target = torch.randn(model(x).shape, generator=torch.Generator().manual_seed(2))
    optimizer = torch.optim.Adam([a, b], lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, enabled=p.scaler)
    losses = []
    for _ in range(20):
        with p.context():
            loss = F.mse_loss(model(x).float(), target)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.95 * losses[0], losses


# -- the dtype rule beyond the matrix ---------------------------------------------------------------
@pytest.mark.parametrize("base_dtype, choice, expected", [
    (torch.bfloat16, "float32", torch.float32), (torch.float16, "float32", torch.float32),
    (torch.bfloat16, "base", torch.bfloat16), (torch.float64, "float32", torch.float64),
    (torch.float32, "base", torch.float32)])
def test_adapter_dtype_rule_for_every_method(base_dtype, choice, expected):
    def mlp():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 8)).to(base_dtype)

    lora = lk.inject(mlp(), lk.LoRAConfig(rank=2, targets=["0"], adapter_dtype=choice))
    clora = lk.inject(mlp(), lk.CLoRAConfig(rank=2, targets=["0"], adapter_dtype=choice))
    adapter = lk.inject(mlp(), lk.AdapterConfig(bottleneck=2, targets=["2"], adapter_dtype=choice))
    for model in (lora, clora, adapter):
        trainable = [p for p in model.parameters() if p.requires_grad]
        assert trainable and all(p.dtype == expected for p in trainable), type(model[0]).__name__
        frozen = [p for p in model.parameters() if not p.requires_grad]
        assert all(p.dtype == base_dtype for p in frozen), "the base keeps its dtype"
        x = torch.randn(3, 8, dtype=base_dtype)
        y = model.train()(x)
        assert y.dtype == base_dtype
        y.float().sum().backward()
        assert all(p.grad is not None and p.grad.dtype == expected for p in trainable)


@pytest.mark.parametrize("method", ["clora", "adapter"])
def test_clora_and_bottleneck_under_autocast(method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 8))
    cfg = lk.CLoRAConfig(rank=2, targets=["0"]) if method == "clora" else lk.AdapterConfig(bottleneck=2, targets=["2"])
    lk.inject(model, cfg).train()
    if method == "clora":
        model[0].set_decay(0.5)  # noise and a partial W
    x = torch.randn(3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    y.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_clora_on_bf16_compresses_to_a_bf16_model(kind):
    torch.manual_seed(0)
    first = nn.Linear(8, 6) if kind == "linear" else nn.Conv2d(3, 6, 3, padding=1)
    model = nn.Sequential(first, nn.ReLU()).to(torch.bfloat16)
    lk.inject(model, lk.CLoRAConfig(rank=2, targets=["0"]))
    assert model[0].lora_A["default"].weight.dtype == torch.float32
    with torch.no_grad():
        model[0].lora_B["default"].weight.normal_()
    model[0].set_decay(0.0)
    x = torch.randn(3, 8) if kind == "linear" else torch.randn(2, 3, 5, 5)
    x = x.to(torch.bfloat16)
    before = model.eval()(x)
    lk.compress(model)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    torch.testing.assert_close(model(x), before, atol=3e-2, rtol=3e-2)


def test_fp32_factors_on_bf16_base_all_move_at_small_lr():
    """The issue: bf16 factors on a bf16 base kept ~92 % of A unchanged after 20 AdamW steps at lr 1e-5."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64)).to(torch.bfloat16)
    lk.inject(model, lk.LoRAConfig(rank=4, alpha=8.0))
    a = model[0].lora_A["default"].weight
    start = a.detach().clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    x, target = torch.randn(16, 64, dtype=torch.bfloat16), torch.randn(16, 64)
    for _ in range(20):
        loss = F.mse_loss(model(x).float(), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    changed = (a.detach() != start).float().mean().item()
    assert a.dtype == torch.float32 and changed > 0.99, changed


# -- train(): fused Adam when the installed torch has it ----------------------------------------------
def _params(dtype):
    return [nn.Parameter(torch.randn(3, 3, dtype=dtype)), nn.Parameter(torch.randn(3, dtype=dtype))]


def test_make_optimizer_falls_back_when_fused_adam_is_missing(monkeypatch):
    """torch < 2.4 has no CPU fused Adam and raises at construction; train() must still run."""
    class OldAdamW(torch.optim.AdamW):
        def __init__(self, params, **kwargs):
            if kwargs.get("fused"):
                raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of "
                                   "supported devices: ['cuda', 'xpu', 'privateuseone']")
            super().__init__(params, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", OldAdamW)
    optimizer = train_module._make_optimizer(_params(torch.float32), train_module.TrainConfig(optimizer="adamw"))
    assert isinstance(optimizer, OldAdamW) and not optimizer.defaults.get("fused")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_make_optimizer_steps_half_precision_params(dtype):
    params = _params(dtype)
    optimizer = train_module._make_optimizer(params, train_module.TrainConfig(optimizer="adamw", lr=0.1))
    before = params[0].detach().clone()
    sum(p.float().sum() for p in params).backward()
    optimizer.step()
    assert params[0].dtype == dtype and not torch.equal(params[0].detach(), before)
