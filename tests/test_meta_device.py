"""A model built on the ``meta`` device (shapes only, as for planning memory or sharding) runs a forward with
every adapter kind, and gives the shapes the real model gives."""
import pytest
import torch

pytest.importorskip("transformers")

import lorakit as lk  # noqa: E402
from tiny_llama import tiny_llama_config, token_batch  # noqa: E402

CONFIGS = {
    "lora": lk.LoRAConfig(rank=4, targets="all-linear"),
    "lora-embedding": lk.LoRAConfig(rank=4, targets=["embed_tokens", "q_proj"]),
    "adapter": lk.AdapterConfig(bottleneck=4, targets=["mlp"]),
    "prompt": lk.PromptConfig(num_tokens=3),
}


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_a_meta_model_runs_a_forward_with_the_real_model_s_shapes(kind):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    real = lk.inject(LlamaForCausalLM(tiny_llama_config()).eval(), CONFIGS[kind])
    with torch.device("meta"):
        meta = LlamaForCausalLM(tiny_llama_config()).eval()
    lk.inject(meta, CONFIGS[kind])
    assert lk.count_parameters(meta) == lk.count_parameters(real)
    ids = token_batch(2, 5)
    with torch.no_grad():
        out = meta(ids.to("meta")).logits
        assert out.device.type == "meta" and out.shape == real(ids).logits.shape
