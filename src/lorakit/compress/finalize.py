"""After C-LoRA training: swap every decayed layer for the low-rank layer it has become.

At d = 0 a C-LoRA layer computes ``s B A x + C`` (no noise in eval), so a ``LowRankLinear`` / ``LowRankConv2d``
with ``B' = s B`` gives the same outputs while W, its bias and the noise statistics are dropped.
"""
from __future__ import annotations

from torch import nn

from ..config import CLoRAConfig
from ..inject import set_active
from ..layers.clora import CLoRALayer
from ..layers.modules_to_save import ModulesToSave
from ..pretrained import sync_save_pretrained
from ..sharing import replace_everywhere
from ..wrapped import unwrap_model

_TOLERANCE = 1e-6


def compress(model: nn.Module, force: bool = False) -> nn.Module:
    """Replace each C-LoRA layer of ``model`` by its low-rank factors, in place; returns ``model``.

    Refuses (``ValueError``, model unchanged) while any layer's decay is above its ``decay_floor``: the
    compressed model would then drop a part of W the trained model still uses. ``force=True`` compresses
    anyway. With ``decay_floor > 0`` the remaining ``floor * W`` is dropped too. Every low-rank layer is built
    before the first one goes in, so an error leaves the model as it was. Accepts DDP / ``torch.compile`` wrappers.
    """
    outer, model = model, unwrap_model(model)
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
    swaps = [(layer, _low_rank(layer)) for _, layer in layers]
    for path, saved in [(p, m) for p, m in model.named_modules() if isinstance(m, ModulesToSave)]:
        trained = [n for n in saved.adapter_names if n in names]
        if trained:  # a head trained beside C-LoRA (modules_to_save) replaces the original
            swaps.append((saved, saved.modules_to_save[trained[0]]))
    for old, new in swaps:
        replace_everywhere(model, old, new)
    configs = {n: c for n, c in getattr(model, "lorakit_configs", {}).items() if not isinstance(c, CLoRAConfig)}
    active = model.__dict__.pop("lorakit_active", None)
    model.__dict__.pop("lorakit_configs", None)
    if configs:
        model.lorakit_configs = configs
        set_active(model, active if active in configs else next(iter(configs)))
    sync_save_pretrained(model)
    return outer


def _low_rank(layer: CLoRALayer) -> nn.Module:
    """The layer's low-rank replacement, built from its one C-LoRA adapter even when another is active."""
    was = layer.active_adapter
    layer.set_active(was or layer.adapter_names[0])
    try:
        return layer.to_low_rank()
    finally:
        layer.set_active(was)
