"""An adapter's tensors under PEFT's names: those a model has, those a config would give it, and the check of a
file's tensors against them.

Keys are PEFT's: ``base_model.model.<path>.lora_A.weight`` (rank, in), ``.lora_B.weight`` (out, rank),
``.lora_magnitude_vector`` (DoRA's m: (out,), or (1, out, 1, ...) for a convolution),
``.lora_embedding_A`` (rank, num) / ``_B`` (dim, rank) for embeddings, ``base_model.model.<path>.<name>`` for a
``modules_to_save`` module's state, ``.token_adapter.trainable_tokens_delta`` (rows, dim) for trainable tokens.
What a config *would* give a model is computed by injecting it into a **meta twin** of the model (:func:`meta_twin`: the same module classes and attributes, every tensor on the
``meta`` device, no storage), so the one code path that builds adapters also says what a file must hold, and
the real model is not touched.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

from .checkpoint_config import AdapterLoadError, FileConfig
from .checkpoint_write import peft_mismatch
from .inject import adapter_layers, inject, parametrizations, trained_biases
from .layers.dora import magnitude_shape
from .layers.lora import is_hf_conv1d
from .layers.prompt import ATTRIBUTE as PROMPT_ATTRIBUTE, SoftPrompt

try:  # FSDP2's sharded tensors
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # a torch built without distributed support
    DTensor, distribute_tensor = (), None

PREFIX = "base_model.model."
PROMPT_KEY = "prompt_embeddings"
LEGACY_PROMPT_KEY = f"{PREFIX}{PROMPT_ATTRIBUTE}.{PROMPT_KEY}"  # where earlier lorakit versions put it: read, never written
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
Entry = tuple[torch.Tensor, Callable[[torch.Tensor], None]]  # (tensor in PEFT's shape, how to write it back)


# -- the tensors a model has ----------------------------------------------------------------------
def adapter_tensors(model: nn.Module, name: str) -> dict[str, Entry]:
    """Every tensor of adapter ``name`` under its PEFT key, with a function that loads a new value."""
    entries: dict[str, Entry] = {}
    for path, layer in adapter_layers(model):
        if name in layer.adapter_names:
            prefix = "" if isinstance(layer, SoftPrompt) else f"{PREFIX}{path}."  # PEFT: a top-level prompt_embeddings
            for suffix, tensor in layer.peft_state(name).items():
                entries[f"{prefix}{suffix}"] = (tensor, _writer(tensor))
    for path, module, pname, lora in parametrizations(model):
        if lora.adapter_name == name:
            entries.update(_parametrized_entries(path, module, pname, lora))
    for key, bias in trained_biases(model, getattr(model, "lorakit_configs", {}).get(name), name).items():
        entries[f"{PREFIX}{key}"] = (bias, _writer(bias))  # bias='all' / 'lora_only': the base biases it trains
    return entries


def _writer(target: torch.Tensor, transpose: bool = False) -> Callable[[torch.Tensor], None]:
    """Copy a file's value into ``target`` (cast to its dtype and device; scattered when it is an FSDP2 shard)."""
    def write(value: torch.Tensor) -> None:
        value = value.t() if transpose else value
        value = value.reshape(target.shape).to(dtype=target.dtype)
        with torch.no_grad():
            if isinstance(target, DTensor):
                target.copy_(distribute_tensor(value.to(target.device), target.device_mesh, target.placements))
            else:
                target.copy_(value)
    return write


def _parametrized_entries(path: str, module: nn.Module, pname: str, lora) -> dict[str, Entry]:
    """Parametrize-mode factors in PEFT's shapes: reshaped for convs, transposed for embeddings and Conv1D."""
    a, b = lora.lora_A, lora.lora_B  # (r, cols), (rows, r)
    shape = module.parametrizations[pname].original.shape
    if isinstance(module, nn.Embedding) and pname == "weight":
        return {f"{PREFIX}{path}.lora_embedding_A": (b.t(), _writer(b, transpose=True)),
                f"{PREFIX}{path}.lora_embedding_B": (a.t(), _writer(a, transpose=True))}
    key = f"{PREFIX}{path}" if pname == "weight" else f"{PREFIX}{path}.{pname}"
    if is_hf_conv1d(module) and pname == "weight":  # W stored (in, out): PEFT's A (r, in) is our B^T, its B our A^T
        return {f"{key}.lora_A.weight": (b.t(), _writer(b, transpose=True)),
                f"{key}.lora_B.weight": (a.t(), _writer(a, transpose=True))}
    a_shape = (a.shape[0], *shape[1:]) if len(shape) > 2 else a.shape
    b_shape = (b.shape[0], b.shape[1], *[1] * (len(shape) - 2))
    entries = {f"{key}.lora_A.weight": (a.view(a_shape), _writer(a)),
               f"{key}.lora_B.weight": (b.view(b_shape), _writer(b))}
    m = lora.lora_magnitude_vector  # DoRA (never on an embedding or a Conv1D in this form: methods.py refuses it)
    if m is not None:
        entries[f"{key}.lora_magnitude_vector"] = (m.view(magnitude_shape(shape)), _writer(m))
    return entries


def layer_of(key: str) -> str:
    """The module path a PEFT key belongs to."""
    if key == PROMPT_KEY:
        return "the soft prompt (num_tokens, embedding size)"
    path = key.removeprefix(PREFIX)
    for suffix in (".lora_A.weight", ".lora_B.weight", ".lora_B.bias", ".lora_embedding_A", ".lora_embedding_B",
                   ".lora_magnitude_vector", ".base_layer.bias", ".token_adapter.trainable_tokens_delta"):
        if path.endswith(suffix):
            return path[: -len(suffix)]
    return path.rpartition(".")[0]


# -- the tensors a config would give a model --------------------------------------------------------
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
               "_load_state_dict_post_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
               "_forward_hooks_always_called")


def meta_twin(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers are storage-less ``meta`` tensors of the same shapes and
    dtypes (global shapes for FSDP2 shards), with no hooks. Shared modules and tied parameters stay shared;
    plain containers in a module's ``__dict__`` (``scaling``, ``lorakit_configs``) are copied, so injecting into
    the twin never reaches the model."""
    memo: dict[int, object] = {}

    def tensor(t):
        if t is None:
            return None
        if id(t) not in memo:
            fake = torch.empty(t.shape, dtype=t.dtype, device="meta")
            memo[id(t)] = nn.Parameter(fake, requires_grad=t.requires_grad and fake.is_floating_point()) \
                if isinstance(t, nn.Parameter) else fake
        return memo[id(t)]

    def module(m: nn.Module) -> nn.Module:
        if id(m) in memo:
            return memo[id(m)]
        twin = object.__new__(type(m))
        memo[id(m)] = twin
        state = {}
        for key, value in m.__dict__.items():
            if key in ("_parameters", "_buffers"):
                value = {n: tensor(t) for n, t in value.items()}
            elif key == "_modules":
                value = {n: None if c is None else module(c) for n, c in value.items()}
            elif key in _HOOK_DICTS:
                value = type(value)()
            elif isinstance(value, (dict, list, set)):
                value = copy.copy(value)
            state[key] = value
        twin.__dict__.update(state)
        return twin

    return module(model)


def expected_tensors(model: nn.Module, file: FileConfig, name: str) -> dict[str, torch.Tensor]:
    """PEFT key -> a meta tensor of the shape and dtype adapter ``name`` from ``file`` would have on ``model``.

    Raises :class:`AdapterLoadError` when the config does not fit the model (targets that match nothing, a
    layer the method cannot adapt, a PEFT setting lorakit would compute differently here); ``model`` is untouched.
    """
    twin = meta_twin(model)
    try:
        inject(twin, file.config, name=name)
    except Exception as err:  # any refusal on the twin is the config not fitting this model
        raise AdapterLoadError(f"adapter in {file.path.parent} does not fit this model: {err}{_origin(file)}") from None
    if file.peft_format:
        reason = peft_mismatch(twin, name)
        if reason is not None:
            raise AdapterLoadError(f"adapter in {file.path.parent} is PEFT's LoRA, and PEFT computes it differently "
                                   f"from lorakit here: {reason}; lorakit refuses it rather than give other outputs")
    return {key: tensor for key, (tensor, _) in adapter_tensors(twin, name).items()}


def _origin(file: FileConfig) -> str:
    if file.peft_format and getattr(file.config, "init", None) == "svd":
        return " (the file's init_lora_weights='pissa' is lorakit's init='svd')"
    return ""


def describe(file: FileConfig) -> str:
    cfg = file.config
    if file.peft_format:
        return f"r={cfg.rank}, lora_alpha={cfg.alpha!r}, use_rslora={cfg.rslora}"
    return f"{type(cfg).__name__}"


def check_tensors(weights: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], file: FileConfig) -> None:
    """Every expected key present, no other, each tensor of a floating dtype (or the model's own for
    ``modules_to_save`` buffers), the expected shape, finite values. :class:`AdapterLoadError` names the first
    problem: the key, what the file holds and what the config (``describe``) implies for this model."""
    where = f"adapter in {file.path.parent}"
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise AdapterLoadError(f"{where} does not fit: it has no tensor {missing[0]!r} for layer "
                               f"{layer_of(missing[0])!r} ({len(missing)} missing in all)")
    extra = sorted(set(weights) - set(expected))
    if extra:
        raise AdapterLoadError(f"{where} does not fit: tensor {extra[0]!r} names layer {layer_of(extra[0])!r}, which "
                               f"the config does not target in this model ({len(extra)} unexpected in all)")
    for key, want in expected.items():
        value = weights[key]
        floating = want.dtype in FLOAT_DTYPES
        if (floating and value.dtype not in FLOAT_DTYPES) or (not floating and value.dtype != want.dtype):
            accepted = "a floating dtype (float16, bfloat16, float32 or float64)" if floating else str(want.dtype)
            raise AdapterLoadError(f"{where} does not fit: tensor {key!r} has dtype {value.dtype}; expected {accepted}")
        if tuple(value.shape) != tuple(want.shape):
            raise AdapterLoadError(f"{where} does not fit layer {layer_of(key)!r}: {key} has shape "
                                   f"{tuple(value.shape)}, the model needs {tuple(want.shape)} ({describe(file)})")
        if floating and not bool(torch.isfinite(value).all()):
            raise AdapterLoadError(f"{where}: tensor {key!r} holds non-finite values (NaN or inf); expected finite "
                                   "numbers (a corrupted or diverged adapter?)")
