"""``model.save_pretrained(dir)`` on a model that holds lorakit adapters writes the adapters, as PEFT's does.

Without this, a Hugging Face model's own ``save_pretrained`` would write the whole model under lorakit's module
names (``q_proj.base_layer.weight``, ``q_proj.lora_A.default.weight``), a folder that ``from_pretrained`` loads
with the adapted layers' weights silently left at random. So while a model has lorakit adapters, and its class
has a ``save_pretrained`` method, it carries an instance attribute ``save_pretrained`` (an
:class:`AdapterSavePretrained`) that shadows the method: :func:`sync_save_pretrained` puts it there on ``inject``
and takes it away when the last adapter goes (``delete_adapter``, ``unload``, ``compress``). It is duck-typed:
nothing here imports transformers.
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

__all__ = ["AdapterSavePretrained", "sync_save_pretrained"]


class AdapterSavePretrained:
    """``model.save_pretrained`` for a model with lorakit adapters: each adapter as a PEFT-layout folder.

    As PEFT's ``PeftModel.save_pretrained``: adapter ``"default"`` goes into ``save_directory`` itself, any other
    adapter ``name`` into ``save_directory/name``; ``selected_adapters`` (default: all) picks which.
    ``is_main_process`` is :func:`lorakit.save_adapter`'s. The folder loads with :func:`lorakit.load_adapter`, PEFT's
    ``PeftModel.from_pretrained``, and (when the model was loaded from a folder or hub id, which
    ``base_model_name_or_path`` records) ``peft.AutoPeftModelForCausalLM.from_pretrained(save_directory)``.

    Raises:
        TypeError: another keyword argument of transformers' ``save_pretrained`` (``state_dict``,
            ``push_to_hub``, ``max_shard_size``, ...) with a value other than None: it is not honoured here.
        ValueError: ``safe_serialization`` is not True (lorakit writes safetensors only).
        KeyError: a selected adapter that the model does not have.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, save_directory, is_main_process: bool | None = None, *, safe_serialization: bool = True,
                 selected_adapters: list[str] | None = None, **others) -> None:
        from .checkpoint import save_adapter  # imported here: checkpoint imports inject, which imports this module

        refused = sorted(key for key, value in others.items() if value is not None)
        if refused:
            raise TypeError(f"save_pretrained on a model with lorakit adapters writes the adapters only (as PEFT "
                            f"does) and cannot honour {', '.join(refused)}; to save the whole model, "
                            "lorakit.unload(model) first")
        if safe_serialization is not True:
            raise ValueError("lorakit writes safetensors only: leave safe_serialization=True")
        configs = self.model.lorakit_configs
        names = list(configs) if selected_adapters is None else list(selected_adapters)
        unknown = [name for name in names if name not in configs]
        if unknown:
            raise KeyError(f"selected_adapters {unknown} are not in the model; it has: {list(configs)}")
        for name in names:
            folder = Path(save_directory) if name == "default" else Path(save_directory) / name
            save_adapter(self.model, folder, name=name, is_main_process=is_main_process)


def sync_save_pretrained(model: nn.Module) -> None:
    """Give ``model`` the adapter-saving ``save_pretrained`` while it has lorakit adapters, take it away after.

    Only a model whose class has ``save_pretrained`` gets one; a ``save_pretrained`` the user set is left alone.
    """
    current = model.__dict__.get("save_pretrained")
    if current is not None and not isinstance(current, AdapterSavePretrained):
        return
    wanted = bool(getattr(model, "lorakit_configs", None)) and callable(getattr(type(model), "save_pretrained", None))
    if wanted and (current is None or current.model is not model):  # a copy (meta twin) shares its original's
        model.save_pretrained = AdapterSavePretrained(model)
    elif not wanted and current is not None:
        del model.save_pretrained
