"""Hugging Face integration: trainers for lorakit models.

- :class:`Trainer`: a drop-in ``transformers.Trainer``;
- ``SFTTrainer``: a drop-in ``trl.SFTTrainer`` (TRL is imported on first use, so this module works without it);
- :class:`AdapterCheckpoints`: the mixin both are made of, for another ``transformers.Trainer`` subclass.

Outside a trainer, ``model.save_pretrained(dir)`` on a Hugging Face model with lorakit adapters writes the adapters
(PEFT layout, as ``PeftModel.save_pretrained``), never a whole model that ``from_pretrained`` would misload: the
core's :class:`lorakit.pretrained.AdapterSavePretrained`, which ``inject`` installs (no glue needed here).

``transformers.Trainer`` already trains a lorakit model as it is (its adapters are ordinary parameters); what it
gets wrong are the files, and a quantised base. The mixin changes only that:

- every checkpoint (``checkpoint-N/``) and ``save_model()`` folder is a PEFT-layout adapter folder
  (``adapter_config.json`` + ``adapter_model.safetensors``, see :func:`lorakit.save_adapter`), next to the
  Trainer's usual optimizer, scheduler, RNG and trainer-state files;
- ``train(resume_from_checkpoint=...)`` and ``load_best_model_at_end`` read those folders back with
  :func:`lorakit.load_adapter` into the model's active adapter;
- a base that transformers marks quantised (bitsandbytes 8-bit, say) trains, as a PEFT model's does, where
  ``transformers.Trainer`` refuses "fine-tuning on purely quantized models" (see :func:`_counted_as_adapted`).

A model without lorakit adapters is saved and loaded exactly as the parent trainer does. Under
``torchrun`` with several processes, training equals one process on the global batch only with
``TrainingArguments(average_tokens_across_devices=False)``: otherwise the loss is normalised by the token count
over all devices, which changes the gradient scale for sequence tasks with padding.

With ``SFTTrainer``, chat data whose loss covers the completions only are prompt/completion rows
(``{"prompt": [messages], "completion": [messages]}``, ``completion_only_loss``), which work with any chat template;
TRL's ``assistant_only_loss`` needs a template with ``{% generation %}`` markers. On a bitsandbytes base TRL casts
the trainable (adapter) parameters to bfloat16, as it does for PEFT.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
import transformers
from transformers.trainer import TRAINING_ARGS_NAME

from .checkpoint import CONFIG_FILE, load_adapter, save_adapter
from .layers.base import quantisation
from .wrapped import unwrap_model


def _lorakit_model(model) -> torch.nn.Module | None:
    model = unwrap_model(model)
    return model if getattr(model, "lorakit_configs", None) else None


@contextlib.contextmanager
def _counted_as_adapted(model):
    """While a trainer is built: a lorakit model whose base is quantised counts as one with adapters attached.

    ``transformers.trainer_utils.validate_quantization_for_training`` refuses "fine-tuning on purely quantized
    models": ``is_quantized`` set (bitsandbytes, a GGUF load that keeps its blocks, ...) and neither a PEFT model nor
    ``_hf_peft_config_loaded`` (transformers' own PEFT integration). lorakit's adapters are attached too, so that
    flag is set on this model for the constructor's duration only. A quantisation that transformers cannot train
    through (``hf_quantizer.is_trainable`` False) is still refused while the model holds packed weights; a GGUF
    load, which transformers marks so but dequantises into plain float weights, trains.
    """
    inner = _lorakit_model(model)
    if inner is None or not getattr(inner, "is_quantized", False) or getattr(inner, "_hf_peft_config_loaded", False):
        yield
        return
    quantizer = getattr(inner, "hf_quantizer", None)
    packed = any(quantisation(m) is not None for m in inner.modules() if isinstance(getattr(m, "weight", None),
                                                                                  torch.Tensor))
    if quantizer is not None and not quantizer.is_trainable and packed:
        method = quantizer.quantization_config.quant_method
        raise ValueError(f"the base model is quantised with {method}, which transformers cannot train through; "
                         "load it dequantised or with a quantisation transformers trains through (bitsandbytes)")
    inner._hf_peft_config_loaded = True
    try:
        yield
    finally:
        del inner._hf_peft_config_loaded  # the class attribute (False) shows again


class AdapterCheckpoints:
    """What lorakit's trainers add to a ``transformers.Trainer`` subclass (put it first in the bases).

    For a lorakit model: quantised bases pass the Trainer's "purely quantized" check, checkpoints are PEFT-layout
    adapter folders, and resuming or ``load_best_model_at_end`` read them back. Other models are untouched.
    """

    def __init__(self, *args, **kwargs) -> None:
        with _counted_as_adapted(kwargs.get("model", args[0] if args else None)):
            super().__init__(*args, **kwargs)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = _lorakit_model(self.model)
        if model is None:
            return super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        save_adapter(model, output_dir)  # every rank calls it; it gathers sharded adapters and rank 0 writes
        if not self.args.should_save:
            return
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        target = _lorakit_model(model if model is not None else self.model)
        if target is None or not (Path(resume_from_checkpoint) / CONFIG_FILE).is_file():
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_adapter(target, resume_from_checkpoint, name=target.lorakit_active)

    def _load_best_model(self) -> None:
        target = _lorakit_model(self.model)
        best = self.state.best_model_checkpoint
        if target is None or best is None or not (Path(best) / CONFIG_FILE).is_file():
            return super()._load_best_model()
        load_adapter(target, best, name=target.lorakit_active)


class Trainer(AdapterCheckpoints, transformers.Trainer):
    """``transformers.Trainer`` whose checkpoints are PEFT-layout adapter folders for a lorakit model."""


def __getattr__(name: str):
    """``SFTTrainer`` is imported on first use, so ``import lorakit.hf`` needs no TRL."""
    if name != "SFTTrainer":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        from ._hf_trl import SFTTrainer
    except ModuleNotFoundError as err:
        if err.name != "trl":
            raise
        raise ImportError("lorakit.hf.SFTTrainer needs TRL, which is not installed: pip install trl") from err
    return SFTTrainer
