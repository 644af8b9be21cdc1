"""Work that tests run in several processes (gloo on CPU); importable by the spawned children."""
from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import StackDataset

import lorakit as lk
from lorakit.parallel import stop
from lorakit.train import TrainConfig, train


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, world_size: int, *args) -> None:
    """Run ``fn(rank, world_size, port, *args)`` in ``world_size`` fresh processes joined by a gloo group."""
    mp.spawn(_entry, args=(fn, world_size, free_port(), args), nprocs=world_size, join=True)


def _entry(rank, fn, world_size, port, args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, port, *args)
    finally:
        stop()


def lora_mlp() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    lk.inject(model, lk.LoRAConfig(rank=4, alpha=8, targets=["0", "2"], modules_to_save=["4"]))
    return model


def problem(n: int = 90):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    return x, (x[:, :4].argmax(1))


def mlp_config(**overrides) -> TrainConfig:
    return TrainConfig(**{"lr": 0.01, "batch_size": 12, "steps": 12, "optimizer": "adamw", "progress": False,
                          **overrides})


def trained_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def train_mlp(rank, world_size, port, parallel, out):
    """Train the LoRA MLP under DDP or FSDP2; rank 0 saves losses and the plain model's state."""
    model = lora_mlp()
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k and "modules_to_save" not in k}
    if parallel == "ddp":
        wrapped = nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.fsdp import fully_shard

        for layer in (model[0], model[2], model[4]):
            fully_shard(layer)
        wrapped = fully_shard(model)
    seen = []
    model[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]))
    history = train(wrapped, problem(), mlp_config(log_every=1))
    state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
             for k, v in model.state_dict().items()}
    unchanged = all(torch.equal(state[k], v) for k, v in frozen.items())
    if rank == 0:
        torch.save({"losses": history.losses, "state": state, "frozen_unchanged": unchanged, "seen": sum(seen)}, out)


def nan_on_rank_one(rank, world_size, port, out):
    """Rank 1's loss turns NaN at step 3: every rank must stop there, naming the step; only rank 0 writes."""
    from lorakit.train import TrainingDivergedError, classification_loss

    calls = []

    def loss_fn(model, batch):
        calls.append(1)
        loss = classification_loss(model, batch)
        return loss * float("nan") if rank == 1 and len(calls) == 3 else loss

    model = nn.parallel.DistributedDataParallel(lora_mlp())
    cfg = mlp_config(checkpoint=f"{out}.rank{rank}.safetensors", checkpoint_every=1,
                     state_path=f"{out}.rank{rank}.state.pt")
    try:
        train(model, problem(), cfg, loss_fn=loss_fn)
    except TrainingDivergedError as err:
        torch.save({"step": err.step, "message": str(err)}, f"{out}.rank{rank}.error.pt")


def unused_adapter(rank, world_size, port, out):
    """A targeted layer that never runs: DDP's error must reach the user and name find_unused_parameters."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"used": nn.Linear(8, 4), "unused": nn.Linear(8, 4)})
    lk.inject(model, lk.LoRAConfig(rank=2, targets=["used", "unused"]))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x):
            return self.inner["used"](x)

    try:
        train(nn.parallel.DistributedDataParallel(Net()), problem(), mlp_config(steps=3))
    except RuntimeError as err:
        torch.save({"message": str(err)}, f"{out}.rank{rank}.error.pt")


def lora_bert() -> nn.Module:
    """A tiny random BERT classifier (no dropout) with LoRA on query/value and the classifier in modules_to_save."""
    from transformers import BertForSequenceClassification

    from lorakit.models.hf import tiny_bert_config

    torch.manual_seed(0)
    config = tiny_bert_config()
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
    model = BertForSequenceClassification(config)
    lk.inject(model, lk.LoRAConfig(rank=2, alpha=4, targets=["query", "value"], modules_to_save=["classifier"]))
    return model


def text_problem(n: int = 40) -> StackDataset:
    """Examples as dicts of input_ids, attention_mask and labels (default_collate stacks them into a batch)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 64, (n, 9), generator=g)
    labels = (ids[:, 0] > 34).long()  # learnable from the first token
    return StackDataset(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)


def bert_config(**overrides) -> TrainConfig:
    return TrainConfig(**{"lr": 0.02, "batch_size": 8, "steps": 10, "optimizer": "adamw", "progress": False,
                          **overrides})


def train_bert_and_save(rank, world_size, port, parallel, out):
    """Train the LoRA BERT under DDP or FSDP2, then every rank calls save_adapter into a folder of its own
    (``<out>/rank<r>``): rank 0 alone may write. Rank 0 also saves its losses and frozen-weight check."""
    from lorakit import parallel as par

    model = lora_bert()
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k and "modules_to_save" not in k}
    wrapped = par.wrap(model, parallel)
    history = train(wrapped, text_problem(), bert_config(log_every=1))
    lk.save_adapter(wrapped, f"{out}/rank{rank}")
    state = par.full_state_dict(wrapped)
    unchanged = all(torch.equal(state[k], v) for k, v in frozen.items())
    if rank == 0:
        torch.save({"losses": history.losses, "frozen_unchanged": unchanged}, f"{out}/rank0.pt")


def keep_best_under_fsdp(rank, world_size, port, out):
    """Train with validation on the opposite labels, so the best weights are the first evaluation's; then compare
    the sharded model's forward with the plain model that holds its gathered state (the best weights)."""
    from torch.distributed.fsdp import fully_shard

    from lorakit.parallel import full_state_dict

    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))

    x, y = problem()
    wrapped = fully_shard(net())  # one unit, the root: a validation forward leaves it unsharded
    history = train(wrapped, (x, y), mlp_config(eval_every=3), validation=(x, (y + 1) % 4), num_classes=4)
    with torch.no_grad():
        sharded_logits = wrapped(x)
    plain = net()
    plain.load_state_dict(full_state_dict(wrapped))
    with torch.no_grad():
        plain_logits = plain(x)
    if rank == 0:
        torch.save({"best_step": history.best_step, "steps": history.steps,
                    "difference": (sharded_logits - plain_logits).abs().max().item()}, out)


def merge_and_load_after_a_forward(rank, world_size, port, out):
    """One FSDP2 unit, the root: after a forward without backward its gathered weights stay registered, until a
    backward reshards it. A merge, an unmerge and a load_adapter in between must reach the shards, not only the
    gathered copy that the reshard throws away. Rank 0 saves the largest differences."""
    from torch.distributed.fsdp import fully_shard

    def plain():
        model = lora_mlp()
        with torch.no_grad():
            for p in (p for n, p in model.named_parameters() if "lora_B" in n):
                p.normal_()  # a LoRA that changes the outputs
        return model

    def backward(model):  # FSDP2 reshards every unit after it
        with torch.enable_grad():
            model(x).sum().backward()
        model.zero_grad()

    x, _ = problem(6)
    reference = plain()
    lk.save_adapter(reference, f"{out}.adapter", is_main_process=rank == 0)
    dist.barrier()
    with torch.no_grad():
        expected = reference(x)
        with lk.disabled(reference):
            base = reference(x)
        sharded = fully_shard(plain())
        differences = {}
        sharded(x)
        lk.merge(sharded)
        backward(sharded)
        differences["merge"] = (sharded(x) - expected).abs().max().item()
        with lk.disabled(sharded):
            differences["disabled"] = (sharded(x) - base).abs().max().item()
        backward(sharded)
        differences["merged again"] = (sharded(x) - expected).abs().max().item()
        lk.unmerge(sharded)
        backward(sharded)
        with lk.disabled(sharded):
            differences["unmerged, disabled"] = (sharded(x) - base).abs().max().item()
        for p in (p for n, p in sharded.named_parameters() if "lora_" in n):
            p.zero_()
        sharded(x)
        lk.load_adapter(sharded, f"{out}.adapter")
        backward(sharded)
        differences["load"] = (sharded(x) - expected).abs().max().item()
    if rank == 0:
        torch.save(differences, out)
