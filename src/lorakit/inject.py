"""Managing adapters on a model: inject, named adapters, merge/unmerge, disable, unload.

Every lorakit layer follows one small protocol (duck-typed, like torchtune's ``adapter_params``):
``base_layer`` or ``original_module``, ``add_adapter(name, cfg)``, ``delete_adapter(name)``,
``set_active(name)``, ``adapter_names``, ``adapter_parameters()``, ``merge()``, ``unmerge()``, ``disabled``.
The model remembers its adapters' configs in ``model.lorakit_configs`` ({name: config}) and the active one in
``model.lorakit_active``; while it has any, a model whose class has ``save_pretrained`` (a Hugging Face model) gets
an instance ``save_pretrained`` that writes the adapters instead (``pretrained.py``). What a config targets is
decided in ``targets.py``; how each config class is injected is the one table :data:`METHODS` below.

``requires_grad``: the first ``inject`` on a model freezes every parameter the model has then (as PEFT).
After that lorakit only switches its own parameters: the active adapter's train, the other adapters' do
not. A base parameter the user unfreezes stays as the user left it through ``inject``, ``set_active``,
``load_adapter`` and ``delete_adapter``.

Every public function accepts a model wrapped by DDP/DataParallel or ``torch.compile`` (:func:`unwrap_model`).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn
from torch.nn.utils import parametrize

from .config import AdapterConfig, CLoRAConfig, LoRAConfig, PromptConfig
from .layers.adapter import adapter_wrapper_for, check_adapter_targets
from .layers.clora import CLoRALayer, clora_wrapper_for
from .layers.base import linear_features, quantisation, warn_requantising
from .layers.lora import is_hf_conv1d, lora_wrapper_for
from .layers.modules_to_save import ModulesToSave
from .layers.parametrize import LoRAParametrization
from .layers.prompt import inject_prompt
from .pretrained import sync_save_pretrained
from .sharing import refuse_tied, replace_everywhere, set_module, tied_partners, user_path, weight_owners
from .targets import (SUPPORTED, Site, base_of, candidate_modules, find_targets, is_adapter_layer, lora_sites,
                      matches, wrapper_sites)

_set_module = set_module  # older name, used by compress/svd.py

__all__ = ["inject", "set_active", "delete_adapter", "merge", "unmerge", "disabled", "unload", "unwrap_model",
           "METHODS", "Method", "find_targets", "candidate_modules", "adapter_layers", "parametrizations",
           "is_adapter_layer", "is_hf_conv1d", "SUPPORTED"]


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


def reshard(model: nn.Module) -> None:
    """Put every FSDP2 unit of ``model`` back in its sharded state (nothing to do without FSDP2).

    A forward without a backward leaves the root unit's gathered parameters registered, and the next forward uses
    them as they are. A write into the shards (merge, a loaded adapter, restored weights) must come after this, or
    that forward would not see it.
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch built without distributed
        return
    for module in unwrap_model(model).modules():
        if isinstance(module, FSDPModule):
            module.reshard()


# -- the methods ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Method:
    """How ``inject`` handles one config class."""

    wrapper_for: Optional[Callable[[nn.Module], Optional[type]]] = None
    """module -> the wrapper class that adapts it, or None when unsupported (per-layer methods)."""
    sites: Callable = wrapper_sites
    """(model, cfg, wrapper_for, skip) -> the :class:`~lorakit.targets.Site` list, target errors raised."""
    check: Optional[Callable[[nn.Module, list, object], None]] = None
    """(model, sites, cfg): refuses unsuitable targets before anything changes."""
    attach: Optional[Callable[[nn.Module, object, str], None]] = None
    """(model, cfg, name) for a method that is not a per-layer wrapper (soft prompts)."""
    merge_refusal: Optional[str] = None
    """Why an active adapter of this method cannot be merged; None when it can."""


def _tied_refusal(model: nn.Module, sites: list[Site], what: str) -> None:
    owners = weight_owners(model)
    for site in sites:
        module = base_of(model.get_submodule(site.path))
        refuse_tied(what, site.path, tied_partners(owners, getattr(module, site.param or "weight"), module))


def _refuse_quantised(model: nn.Module, sites: list[Site], what: str) -> None:
    """Methods that change or read W itself (parametrize form, PiSSA, C-LoRA) cannot work on a quantised weight."""
    for site in sites:
        module = base_of(model.get_submodule(site.path))
        kind = quantisation(module) if site.param in (None, "weight") else None
        if kind is not None:
            raise ValueError(f"{what} needs a plain weight, but {site.path!r} is quantised ({kind}); use LoRA with "
                             "mode='module' and init='kaiming' or 'gaussian' on quantised layers")


def _check_lora(model: nn.Module, sites: list[Site], cfg: LoRAConfig) -> None:
    if cfg.mode == "parametrize":
        _refuse_quantised(model, sites, "LoRA mode='parametrize'")
    for site in (s for s in sites if s.param is None):
        module = base_of(model.get_submodule(site.path))
        if isinstance(module, nn.Linear):
            linear_features(module)  # a quantised layer without logical features is refused by name
    read = [s for s in sites if s.param is not None and cfg.mode == "module"]
    if read and cfg.dropout > 0:
        raise ValueError(f"LoRA dropout needs the layer's own forward, but {read[0].path!r}'s parent reads its "
                         f"{read[0].param} directly (adapted in parametrize form, which has no dropout); set "
                         f"dropout=0 or leave {read[0].path!r} out of targets")
    if cfg.init != "svd":
        return
    _refuse_quantised(model, sites, "init='svd' (PiSSA, which leaves the residual in W)")
    if read:
        raise ValueError(f"init='svd' needs a wrapped layer, but {read[0].path!r}'s parent reads its "
                         f"{read[0].param} directly (parametrize form); use init='kaiming' or exclude it")
    wrapped = [(s.path, base_of(model.get_submodule(s.path))) for s in sites if s.param is None]
    bad = [p for p, m in wrapped if not (isinstance(m, nn.Linear) or is_hf_conv1d(m))]
    if bad:
        raise ValueError(f"init='svd' supports Linear and Conv1D layers only; {bad[0]!r} is not one")
    small = [(p, min(m.weight.shape)) for p, m in wrapped if min(m.weight.shape) < cfg.rank]
    if small:
        raise ValueError(f"init='svd' needs rank <= min(in, out); layer {small[0][0]!r} allows at most "
                         f"{small[0][1]}, got rank={cfg.rank}")
    _tied_refusal(model, sites, "init='svd' (which leaves the residual in W)")


def _check_adapters(model: nn.Module, sites: list[Site], cfg: AdapterConfig) -> None:
    check_adapter_targets(model, [s.path for s in sites])


def _check_clora(model: nn.Module, sites: list[Site], cfg: CLoRAConfig) -> None:
    """rank < min(out, in) everywhere, one C-LoRA adapter per layer (W decays once)."""
    _refuse_quantised(model, sites, "C-LoRA (which decays W)")
    for site in sites:
        module = model.get_submodule(site.path)
        if isinstance(module, CLoRALayer) and module.adapter_names:
            raise ValueError(f"layer {site.path!r} already holds C-LoRA adapter {module.adapter_names[0]!r}; W decays "
                             "once, so a layer takes one C-LoRA adapter (delete_adapter it first)")
        shape = base_of(module).weight.flatten(1).shape
        if cfg.rank >= min(shape):
            raise ValueError(f"rank {cfg.rank} >= min(out, in) = {min(shape)} of layer {site.path!r} (weight "
                             f"{tuple(shape)}): no compression; choose rank < {min(shape)} or leave {site.path!r} "
                             "out of targets")
    if cfg.init == "svd":
        _tied_refusal(model, sites, "C-LoRA init='svd' (which leaves the residual in W)")


METHODS: dict[type, Method] = {
    LoRAConfig: Method(lora_wrapper_for, sites=lora_sites, check=_check_lora),
    AdapterConfig: Method(adapter_wrapper_for, check=_check_adapters),
    CLoRAConfig: Method(clora_wrapper_for, check=_check_clora, merge_refusal=(
        "C-LoRA layers do not merge into W (W decays away); train to the end of the schedule and call "
        "lorakit.compress(model) to get the low-rank model, or unload(model, merge=False)")),
    PromptConfig: Method(attach=inject_prompt),
}
"""Config class -> how it is injected. The one registry of methods: add a method here, nowhere else."""


# -- inject ---------------------------------------------------------------------------------------
def inject(model: nn.Module, cfg, name: str = "default") -> nn.Module:
    """Add adapter ``name`` described by ``cfg`` to ``model`` in place and make it the active one.

    The first adapter freezes the base model; the new adapter (and its ``modules_to_save`` copies) trains.
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
        model.lorakit_configs = {**configs, name: cfg}
        if not configs:  # the first adapter: the base is frozen once; later calls leave base parameters alone
            for p in before:
                p.requires_grad_(False)
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
        plan.append((module, module if isinstance(module, cls) else cls(module)))
    loras = []
    for site in (s for s in sites if s.param is not None):
        module = model.get_submodule(site.path)
        loras.append((module, site.param, LoRAParametrization(getattr(module, site.param), cfg, name)))
    for module, wrapper in plan:
        if wrapper is not module:
            replace_everywhere(model, module, wrapper)  # a shared module: every path gets the one wrapper
        wrapper.add_adapter(name, cfg)
    for module, pname, lora in loras:
        parametrize.register_parametrization(module, pname, lora, unsafe=True)


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
    """Make adapter ``name`` the one used in the forward and the only trainable adapter (base untouched)."""
    model = unwrap_model(model)
    _require(model, name)
    reshard(model)  # switching may unmerge
    for _, layer in adapter_layers(model):
        layer.set_active(name if name in layer.adapter_names else None)
    for _, module, pname, lora in parametrizations(model):
        if lora.adapter_name != name:  # as the wrappers do: a merged adapter switched off is taken out
            _unmerge_parametrization(module, pname, lora)
        lora.enabled = lora.adapter_name == name
    _mark_trainable(model, name)
    model.lorakit_active = name


def _mark_trainable(model: nn.Module, name: str) -> None:
    """Adapter ``name``'s parameters train, every other adapter's do not; no other parameter is touched."""
    own, active = {}, set()
    for _, layer in adapter_layers(model):
        own |= {id(p): p for p in layer.adapter_parameters()}
        if name in layer.adapter_names:
            active |= {id(p) for p in layer.adapter_parameters(name)}
    for _, _, _, lora in parametrizations(model):
        own |= {id(p): p for p in lora.adapter_parameters()}
        if lora.adapter_name == name:
            active |= {id(p) for p in lora.adapter_parameters()}
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
    for path, layer in adapter_layers(model):
        if name in layer.adapter_names:
            layer.delete_adapter(name)
        if not layer.adapter_names:
            _remove_layer(model, path, layer)
    for _, module, pname, lora in parametrizations(model):
        if lora.adapter_name == name:
            _unmerge_parametrization(module, pname, lora)
            plist = module.parametrizations[pname]
            if len(plist) == 1:
                parametrize.remove_parametrizations(module, pname, leave_parametrized=False)
            else:
                del plist[[i for i, p in enumerate(plist) if p is lora][0]]


def _remove_layer(model: nn.Module, path: str, layer: nn.Module) -> None:
    """Put the plain module back at every path; a layer that wraps nothing (a soft prompt) takes itself off."""
    detach = getattr(layer, "detach_from", None)
    if callable(detach):
        detach(model, path)
    else:
        replace_everywhere(model, layer, getattr(layer, "base_layer", None) or getattr(layer, "original_module"))


# -- merge / disable / unload ---------------------------------------------------------------------
def _check_mergeable(model: nn.Module) -> None:
    """Refuse, before anything changes, to merge an active adapter that cannot be folded into its weight."""
    configs = getattr(model, "lorakit_configs", {})
    owners = weight_owners(model)
    for path, layer in adapter_layers(model):
        check = getattr(layer, "check_mergeable", None)
        if callable(check):
            check()
        active = getattr(layer, "active_adapter", None)
        refusal = METHODS[type(configs[active])].merge_refusal if active in configs else None
        if refusal is not None:
            raise ValueError(f"layer {path!r}: {refusal}")
        if active is not None and getattr(layer, "merged_adapter", None) is None and hasattr(layer, "delta_weight"):
            base = layer.base_layer
            refuse_tied("merge", path, tied_partners(owners, base.weight, base))
    for path, module, pname, lora in parametrizations(model):
        if lora.enabled and not lora.merged:
            plist = module.parametrizations[pname]
            target = path if pname == "weight" else f"{path}.{pname}"
            refuse_tied("merge", target, tied_partners(owners, plist.original, plist))


def merge(model: nn.Module) -> nn.Module:
    """Fold the active adapter into the base weights (idempotent). Adapters that cannot merge say so."""
    inner = unwrap_model(model)
    _check_mergeable(inner)
    reshard(inner)
    to_merge = [layer for _, layer in adapter_layers(inner) if hasattr(layer, "delta_weight")
                and layer.active_adapter is not None and layer.merged_adapter is None]
    warn_requantising(_quantised_kinds(to_merge))
    for _, layer in adapter_layers(inner):
        if getattr(layer, "active_adapter", None) is not None:
            layer.merge()
    for _, module, pname, lora in parametrizations(inner):
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
    inner = unwrap_model(model)
    if any(_merged(inner)):
        reshard(inner)  # only then: disabled() calls this inside training steps, between forward and backward
        warn_requantising(_quantised_kinds(_merged(inner)[0]))
    for _, layer in adapter_layers(inner):
        layer.unmerge()
    for _, module, pname, lora in parametrizations(inner):
        _unmerge_parametrization(module, pname, lora)
    return model


def _quantised_kinds(layers) -> set[str]:
    """How the base layers of ``layers`` are quantised (a merge or unmerge writes into these weights)."""
    return {kind for layer in layers if (kind := quantisation(getattr(layer, "base_layer", layer))) is not None}


def _merged(inner: nn.Module) -> tuple[list, list]:
    """The adapter layers, and the (module, name, parametrization) triples, that hold a merged adapter."""
    layers = [layer for _, layer in adapter_layers(inner) if getattr(layer, "merged_adapter", None) is not None]
    return layers, [(m, pn, lora) for _, m, pn, lora in parametrizations(inner) if lora.merged]


@contextlib.contextmanager
def disabled(model: nn.Module):
    """Inside, the model computes exactly what the base model computes (merged adapters are taken out)."""
    inner = unwrap_model(model)
    layers = [layer for _, layer in adapter_layers(inner)]
    loras = parametrizations(inner)
    merged, merged_p = _merged(inner)
    enabled = [lora.enabled for *_, lora in loras]
    unmerge(inner)
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
        if merged or merged_p:
            reshard(inner)
        for layer in merged:
            layer.merge()
        for module, pname, lora in merged_p:
            _merge_parametrization(module, pname, lora)


def unload(model: nn.Module, merge: bool = True) -> nn.Module:
    """Plain torch modules again: with ``merge`` the active adapter is folded in, else the base comes back.

    Everything is checked first (an adapter that cannot merge, a tied weight), so it never stops halfway.
    """
    inner = unwrap_model(model)
    if merge:
        _check_mergeable(inner)
    reshard(inner)
    for path, layer in reversed(adapter_layers(inner)):
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
    for _, module, pname, lora in parametrizations(inner):
        if merge and lora.enabled:
            _merge_parametrization(module, pname, lora)
        elif not merge:
            _unmerge_parametrization(module, pname, lora)
    for module in {id(m): m for _, m, _, _ in parametrizations(inner)}.values():
        for pname in list(module.parametrizations):
            parametrize.remove_parametrizations(module, pname, leave_parametrized=False)
    for attr in ("lorakit_configs", "lorakit_active"):
        inner.__dict__.pop(attr, None)
    sync_save_pretrained(inner)
    return model
