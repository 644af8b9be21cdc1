"""LoRA on quantised bases (QLoRA): bitsandbytes Linear4bit (nf4, fp4; fp32 or bf16 compute) and Linear8bitLt on
the CPU backend, checked against PEFT on the same tiny Llama; other quantisers by the logical-features rule."""
import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")
bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")

import lorakit as lk  # noqa: E402
from tiny_llama import token_batch, write_tiny_llama  # noqa: E402

SIZE = dict(hidden_size=64, intermediate_size=128, initializer_range=0.2)  # bitsandbytes blocks are 64 wide
QUANT = {
    "nf4-fp32": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    "fp4-fp32": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32),
    "nf4-bf16": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16),
    "nf4-double": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                       bnb_4bit_use_double_quant=True),  # the block scales quantised too (QLoRA's default)
    "int8": dict(load_in_8bit=True),
}
CFG = dict(r=8, lora_alpha=16, target_modules="all-linear")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("qlora") / "llama", seed=4, **SIZE)


def load(folder, quant=None):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(**QUANT[quant]) if quant else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bitsandbytes' notes on CPU casts
        return AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, device_map="cpu").eval()


def peft_adapter(folder, quant, out):
    """A PEFT QLoRA adapter with non-zero B (as after training), saved to ``out``; returns the PEFT model."""
    torch.manual_seed(7)
    model = peft.get_peft_model(load(folder, quant), peft.LoraConfig(**CFG, init_lora_weights=False)).eval()
    model.save_pretrained(out)
    return model


def factors(model):
    return [p for n, p in model.named_parameters() if "lora_" in n]


def logits(model, ids=None):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model(token_batch(seed=2) if ids is None else ids).logits.float()


@pytest.mark.parametrize("quant", list(QUANT))
def test_factors_have_the_logical_shapes_in_float32_and_the_counts_are_peft_s(folder, quant):
    model = lk.inject(load(folder, quant), lk.LoRAConfig(rank=8, alpha=16, targets="all-linear"))
    k_proj = model.model.layers[0].self_attn.k_proj  # 64 -> 32 (two key/value heads of 16)
    assert k_proj.lora_A["default"].weight.shape == (8, 64) and k_proj.lora_B["default"].weight.shape == (32, 8)
    assert {p.dtype for p in factors(model)} == {torch.float32}
    count = lk.count_parameters(model)
    reference = peft.get_peft_model(load(folder, quant), peft.LoraConfig(**CFG))
    assert (count.trainable, count.total) == reference.get_nb_trainable_parameters()


@pytest.mark.parametrize("quant", list(QUANT))
def test_forward_and_backward_train_only_the_factors(folder, quant):
    model = lk.inject(load(folder, quant), lk.LoRAConfig(rank=8, alpha=16, targets="all-linear")).train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model(token_batch(seed=2), labels=token_batch(seed=2))
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert any(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)


def trained_step(model, evaluate_first):
    """The loss and the factors' gradients of one training forward/backward, after an evaluation or not."""
    if evaluate_first:
        logits(model.eval())
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = model(token_batch(seed=2), labels=token_batch(seed=2)).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if "lora_" in n}


def adapted(folder, quant):
    model = lk.inject(load(folder, quant), lk.LoRAConfig(rank=8, alpha=16, targets="all-linear"))
    torch.manual_seed(3)
    with torch.no_grad():
        for p in factors(model):  # non-zero B, as after some training: every factor gets a gradient
            p.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("quant", ["nf4-fp32", "nf4-bf16"])
def test_every_adapter_gets_a_gradient_after_an_evaluation(folder, quant):
    """On AVX512-BF16 CPUs bitsandbytes re-packs a 4-bit weight at the first eval forward, into a layout whose kernel
    has no backward; without lorakit's hook, only the adapters above the last such layer trained afterwards."""
    model = lk.inject(load(folder, quant), lk.LoRAConfig(rank=8, alpha=16, targets="all-linear"))
    _, grads = trained_step(model, evaluate_first=True)
    starved = [n for n, g in grads.items() if "lora_B" in n and (g is None or not g.abs().sum())]
    assert not starved, f"no gradient after an evaluation: {starved}"


@pytest.mark.parametrize("quant", ["nf4-fp32", "fp4-fp32", "nf4-bf16", "nf4-double"])
def test_training_after_an_evaluation_is_as_if_it_had_not_happened(folder, quant):
    """Exactly: the standard layout comes back as it was, not by bitsandbytes' inverse of the packing (which rounds
    the block scales to bf16 and, without double quantisation, leaves them transposed: another base)."""
    model = adapted(folder, quant)
    fresh_loss, fresh_grads = trained_step(model, evaluate_first=False)
    evaluated = logits(model.eval())  # the factors are as they were (no optimiser step)
    again = adapted(folder, quant)
    for checkpoint in (False, True):  # evaluations, a checkpoint, training: as in a fine-tune
        torch.testing.assert_close(logits(again.eval()), evaluated, atol=0, rtol=0)  # bitsandbytes' packed kernel
        if checkpoint:  # bitsandbytes' state_dict() runs that inverse in place: undone too
            again.state_dict()
            torch.testing.assert_close(logits(again.eval()), evaluated, atol=0, rtol=0)
        again.zero_grad()
        loss, grads = trained_step(again, evaluate_first=False)
        torch.testing.assert_close(loss, fresh_loss, atol=1e-6, rtol=0)
        assert grads.keys() == fresh_grads.keys() and all(g is not None for g in grads.values())
        for name, g in grads.items():
            torch.testing.assert_close(g, fresh_grads[name], atol=1e-6, rtol=0, msg=name)
    logits(again.eval())
    layer = again.model.layers[0].self_attn.q_proj.base_layer
    packs = getattr(layer, "support_avx512bf16_for_cpu", False)  # else nothing here was packed: trivially exact
    assert getattr(layer.weight.quant_state, "packing_format_for_cpu", False) == packs


def test_a_base_evaluated_before_inject_warns_that_its_gradients_stop(folder):
    """Packed before lorakit saw it: no exact standard layout is left to go back to."""
    model = load(folder, "nf4-fp32")
    logits(model)
    lk.inject(model, lk.LoRAConfig(rank=8, alpha=16, targets="all-linear")).train()
    if not getattr(model.model.layers[0].self_attn.q_proj.base_layer, "support_avx512bf16_for_cpu", False):
        pytest.skip("bitsandbytes packs 4-bit weights only on CPUs with AVX512-BF16")
    with pytest.warns(UserWarning, match="already packed .* inject before evaluating"):
        model(token_batch(seed=2))


@pytest.mark.parametrize("quant", ["nf4-fp32", "nf4-bf16", "int8"])
def test_a_peft_qlora_adapter_loads_with_peft_s_outputs_on_the_quantised_and_the_float_base(folder, tmp_path, quant):
    reference = peft_adapter(folder, quant, tmp_path / "peft")
    model = lk.load_adapter(load(folder, quant), tmp_path / "peft").eval()
    torch.testing.assert_close(logits(model), logits(reference), atol=1e-5, rtol=0)

    float_reference = peft.PeftModel.from_pretrained(load(folder), tmp_path / "peft").eval()
    float_model = lk.load_adapter(load(folder), tmp_path / "peft").eval()
    torch.testing.assert_close(logits(float_model), logits(float_reference), atol=1e-5, rtol=0)


@pytest.mark.parametrize("injected", [False, True])
@pytest.mark.parametrize("quant", ["nf4-fp32", "fp4-fp32", "nf4-double", "int8"])
def test_the_dense_weight_is_the_same_after_an_eval_forward(folder, quant, injected):
    """On AVX512-BF16 CPUs bitsandbytes re-packs a 4-bit weight for its kernel at the first eval forward; reading
    the weight must undo that for every layer (down_proj's 128 inputs are two scale blocks): exactly on an injected
    model (the standard layout kept), else through bitsandbytes' inverse (its scales rounded to bf16)."""
    from lorakit.layers.base import dense_weight

    model = load(folder, quant)
    if injected:
        lk.inject(model, lk.LoRAConfig(rank=2, targets=["q_proj"]))
    layers = {n: m for n, m in model.named_modules() if n.endswith(("q_proj", "down_proj")) and "base_layer" not in n}
    before = {n: dense_weight(m.base_layer if hasattr(m, "base_layer") else m).float().clone() for n, m in layers.items()}
    logits(model.eval())
    for name, layer in layers.items():
        after = dense_weight(layer.base_layer if hasattr(layer, "base_layer") else layer).float()
        tolerance = 0 if injected or quant == "int8" else 1e-2
        torch.testing.assert_close(after, before[name], atol=0, rtol=tolerance, msg=name)
    logits(model)  # and the layers still compute after being read


def test_a_lorakit_adapter_on_a_4bit_base_loads_in_peft_with_the_same_outputs(folder, tmp_path):
    model = lk.inject(load(folder, "nf4-fp32"), lk.LoRAConfig(rank=8, alpha=16, targets="all-linear"))
    with torch.no_grad():
        for p in factors(model):
            p.normal_(0, 0.1)
    lk.save_adapter(model, tmp_path / "lk")
    reference = peft.PeftModel.from_pretrained(load(folder, "nf4-fp32"), tmp_path / "lk").eval()
    torch.testing.assert_close(logits(reference), logits(model.eval()), atol=1e-5, rtol=0)


@pytest.mark.parametrize("quant", ["nf4-fp32", "int8"])
def test_merge_requantises_with_a_warning_as_peft_does(folder, tmp_path, quant):
    """Merged before any forward on both sides: bitsandbytes may re-pack a 4-bit weight at its first eval forward
    (next test), after which PEFT's merge reads the packed bytes as if they were not."""
    reference = peft_adapter(folder, quant, tmp_path / "peft")
    unmerged = logits(lk.load_adapter(load(folder, quant), tmp_path / "peft").eval())
    model = lk.load_adapter(load(folder, quant), tmp_path / "peft").eval()
    with pytest.warns(UserWarning, match="quantises their weights again"):
        lk.merge(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference.merge_adapter()
    merged = logits(model)
    torch.testing.assert_close(merged, logits(reference), atol=1e-4, rtol=0)  # PEFT's merge rounds the same way
    assert not torch.equal(merged, unmerged)  # the rounding the warning names
    plain = lk.unload(model, merge=True)
    assert type(plain.model.layers[0].self_attn.q_proj).__name__ in ("Linear4bit", "Linear8bitLt")


@pytest.mark.parametrize("cfg, words", [
    (lk.LoRAConfig(rank=4, targets=["q_proj"], mode="parametrize"), "mode='parametrize'"),
    (lk.LoRAConfig(rank=4, targets=["q_proj"], init="svd"), "init='svd'"),
    (lk.CLoRAConfig(rank=4, targets=["q_proj"]), "C-LoRA"),
])
def test_methods_that_change_the_weight_itself_are_refused_on_a_4bit_base(folder, cfg, words):
    model = load(folder, "nf4-fp32")
    before = logits(model)
    with pytest.raises(ValueError, match=f"{words}.*quantised \\(bitsandbytes 4-bit \\(nf4\\)\\)"):
        lk.inject(model, cfg)
    assert not any(type(m).__module__.startswith("lorakit") for m in model.modules())
    torch.testing.assert_close(logits(model), before, atol=0, rtol=0)


class PackedLinear(nn.Module):
    """Another quantiser's layer: an int8 weight with a row scale and its own forward."""

    def __init__(self, linear: nn.Linear, logical: bool = True) -> None:
        super().__init__()
        scale = linear.weight.abs().amax(1, keepdim=True) / 127
        self.weight = nn.Parameter((linear.weight / scale).round().to(torch.int8), requires_grad=False)
        self.register_buffer("scale", scale)
        if logical:
            self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x):
        return x @ (self.weight.float() * self.scale).t()


class PackedNet(nn.Module):
    def __init__(self, logical: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = PackedLinear(nn.Linear(6, 5), logical)

    def forward(self, x):
        return self.proj(x)


def test_another_quantiser_with_logical_features_trains_and_refuses_to_merge_by_name():
    from lorakit.layers.lora import LoRALinear

    model = PackedNet()
    wrapper = LoRALinear(model.proj)
    wrapper.add_adapter("default", lk.LoRAConfig(rank=2, alpha=2))
    with torch.no_grad():
        wrapper.lora_B["default"].weight.fill_(0.5)
    x = torch.randn(3, 6)
    low = x @ wrapper.lora_A["default"].weight.t() @ wrapper.lora_B["default"].weight.t()
    torch.testing.assert_close(wrapper(x), model.proj(x) + low)
    with pytest.raises(ValueError, match="cannot merge into PackedLinear.*int8"):
        wrapper.check_mergeable()


def test_a_quantised_layer_without_logical_features_is_refused_by_name():
    from lorakit.layers.lora import LoRALinear

    with pytest.raises(ValueError, match="PackedLinear is quantised.*no logical in_features/out_features"):
        LoRALinear(PackedNet(logical=False).proj)


@pytest.mark.integration
def test_smollm2_in_4bit_gets_peft_s_counts_and_peft_s_outputs():
    """The real SmolLM2-135M-Instruct quantised to nf4: a QLoRA adapter as PEFT makes it, on 30 Llama layers."""
    from lorakit.models import load_causal_lm

    model, tokenizer = load_causal_lm("smollm2", quantize="4bit")
    reference = peft.get_peft_model(load_causal_lm("smollm2", quantize="4bit")[0],
                                    peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0,
                                                    init_lora_weights=False)).eval()
    lk.inject(model, lk.LoRAConfig(rank=16, alpha=32, targets="all-linear"))
    count = lk.count_parameters(model)
    assert (count.trainable, count.total) == reference.get_nb_trainable_parameters()
    ours = dict(model.named_parameters())
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "lora_" in name:  # PEFT's random factors, copied into lorakit's layer of the same name
                ours[name.removeprefix("base_model.model.")].copy_(p)
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    torch.testing.assert_close(logits(model.eval(), ids), logits(reference, ids), atol=1e-4, rtol=0)
