"""Trainable rows of an embedding (PEFT's ``trainable_token_indices``), e.g. the tokens a chat template adds.

The wrapped module keeps its weight frozen; adapter ``name`` trains new values for the rows ``indices`` in
``trainable_tokens_delta[name]`` (PEFT's name: the rows' values, not a difference), which start as a copy of the
rows. The forward runs the base module's own forward with ``W.index_copy(0, indices, rows)``, so an embedding
subclass (a scaled embedding) or a head's bias behaves as in the base.

**Tied weights.** Where the embedding's weight is also another module's (an LM head tied to it), that module gets
a *tied* wrapper that reads the same rows: both uses change together, as in the model, and ``merge`` writes the
rows into the one shared weight. The tied wrapper saves nothing (the embedding's entry holds the rows).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from ..sharing import module_paths, replace_everywhere, weight_owners
from .modules_to_save import ModulesToSave

KEY = "token_adapter.trainable_tokens_delta"  # PEFT's key, after the module's path


class TrainableTokens(nn.Module):
    """Wraps a module whose weight's rows are tokens (an ``nn.Embedding``, or a head tied to one)."""

    def __init__(self, base_layer: nn.Module, tied_to: "TrainableTokens | None" = None) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.trainable_tokens_delta = nn.ParameterDict()  # empty on a tied wrapper: it reads its owner's
        self.token_indices: dict[str, list[int]] = {}
        self._owner = (tied_to,) if tied_to is not None else ()  # a tuple: the owner is not a submodule
        self._names: list[str] = []
        self.active_adapter: str | None = None
        self.merged_adapter: str | None = None
        self._merged_rows: torch.Tensor | None = None  # the base's rows while merged, for unmerge
        self.disabled = False

    @property
    def owner(self) -> "TrainableTokens":
        return self._owner[0] if self._owner else self

    @property
    def adapter_names(self) -> list[str]:
        return list(self._names)

    def add_adapter(self, name: str, indices: list[int]) -> None:
        if self.owner is self:
            weight = self.base_layer.weight
            self.token_indices[name] = list(indices)
            rows = weight.detach()[torch.tensor(indices, device=weight.device)].clone()
            self.trainable_tokens_delta[name] = nn.Parameter(rows)
        self._names.append(name)
        self.active_adapter = name

    def delete_adapter(self, name: str) -> None:
        if self.merged_adapter == name:
            self.unmerge()
        if self.owner is self:
            del self.trainable_tokens_delta[name], self.token_indices[name]
        self._names.remove(name)
        if self.active_adapter == name:
            self.active_adapter = None

    def set_active(self, name: str | None) -> None:
        self.active_adapter = name

    def adapter_parameters(self, name: str | None = None) -> list[nn.Parameter]:
        params = self.trainable_tokens_delta
        return list(params.values()) if name is None else ([params[name]] if name in params else [])

    def weight_with(self, name: str) -> torch.Tensor:
        """The base weight with adapter ``name``'s rows in place (differentiable in the rows)."""
        owner, weight = self.owner, self.base_layer.weight
        index = torch.tensor(owner.token_indices[name], device=weight.device)
        return weight.index_copy(0, index, owner.trainable_tokens_delta[name].to(weight.dtype))

    @property
    def weight(self) -> torch.Tensor:
        """What the forward uses (code that reads an embedding's ``weight``, e.g. its dtype, sees the new rows)."""
        name = None if self.disabled else self.active_adapter
        if name is None or self.owner.merged_adapter == name:
            return self.base_layer.weight
        return self.weight_with(name)

    def merge_weight(self):
        return None  # every module holding this weight is wrapped (see attach_trainable_tokens): nothing to refuse

    def merge(self) -> None:
        """Write the active adapter's rows into the weight (the owner writes; a tied wrapper shares that weight)."""
        if self.active_adapter is None or self.merged_adapter is not None:
            return
        if self.owner is self:
            weight = self.base_layer.weight
            index = torch.tensor(self.token_indices[self.active_adapter], device=weight.device)
            with torch.no_grad():
                self._merged_rows = weight[index].clone()
                weight.index_copy_(0, index, self.trainable_tokens_delta[self.active_adapter].to(weight.dtype))
        self.merged_adapter = self.active_adapter

    def unmerge(self) -> None:
        if self.merged_adapter is None:
            return
        if self.owner is self:
            weight = self.base_layer.weight
            index = torch.tensor(self.token_indices[self.merged_adapter], device=weight.device)
            with torch.no_grad():
                weight.index_copy_(0, index, self._merged_rows.to(weight))
            self._merged_rows = None
        self.merged_adapter = None

    def peft_state(self, name: str) -> dict[str, torch.Tensor]:
        return {KEY: self.trainable_tokens_delta[name]} if self.owner is self else {}

    def forward(self, x, *args, **kwargs):
        name = None if self.disabled else self.active_adapter
        if name is None or self.owner.merged_adapter == name:
            return self.base_layer(x, *args, **kwargs)
        return functional_call(self.base_layer, {"weight": self.weight_with(name)}, (x, *args), kwargs)


SIDE_LAYERS = (ModulesToSave, TrainableTokens)
"""Layers an adapter trains beside its factors: they are no adapted layer (not targets, no LoRA biases)."""


# -- which modules, and wrapping them ----------------------------------------------------------------
def token_modules(model: nn.Module, spec) -> dict[str, list[int]]:
    """{module path: row indices} for ``trainable_token_indices``; errors before anything changes.

    PEFT's rules: a list names the rows of the input embeddings (``get_input_embeddings()``, else modules named
    ``embed_tokens``); a dict's keys match every module path that ends with the key (a plain string suffix).
    """
    if spec is None:
        return {}
    paths = module_paths(model)
    if isinstance(spec, dict):
        wanted = spec
    else:
        getter = getattr(model, "get_input_embeddings", None)
        embedding = getter() if callable(getter) else None
        key = paths[id(embedding)][0] if isinstance(embedding, nn.Module) and id(embedding) in paths else "embed_tokens"
        wanted = {key: spec}
    found: dict[str, list[int]] = {}
    for key, indices in wanted.items():
        hits = [p for p, m in model.named_modules() if p and p.endswith(key) and not _inside_lorakit(p)]
        if not hits:
            raise ValueError(f"trainable_token_indices: no module path ends with {key!r}; name the embedding, e.g. "
                             f"{{'<path of the nn.Embedding>': {list(indices)}}}")
        for path in hits:
            found[path] = indices
    for path, indices in found.items():
        module = model.get_submodule(path)
        base = module.base_layer if isinstance(module, TrainableTokens) else module
        weight = getattr(base, "weight", None)
        if _adapter_layer(module) and not isinstance(module, TrainableTokens):
            raise ValueError(f"trainable_token_indices on {path!r}, which already holds a {type(module).__name__} "
                             "(targets / modules_to_save name it); one kind of adapter per layer, so choose one")
        if not isinstance(base, (nn.Embedding, nn.Linear)) or not isinstance(weight, nn.Parameter) \
                or not weight.is_floating_point():
            raise ValueError(f"trainable_token_indices on {path!r}: a {type(base).__name__} with a "
                             f"{getattr(weight, 'dtype', None)} weight; expected an nn.Embedding (or a Linear head) "
                             "with a floating-point weight")
        if max(indices) >= weight.shape[0]:
            raise ValueError(f"trainable_token_indices for {path!r}: index {max(indices)} is out of range; the "
                             f"layer has {weight.shape[0]} tokens (rows)")
    return found


def _adapter_layer(module: nn.Module) -> bool:  # targets.is_adapter_layer, which imports this package
    return callable(getattr(module, "adapter_parameters", None)) and hasattr(module, "adapter_names")


def _inside_lorakit(path: str) -> bool:
    return any(piece in f".{path}." for piece in (".base_layer.", ".modules_to_save.", ".original_module.",
                                                  ".lora_", ".parametrizations."))


def tied_modules(model: nn.Module, plan: dict[str, list[int]]) -> dict[str, str]:
    """{path of a module sharing a planned layer's weight: that layer's path}; a tie to another planned layer
    with other indices is refused (the one weight cannot hold two sets of rows)."""
    owners = weight_owners(model)
    ties = {}
    for path in plan:
        module = model.get_submodule(path)
        base = module.base_layer if isinstance(module, TrainableTokens) else module
        for other, holder in owners.get(id(base.weight), []):
            if holder is base or other in ties or other == path:
                continue
            if other in plan and plan[other] != plan[path]:
                raise ValueError(f"trainable_token_indices: {path!r} and {other!r} share one weight (tied) but are "
                                 f"given other indices ({plan[path]} and {plan[other]}); give both the same rows")
            if other not in plan or list(plan).index(other) > list(plan).index(path):
                ties[other] = path
    return ties


def attach_trainable_tokens(model: nn.Module, plan: dict[str, list[int]], name: str) -> None:
    """Wrap each planned module (once; a later adapter reuses the wrapper) and its tied partners, then add ``name``."""
    ties = tied_modules(model, plan)
    owners = {}
    for path, indices in plan.items():
        if path in ties:
            continue
        owners[path] = _wrapper(model, path, None)
        owners[path].add_adapter(name, indices)
    for path, owner_path in ties.items():
        _wrapper(model, path, owners[owner_path]).add_adapter(name, plan[owner_path])


def _wrapper(model: nn.Module, path: str, tied_to: TrainableTokens | None) -> TrainableTokens:
    module = model.get_submodule(path)
    if isinstance(module, TrainableTokens):
        if (module.owner is module) != (tied_to is None) or (tied_to is not None and module.owner is not tied_to):
            raise ValueError(f"trainable_token_indices: {path!r} is tied differently than for the model's other "
                             "adapters; delete them first")
        return module
    if _adapter_layer(module):
        raise ValueError(f"trainable_token_indices: {path!r} shares the embedding's weight but already holds a "
                         f"{type(module).__name__}; leave it out of targets (its rows follow the embedding's)")
    wrapper = TrainableTokens(module, tied_to)
    replace_everywhere(model, module, wrapper)
    return wrapper


def token_rows(model: nn.Module, name: str) -> dict[str, list[int]]:
    """{path: row indices} of adapter ``name``'s trainable tokens (tied wrappers left out: they follow)."""
    return {path: module.token_indices[name] for path, module in model.named_modules()
            if isinstance(module, TrainableTokens) and module.owner is module and name in module.token_indices}
