"""Compression: C-LoRA decay schedule (schedule.py), C-LoRA -> low rank (finalize.py), truncated SVD (svd.py).

Importing this package registers C-LoRA with ``lorakit.inject``: ``CLoRAConfig`` -> ``CLoRALayer`` wrappers,
injected only after every target has been checked, so a bad rank leaves the model unchanged.
"""
from torch import nn

from .. import inject as _inject
from ..config import CLoRAConfig
from ..layers.clora import CLoRALayer, clora_wrapper_for
from ..layers.lowrank import LowRankConv2d, LowRankLinear
from ..layers.modules_to_save import ModulesToSave
from .finalize import compress
from .schedule import DecaySchedule, decay_factor
from .svd import choose_rank, factor_parameters, svd_compress, truncated_svd, whitened_svd


def _inject_clora(model: nn.Module, cfg: CLoRAConfig, name: str) -> None:
    """Check every target's shape first (rank < min(out, in)), then wrap them."""
    def supports(module: nn.Module) -> bool:
        return clora_wrapper_for(getattr(module, "base_layer", module)) is not None and not isinstance(module, ModulesToSave)

    for path in _inject.find_targets(model, cfg.targets, cfg.exclude, supports):
        module = model.get_submodule(path)
        shape = getattr(module, "base_layer", module).weight.flatten(1).shape
        if cfg.rank >= min(shape):
            raise ValueError(f"rank {cfg.rank} >= min(out, in) = {min(shape)} of layer {path!r} (weight {tuple(shape)}): "
                             f"no compression; choose rank < {min(shape)} or leave {path!r} out of targets")
    _inject._inject_wrappers(model, cfg, name)


_inject.WRAPPERS[CLoRAConfig] = clora_wrapper_for
_inject._INJECTORS[CLoRAConfig] = _inject_clora

__all__ = ["compress", "svd_compress", "DecaySchedule", "decay_factor", "choose_rank", "truncated_svd",
           "whitened_svd", "factor_parameters", "CLoRALayer", "LowRankLinear", "LowRankConv2d"]
