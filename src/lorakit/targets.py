"""What a config adapts: PEFT's target rules, applied to the shapes real models have.

Matching follows PEFT: a regex string must match the whole module name; a list item matches a name equal to
it or ending in ``"." + item``; ``"all-linear"`` takes every ``nn.Linear`` / HF ``Conv1D`` except the model's
output head, which is what ``get_output_embeddings()`` returns (PEFT's rule: a plain torch model has none, so
all its Linears are taken); ``None`` takes every supported module. ``exclude`` uses the same rules.

Real models add three cases, decided here and nowhere else:

- **Shared modules.** A module reachable at several paths is one target, selected when any of its paths
  matches and named by its first path; inject puts the wrapper at every path (see ``sharing.py``).
- **modules_to_save.** Such a module trains whole, so nothing in its subtree is a target (``skip``).
- **Weights read by the parent.** ``nn.MultiheadAttention``'s forward reads ``in_proj_weight`` and
  ``out_proj.weight`` itself and never calls ``out_proj``; ``nn.TransformerEncoderLayer``'s fast path (eval,
  no grad) reads ``linear1.weight`` / ``linear2.weight``. A wrapper there would be bypassed, so LoRA adapts
  those weights in parametrize form. A :class:`Site` is therefore ``(module path, parameter)``: ``param=None``
  wraps the module, a parameter name parametrizes it. Targeting an attention module adapts its packed
  ``in_proj_weight`` (or ``q/k/v_proj_weight``) and ``out_proj.weight``; targeting ``<attn>.out_proj`` adapts
  ``out_proj.weight`` alone. Other methods (adapters, C-LoRA) refuse these modules by name.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import nn

from .config import block_index
from .layers.lora import is_hf_conv1d
from .layers.parametrize import LoRAParametrization
from .sharing import module_paths

SUPPORTED = "nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding, Hugging Face Conv1D and nn.MultiheadAttention"
# Parent type -> children whose weight the parent's forward reads without calling the child.
READ_BY_PARENT: dict[type, tuple[str, ...]] = {
    nn.MultiheadAttention: ("out_proj",),
    nn.TransformerEncoderLayer: ("linear1", "linear2"),
}


@dataclass(frozen=True)
class Site:
    """One place an adapter goes: wrap module ``path`` (``param=None``), or parametrize its ``param``."""

    path: str
    param: Optional[str] = None


def is_adapter_layer(module: nn.Module) -> bool:
    return callable(getattr(module, "adapter_parameters", None)) and hasattr(module, "adapter_names")


def base_of(module: nn.Module) -> nn.Module:
    return getattr(module, "base_layer", module)


def matches(name: str, spec) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == item or name.endswith("." + item) for item in spec)


def _under(path: str, roots: Sequence[str]) -> bool:
    return any(path == r or path.startswith(r + ".") for r in roots)


def candidate_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Named modules a config may target: not the root, nothing inside a lorakit layer or a parametrization."""
    inside: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(p + ".") for p in inside):
            continue
        if is_adapter_layer(module):
            inside.append(name)
        if isinstance(module, LoRAParametrization) or ".parametrizations." in f".{name}.":
            continue
        yield name, module


def output_head(model: nn.Module) -> Optional[nn.Module]:
    """The model's output head as PEFT finds it: ``get_output_embeddings()``, else none."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    return head if isinstance(head, nn.Module) else None


def parent_reading(model: nn.Module, path: str) -> Optional[nn.Module]:
    """The parent module when it reads ``path``'s weight directly (see the module docstring), else None."""
    parent_name, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    for parent_type, children in READ_BY_PARENT.items():
        if isinstance(parent, parent_type) and child in children:
            return parent
    return None


def attention_parameters(attention: nn.MultiheadAttention) -> list[str]:
    """The packed input projection, or the three separate ones when q, k, v have other widths."""
    if attention._qkv_same_embed_dim:
        return ["in_proj_weight"]
    return ["q_proj_weight", "k_proj_weight", "v_proj_weight"]


def find_targets(model: nn.Module, targets, exclude=None, supports: Callable[[nn.Module], bool] = lambda m: True,
                 skip: Sequence[str] = ()) -> list[str]:
    """Paths of the modules ``targets`` selects (PEFT's rules); errors name what exists instead.

    ``skip``: paths whose whole subtree is never a target (``modules_to_save``).
    """
    aliases = module_paths(model)
    modules = [(n, m) for n, m in candidate_modules(model) if not any(_under(a, skip) for a in aliases[id(m)])]

    def named(module: nn.Module, spec) -> bool:
        return any(matches(a, spec) for a in aliases[id(module)])

    if targets == "all-linear":
        head = output_head(model)
        chosen = [n for n, m in modules if (isinstance(base_of(m), nn.Linear) or is_hf_conv1d(base_of(m)))
                  and head is not m and head is not base_of(m)]
    elif targets is None:
        chosen = [n for n, m in modules if supports(m)]
    else:
        chosen = [n for n, m in modules if named(m, targets)]
        by_name = dict(modules)
        unsupported = [n for n in chosen if not supports(by_name[n])]
        explicit = [n for n in unsupported if not isinstance(targets, str)
                    and any(a in targets for a in aliases[id(by_name[n])])]
        if explicit:
            n = explicit[0]
            raise ValueError(f"module {n!r} is a {type(by_name[n]).__name__}, which this method cannot adapt; "
                             f"supported: {SUPPORTED} (LoRA mode='parametrize' adapts any module's weight)")
        chosen = [n for n in chosen if n not in unsupported]
    if exclude is not None:
        by_name = dict(modules)
        chosen = [n for n in chosen if not named(by_name[n], exclude)]
    if not chosen:
        existing = [n for n, m in modules if supports(m)] or [n for n, _ in modules]
        shown = ", ".join(existing[:12]) + (", ..." if len(existing) > 12 else "")
        raise ValueError(f"targets={targets!r} match no supported module; modules that exist include: {shown}")
    return chosen


def lora_sites(model: nn.Module, cfg, wrapper_for, skip: Sequence[str] = ()) -> list[Site]:
    """Where a ``LoRAConfig`` goes: wrapped modules, and parametrized weights the wrappers cannot reach."""
    pname = cfg.target_parameter if cfg.mode == "parametrize" else "weight"

    def supports(module: nn.Module) -> bool:
        if isinstance(module, nn.MultiheadAttention):
            return pname == "weight"
        if cfg.mode == "parametrize":
            weight = getattr(module, pname, None)
            return isinstance(weight, torch.Tensor) and weight.dim() >= 2 and not is_adapter_layer(module)
        return wrapper_for(base_of(module)) is not None

    sites: list[Site] = []
    for path in in_blocks(find_targets(model, cfg.targets, cfg.exclude, supports, skip), cfg):
        module = model.get_submodule(path)
        if isinstance(module, nn.MultiheadAttention) and pname == "weight":
            sites += [Site(path, p) for p in attention_parameters(module)] + [Site(f"{path}.out_proj", "weight")]
        elif cfg.mode == "parametrize" or parent_reading(model, path) is not None:
            sites.append(Site(path, pname))
        else:
            sites.append(Site(path))
    return list(dict.fromkeys(sites))  # an attention module and its out_proj both named: out_proj once


def in_blocks(paths: list[str], cfg) -> list[str]:
    """The paths inside the blocks ``cfg.layers_to_transform`` names (all of them when it is None).

    PEFT's rule, quirks included: a path listed in ``targets`` as it is (not by its suffix) is kept whatever its block.
    """
    wanted = cfg.layers_to_transform
    if wanted is None:
        return paths
    wanted = [wanted] if isinstance(wanted, int) else wanted
    listed = cfg.targets if isinstance(cfg.targets, (list, tuple)) else []
    kept = [p for p in paths if p in listed or block_index(p, cfg.layers_pattern) in wanted]
    if not kept:
        found = sorted({i for p in paths if (i := block_index(p, cfg.layers_pattern)) is not None})
        raise ValueError(f"layers_to_transform={cfg.layers_to_transform!r} (layers_pattern={cfg.layers_pattern!r}) "
                         f"keeps none of the {len(paths)} targeted modules; their blocks are {found or 'none'} "
                         f"(e.g. {paths[0]!r})")
    return kept


def wrapper_sites(model: nn.Module, cfg, wrapper_for, skip: Sequence[str] = ()) -> list[Site]:
    """Where a per-layer wrapper method (adapters, C-LoRA) goes; weights read by a parent are refused by name."""
    from .layers.modules_to_save import ModulesToSave

    def supports(module: nn.Module) -> bool:
        return wrapper_for(base_of(module)) is not None and not isinstance(module, ModulesToSave)

    paths = find_targets(model, cfg.targets, cfg.exclude, supports, skip)
    read = [(p, parent_reading(model, p)) for p in paths if parent_reading(model, p) is not None]
    explicit = [(p, parent) for p, parent in read if isinstance(cfg.targets, (list, tuple))
                and any(p == t or p.endswith("." + t) for t in cfg.targets)]
    if explicit:
        path, parent = explicit[0]
        raise ValueError(f"{type(cfg).__name__} cannot adapt {path!r}: its parent {type(parent).__name__} reads "
                         f"{path.rpartition('.')[2]}.weight directly and never calls it, so a wrapper would be "
                         f"bypassed; LoRAConfig adapts it (in parametrize form), or leave it out of targets")
    kept = [p for p in paths if parent_reading(model, p) is None]
    if not kept:
        raise ValueError(f"targets={cfg.targets!r} match only modules whose parent reads their weight directly "
                         f"({', '.join(p for p, _ in read)}); {type(cfg).__name__} cannot adapt those")
    return [Site(p) for p in kept]
