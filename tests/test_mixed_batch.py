"""lorakit.mixed_batch: row i uses adapter i (None: the base), in forward and generate(), equal to each row run
alone and to PEFT's ``adapter_names=``; bad names and sizes are refused by name and change nothing."""
import pytest
import torch

pytest.importorskip("transformers")

import lorakit as lk  # noqa: E402
from tiny_llama import tiny_llama, token_batch  # noqa: E402

ADAPTERS = {
    "fr": lk.LoRAConfig(rank=4, alpha=8, targets="all-linear"),
    "de": lk.LoRAConfig(rank=8, alpha=8, targets=["q_proj", "v_proj", "embed_tokens"]),
    "it": lk.LoRAConfig(rank=2, alpha=4, targets=["o_proj", "down_proj"], rslora=True),
}
NAMES = ["de", None, "fr", "it", "fr"]


def model_with_adapters(seed=0):
    model = tiny_llama(seed=0, initializer_range=0.2)
    torch.manual_seed(seed)
    for name, cfg in ADAPTERS.items():
        lk.inject(model, cfg, name=name)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.3)
    return model.eval()


def alone(model, ids, name, **generate):
    """Row ``ids`` (1, T) with adapter ``name`` active (None: the base)."""
    def run():
        return model.generate(ids, **generate) if generate else model(ids).logits

    if name is None:
        with lk.disabled(model):
            return run()
    lk.set_active(model, name)
    return run()


@pytest.fixture(scope="module")
def model():
    return model_with_adapters()


def test_each_row_of_a_forward_equals_that_row_alone_with_its_adapter(model):
    ids = token_batch(len(NAMES), 9)
    with torch.no_grad(), lk.mixed_batch(model, NAMES):
        mixed = model(ids).logits
    with torch.no_grad():
        for i, name in enumerate(NAMES):
            torch.testing.assert_close(mixed[i:i + 1], alone(model, ids[i:i + 1], name), atol=1e-5, rtol=0, msg=name)
    rows = {name: mixed[i] for i, name in enumerate(NAMES)}
    assert not torch.allclose(rows["fr"], rows["de"]) and not torch.allclose(rows[None], rows["it"])


def test_greedy_generate_with_the_cache_gives_each_row_its_own_adapter_s_tokens(model):
    ids = token_batch(len(NAMES), 6, seed=3)
    settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad(), lk.mixed_batch(model, NAMES):
        mixed = model.generate(ids, **settings)
    with torch.no_grad():
        expected = [alone(model, ids[i:i + 1], name, **settings) for i, name in enumerate(NAMES)]
    assert mixed.tolist() == torch.cat(expected).tolist()
    with torch.no_grad(), lk.disabled(model):
        base = model.generate(ids, **settings)
    assert all((mixed[i] != base[i]).any() for i, name in enumerate(NAMES) if name)  # the adapters change tokens


def test_a_mixed_batch_equals_peft_s_adapter_names(model, tmp_path):
    peft = pytest.importorskip("peft")
    for name in ADAPTERS:
        lk.save_adapter(model, tmp_path / name, name=name)
    reference = peft.PeftModel.from_pretrained(tiny_llama(seed=0, initializer_range=0.2), tmp_path / "fr",
                                               adapter_name="fr")
    for name in ("de", "it"):
        reference.load_adapter(tmp_path / name, adapter_name=name)
    ids = token_batch(len(NAMES), 9)
    with torch.no_grad():
        expected = reference.eval()(ids, adapter_names=[n or "__base__" for n in NAMES]).logits
        with lk.mixed_batch(model, NAMES):
            torch.testing.assert_close(model(ids).logits, expected, atol=1e-5, rtol=0)


def test_leaving_the_block_restores_the_active_adapter(model):
    lk.set_active(model, "fr")
    ids = token_batch(2, 5)
    with torch.no_grad():
        before = model(ids).logits
        with lk.mixed_batch(model, ["de", "it"]):
            model(ids)
        torch.testing.assert_close(model(ids).logits, before, atol=0, rtol=0)


@pytest.mark.parametrize("names, words", [
    (["fr", "es"], r"unknown adapter names \['es'\].*'fr', 'de', 'it'"),
    ([], "non-empty list"),
    ("fr", "non-empty list"),
    (5, "non-empty list"),
    ([["fr"]], "non-empty list"),
])
def test_unknown_names_are_refused_by_name_and_change_nothing(model, names, words):
    with pytest.raises(ValueError, match=words):
        with lk.mixed_batch(model, names):
            pass
    assert all(getattr(m, "mixed", None) is None for m in model.modules())


def test_a_batch_of_another_size_is_refused_with_both_numbers(model):
    with pytest.raises(ValueError, match="given 3 adapter names, but this batch has 2 rows"):
        with torch.no_grad(), lk.mixed_batch(model, ["fr", "de", None]):
            model(token_batch(2, 5))
    assert all(getattr(m, "mixed", None) is None for m in model.modules())


def _refusal(setup, words):
    model = model_with_adapters()
    names = setup(model) or ["fr", None]
    with pytest.raises(ValueError, match=words):
        with lk.mixed_batch(model, names):
            pass
    assert all(getattr(m, "mixed", None) is None for m in model.modules())


@pytest.mark.parametrize("setup, words", [
    (lambda m: m.train() and None, "training mode.*model.eval()"),
    (lambda m: lk.merge(m) and None, "holds merged adapter 'it'.*unmerge"),
    (lambda m: lk.inject(m, lk.PromptConfig(num_tokens=2), name="p") and ["p"], "'p' is a PromptConfig.*LoRA"),
    (lambda m: lk.inject(m, lk.AdapterConfig(bottleneck=2, targets=["mlp"]), name="ad") and None,
     "active AdapterWrapper adapter 'ad'"),
    (lambda m: lk.inject(m, lk.LoRAConfig(rank=2, targets=["q_proj"], init="svd"), name="pi") and ["pi"],
     "init='svd'"),
])
def test_what_mixed_batches_do_not_support_is_refused_by_name(setup, words):
    _refusal(setup, words)


def test_a_mixed_batch_on_a_4bit_base_equals_each_row_alone(tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from tiny_llama import write_tiny_llama

    folder = write_tiny_llama(tmp_path / "m", hidden_size=64, intermediate_size=128, initializer_range=0.2)
    model = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)).eval()
    torch.manual_seed(0)
    for name in ("fr", "de"):
        lk.inject(model, lk.LoRAConfig(rank=4, targets="all-linear"), name=name)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.3)
        ids = token_batch(3, 5)
        with lk.mixed_batch(model, ["de", None, "fr"]):
            mixed = model(ids).logits
        for i, name in enumerate(["de", None, "fr"]):
            torch.testing.assert_close(mixed[i:i + 1], alone(model, ids[i:i + 1], name), atol=1e-5, rtol=0)
