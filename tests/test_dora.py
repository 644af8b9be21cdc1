"""DoRA (``LoRAConfig(dora=True)``) against PEFT's ``use_dora`` and against closed forms.

The invariants LoRA has (init == base, merge == unmerged, disabled == base, unload, save/load) run over DoRA rows
in tests/test_lora_invariants.py; PEFT's files load both ways in tests/test_peft_fields.py. Here: the gradients
equal PEFT's, the low-rank norm equals the dense one, the eval cache is used and invalidated, mixed batches, a
4-bit base, bf16 autocast.
"""
from __future__ import annotations

import warnings

import peft
import pytest
import torch
from torch import nn

import lorakit as lk
from conftest import FACTORIES, perturb_adapters
from lorakit.layers.dora import row_norms

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.filterwarnings("ignore")]
TARGETS = ["layer", "head"]
MODELS = ["linear", "conv1d", "conv2d", "hf_conv1d", "embedding"]


def peft_dora(factory, **kw):
    """A PEFT DoRA model with random factors and magnitudes, in train mode."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(factory(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS,
                                                               use_dora=True, **kw))
    perturb_adapters(model)
    return model


def grads_by_key(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable gradients under one naming for PEFT and lorakit: ``<path>.<lora_A|lora_B|lora_magnitude_vector>``."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            key = name.removeprefix("base_model.model.").replace(".default", "").removesuffix(".weight")
            out[key] = p.grad
    return out


@pytest.mark.parametrize("model_name", MODELS)
def test_outputs_and_gradients_equal_peft_s(model_name, tmp_path):
    factory = FACTORIES[model_name]
    reference = peft_dora(factory)
    reference.save_pretrained(tmp_path)
    ours = lk.load_adapter(factory(), tmp_path)
    lk.set_active(ours, "default")
    x = factory().example_input()
    for model in (reference, ours):
        model.train()
        model(x).square().sum().backward()
    got, want = grads_by_key(ours), grads_by_key(reference)
    assert sorted(got) == sorted(want) and any("magnitude" in k for k in got)
    for key in want:
        torch.testing.assert_close(got[key].view(want[key].shape), want[key], atol=1e-5, rtol=1e-5, msg=key)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), reference.eval()(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rank, scale", [(1, 1.0), (4, 0.5), (8, 3.0)])
def test_the_low_rank_norm_equals_the_dense_one(rank, scale):
    gen = torch.Generator().manual_seed(rank)
    w, a, b = (torch.randn(*s, generator=gen, dtype=torch.float64) for s in [(12, 20), (rank, 20), (12, rank)])
    dense = (w + scale * b @ a).norm(dim=1)
    torch.testing.assert_close(row_norms(w, a, b, scale), dense, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(row_norms(w.float(), a.float(), b.float(), scale), dense.float(), atol=1e-5, rtol=1e-5)


def test_the_norm_is_detached_and_the_magnitude_trains():
    model = lk.inject(FACTORIES["linear"](), lk.LoRAConfig(rank=2, targets=TARGETS, dora=True)).train()
    perturb_adapters(model)
    model(model.example_input()).sum().backward()
    layer = model.layer
    assert layer.lora_magnitude_vector["default"].grad.abs().sum() > 0
    assert layer.base_layer.weight.grad is None  # the base stays frozen; the norm carries no gradient


def count_norms(monkeypatch, layer) -> list:
    calls = []
    compute = layer._compute_norm
    monkeypatch.setattr(layer, "_compute_norm", lambda name: calls.append(name) or compute(name))
    return calls


def test_eval_reuses_an_unchanged_norm_and_recomputes_a_changed_one(monkeypatch, tmp_path):
    model = lk.inject(FACTORIES["linear"](), lk.LoRAConfig(rank=2, targets=TARGETS, dora=True)).eval()
    perturb_adapters(model)
    calls, x = count_norms(monkeypatch, model.layer), model.example_input()
    with torch.no_grad():
        first = model(x)
        assert torch.equal(model(x), first)
        assert len(calls) == 1, "the second eval forward must reuse the norm"
        model.layer.lora_B["default"].weight.add_(0.1)  # an in-place write (an optimiser step, load_adapter)
        changed = model(x)
    assert len(calls) == 2 and not torch.allclose(changed, first)
    model.train()
    model(x)
    model(x)
    assert len(calls) == 4, "training mode computes the norm at every forward"
    lk.save_adapter(model, tmp_path)
    fresh = lk.load_adapter(lk.inject(FACTORIES["linear"](), lk.LoRAConfig(rank=2, targets=TARGETS, dora=True)),
                            tmp_path).eval()
    with torch.no_grad():
        fresh(x)  # fill the cache, then load other values: the cache must not hide them
        lk.load_adapter(fresh, tmp_path)
        torch.testing.assert_close(fresh(x), model.eval()(x))


def test_mixed_batches_give_each_row_its_adapter_s_output():
    model = FACTORIES["linear"]()
    lk.inject(model, lk.LoRAConfig(rank=2, targets=TARGETS, dora=True), name="dora")
    lk.inject(model, lk.LoRAConfig(rank=3, alpha=2.0, targets=["layer"]), name="lora")
    lk.inject(model, lk.LoRAConfig(rank=1, targets=["head"], dora=True, rslora=True), name="head_only")
    for seed, name in enumerate(["dora", "lora", "head_only"]):  # perturb_adapters reaches the active adapter
        lk.set_active(model, name)
        perturb_adapters(model, seed=seed)
    model.eval()
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(3))
    names = ["dora", None, "lora", "head_only", "dora"]
    with torch.no_grad():
        with lk.mixed_batch(model, names):
            mixed = model(x)
        for i, name in enumerate(names):
            if name is None:
                with lk.disabled(model):
                    alone = model(x[i:i + 1])
            else:
                lk.set_active(model, name)
                alone = model(x[i:i + 1])
            torch.testing.assert_close(mixed[i:i + 1], alone, atol=1e-6, rtol=1e-5, msg=str(name))
    assert not torch.allclose(mixed[0], mixed[1])


def test_bf16_autocast_stays_close_to_float32():
    model = lk.inject(FACTORIES["linear"](), lk.LoRAConfig(rank=2, targets=TARGETS, dora=True)).train()
    perturb_adapters(model)
    x = model.example_input()
    exact = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(x)
    low.float().sum().backward()
    assert {p.grad.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    torch.testing.assert_close(low.float(), exact, atol=5e-2, rtol=5e-2)


def test_dora_is_refused_where_its_norm_would_take_another_axis():
    with pytest.raises(ValueError, match="dora=True on the embedding 'layer' needs mode='module'"):
        lk.inject(FACTORIES["embedding"](), lk.LoRAConfig(targets=["layer"], dora=True, mode="parametrize"))
    with pytest.raises(ValueError, match="needs mode='module'"):
        lk.inject(FACTORIES["hf_conv1d"](), lk.LoRAConfig(targets=["layer"], dora=True, mode="parametrize"))
    with pytest.raises(ValueError, match="dora=True with init='svd'"):
        lk.LoRAConfig(dora=True, init="svd")
    with pytest.raises(TypeError, match="dora=1 is not a boolean"):
        lk.LoRAConfig(dora=1)


def test_the_added_parameters_count_the_magnitudes():
    base = FACTORIES["linear"]()
    cfg = lk.LoRAConfig(rank=2, targets=TARGETS, dora=True)
    model = lk.inject(FACTORIES["linear"](), cfg)
    # LinearNet 6-5-3: LoRA 2 (6 + 5) + 2 (5 + 3) = 38, DoRA's magnitudes 5 + 3
    assert lk.count_parameters(model).adapter == 38 + 8 == lk.params.lora_added_parameters(base, cfg)
    assert "2 x (6 + 5) + 5" in lk.params.formula(base, cfg)


def test_a_4bit_base_starts_at_the_base_trains_and_repeats_itself(tmp_path):
    """On a bitsandbytes 4-bit base DoRA starts at the base's outputs, trains, repeats itself in eval (bitsandbytes
    re-packs a 4-bit weight at eval forwards on AVX512-BF16 CPUs; reading W must not undo that in place), and its
    norm is the dequantised weight's."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from lorakit.layers.base import dense_weight
    from tiny_llama import token_batch, write_tiny_llama

    folder = write_tiny_llama(tmp_path / "llama", seed=4, hidden_size=64, intermediate_size=128, initializer_range=0.2)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    # train mode first: after an eval forward bitsandbytes' packed CPU kernel passes no gradient to its input
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quant, device_map="cpu").train()
    ids = token_batch(seed=2)
    with torch.no_grad():
        before = model(ids).logits
    lk.inject(model, lk.LoRAConfig(rank=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"], dora=True))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, atol=1e-5, rtol=0)
    model(ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values()), [n for n, g in grads.items() if g is None]
    assert any(g.abs().sum() > 0 for n, g in grads.items() if "magnitude" in n)
    perturb_adapters(model, std=0.1)
    model.eval()
    with torch.no_grad():
        first = model(ids).logits
        torch.testing.assert_close(model(ids).logits, first, atol=0, rtol=0)
    layer = model.model.layers[0].self_attn.q_proj
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    exact = (dense_weight(layer.base_layer) + layer.scaling["default"] * b @ a).norm(dim=1)
    torch.testing.assert_close(layer._norm("default"), exact.detach(), atol=1e-5, rtol=1e-5)


def test_a_fused_optimiser_step_between_evals_is_seen(tmp_path):
    """Fused AdamW writes A, B and m without bumping their version counters; eval() must not reuse old norms."""
    model = lk.inject(FACTORIES["linear"](), lk.LoRAConfig(rank=2, targets=TARGETS, dora=True))
    perturb_adapters(model)
    x = model.example_input()
    with torch.no_grad():
        model.eval()(x)  # fills the eval cache
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1, fused=True)
    model.train()(x).square().sum().backward()
    optimizer.step()
    with torch.no_grad():
        after = model.eval()(x)
    lk.save_adapter(model, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(after, lk.load_adapter(FACTORIES["linear"](), tmp_path).eval()(x))


def test_dora_on_an_embedding_runs_in_mixed_batches_beside_lora():
    """DoRA's g on an embedding scales each embedding coordinate (PEFT's convention); per row in a mixed batch."""
    from test_patterns import assert_rows_match_alone
    from tiny_llama import tiny_llama

    model = tiny_llama()
    lk.inject(model, lk.LoRAConfig(rank=2, targets=["embed_tokens", "q_proj"], dora=True), name="dora")
    lk.inject(model, lk.LoRAConfig(rank=3, targets=["embed_tokens"]), name="lora")
    assert model.model.embed_tokens.lora_magnitude_vector["dora"].shape == (32,)  # hidden size, not the vocabulary
    assert_rows_match_alone(model.eval(), ["dora", "lora", None])
