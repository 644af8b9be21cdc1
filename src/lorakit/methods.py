"""The methods ``inject`` knows: per config class, how its targets are found and checked and how it is attached.

:data:`METHODS` is the one registry: add a method here, nowhere else. A check refuses unsuitable targets before
anything changes (a quantised weight where W itself changes, a tied weight where a residual stays in W, a rank too
large to compress).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from torch import nn

from .config import AdapterConfig, CLoRAConfig, LoRAConfig, PromptConfig
from .layers.adapter import adapter_wrapper_for, check_adapter_targets
from .layers.base import linear_features, quantisation
from .layers.clora import CLoRALayer, clora_wrapper_for
from .layers.lora import is_hf_conv1d
from .layers.wrappers import lora_wrapper_for
from .layers.prompt import inject_prompt
from .sharing import refuse_tied, tied_partners, weight_owners
from .targets import Site, base_of, lora_sites, wrapper_sites


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


def _check_dora(model: nn.Module, sites: list[Site]) -> None:
    """DoRA's norm is over each output's inputs: refused where lorakit's layer would take it over another axis."""
    for site in sites:
        module = base_of(model.get_submodule(site.path))
        if isinstance(module, nn.Embedding) and site.param is not None:
            raise ValueError(f"dora=True on the embedding {site.path!r} needs mode='module' (its table is stored "
                             "(num, dim), so the parametrize form would take the norm over the other axis)")
        if is_hf_conv1d(module) and site.param is not None:
            raise ValueError(f"dora=True on the Conv1D {site.path!r} needs mode='module' (its weight is stored "
                             "(in, out), so the parametrize form would take the norm over the outputs)")


def _check_lora(model: nn.Module, sites: list[Site], cfg: LoRAConfig) -> None:
    if cfg.dora:
        _check_dora(model, sites)
    if cfg.lora_bias:
        for site in sites:
            module = base_of(model.get_submodule(site.path))
            if isinstance(module, nn.Embedding) or site.param is not None:
                raise ValueError(f"lora_bias=True needs a wrapped Linear, Conv or Conv1D layer; {site.path!r} is "
                                 f"{'an embedding' if isinstance(module, nn.Embedding) else 'adapted in parametrize form'}"
                                 "; exclude it or use lora_bias=False")
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
    small = [(p, min(m.weight.shape)) for p, m in wrapped if min(m.weight.shape) < cfg.for_layer(p).rank]
    if small:
        raise ValueError(f"init='svd' needs rank <= min(in, out); layer {small[0][0]!r} allows at most "
                         f"{small[0][1]}, got rank={cfg.for_layer(small[0][0]).rank}")
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
