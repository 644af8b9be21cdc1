"""Adapter checkpoints in PEFT's layout: ``adapter_config.json`` + ``adapter_model.safetensors``.

Keys are PEFT's: ``base_model.model.<path>.lora_A.weight`` (rank, in), ``.lora_B.weight`` (out, rank),
``.lora_embedding_A`` / ``_B`` for embeddings, and ``base_model.model.<path>.<param>`` for
``modules_to_save``. Writes are atomic. Loading reads safetensors, or a PEFT ``.bin`` with
``torch.load(weights_only=True)``; nothing is ever unpickled. Loading is transactional: on any error the
model is left exactly as it was.
"""
from __future__ import annotations

import dataclasses
import json
import re
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from . import _io
from .config import LoRAConfig
from .inject import adapter_layers, candidate_modules, delete_adapter, inject, is_hf_conv1d, parametrizations, set_active
from .layers.modules_to_save import ModulesToSave

PREFIX = "base_model.model."
CONFIG_FILE, WEIGHTS_FILE, BIN_FILE = "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"

# PEFT LoraConfig keys lorakit reads (left) and keys it accepts at their default value (right).
_LORA_FIELDS = {"r": "rank", "lora_alpha": "alpha", "lora_dropout": "dropout", "target_modules": "targets",
                "exclude_modules": "exclude", "use_rslora": "rslora", "modules_to_save": "modules_to_save"}
_UNSUPPORTED_IF_SET = {"use_dora": False, "rank_pattern": {}, "alpha_pattern": {}, "bias": "none",
                       "layers_to_transform": None, "layer_replication": None, "target_parameters": None,
                       "use_qalora": False, "lora_bias": False, "trainable_token_indices": None}
_IGNORED = {"peft_type", "peft_version", "task_type", "base_model_name_or_path", "revision", "inference_mode",
            "init_lora_weights", "fan_in_fan_out", "auto_mapping", "layers_pattern", "loftq_config",
            "megatron_config", "megatron_core", "eva_config", "corda_config", "alora_invocation_tokens",
            "arrow_config", "ensure_weight_tying", "kasa_config", "lora_ga_config", "monteclora_config",
            "qalora_group_size", "use_bdlora", "velora_config"}


# -- the adapter's tensors, named as PEFT names them ----------------------------------------------
Entry = tuple[torch.Tensor, Callable[[torch.Tensor], None]]  # (tensor in PEFT's shape, how to write it back)


def adapter_tensors(model: nn.Module, name: str) -> dict[str, Entry]:
    """Every tensor of adapter ``name`` under its PEFT key, with a function that loads a new value."""
    entries: dict[str, Entry] = {}
    for path, layer in adapter_layers(model):
        if name in layer.adapter_names:
            for suffix, tensor in layer.peft_state(name).items():
                entries[f"{PREFIX}{path}.{suffix}"] = (tensor, _copier(tensor))
    for path, module, pname, lora in parametrizations(model):
        if lora.adapter_name == name:
            entries.update(_parametrized_entries(path, module, pname, lora))
    return entries


def _copier(target: torch.Tensor) -> Callable[[torch.Tensor], None]:
    def copy(value: torch.Tensor) -> None:
        with torch.no_grad():
            target.copy_(value.view_as(target))
    return copy


def _parametrized_entries(path: str, module: nn.Module, pname: str, lora) -> dict[str, Entry]:
    """Parametrize-mode factors in PEFT's shapes: reshaped for convs, transposed for embeddings."""
    a, b = lora.lora_A, lora.lora_B  # (r, cols), (rows, r)
    shape = module.parametrizations[pname].original.shape
    if isinstance(module, nn.Embedding) and pname == "weight":
        return {f"{PREFIX}{path}.lora_embedding_A": (b.t(), lambda v: _copier(b)(v.t())),
                f"{PREFIX}{path}.lora_embedding_B": (a.t(), lambda v: _copier(a)(v.t()))}
    key = f"{PREFIX}{path}" if pname == "weight" else f"{PREFIX}{path}.{pname}"
    if is_hf_conv1d(module) and pname == "weight":  # W stored (in, out): PEFT's A (r, in) is our B^T, its B our A^T
        return {f"{key}.lora_A.weight": (b.t(), lambda v: _copier(b)(v.t())),
                f"{key}.lora_B.weight": (a.t(), lambda v: _copier(a)(v.t()))}
    a_shape = (a.shape[0], *shape[1:]) if len(shape) > 2 else a.shape
    b_shape = (b.shape[0], b.shape[1], *[1] * (len(shape) - 2))
    return {f"{key}.lora_A.weight": (a.view(a_shape), _copier(a)),
            f"{key}.lora_B.weight": (b.view(b_shape), _copier(b))}


# -- save -----------------------------------------------------------------------------------------
def save_adapter(model: nn.Module, directory: str | Path, name: str | None = None) -> Path:
    """Write adapter ``name`` (default: the active one) as ``adapter_config.json`` + safetensors."""
    name = name or getattr(model, "lorakit_active", None)
    configs = getattr(model, "lorakit_configs", {})
    if name not in configs:
        raise KeyError(f"no adapter named {name!r} to save; the model has: {list(configs) or 'none'}")
    cfg = configs[name]
    tensors = {key: tensor for key, (tensor, _) in adapter_tensors(model, name).items()}
    directory = Path(directory)
    _io.save_tensors(directory / WEIGHTS_FILE, tensors, metadata={"format": "pt"})
    _io.write_json(directory / CONFIG_FILE, config_to_json(model, cfg, name))
    return directory


def config_to_json(model: nn.Module, cfg, name: str) -> dict:
    if not isinstance(cfg, LoRAConfig):
        return {"peft_type": f"LORAKIT_{type(cfg).__name__.upper()}", **dataclasses.asdict(cfg)}
    layers = [p for p, layer in adapter_layers(model) if name in layer.adapter_names and not isinstance(layer, ModulesToSave)]
    layers += [p for p, _, _, lora in parametrizations(model) if lora.adapter_name == name]
    saved = [p for p, layer in adapter_layers(model) if isinstance(layer, ModulesToSave) and name in layer.adapter_names]
    targets = sorted(set(layers))
    others = [n for n, _ in candidate_modules(model) if n not in targets]
    if any(o.endswith("." + t) for o in others for t in targets):  # a list would also match those: be exact
        targets = "|".join(re.escape(t) for t in targets)
    conv1d = any(is_hf_conv1d(getattr(model.get_submodule(p), "base_layer", model.get_submodule(p))) for p in layers)
    return {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": None, "inference_mode": True,
            "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "target_modules": targets,
            "use_rslora": cfg.rslora, "modules_to_save": saved or None, "fan_in_fan_out": conv1d, "bias": "none",
            "init_lora_weights": True, "use_dora": False, **({"lorakit_mode": cfg.mode} if cfg.mode != "module" else {})}


# -- load -----------------------------------------------------------------------------------------
def read_config(directory: str | Path):
    """The config in ``directory/adapter_config.json``; unknown keys are ignored with a warning."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"{path} does not exist; an adapter folder holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON (truncated or corrupted?): {err}") from err
    if not isinstance(raw, dict) or "peft_type" not in raw:
        raise ValueError(f"{path} has no 'peft_type'; expected a PEFT adapter config such as {{'peft_type': 'LORA', 'r': 8, ...}}")
    if raw["peft_type"] != "LORA":
        return _lorakit_config(path, raw)
    for key, default in _UNSUPPORTED_IF_SET.items():
        if key in raw and raw[key] not in (default, None, {}, [], False):
            raise ValueError(f"{path} sets {key}={raw[key]!r}, which lorakit does not support; it loads plain LoRA adapters")
    unknown = sorted(set(raw) - set(_LORA_FIELDS) - set(_UNSUPPORTED_IF_SET) - _IGNORED - {"lorakit_mode"})
    if unknown:
        warnings.warn(f"{path}: ignoring keys lorakit does not know: {unknown}", stacklevel=3)
    kwargs = {ours: raw[peft] for peft, ours in _LORA_FIELDS.items() if raw.get(peft) is not None}
    kwargs["mode"] = raw.get("lorakit_mode") or "module"
    return LoRAConfig(**kwargs)


def _lorakit_config(path: Path, raw: dict):
    from . import config as config_module

    kinds = {f"LORAKIT_{c.__name__.upper()}": c for c in vars(config_module).values()
             if dataclasses.is_dataclass(c) and isinstance(c, type)}
    cls = kinds.get(raw["peft_type"])
    if cls is None:
        raise ValueError(f"{path}: peft_type {raw['peft_type']!r} is not one lorakit loads; expected one of {['LORA', *kinds]}")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - fields - {"peft_type"})
    if unknown:
        warnings.warn(f"{path}: ignoring keys lorakit does not know: {unknown}", stacklevel=3)
    return cls(**{k: v for k, v in raw.items() if k in fields})


def read_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    directory = Path(directory)
    if (directory / WEIGHTS_FILE).is_file():
        return _io.load_tensors(directory / WEIGHTS_FILE)
    if (directory / BIN_FILE).is_file():
        try:
            state = torch.load(directory / BIN_FILE, map_location="cpu", weights_only=True)
        except Exception as err:  # keep torch's reason, not its advice to retry with weights_only=False
            reason = next((line.strip() for line in str(err).splitlines() if "Unsupported global" in line),
                          str(err).splitlines()[0] if str(err) else type(err).__name__)
            raise ValueError(f"{directory / BIN_FILE} cannot be read as plain tensors ({reason}); lorakit never "
                             "unpickles arbitrary objects: convert it to safetensors") from err
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"{directory / BIN_FILE} is not a dict of tensors")
        return state
    raise ValueError(f"{directory} has no {WEIGHTS_FILE} (nor a PEFT {BIN_FILE}); is this an adapter folder?")


def load_adapter(model: nn.Module, directory: str | Path, name: str = "default") -> nn.Module:
    """Load an adapter saved by lorakit or PEFT into ``model`` as ``name``, injecting it if needed.

    Shapes and targets are checked against the model; on any mismatch a ``ValueError`` names the layer and
    the model is left exactly as it was.
    """
    cfg = read_config(directory)
    weights = read_weights(directory)
    if name in getattr(model, "lorakit_configs", {}):
        existing = model.lorakit_configs[name]
        if isinstance(cfg, LoRAConfig) and isinstance(existing, LoRAConfig) and existing.rank == cfg.rank \
                and existing.scale != cfg.scale:  # a rank that differs fails the shape check, naming the layer
            raise ValueError(f"adapter {name!r} in the model has scale {existing.scale:g} but {directory} needs "
                             f"{cfg.scale:g} (r={cfg.rank}, lora_alpha={cfg.alpha}, use_rslora={cfg.rslora}); "
                             f"delete_adapter(model, {name!r}) first or load it under another name")
        _assign(adapter_tensors(model, name), weights, directory)
        return model
    before = _snapshot(model)
    try:
        inject(model, cfg, name=name)
        _assign(adapter_tensors(model, name), weights, directory)
    except Exception as err:
        _restore(model, before, name)
        if isinstance(err, (ValueError, KeyError)) and "does not fit" in str(err):
            raise
        raise ValueError(f"adapter in {directory} does not fit this model: {err}") from err
    return model


def _assign(entries: dict[str, Entry], weights: dict[str, torch.Tensor], directory) -> None:
    missing = sorted(set(entries) - set(weights))
    extra = sorted(set(weights) - set(entries))
    if missing:
        raise ValueError(f"adapter in {directory} does not fit: it has no tensor {missing[0]!r} for layer "
                         f"{_layer_of(missing[0])!r} ({len(missing)} missing in all)")
    if extra:
        raise ValueError(f"adapter in {directory} does not fit: tensor {extra[0]!r} names layer {_layer_of(extra[0])!r}, "
                         f"which the config does not target in this model ({len(extra)} unexpected in all)")
    for key, (tensor, _) in entries.items():
        if tuple(weights[key].shape) != tuple(tensor.shape):
            raise ValueError(f"adapter in {directory} does not fit layer {_layer_of(key)!r}: {key} has shape "
                             f"{tuple(weights[key].shape)}, the model needs {tuple(tensor.shape)}")
    for key, (_, write) in entries.items():
        write(weights[key])


def _layer_of(key: str) -> str:
    path = key.removeprefix(PREFIX)
    for suffix in (".lora_A.weight", ".lora_B.weight", ".lora_embedding_A", ".lora_embedding_B"):
        if path.endswith(suffix):
            return path[: -len(suffix)]
    return path.rpartition(".")[0]


def _snapshot(model: nn.Module) -> dict:
    return {"grad": {id(p): p.requires_grad for p in model.parameters()},
            "active": getattr(model, "lorakit_active", None), "has": "lorakit_configs" in model.__dict__}


def _restore(model: nn.Module, before: dict, name: str) -> None:
    if name in getattr(model, "lorakit_configs", {}):
        delete_adapter(model, name)
    if before["active"] is not None:
        set_active(model, before["active"])
    elif not before["has"]:
        for attr in ("lorakit_configs", "lorakit_active"):
            model.__dict__.pop(attr, None)
    for p in model.parameters():
        if id(p) in before["grad"]:
            p.requires_grad_(before["grad"][id(p)])
