"""Modules reachable at several paths, and parameters shared by several modules (tied weights).

- A *shared module* is one object at two paths (``model.encoder.embed is model.decoder.embed``). It is one
  target: inject puts its wrapper at every path (:func:`replace_everywhere`), so both uses see the adapter.
- A *tied weight* is one ``nn.Parameter`` held by two modules (an embedding and an LM head). Folding one
  module's ``s B A`` into it would change the other module's output as well, so ``merge`` and in-place
  initialisations (PiSSA, C-LoRA ``init="svd"``) refuse it, naming both modules (:func:`tied_partners`).
"""
from __future__ import annotations

import re

from torch import nn

# Path pieces that belong to lorakit or torch's parametrize, not to the user's model.
_INTERNAL = re.compile(r"(\.base_layer|\.original_module|\.parametrizations\.[^.]+(\.original)?)")


def user_path(path: str) -> str:
    """``a.base_layer`` -> ``a``, ``head.parametrizations.weight`` -> ``head``: the name the user knows."""
    return _INTERNAL.sub("", path)


def module_paths(model: nn.Module) -> dict[int, list[str]]:
    """id(module) -> every path it is reachable at, in ``named_modules`` order (the root is ``""``)."""
    paths: dict[int, list[str]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(module), []).append(path)
    return paths


def set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_name, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def replace_everywhere(model: nn.Module, old: nn.Module, new: nn.Module) -> list[str]:
    """Put ``new`` at every path where ``old`` sits; returns those paths (deepest last is fine: same object)."""
    paths = [p for p, m in model.named_modules(remove_duplicate=False) if m is old and p]
    for path in paths:
        set_module(model, path, new)
    return paths


def weight_owners(model: nn.Module) -> dict[int, list[tuple[str, nn.Module]]]:
    """id(parameter) -> the distinct modules holding it directly, as (user path, module)."""
    owners: dict[int, dict[int, tuple[str, nn.Module]]] = {}
    for path, module in model.named_modules():
        for param in module._parameters.values():
            if param is not None:
                owners.setdefault(id(param), {}).setdefault(id(module), (user_path(path), module))
    return {key: list(found.values()) for key, found in owners.items()}


def tied_partners(owners: dict[int, list[tuple[str, nn.Module]]], param, holder: nn.Module) -> list[str]:
    """User paths of the other modules that hold ``param`` besides ``holder``."""
    return [path for path, module in owners.get(id(param), []) if module is not holder]


def refuse_tied(what: str, path: str, partners: list[str]) -> None:
    """Raise the one message every in-place change of a tied weight gives."""
    if partners:
        raise ValueError(
            f"{what} would change the weight of {path!r}, which is tied to (the same Parameter as) "
            f"{', '.join(repr(p) for p in partners)}: the change would reach those modules too. Keep the adapter "
            f"unmerged, untie the weights first, or leave {path!r} out of targets")
