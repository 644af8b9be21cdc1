"""Wrapped models (issue 8, item 5): every inject.py entry point and count_parameters accept DDP,
``torch.compile`` and FSDP2 (``fully_shard``) models. One process, a gloo group of size 1.

The reference is the same adapter on the plain model: whatever a call does through the wrapper must give the
outputs it gives on the unwrapped model.
"""
from __future__ import annotations

import contextlib
import copy
import socket

import pytest
import torch
import torch.distributed as dist
from torch import nn

import lorakit as lk
from conftest import perturb_adapters

pytestmark = pytest.mark.usefixtures("single_thread")


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))


X = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))


@contextlib.contextmanager
def process_group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{port}")
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def group():
    with process_group():
        yield


def two_adapters(model: nn.Module) -> nn.Module:
    lk.inject(model, lk.LoRAConfig(rank=2, targets=["0", "2"]), name="a")
    perturb_adapters(model, seed=1)
    lk.inject(model, lk.LoRAConfig(rank=2, targets=["2", "4"]), name="b")
    perturb_adapters(model, seed=2)
    return model


def reference_outputs() -> dict[str, torch.Tensor]:
    plain = two_adapters(net())
    with torch.no_grad():
        out = {"b": plain(X)}
        lk.set_active(plain, "a")
        out["a"] = plain(X)
        with lk.disabled(plain):
            out["base"] = plain(X)
    return out


def check_every_entry_point(wrapped: nn.Module, inner: nn.Module) -> None:
    """The same calls as on the plain model, through the wrapper; outputs read through the wrapper."""
    expected = reference_outputs()
    two_adapters(wrapped)  # inject through the wrapper
    assert list(inner.lorakit_configs) == ["a", "b"]
    count = lk.count_parameters(wrapped)
    assert count == lk.count_parameters(inner) and count.adapter == 2 * (11 + 9) + 2 * (9 + 7)
    assert count.trainable == 2 * (9 + 7)  # adapter b only
    with torch.no_grad():
        torch.testing.assert_close(wrapped(X), expected["b"])
        lk.set_active(wrapped, "a")
        torch.testing.assert_close(wrapped(X), expected["a"])
        with lk.disabled(wrapped):
            torch.testing.assert_close(wrapped(X), expected["base"])
        lk.merge(wrapped)
        assert inner[0].merged_adapter == "a"
        torch.testing.assert_close(wrapped(X), expected["a"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(wrapped(X), expected["a"], atol=1e-5, rtol=1e-5)  # still there after a forward
        lk.unmerge(wrapped)
        torch.testing.assert_close(wrapped(X), expected["a"], atol=1e-5, rtol=1e-5)
        lk.delete_adapter(wrapped, "b")
        assert list(inner.lorakit_configs) == ["a"]
        lk.merge(wrapped)
        assert lk.unload(wrapped, merge=True) is wrapped
        assert not any(type(m).__module__.startswith("lorakit") for m in inner.modules())
        torch.testing.assert_close(wrapped(X), expected["a"], atol=1e-5, rtol=1e-5)


def test_data_parallel_wrapped(group):
    inner = net()
    check_every_entry_point(nn.parallel.DistributedDataParallel(inner), inner)


def test_compiled(group):
    torch._dynamo.reset()
    inner = net()
    check_every_entry_point(torch.compile(inner, backend="eager"), inner)


def test_ddp_around_an_injected_model_trains_only_the_adapter(group):
    model = lk.inject(net(), lk.LoRAConfig(rank=2, targets=["0"]))
    ddp = nn.parallel.DistributedDataParallel(model)
    ddp(X).sum().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == {"0.lora_A.default.weight", "0.lora_B.default.weight"}
    lk.set_active(ddp, "default")  # a KeyError before: the DDP wrapper has no lorakit_configs
    assert lk.count_parameters(ddp).trainable == 2 * (6 + 5)


def test_fsdp2_merge_acts_on_the_full_weights(group):
    """fully_shard in place: merge writes into the sharded weights and survives the reshard after a forward."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    model = two_adapters(net())
    lk.set_active(model, "a")
    with torch.no_grad():
        expected = model(X)
        with lk.disabled(model):
            base = model(X)
    for layer in (model[0], model[2], model[4]):
        fully_shard(layer)
    fully_shard(model)
    assert isinstance(model[0].base_layer.weight, DTensor)
    with torch.no_grad():
        lk.merge(model)
        for _ in range(2):  # each forward gathers, then reshards
            torch.testing.assert_close(model(X), expected, atol=1e-5, rtol=1e-5)
        merged_weight = model[0].base_layer.weight.full_tensor()
        unsharded = copy.deepcopy(net()[0].weight) + model[0].delta_weight("a").full_tensor()
        torch.testing.assert_close(merged_weight, unsharded, atol=1e-6, rtol=1e-6)
        with lk.disabled(model):
            torch.testing.assert_close(model(X), base, atol=1e-5, rtol=1e-5)
        lk.unmerge(model)
        torch.testing.assert_close(model(X), expected, atol=1e-5, rtol=1e-5)
        lk.set_active(model, "b")
    assert lk.count_parameters(model).trainable == 2 * (9 + 7)


def test_fsdp2_wrap_of_a_soft_prompt_model_gives_the_plain_outputs_and_gradients(group):
    """The prompt is read by the model's forward pre-hook, never called: it must stay in the root's FSDP2 group."""
    pytest.importorskip("transformers")
    from transformers import BertForSequenceClassification

    from lorakit import parallel
    from lorakit.models.hf import tiny_bert_config

    torch.manual_seed(0)
    config = tiny_bert_config()
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
    plain = BertForSequenceClassification(config)
    lk.inject(plain, lk.PromptConfig(num_tokens=3))
    sharded = parallel.wrap(copy.deepcopy(plain), "fsdp")
    batch = {"input_ids": torch.randint(5, 64, (4, 7)), "attention_mask": torch.ones(4, 7, dtype=torch.long),
             "labels": torch.tensor([0, 1, 0, 1])}
    for model in (plain, sharded):
        model(**batch).loss.backward()
    grads = [next(p.grad for n, p in m.named_parameters() if "prompt" in n) for m in (plain, sharded)]
    torch.testing.assert_close(grads[1].full_tensor(), grads[0], atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(sharded(**batch).logits, plain(**batch).logits, atol=1e-6, rtol=1e-5)


def test_fsdp2_resume_state_saved_right_after_validation_resumes_bit_identical(group, tmp_path):
    """Validation is a forward without a backward: it leaves the root FSDP2 unit unsharded, with trainable
    parameters in it (PEFT's ``modules_to_save`` head). Saving the state there used to fail inside DCP."""
    from test_train_resume import Counter, model_and_config, run

    from lorakit import parallel

    def sharded(folder, **overrides):
        model, cfg = model_and_config(folder, eval_every=5, **overrides)  # a state is saved every 5 steps too
        return parallel.wrap(model, "fsdp"), cfg

    model, cfg = sharded(tmp_path / "a")
    reference = run(model, cfg, Counter())
    expected = {k: v.full_tensor() for k, v in model.state_dict().items() if k != "seen"}
    stopped, cfg_b = sharded(tmp_path / "b")
    with pytest.raises(KeyboardInterrupt):
        run(stopped, cfg_b, Counter(), stop_at=13)
    resumed, cfg_b = sharded(tmp_path / "b", resume=True)
    history = run(resumed, cfg_b, Counter())
    for key, value in expected.items():
        assert torch.equal(resumed.state_dict()[key].full_tensor(), value), key
    assert history.losses == reference.losses and history.val_accuracies == reference.val_accuracies
