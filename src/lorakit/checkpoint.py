"""Adapter checkpoints in PEFT's layout: ``adapter_config.json`` + ``adapter_model.safetensors``.

:func:`load_adapter` reads, then acts: it validates the whole config (``checkpoint_config.py``) and every
tensor's name, dtype, shape and values against what that config implies for this model (computed on a meta
twin, ``checkpoint_tensors.py``), and only then changes the model; any later error rolls back. Loading reads
safetensors, or a PEFT ``.bin`` with ``torch.load(weights_only=True)``; nothing is ever unpickled.

:func:`save_adapter` writes PEFT's LoRA format when PEFT computes the same outputs from it, else lorakit's own
(``peft_type`` ``LORAKIT_*``, which PEFT refuses). Writes are atomic. Both accept models wrapped by DDP,
``torch.compile`` or FSDP2 (sharded adapter tensors are gathered; with a process group, rank 0 writes).
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from . import _io
from .checkpoint_config import BIN_FILE, CONFIG_FILE, WEIGHTS_FILE, AdapterLoadError, FileConfig, read_config
from .checkpoint_tensors import LEGACY_PROMPT_KEY, PREFIX, PROMPT_KEY, DTensor, adapter_tensors, check_tensors, describe, expected_tensors
from .checkpoint_write import config_to_json, peft_mismatch, prompt_mismatch
from .config import LoRAConfig, PromptConfig
from .inject import adapter_layers, adapters, delete_adapter, inject, parametrizations, set_active
from .layers.trainable_tokens import tied_modules, token_modules, token_rows
from .wrapped import reshard, unwrap_model

__all__ = ["save_adapter", "load_adapter", "read_config", "read_weights", "adapter_tensors", "AdapterLoadError",
           "PREFIX", "CONFIG_FILE", "WEIGHTS_FILE", "BIN_FILE"]


# -- save -----------------------------------------------------------------------------------------
def save_adapter(model: nn.Module, directory: str | Path, name: str | None = None,
                 is_main_process: bool | None = None) -> Path:
    """Write adapter ``name`` (default: the active one) to ``directory`` as ``adapter_config.json`` + safetensors.

    Keys are clean (no ``module.`` / ``_orig_mod.``) for a DDP-, FSDP2- or ``torch.compile``-wrapped model. When a
    process group is initialised every rank must call this: sharded tensors are gathered, rank 0 writes, and all
    ranks return together. ``is_main_process`` (PEFT's name) decides instead whether this process writes, with no
    wait for the others: True for a folder of its own (a temporary one), False to write nothing. A PiSSA adapter
    (``init="svd"``) is written as the plain rank-2r adapter that gives the trained outputs on the *original* base
    (``s B A - s B0 A0 = s [B | -B0] [A ; A0]``), so PEFT loads it too.

    Raises:
        KeyError: the model has no adapter ``name`` (or none at all).
        OSError: a file cannot be written (full disk, no permission); the old files stay whole.
        RuntimeError: with a process group, on the other ranks when rank 0 could not write.
    """
    model = unwrap_model(model)
    name = name or getattr(model, "lorakit_active", None)
    configs = getattr(model, "lorakit_configs", {})
    if name not in configs:
        raise KeyError(f"no adapter named {name!r} to save; the model has: {list(configs) or 'none'}")
    cfg = configs[name]
    tensors = {key: _gathered(tensor) for key, (tensor, _) in adapter_tensors(model, name).items()}
    reason = peft_mismatch(model, name) if isinstance(cfg, LoRAConfig) else \
        prompt_mismatch(model, cfg) if isinstance(cfg, PromptConfig) else None
    if isinstance(cfg, LoRAConfig) and cfg.init == "svd" and reason is None:
        tensors = pissa_as_plain(model, name, tensors)
    directory = Path(directory)
    _write_adapter_files(directory, tensors, config_to_json(model, cfg, name, reason), is_main_process)
    return directory


def _gathered(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: an FSDP2 shard is gathered (a collective: every rank calls this in the same order)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def pissa_as_plain(model: nn.Module, name: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PiSSA adapter ``name`` as a plain rank-2r adapter on the original base W = W_res + s B0 A0.

    The trained layer computes ``W_res + s B A = W + s (B A - B0 A0) = W + s [B | -B0] [A ; A0]``:
    A' (2r, in) stacks A over A0, B' (out, 2r) puts -B0 beside B.
    """
    out = dict(tensors)
    for path, layer in adapter_layers(model):
        if name not in layer.adapter_names or not hasattr(layer, "pissa_initial"):
            continue
        start = layer.pissa_initial(name)
        if start is None:
            raise ValueError(f"layer {path!r} of PiSSA adapter {name!r} has no initial factors to convert with")
        a0, b0 = (_gathered(t) for t in start)
        key_a, key_b = f"{PREFIX}{path}.lora_A.weight", f"{PREFIX}{path}.lora_B.weight"
        out[key_a] = torch.cat([out[key_a], a0.to(out[key_a].dtype)], dim=0)
        out[key_b] = torch.cat([out[key_b], -b0.to(out[key_b].dtype)], dim=1)
    return out


def _write_adapter_files(directory: Path, tensors: dict[str, torch.Tensor], config: dict,
                        is_main_process: bool | None = None) -> None:
    grouped = is_main_process is None and dist.is_available() and dist.is_initialized()
    writer = is_main_process if is_main_process is not None else not grouped or dist.get_rank() == 0
    failure: BaseException | None = None
    if writer:
        try:
            _io.save_tensors(directory / WEIGHTS_FILE, tensors, metadata={"format": "pt"})
            _io.write_json(directory / CONFIG_FILE, config)
        except Exception as err:
            failure = err
    if grouped:  # the broadcast is the barrier, and tells the other ranks whether rank 0 succeeded
        news = [None if failure is None else f"{type(failure).__name__}: {failure}"]
        dist.broadcast_object_list(news, src=0)
        if news[0] is not None and not writer:
            raise RuntimeError(f"rank 0 could not write the adapter to {directory}: {news[0]}")
    if failure is not None:
        raise failure


# -- load -----------------------------------------------------------------------------------------
def read_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of ``directory``'s safetensors file (or PEFT ``.bin``); :class:`AdapterLoadError` otherwise."""
    directory = Path(directory)
    if (directory / WEIGHTS_FILE).is_file():
        try:
            return _io.load_tensors(directory / WEIGHTS_FILE)
        except (ValueError, OSError) as err:
            raise AdapterLoadError(str(err)) from None
    if (directory / BIN_FILE).is_file():
        try:
            state = torch.load(directory / BIN_FILE, map_location="cpu", weights_only=True)
        except Exception as err:  # keep torch's reason, not its advice to retry with weights_only=False
            reason = next((line.strip() for line in str(err).splitlines() if "Unsupported global" in line),
                          str(err).splitlines()[0] if str(err) else type(err).__name__)
            raise AdapterLoadError(f"{directory / BIN_FILE} cannot be read as plain tensors ({reason}); lorakit never "
                                   "unpickles arbitrary objects: convert it to safetensors") from None
        if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                  for k, v in state.items()):
            raise AdapterLoadError(f"{directory / BIN_FILE} is not a dict of named tensors")
        return state
    raise AdapterLoadError(f"{directory} has no {WEIGHTS_FILE} (nor a PEFT {BIN_FILE}); is this an adapter folder?")


def load_adapter(model: nn.Module, directory: str | Path, name: str = "default") -> nn.Module:
    """Load an adapter saved by lorakit or PEFT into ``model`` as ``name``, injecting it if needed; returns ``model``.

    Everything is checked before the model changes: the config's keys, types and ranges, then every tensor's
    name, dtype (floating), shape and values (finite) against what the config implies for this model. Into an
    existing adapter ``name`` of the same config, the values are replaced; a merged adapter is unmerged first and
    merged again with the new values. ``model`` may be wrapped by DDP, FSDP2 or ``torch.compile``.

    Raises:
        AdapterLoadError: (a ``ValueError``) a file is missing, unreadable or corrupted; a config value has the
            wrong type or range or a setting lorakit does not support; a tensor is missing, unexpected, of another
            dtype or shape, or not finite; the adapter does not fit this model or the existing adapter ``name``.
            The model is left exactly as it was (tensors, ``requires_grad``, modules, ``lorakit_configs``).
        ValueError: ``name`` is not a valid adapter name (a non-empty string without dots).
    """
    outer, model = model, unwrap_model(model)
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"adapter name must be a non-empty string without dots, got {name!r}")
    file = read_config(directory)
    weights = read_weights(directory)
    if LEGACY_PROMPT_KEY in weights and PROMPT_KEY not in weights:
        weights[PROMPT_KEY] = weights.pop(LEGACY_PROMPT_KEY)
    configs = getattr(model, "lorakit_configs", {})
    if name in configs:
        own = _pissa_file_halves(model, name, configs[name], file, weights)
        if own is not None:  # this PiSSA adapter as save_adapter wrote it: load A, B back into it
            file, weights = dataclasses.replace(file, config=configs[name]), own
        _check_same_adapter(model, name, configs[name], file)
        check_tensors(weights, {k: t for k, (t, _) in adapter_tensors(model, name).items()}, file)
        _replace_values(model, name, weights)
    else:
        check_tensors(weights, expected_tensors(model, file, name), file)
        _inject_with_values(model, file, name, weights)
    return outer


def _pissa_file_halves(model: nn.Module, name: str, existing, file: FileConfig,
                       weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """When ``file`` is PiSSA adapter ``name`` as :func:`pissa_as_plain` wrote it (rank 2r, the same scale, second
    halves equal to this adapter's start ``[A0 ; -B0]``), the rank-r tensors (A, B) to load into it; else None."""
    cfg = file.config
    if not (isinstance(existing, LoRAConfig) and existing.init == "svd" and isinstance(cfg, LoRAConfig)
            and cfg.init != "svd" and cfg.rank == 2 * existing.rank and math.isclose(cfg.scale, existing.scale)):
        return None
    r, out = existing.rank, dict(weights)
    for path, layer in adapter_layers(model):
        start = layer.pissa_initial(name) if name in layer.adapter_names and hasattr(layer, "pissa_initial") else None
        if start is None:
            continue
        key_a, key_b = f"{PREFIX}{path}.lora_A.weight", f"{PREFIX}{path}.lora_B.weight"
        a, b = weights.get(key_a), weights.get(key_b)
        a0, b0 = (_gathered(t) for t in start)
        if a is None or b is None or a.shape != (2 * r, *a0.shape[1:]) or b.shape != (b0.shape[0], 2 * r) or \
                not torch.allclose(a[r:].to(a0.dtype), a0) or not torch.allclose(b[:, r:].to(b0.dtype), -b0):
            return None
        out[key_a], out[key_b] = a[:r], b[:, :r]
    return out


def _check_same_adapter(model: nn.Module, name: str, existing, file: FileConfig) -> None:
    """The file must describe the adapter already in the model: same method, rank, scale and PiSSA start."""
    cfg, hint = file.config, f"; delete_adapter(model, {name!r}) first or load it under another name"
    where = f"adapter {name!r} in the model"
    if type(existing) is not type(cfg):
        raise AdapterLoadError(f"{where} is a {type(existing).__name__} but {file.path} holds a {type(cfg).__name__}{hint}")
    if isinstance(cfg, LoRAConfig):
        for path, scale in _layer_scales(model, name):  # per layer: rank_pattern / alpha_pattern may differ
            if existing.rank == cfg.rank and scale != cfg.for_layer(path).scale:
                raise AdapterLoadError(f"{where} has scale {scale:g} at {path!r} but {file.path.parent} needs "
                                       f"{cfg.for_layer(path).scale:g} there ({describe(file)}){hint}")
        if existing.init == "svd" and cfg.init != "svd" and cfg.rank == 2 * existing.rank:
            raise AdapterLoadError(f"{where} is PiSSA (rank {existing.rank}); {file.path.parent} holds a plain rank-"
                                   f"{cfg.rank} adapter whose second half is not this adapter's start [A0 ; -B0] "
                                   f"(saved from another base?){hint}")
        if (existing.init == "svd") != (cfg.init == "svd"):
            raise AdapterLoadError(f"{where} has init={existing.init!r} but {file.path} has init={cfg.init!r}: a PiSSA "
                                   f"start and a plain one give other outputs from the same factors{hint}")
        try:
            planned = token_modules(model, cfg.trainable_token_indices)
            planned = {p: list(rows) for p, rows in planned.items() if p not in tied_modules(model, planned)}
        except ValueError as err:
            raise AdapterLoadError(f"{file.path}: {err}") from None
        if planned != token_rows(model, name):
            raise AdapterLoadError(f"{where} trains the token rows {token_rows(model, name) or 'none'} but "
                                   f"{file.path} has trainable_token_indices for {planned or 'none'}{hint}")
        reason = peft_mismatch(model, name) if file.peft_format else None
        if reason is not None:
            raise AdapterLoadError(f"adapter in {file.path.parent} is PEFT's LoRA, and PEFT computes it differently "
                                   f"from lorakit here: {reason}")
        return
    structural = {"targets", "exclude", "modules_to_save", "adapter_dtype"}  # checked by the tensors, or harmless
    for field in (f for f in vars(cfg) if f not in structural):
        if getattr(existing, field) != getattr(cfg, field):
            raise AdapterLoadError(f"{where} has {field}={getattr(existing, field)!r} but {file.path} has "
                                   f"{field}={getattr(cfg, field)!r}{hint}")


def _layer_scales(model: nn.Module, name: str) -> list[tuple[str, float]]:
    """(module path, scale) of every layer and parametrized weight LoRA adapter ``name`` adapts."""
    scales = [(path, layer.scaling[name]) for path, layer in adapter_layers(model)
              if name in layer.adapter_names and isinstance(getattr(layer, "scaling", None), dict)]
    return scales + [(path, lora.scale) for path, _, _, lora in parametrizations(model) if lora.adapter_name == name]


def _merged_parts(model: nn.Module, name: str) -> list[tuple]:
    """(merge, unmerge) callables for every layer and parametrized weight where adapter ``name`` is merged."""
    return [(layer.merge, layer.unmerge) for _, layer in adapters(model)
            if getattr(layer, "merged_adapter", None) == name]


def _replace_values(model: nn.Module, name: str, weights: dict[str, torch.Tensor]) -> None:
    """New values for an existing adapter: unmerge where merged, write, merge again; on error, the old values."""
    reshard(model)
    entries = adapter_tensors(model, name)
    old = {key: tensor.detach().clone() for key, (tensor, _) in entries.items()}
    merged = _merged_parts(model, name)

    def rewrite(values: dict[str, torch.Tensor]) -> None:
        for _, unmerge in merged:  # idempotent: a layer already unmerged stays so
            unmerge()
        for key, (_, write) in entries.items():
            write(values[key])
        for merge, _ in merged:
            merge()

    try:
        rewrite(weights)
    except BaseException:
        rewrite(old)
        raise


def _inject_with_values(model: nn.Module, file: FileConfig, name: str, weights: dict[str, torch.Tensor]) -> None:
    before = {"grad": {id(p): p.requires_grad for p in model.parameters()},
              "active": getattr(model, "lorakit_active", None), "has": "lorakit_configs" in model.__dict__}
    try:
        cfg = file.config
        if isinstance(cfg, PromptConfig) and cfg.init == "text":  # the file's values replace it: no tokenizer
            inject(model, dataclasses.replace(cfg, init="random", init_text=None, tokenizer=None), name=name)
            model.lorakit_configs[name] = cfg
        else:
            inject(model, cfg, name=name)
        entries = adapter_tensors(model, name)
        if set(entries) != set(weights):  # the twin said otherwise: a lorakit bug, not the file's fault
            raise RuntimeError(f"internal error: the adapter built differs from its plan "
                               f"({sorted(set(entries) ^ set(weights))[:3]})")
        for key, (_, write) in entries.items():
            write(weights[key])
    except (ValueError, TypeError, KeyError) as err:
        _restore(model, before, name)
        raise AdapterLoadError(f"adapter in {file.path.parent} does not fit this model: {err}") from None
    except BaseException:
        _restore(model, before, name)
        raise


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
