"""Activation (gradient) checkpointing on a lorakit tiny Llama, reentrant and not: the adapter gradients equal those
of the run without checkpointing, for every kind of adapter."""
import pytest
import torch

pytest.importorskip("transformers")

import lorakit as lk  # noqa: E402
from tiny_llama import tiny_llama, token_batch  # noqa: E402

CONFIGS = {
    "lora": lk.LoRAConfig(rank=4, alpha=8, targets="all-linear"),
    "lora-parametrize": lk.LoRAConfig(rank=4, alpha=8, targets=["q_proj", "down_proj"], mode="parametrize"),
    "lora-embedding": lk.LoRAConfig(rank=4, alpha=8, targets=["embed_tokens", "v_proj"]),
    "adapter": lk.AdapterConfig(bottleneck=4, targets=["o_proj", "down_proj"]),
    "prompt": lk.PromptConfig(num_tokens=3),
}


def adapter_gradients(cfg, checkpointing=None):
    model = lk.inject(tiny_llama(), cfg).train()
    if checkpointing is not None:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": checkpointing})
        assert model.is_activation_checkpointing
    ids = token_batch(batch=2, length=6)
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    return grads


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
@pytest.mark.parametrize("kind", list(CONFIGS))
def test_gradients_with_checkpointing_equal_those_without(kind, reentrant):
    plain = adapter_gradients(CONFIGS[kind])
    checkpointed = adapter_gradients(CONFIGS[kind], checkpointing=reentrant)
    assert plain.keys() == checkpointed.keys()
    assert any(g.abs().sum() > 0 for g in plain.values())
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-7, rtol=1e-6, msg=name)
