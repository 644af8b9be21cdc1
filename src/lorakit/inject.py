"""Choosing targets and managing adapters on a model: inject, merge/unmerge, disable, unload, named adapters.

Every lorakit layer follows one small protocol (duck-typed, like torchtune's ``adapter_params``):
``base_layer`` or ``original_module``, ``add_adapter(name, cfg)``, ``delete_adapter(name)``,
``set_active(name)``, ``adapter_names``, ``adapter_parameters()``, ``merge()``, ``unmerge()``, ``disabled``.
The model remembers its adapters' configs in ``model.lorakit_configs`` ({name: config}) and the active one in
``model.lorakit_active``.
"""
from __future__ import annotations

import contextlib
import re
from typing import Callable, Iterator, Optional

import torch
from torch import nn
from torch.nn.utils import parametrize

from .config import AdapterConfig, LoRAConfig, PromptConfig
from .layers.adapter import adapter_wrapper_for, check_adapter_targets
from .layers.lora import is_hf_conv1d, lora_wrapper_for
from .layers.modules_to_save import ModulesToSave
from .layers.parametrize import LoRAParametrization
from .layers.prompt import inject_prompt

# config class -> function(module) giving the wrapper class for it, or None when unsupported.
WRAPPERS: dict[type, Callable[[nn.Module], Optional[type]]] = {LoRAConfig: lora_wrapper_for}
WRAPPERS[AdapterConfig] = adapter_wrapper_for
# config class -> function(model, target paths) that refuses unsuitable targets before anything changes.
TARGET_CHECKS: dict[type, Callable[[nn.Module, list[str]], None]] = {AdapterConfig: check_adapter_targets}
SUPPORTED = "nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding and Hugging Face Conv1D"


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's model inside a DDP / DataParallel (``.module``) or ``torch.compile`` (``._orig_mod``) wrapper.

    FSDP2's ``fully_shard`` shards in place (same module, DTensor parameters), so it needs no unwrapping.
    Every public entry point calls this first, so keys and attributes are those of the plain model.
    """
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch._dynamo's OptimizedModule
            model = model._orig_mod
        else:
            return model


def is_adapter_layer(module: nn.Module) -> bool:
    return callable(getattr(module, "adapter_parameters", None)) and hasattr(module, "adapter_names")


# -- finding targets ------------------------------------------------------------------------------
def _matches(name: str, spec) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == item or name.endswith("." + item) for item in spec)


def candidate_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Named modules a config may target: not the root, nothing inside a lorakit layer."""
    inside: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(p + ".") for p in inside):
            continue
        if is_adapter_layer(module) or parametrize.is_parametrized(module):
            inside.append(name)
        if isinstance(module, LoRAParametrization) or ".parametrizations." in f".{name}.":
            continue
        yield name, module


def _output_head(model: nn.Module) -> Optional[nn.Module]:
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if head is not None:
        return head
    linears = [m for _, m in candidate_modules(model) if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def _base_of(module: nn.Module) -> nn.Module:
    return getattr(module, "base_layer", module)


def find_targets(model: nn.Module, targets, exclude=None, supports: Callable[[nn.Module], bool] = lambda m: True) -> list[str]:
    """Names of the modules that ``targets`` selects (PEFT's rules); errors name what exists instead.

    A regex string must match the whole name; a list item matches a name equal to it or ending in
    ``"." + item``; ``"all-linear"`` takes every Linear/Conv1D except the output head; ``None`` takes every
    module ``supports`` accepts.
    """
    modules = list(candidate_modules(model))
    if targets == "all-linear":
        head = _output_head(model)
        chosen = [n for n, m in modules if (isinstance(_base_of(m), nn.Linear) or is_hf_conv1d(_base_of(m)))
                  and _base_of(m) is not head]
    elif targets is None:
        chosen = [n for n, m in modules if supports(m)]
    else:
        chosen = [n for n, m in modules if _matches(n, targets)]
        unsupported = [n for n, m in modules if n in chosen and not supports(m)]
        named_explicitly = [n for n in unsupported if not isinstance(targets, str) and n in targets]
        if named_explicitly:
            n = named_explicitly[0]
            raise ValueError(f"module {n!r} is a {type(dict(modules)[n]).__name__}, which this method cannot adapt; "
                             f"supported: {SUPPORTED} (LoRA mode='parametrize' adapts any module's weight)")
        chosen = [n for n in chosen if n not in unsupported]
    if exclude is not None:
        chosen = [n for n in chosen if not _matches(n, exclude)]
    if not chosen:
        existing = [n for n, m in modules if supports(m)] or [n for n, _ in modules]
        shown = ", ".join(existing[:12]) + (", ..." if len(existing) > 12 else "")
        raise ValueError(f"targets={targets!r} match no supported module; modules that exist include: {shown}")
    return chosen


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


# -- inject ---------------------------------------------------------------------------------------
def inject(model: nn.Module, cfg, name: str = "default") -> nn.Module:
    """Add adapter ``name`` described by ``cfg`` to ``model`` in place and make it the active one.

    The base model is frozen; the new adapter (and its ``modules_to_save`` copies) is trainable.
    Everything is checked before the model is touched: on error the model is unchanged.
    """
    configs = getattr(model, "lorakit_configs", {})
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"adapter name must be a non-empty string without dots, got {name!r}")
    if name in configs:
        raise ValueError(f"model already has an adapter named {name!r}; pick another name or delete_adapter it first")
    saved = _resolve_modules_to_save(model, getattr(cfg, "modules_to_save", None))
    hook = _INJECTORS.get(type(cfg))
    if hook is not None:  # methods that are not per-layer wrappers (soft prompts)
        hook(model, cfg, name)
    elif getattr(cfg, "mode", "module") == "parametrize":
        _inject_parametrize(model, cfg, name, skip=saved)
    else:
        _inject_wrappers(model, cfg, name, skip=saved)
    for path in saved:
        module = model.get_submodule(path)
        if not isinstance(module, ModulesToSave):
            module = ModulesToSave(module)
            _set_module(model, path, module)
        module.add_adapter(name)
    model.lorakit_configs = {**configs, name: cfg}
    set_active(model, name)
    return model


# Per-config hooks for methods that are not layer wrappers, e.g. {PromptConfig: inject_prompt}.
_INJECTORS: dict[type, Callable[[nn.Module, object, str], None]] = {}
_INJECTORS[PromptConfig] = inject_prompt


def _resolve_modules_to_save(model: nn.Module, names) -> list[str]:
    if not names:
        return []
    modules = dict(candidate_modules(model))
    found = [n for n in modules if _matches(n, list(names)) and not is_adapter_layer(modules[n])]
    found += [n for n in modules if isinstance(modules[n], ModulesToSave) and _matches(n, list(names))]
    if not found:
        shown = ", ".join(list(modules)[:12])
        raise ValueError(f"modules_to_save={names!r} match no module; modules that exist include: {shown}")
    return found


def _inject_wrappers(model: nn.Module, cfg, name: str, skip=()) -> None:
    wrapper_for = WRAPPERS[type(cfg)]
    skipped = {id(model.get_submodule(p)) for p in skip}  # modules_to_save train whole, as in PEFT

    def supports(module: nn.Module) -> bool:
        return (wrapper_for(_base_of(module)) is not None and not isinstance(module, ModulesToSave)
                and id(module) not in skipped)

    paths = find_targets(model, cfg.targets, cfg.exclude, supports)
    check = TARGET_CHECKS.get(type(cfg))
    if check is not None:
        check(model, paths)
    plan = []
    for path in paths:
        module = model.get_submodule(path)
        wrapper_cls = wrapper_for(_base_of(module))
        if is_adapter_layer(module) and not isinstance(module, wrapper_cls):
            raise ValueError(f"layer {path!r} already holds a {type(module).__name__}; one kind of adapter per layer")
        plan.append((path, module, wrapper_cls))
    if isinstance(cfg, LoRAConfig) and cfg.init == "svd":  # C-LoRA checks its own targets
        bad = [p for p, m, _ in plan if not (isinstance(_base_of(m), nn.Linear) or is_hf_conv1d(_base_of(m)))]
        if bad:
            raise ValueError(f"init='svd' supports Linear and Conv1D layers only; {bad[0]!r} is not one")
        small = [(p, min(_base_of(m).weight.shape)) for p, m, _ in plan if min(_base_of(m).weight.shape) < cfg.rank]
        if small:
            raise ValueError(f"init='svd' needs rank <= min(in, out); layer {small[0][0]!r} allows at most "
                             f"{small[0][1]}, got rank={cfg.rank}")
    # Build every new wrapper before the first goes in: one that refuses its layer leaves the model as it was.
    wrapped = [(path, module, module if isinstance(module, cls) else cls(module)) for path, module, cls in plan]
    for path, module, wrapper in wrapped:
        if wrapper is not module:
            _set_module(model, path, wrapper)
        wrapper.add_adapter(name, cfg)


def _inject_parametrize(model: nn.Module, cfg: LoRAConfig, name: str, skip=()) -> None:
    pname = cfg.target_parameter
    skipped = {id(model.get_submodule(p)) for p in skip}  # modules_to_save train whole, as in PEFT

    def supports(module: nn.Module) -> bool:
        weight = getattr(module, pname, None)
        return (isinstance(weight, torch.Tensor) and weight.dim() >= 2 and not is_adapter_layer(module)
                and id(module) not in skipped)

    paths = find_targets(model, cfg.targets, cfg.exclude, supports)
    new = [(p, LoRAParametrization(getattr(model.get_submodule(p), pname), cfg, name)) for p in paths]
    for path, lora in new:
        parametrize.register_parametrization(model.get_submodule(path), pname, lora, unsafe=True)


# -- walking the adapters -------------------------------------------------------------------------
def adapter_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if is_adapter_layer(m)]


def parametrizations(model: nn.Module) -> list[tuple[str, nn.Module, str, LoRAParametrization]]:
    """(module path, module, parameter name, LoRA parametrization) for every parametrize-mode adapter."""
    found = []
    for path, module in model.named_modules():
        if parametrize.is_parametrized(module):
            for pname, plist in module.parametrizations.items():
                found += [(path, module, pname, p) for p in plist if isinstance(p, LoRAParametrization)]
    return found


def _require(model: nn.Module, name: str) -> None:
    names = list(getattr(model, "lorakit_configs", {}))
    if name not in names:
        raise KeyError(f"no adapter named {name!r}; the model has: {names or 'none (call lorakit.inject first)'}")


def set_active(model: nn.Module, name: str) -> None:
    """Make adapter ``name`` the one used in the forward and the only trainable one."""
    _require(model, name)
    for _, layer in adapter_layers(model):
        layer.set_active(name if name in layer.adapter_names else None)
    for _, module, pname, lora in parametrizations(model):
        if lora.adapter_name != name:  # as the wrappers do: a merged adapter switched off is taken out
            _unmerge_parametrization(module, pname, lora)
        lora.enabled = lora.adapter_name == name
    _mark_trainable(model, name)
    model.lorakit_active = name


def _mark_trainable(model: nn.Module, name: str) -> None:
    active = set()
    for _, layer in adapter_layers(model):
        if name in layer.adapter_names:
            active |= {id(p) for p in layer.adapter_parameters(name)}
    for _, _, _, lora in parametrizations(model):
        if lora.adapter_name == name:
            active |= {id(p) for p in lora.adapter_parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in active)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name``; layers left with no adapter become their plain base modules again."""
    _require(model, name)
    for path, layer in adapter_layers(model):
        if name in layer.adapter_names:
            layer.delete_adapter(name)
            if not layer.adapter_names:
                _remove_layer(model, path, layer)
    for path, module, pname, lora in parametrizations(model):
        if lora.adapter_name == name:
            _unmerge_parametrization(module, pname, lora)
            plist = module.parametrizations[pname]
            if len(plist) == 1:
                parametrize.remove_parametrizations(module, pname, leave_parametrized=False)
            else:
                del plist[[i for i, p in enumerate(plist) if p is lora][0]]
    configs = dict(model.lorakit_configs)
    del configs[name]
    model.lorakit_configs = configs
    if not configs:  # the last one: a plain model again
        del model.lorakit_configs, model.lorakit_active
        return
    if getattr(model, "lorakit_active", None) == name:
        model.lorakit_active = None
        if configs:
            set_active(model, next(iter(configs)))


def _plain(layer: nn.Module) -> nn.Module:
    return getattr(layer, "base_layer", None) or getattr(layer, "original_module")


def _remove_layer(model: nn.Module, path: str, layer: nn.Module) -> None:
    """Put the plain module back; a layer that wraps nothing (a soft prompt) takes itself off instead."""
    detach = getattr(layer, "detach_from", None)
    if callable(detach):
        detach(model, path)
    else:
        _set_module(model, path, _plain(layer))


def _check_mergeable(model: nn.Module) -> None:
    """Refuse, before anything changes, to merge when an active adapter cannot be folded into weights."""
    for _, layer in adapter_layers(model):
        check = getattr(layer, "check_mergeable", None)
        if callable(check):
            check()


# -- merge / disable / unload ---------------------------------------------------------------------
def merge(model: nn.Module) -> nn.Module:
    """Fold the active adapter into the base weights (idempotent). Adapters that cannot merge say so."""
    _check_mergeable(model)
    for path, layer in adapter_layers(model):
        layer.merge()
    for _, module, pname, lora in parametrizations(model):
        if lora.enabled:
            _merge_parametrization(module, pname, lora)
    return model


def _merge_parametrization(module: nn.Module, pname: str, lora: LoRAParametrization) -> None:
    if not lora.merged:
        with torch.no_grad():
            original = module.parametrizations[pname].original
            original += lora.delta(original.shape)
        lora.merged = True


def _unmerge_parametrization(module: nn.Module, pname: str, lora: LoRAParametrization) -> None:
    if lora.merged:
        with torch.no_grad():
            original = module.parametrizations[pname].original
            original -= lora.delta(original.shape)
        lora.merged = False


def unmerge(model: nn.Module) -> nn.Module:
    """Take merged adapter weights back out of the base weights (idempotent)."""
    for _, layer in adapter_layers(model):
        layer.unmerge()
    for _, module, pname, lora in parametrizations(model):
        _unmerge_parametrization(module, pname, lora)
    return model


@contextlib.contextmanager
def disabled(model: nn.Module):
    """Inside, the model computes exactly what the base model computes (merged adapters are taken out)."""
    layers = [layer for _, layer in adapter_layers(model)]
    loras = parametrizations(model)
    merged = [layer for layer in layers if getattr(layer, "merged_adapter", None) is not None]
    merged_p = [(m, pn, lora) for _, m, pn, lora in loras if lora.merged]
    enabled = [lora.enabled for *_, lora in loras]
    unmerge(model)
    for layer in layers:
        layer.disabled = True
    for *_, lora in loras:
        lora.enabled = False
    try:
        yield model
    finally:
        for layer in layers:
            layer.disabled = False
        for (*_, lora), was in zip(loras, enabled):
            lora.enabled = was
        for layer in merged:
            layer.merge()
        for module, pname, lora in merged_p:
            _merge_parametrization(module, pname, lora)


def unload(model: nn.Module, merge: bool = True) -> nn.Module:
    """Plain torch modules again: with ``merge`` the active adapter is folded in, else the base comes back."""
    if merge:
        _check_mergeable(model)
    for path, layer in reversed(adapter_layers(model)):
        if isinstance(layer, ModulesToSave):
            keep = layer.modules_to_save[layer.active_adapter] if merge and layer.active_adapter else layer.original_module
            _set_module(model, path, keep)
            continue
        layer.merge() if merge else layer.unmerge()
        _remove_layer(model, path, layer)
    for _, module, pname, lora in parametrizations(model):
        if merge and lora.enabled:
            _merge_parametrization(module, pname, lora)
        elif not merge:
            _unmerge_parametrization(module, pname, lora)
    for module in {id(m): m for _, m, _, _ in parametrizations(model)}.values():
        for pname in list(module.parametrizations):
            parametrize.remove_parametrizations(module, pname, leave_parametrized=False)
    for attr in ("lorakit_configs", "lorakit_active"):
        if attr in model.__dict__:
            delattr(model, attr)
    return model
