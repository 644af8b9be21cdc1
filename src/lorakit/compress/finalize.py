"""After C-LoRA training: swap every decayed layer for the low-rank layer it has become.

At d = 0 a C-LoRA layer computes ``s B A x + C`` (no noise in eval), so a ``LowRankLinear`` / ``LowRankConv2d``
with ``B' = s B`` gives the same outputs while W, its bias and the noise statistics are dropped.
"""
from __future__ import annotations

from torch import nn

from ..config import CLoRAConfig
from ..inject import _set_module
from ..layers.clora import CLoRALayer
from ..layers.modules_to_save import ModulesToSave

_TOLERANCE = 1e-6


def compress(model: nn.Module, force: bool = False) -> nn.Module:
    """Replace each C-LoRA layer of ``model`` by its low-rank factors, in place; returns ``model``.

    Refuses (``ValueError``, model unchanged) while any layer's decay is above its ``decay_floor``: the
    compressed model would then drop a part of W the trained model still uses. ``force=True`` compresses
    anyway. With ``decay_floor > 0`` the remaining ``floor * W`` is dropped too.
    """
    layers = [(path, m) for path, m in model.named_modules() if isinstance(m, CLoRALayer) and m.adapter_names]
    if not layers:
        raise ValueError("the model has no C-LoRA layers to compress; inject a CLoRAConfig and train it first")
    if not force:
        waiting = [(p, float(m.decay), m.configs[m.active_adapter or m.adapter_names[0]].decay_floor)
                   for p, m in layers]
        waiting = [w for w in waiting if w[1] > w[2] + _TOLERANCE]
        if waiting:
            path, d, floor = waiting[0]
            raise ValueError(f"the decay schedule has not finished: layer {path!r} still has d = {d:.4f} > floor "
                             f"{floor} ({len(waiting)} layer(s) not decayed); train until the schedule ends "
                             "(DecaySchedule.finished()) or pass force=True")
    names = {m.active_adapter or m.adapter_names[0] for _, m in layers}
    for path, layer in layers:
        if layer.active_adapter is None:
            layer.set_active(layer.adapter_names[0])
        _set_module(model, path, layer.to_low_rank())
    for path, saved in [(p, m) for p, m in model.named_modules() if isinstance(m, ModulesToSave)]:
        trained = [n for n in saved.adapter_names if n in names]
        if trained:  # a head trained beside C-LoRA (modules_to_save) replaces the original
            _set_module(model, path, saved.modules_to_save[trained[0]])
    configs = {n: c for n, c in getattr(model, "lorakit_configs", {}).items() if not isinstance(c, CLoRAConfig)}
    model.__dict__.pop("lorakit_configs", None)
    model.__dict__.pop("lorakit_active", None)
    if configs:
        model.lorakit_configs = configs
        model.lorakit_active = next(iter(configs))
    return model
