"""Managing adapters on a model: inject, named adapters, merge/unmerge, disable, unload.

Every lorakit layer follows one small protocol (duck-typed, like torchtune's ``adapter_params``):
``base_layer`` or ``original_module``, ``add_adapter(name, cfg)``, ``delete_adapter(name)``,
``set_active(name)``, ``adapter_names``, ``adapter_parameters()``, ``merge()``, ``unmerge()``, ``disabled``.
The model remembers its adapters' configs in ``model.lorakit_configs`` ({name: config}) and the active one in
``model.lorakit_active``; while it has any, a model whose class has ``save_pretrained`` (a Hugging Face model) gets
an instance ``save_pretrained`` that writes the adapters instead (``pretrained.py``). What a config targets is
decided in ``targets.py``; how each config class is injected is the one table :data:`~lorakit.methods.METHODS`.

``requires_grad``: the first ``inject`` on a model freezes every parameter the model has then (as PEFT).
After that lorakit only switches its own parameters: the active adapter's train, the other adapters' do
not. A base parameter the user unfreezes stays as the user left it through ``inject``, ``set_active``,
``load_adapter`` and ``delete_adapter``.

A parametrize-mode adapter (:class:`~lorakit.layers.parametrize.LoRAParametrization`) is walked as a
:class:`~lorakit.layers.parametrize.ParametrizedWeight`, which follows the same protocol (:func:`adapters`), so
each operation below is written once. Every public function accepts a model wrapped by DDP/DataParallel or
``torch.compile`` (:func:`lorakit.wrapped.unwrap_model`).
"""
from __future__ import annotations

import contextlib
import warnings

import torch
from torch import nn
from torch.nn.utils import parametrize

from .config import LoRAConfig
from .layers.base import keep_4bit_training_exact, quantisation, warn_requantising
from .layers.modules_to_save import ModulesToSave
from .layers.parametrize import LoRAParametrization, ParametrizedWeight
from .layers.trainable_tokens import SIDE_LAYERS, attach_trainable_tokens, token_modules
from .methods import METHODS, Method
from .pretrained import sync_save_pretrained
from .sharing import refuse_tied, replace_everywhere, tied_partners, weight_owners
from .targets import SUPPORTED, Site, base_of, candidate_modules, find_targets, is_adapter_layer, matches
from .wrapped import reshard, unwrap_model

__all__ = ["inject", "set_active", "delete_adapter", "merge", "unmerge", "disabled", "unload", "METHODS", "Method",
           "find_targets", "candidate_modules", "adapter_layers", "parametrizations", "adapters",
           "is_adapter_layer", "SUPPORTED"]


# -- inject ---------------------------------------------------------------------------------------
def inject(model: nn.Module, cfg, name: str = "default") -> nn.Module:
    """Add adapter ``name`` described by ``cfg`` to ``model`` in place and make it the active one.

    The first adapter freezes the base model; the new adapter (and its ``modules_to_save`` copies and trainable
    token rows) trains.
    Everything is checked before the model is touched, and any later error rolls back: the model is unchanged.
    """
    outer, model = model, unwrap_model(model)
    configs = getattr(model, "lorakit_configs", {})
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"adapter name must be a non-empty string without dots, got {name!r}")
    if name in configs:
        raise ValueError(f"model already has an adapter named {name!r}; pick another name or delete_adapter it first")
    method = METHODS.get(type(cfg))
    if method is None:
        raise TypeError(f"inject takes one of {[c.__name__ for c in METHODS]}, got {type(cfg).__name__}")
    saved = _resolve_modules_to_save(model, getattr(cfg, "modules_to_save", None))
    before = {p: p.requires_grad for p in model.parameters()}
    active = getattr(model, "lorakit_active", None)
    try:
        if method.attach is not None:
            method.attach(model, cfg, name)
        else:
            sites = method.sites(model, cfg, method.wrapper_for, skip=saved)
            if method.check is not None:
                method.check(model, sites, cfg)
            _add_at_sites(model, cfg, name, method, sites)
        for path in saved:
            module = model.get_submodule(path)
            if not isinstance(module, ModulesToSave):
                wrapper = ModulesToSave(module)
                replace_everywhere(model, module, wrapper)
                module = wrapper
            module.add_adapter(name)
        tokens = getattr(cfg, "trainable_token_indices", None)  # after the layers: an adapted one is refused
        attach_trainable_tokens(model, token_modules(model, tokens), name)
        model.lorakit_configs = {**configs, name: cfg}
        if not configs:  # the first adapter: the base is frozen once; later calls leave base parameters alone
            for p in before:
                p.requires_grad_(False)
            keep_4bit_training_exact(model)  # bitsandbytes' CPU packing at an evaluation (layers/base.py)
        for bias in trained_biases(model, cfg, name).values():  # PEFT's bias='all' / 'lora_only'
            bias.requires_grad_(True)
        set_active(model, name)
    except BaseException:  # roll back: the adapter out of every layer, the attributes and flags as they were
        _remove_from_layers(model, name)
        for attr in ("lorakit_configs", "lorakit_active"):
            model.__dict__.pop(attr, None)
        if configs:
            model.lorakit_configs = configs
            model.lorakit_active = None
            if active is not None:
                set_active(model, active)
        for p, flag in before.items():
            p.requires_grad_(flag)
        raise
    finally:
        sync_save_pretrained(model)
    return outer


def _resolve_modules_to_save(model: nn.Module, names) -> list[str]:
    if not names:
        return []
    modules = dict(candidate_modules(model))
    found = [n for n in modules if matches(n, list(names)) and not is_adapter_layer(modules[n])]
    found += [n for n in modules if isinstance(modules[n], ModulesToSave) and matches(n, list(names))]
    if not found:
        shown = ", ".join(list(modules)[:12])
        raise ValueError(f"modules_to_save={names!r} match no module; modules that exist include: {shown}")
    return found


def _add_at_sites(model: nn.Module, cfg, name: str, method: Method, sites: list[Site]) -> None:
    """Build every wrapper and parametrization first (one that refuses its layer changes nothing), then add."""
    plan = []
    for site in (s for s in sites if s.param is None):
        module = model.get_submodule(site.path)
        cls = method.wrapper_for(base_of(module))
        if is_adapter_layer(module) and not isinstance(module, cls):
            raise ValueError(f"layer {site.path!r} already holds a {type(module).__name__}; one kind of adapter per layer")
        plan.append((module, module if isinstance(module, cls) else cls(module), _layer_config(cfg, site.path)))
    loras = []
    for site in (s for s in sites if s.param is not None):
        module = model.get_submodule(site.path)
        layer_cfg = _layer_config(cfg, site.path)
        loras.append((module, site.param, LoRAParametrization(getattr(module, site.param), layer_cfg, name)))
    for module, wrapper, layer_cfg in plan:
        if wrapper is not module:
            replace_everywhere(model, module, wrapper)  # a shared module: every path gets the one wrapper
        wrapper.add_adapter(name, layer_cfg)
    for module, pname, lora in loras:
        parametrize.register_parametrization(module, pname, lora, unsafe=True)


def _layer_config(cfg, path: str):
    """The config layer ``path`` gets: a LoRA config's ``rank_pattern`` / ``alpha_pattern`` applied."""
    for_layer = getattr(cfg, "for_layer", None)
    return for_layer(path) if callable(for_layer) else cfg


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


def adapters(model: nn.Module) -> list[tuple[str, object]]:
    """Every adapter layer, then every parametrized weight (:class:`ParametrizedWeight`), with its path (a
    parametrized weight other than ``weight`` is named ``<module path>.<parameter>``): all follow one protocol."""
    weights = [(path if pname == "weight" else f"{path}.{pname}", ParametrizedWeight(module, pname, lora))
               for path, module, pname, lora in parametrizations(model)]
    return adapter_layers(model) + weights


def trained_biases(model: nn.Module, cfg, name: str) -> dict[str, nn.Parameter]:
    """The base biases adapter ``name`` trains (its config's ``bias``), under PEFT's names: ``<path>.base_layer.bias``
    for a layer the adapter adapts, ``<path>.bias`` for any other module (``bias='all'`` only)."""
    mode = cfg.bias if isinstance(cfg, LoRAConfig) else "none"  # (C-LoRA's bias is its own vector C)
    if mode == "none":
        return {}
    adapted = {}
    for path, layer in adapters(model):
        if name in layer.adapter_names and not isinstance(layer, SIDE_LAYERS):
            module = layer.base_layer if hasattr(layer, "base_layer") else layer.module  # wrapper / parametrized
            adapted.setdefault(id(module), path.removesuffix(f".{getattr(layer, 'pname', 'weight')}"))
    found = {}
    for path, module in model.named_modules():
        bias = module._parameters.get("bias")
        if bias is None or ".lora_" in f".{path}" or ".modules_to_save." in f".{path}.":
            continue  # an adapter's own bias (lora_bias) is saved with its factors
        if id(module) in adapted:
            found[f"{adapted[id(module)]}.base_layer.bias"] = bias
        elif mode == "all":
            found[f"{path}.bias" if path else "bias"] = bias
    return found


def _require(model: nn.Module, name: str) -> None:
    names = list(getattr(model, "lorakit_configs", {}))
    if name not in names:
        raise KeyError(f"no adapter named {name!r}; the model has: {names or 'none (call lorakit.inject first)'}")


def set_active(model: nn.Module, name: str) -> None:
    """Make adapter ``name`` the one used in the forward and the only trainable adapter (base untouched)."""
    model = unwrap_model(model)
    _require(model, name)
    reshard(model)  # switching may unmerge
    for _, layer in adapters(model):
        layer.set_active(name if name in layer.adapter_names else None)
    _mark_trainable(model, name)
    model.lorakit_active = name


def _mark_trainable(model: nn.Module, name: str) -> None:
    """Adapter ``name``'s parameters train, every other adapter's do not; no other parameter is touched."""
    own, active = {}, set()
    for _, layer in adapters(model):
        own |= {id(p): p for p in layer.adapter_parameters()}
        if name in layer.adapter_names:
            active |= {id(p) for p in layer.adapter_parameters(name)}
    for key, p in own.items():
        p.requires_grad_(key in active)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name``; layers left with no adapter become their plain base modules again."""
    model = unwrap_model(model)
    _require(model, name)
    reshard(model)  # removing may unmerge
    _remove_from_layers(model, name)
    configs = dict(model.lorakit_configs)
    del configs[name]
    model.lorakit_configs = configs
    if not configs:  # the last one: a plain model again
        del model.lorakit_configs, model.lorakit_active
        sync_save_pretrained(model)
        return
    if getattr(model, "lorakit_active", None) == name:
        model.lorakit_active = None
        set_active(model, next(iter(configs)))


def _remove_from_layers(model: nn.Module, name: str) -> None:
    """Take adapter ``name`` out of every layer and parametrization; drop layers left empty."""
    for path, layer in adapters(model):
        if name in layer.adapter_names:
            layer.delete_adapter(name)
        if not layer.adapter_names:
            _remove_layer(model, path, layer)


def _remove_layer(model: nn.Module, path: str, layer) -> None:
    """Put the plain module back at every path; a layer that wraps nothing (a soft prompt, a parametrization)
    takes itself off."""
    detach = getattr(layer, "detach_from", None)
    if callable(detach):
        detach(model, path)
    else:
        replace_everywhere(model, layer, getattr(layer, "base_layer", None) or getattr(layer, "original_module"))


# -- merge / disable / unload ---------------------------------------------------------------------
def _merge_weight(layer) -> tuple[torch.Tensor, nn.Module] | None:
    """The weight a merge of ``layer`` writes into and the module that owns it; None when it merges into none."""
    own = getattr(layer, "merge_weight", None)
    if callable(own):
        return own()
    return (layer.base_layer.weight, layer.base_layer) if hasattr(layer, "delta_weight") else None


def _check_mergeable(model: nn.Module) -> None:
    """Refuse, before anything changes, to merge an active adapter that cannot be folded into its weight."""
    configs = getattr(model, "lorakit_configs", {})
    owners = weight_owners(model)
    for path, layer in adapters(model):
        check = getattr(layer, "check_mergeable", None)
        if callable(check):
            check()
        active = getattr(layer, "active_adapter", None)
        refusal = METHODS[type(configs[active])].merge_refusal if active in configs else None
        if refusal is not None:
            raise ValueError(f"layer {path!r}: {refusal}")
        target = _merge_weight(layer)
        if active is not None and getattr(layer, "merged_adapter", None) is None and target is not None:
            refuse_tied("merge", path, tied_partners(owners, *target))


def merge(model: nn.Module) -> nn.Module:
    """Fold the active adapter into the base weights (idempotent). Adapters that cannot merge say so."""
    inner = unwrap_model(model)
    _check_mergeable(inner)
    reshard(inner)
    to_merge = [layer for _, layer in adapter_layers(inner) if hasattr(layer, "delta_weight")
                and layer.active_adapter is not None and layer.merged_adapter is None]
    warn_requantising(_quantised_kinds(to_merge))
    for _, layer in adapters(inner):
        if getattr(layer, "active_adapter", None) is not None:
            layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Take merged adapter weights back out of the base weights (idempotent)."""
    inner = unwrap_model(model)
    merged = _merged(inner)
    if merged:
        reshard(inner)  # only then: disabled() calls this inside training steps, between forward and backward
        warn_requantising(_quantised_kinds(merged))
    for _, layer in adapters(inner):
        layer.unmerge()
    return model


def _quantised_kinds(layers) -> set[str]:
    """How the base layers of ``layers`` are quantised (a merge or unmerge writes into these weights)."""
    return {kind for layer in layers if (kind := quantisation(getattr(layer, "base_layer", layer))) is not None}


def _merged(inner: nn.Module) -> list:
    """The adapter layers and parametrized weights that hold a merged adapter."""
    return [layer for _, layer in adapters(inner) if getattr(layer, "merged_adapter", None) is not None]


@contextlib.contextmanager
def disabled(model: nn.Module):
    """Inside, the model computes exactly what the base model computes (merged adapters are taken out)."""
    inner = unwrap_model(model)
    layers = [layer for _, layer in adapters(inner)]
    merged = [layer for layer in layers if getattr(layer, "merged_adapter", None) is not None]
    trained = [n for n, c in getattr(inner, "lorakit_configs", {}).items() if isinstance(c, LoRAConfig) and c.bias != "none"]
    if trained:
        warnings.warn(f"adapters {trained} train the base's biases (bias='all' or 'lora_only'): inside disabled() the "
                      "model computes the base with the trained biases, not the original base (as in PEFT)",
                      stacklevel=3)
    unmerge(inner)
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer in layers:
            layer.disabled = False
        if merged:
            reshard(inner)
        for layer in merged:
            layer.merge()


def unload(model: nn.Module, merge: bool = True) -> nn.Module:
    """Plain torch modules again: with ``merge`` the active adapter is folded in, else the base comes back.

    Everything is checked first (an adapter that cannot merge, a tied weight), so it never stops halfway.
    """
    inner = unwrap_model(model)
    if merge:
        _check_mergeable(inner)
    reshard(inner)
    for path, layer in reversed(adapters(inner)):
        if isinstance(layer, ModulesToSave):
            keep = layer.modules_to_save[layer.active_adapter] if merge and layer.active_adapter else layer.original_module
            replace_everywhere(inner, layer, keep)
            continue
        if merge and getattr(layer, "active_adapter", None) is not None:
            layer.merge()
        kept = getattr(layer, "merged_adapter", None) if merge else None
        for name in [n for n in layer.adapter_names if n != kept]:
            layer.delete_adapter(name)  # the layer gives its base back as it was (unmerged, residuals restored)
        _remove_layer(inner, path, layer)
    for attr in ("lorakit_configs", "lorakit_active"):
        inner.__dict__.pop(attr, None)
    sync_save_pretrained(inner)
    return model
