"""The Weight Decay Schedule of C-LoRA: how much of the frozen W is left at each training step.

    d(t) = 1                                        for t <= start * T
         = 1 - (1 - floor) (t - start T) / ((end - start) T)   in between
         = floor                                    for t >= end * T

``DecaySchedule`` is stepped after each optimizer step, like a learning-rate scheduler, and writes d into
every C-LoRA layer's ``decay`` buffer and its host mirror (``CLoRALayer.set_decay``), so evaluation in the middle
of training uses the current d and no forward reads d back from the device.
"""
from __future__ import annotations

from torch import nn

from ..layers.clora import CLoRALayer


def decay_factor(step: int, total_steps: int, start: float = 0.05, end: float = 0.85, floor: float = 0.0) -> float:
    """d after ``step`` of ``total_steps`` optimizer steps; ``start``/``end`` are fractions of ``total_steps``."""
    begin, finish = start * total_steps, end * total_steps
    if step <= begin:
        return 1.0
    if step >= finish:
        return floor
    return 1.0 - (1.0 - floor) * (step - begin) / (finish - begin)


class DecaySchedule:
    """Drives the decay of every C-LoRA layer of ``model`` over ``total_steps`` optimizer steps.

    >>> schedule = DecaySchedule(model, total_steps)      # sets d = 1
    >>> for batch in data: ...; optimizer.step(); schedule.step()
    """

    def __init__(self, model: nn.Module, total_steps: int) -> None:
        if not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps must be an integer >= 1, got {total_steps!r}")
        self.layers = [m for m in model.modules() if isinstance(m, CLoRALayer) and m.adapter_names]
        if not self.layers:
            raise ValueError("the model has no C-LoRA layers; call lorakit.inject(model, CLoRAConfig(...)) first")
        self.total_steps = total_steps
        self.last_step = 0
        self._apply()

    def _config(self, layer: CLoRALayer):
        return layer.configs[layer.active_adapter or layer.adapter_names[0]]

    def decay_factor(self, step: int | None = None) -> float:
        """d at ``step`` (default: the current step) for the model's C-LoRA config."""
        cfg = self._config(self.layers[0])
        step = self.last_step if step is None else step
        return decay_factor(step, self.total_steps, cfg.decay_start, cfg.decay_end, cfg.decay_floor)

    def step(self) -> float:
        """Advance one optimizer step; returns the new d."""
        self.last_step += 1
        self._apply()
        return self.decay_factor()

    def finished(self) -> bool:
        """Whether every layer has reached its floor."""
        return all(layer.decay_value() <= self._config(layer).decay_floor + 1e-6 for layer in self.layers)

    def _apply(self) -> None:
        for layer in self.layers:
            cfg = self._config(layer)
            # the buffer and its host mirror together: the layers' forward never reads d back from the device
            layer.set_decay(decay_factor(self.last_step, self.total_steps, cfg.decay_start, cfg.decay_end,
                                         cfg.decay_floor))

    def state_dict(self) -> dict:
        return {"last_step": self.last_step, "total_steps": self.total_steps}

    def load_state_dict(self, state: dict) -> None:
        self.last_step, self.total_steps = int(state["last_step"]), int(state["total_steps"])
        self._apply()
