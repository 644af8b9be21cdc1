"""What ``adapter_config.json`` says about a model's adapter when lorakit saves it: PEFT's LoRA or prompt-tuning
config where PEFT would compute the same outputs, else lorakit's own (``"lorakit_reason"`` says why PEFT would not).
The files' rules, and reading them, are ``checkpoint_config.py``."""
from __future__ import annotations

import dataclasses
import math
import re

from torch import nn

from . import config as configs
from .checkpoint_config import PROMPT_INITS, lorakit_type
from .config import LoRAConfig
from .inject import adapter_layers, candidate_modules, parametrizations
from .layers.lora import is_hf_conv1d
from .layers.modules_to_save import ModulesToSave
from .layers.trainable_tokens import SIDE_LAYERS, TrainableTokens, token_rows
from .sharing import module_paths
from .targets import parent_reading


TASK_TYPES = {"ForCausalLM": "CAUSAL_LM", "ForSequenceClassification": "SEQ_CLS", "ForConditionalGeneration":
              "SEQ_2_SEQ_LM", "ForTokenClassification": "TOKEN_CLS", "ForQuestionAnswering": "QUESTION_ANS"}


def peft_task_type(model: nn.Module) -> str | None:
    """PEFT's ``task_type`` of a Hugging Face model, from its class name (``LlamaForCausalLM`` -> CAUSAL_LM)."""
    cls = type(model).__name__
    return next((task for suffix, task in TASK_TYPES.items() if cls.endswith(suffix)), None)


def model_metadata(model: nn.Module) -> dict:
    """``task_type`` and ``base_model_name_or_path`` where the model tells them (PEFT's Auto classes need both)."""
    hf_config = getattr(model, "config", None)
    return {"task_type": peft_task_type(model),
            "base_model_name_or_path": getattr(hf_config, "_name_or_path", None) or None}


def prompt_to_json(model: nn.Module, cfg: configs.PromptConfig) -> dict:
    """PEFT's ``PROMPT_TUNING`` config for ``cfg`` on ``model`` (a decoder or an encoder)."""
    hf_config = getattr(model, "config", None)
    return {"peft_type": "PROMPT_TUNING", **model_metadata(model), "inference_mode": True,
            "num_virtual_tokens": cfg.num_tokens, "token_dim": model.lorakit_prompt.embedding_dim,
            "num_transformer_submodules": 1, "num_attention_heads": getattr(hf_config, "num_attention_heads", None),
            "num_layers": getattr(hf_config, "num_hidden_layers", None),
            "prompt_tuning_init": {v: k for k, v in PROMPT_INITS.items()}[cfg.init],
            "prompt_tuning_init_text": cfg.init_text, "tokenizer_name_or_path": cfg.tokenizer,
            "modules_to_save": None}


def prompt_mismatch(model: nn.Module, cfg: configs.PromptConfig) -> str | None:
    """Why PEFT's prompt tuning would compute other outputs than this lorakit prompt, else None."""
    if cfg.modules_to_save:
        return "modules_to_save: PEFT's prompt-tuning files hold the prompt alone"
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return "an encoder-decoder: PEFT prompts its encoder and decoder, lorakit the encoder only"
    return None


def _conv_mismatch(module: nn.Module) -> str | None:
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        dilated = any(d != 1 for d in module.dilation)
        if module.padding_mode != "zeros" or dilated:
            return (f"padding_mode={module.padding_mode!r}, dilation={module.dilation}: PEFT's LoRA convolution "
                    "pads with zeros and has no dilation, lorakit's follows the base convolution")
    return None


def peft_mismatch(model: nn.Module, name: str) -> str | None:
    """Why PEFT would compute other outputs than lorakit for LoRA adapter ``name`` on ``model``, else None."""
    aliases = module_paths(model)
    for path, layer in adapter_layers(model):
        if isinstance(layer, TrainableTokens) and name in layer.adapter_names:
            reason = _tokens_mismatch(model, path, layer)
            if reason:
                return reason
        if name in layer.adapter_names and not isinstance(layer, SIDE_LAYERS):
            if len(aliases[id(layer)]) > 1:
                return f"layer {path!r} is shared with {aliases[id(layer)][1]!r}; PEFT would adapt one path only"
            reason = _conv_mismatch(layer.base_layer)
            if reason:
                return f"layer {path!r} has {reason}"
    for path, module, pname, lora in parametrizations(model):
        if lora.adapter_name != name:
            continue
        peft_layer = isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)) or is_hf_conv1d(module)
        if pname != "weight" or not peft_layer:
            return f"{path}.{pname} of a {type(module).__name__} is adapted in parametrize form, which PEFT has no layer for"
        if parent_reading(model, path) is not None:
            return f"{path!r} is read directly by its parent {type(parent_reading(model, path)).__name__}, which " \
                   "would bypass PEFT's wrapper"
        if len(aliases[id(module)]) > 1:
            return f"layer {path!r} is shared with {aliases[id(module)][1]!r}; PEFT would adapt one path only"
        reason = _conv_mismatch(module)
        if reason:
            return f"layer {path!r} has {reason}"
    return None


def _tokens_mismatch(model: nn.Module, path: str, layer: TrainableTokens) -> str | None:
    bias = getattr(layer.base_layer, "bias", None)
    if isinstance(layer.base_layer, nn.Linear) and bias is not None:
        return f"trainable tokens on the Linear {path!r}, whose bias PEFT's trainable tokens drop"
    if layer.owner is not layer:
        getter = getattr(model, "get_input_embeddings", None)
        tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False) is True
        if not (tied and callable(getter) and getter() is layer.owner):
            return (f"{path!r} shares its weight with trainable-token rows; PEFT ties them only to a Hugging Face "
                    "model's input embeddings with tie_word_embeddings=True")
    return None


def _exact_targets(model: nn.Module, name: str) -> tuple[object, list[str]]:
    """The adapted layers as PEFT target_modules (a list, or an exact regex where a list would match more),
    and the modules_to_save paths."""
    layers = [p for p, layer in adapter_layers(model) if name in layer.adapter_names and not isinstance(layer, SIDE_LAYERS)]
    layers += [p for p, _, _, lora in parametrizations(model) if lora.adapter_name == name]
    saved = [p for p, layer in adapter_layers(model) if isinstance(layer, ModulesToSave) and name in layer.adapter_names]
    targets = sorted(set(layers))
    others = [n for n, _ in candidate_modules(model) if n not in targets]
    if any(o.endswith("." + t) for o in others for t in targets):
        return "|".join(re.escape(t) for t in targets), saved
    return targets, saved


def config_to_json(model: nn.Module, cfg, name: str, reason: str | None) -> dict:
    """The ``adapter_config.json`` of adapter ``name``: PEFT's LoRA when ``reason`` is None, else lorakit's own.

    A PiSSA adapter (``init="svd"``) in PEFT's format is the plain rank-2r adapter :func:`pissa_as_plain` builds,
    at the same scale: alpha doubles (alpha / r) or grows by sqrt(2) (rsLoRA, alpha / sqrt(r)).
    """
    if isinstance(cfg, configs.PromptConfig) and reason is None:
        return prompt_to_json(model, cfg)
    if not isinstance(cfg, LoRAConfig):
        own = {"peft_type": lorakit_type(type(cfg)), **dataclasses.asdict(cfg)}
        return {**own, "lorakit_reason": reason} if reason is not None else own
    targets, saved = _exact_targets(model, name)
    if reason is not None:
        exact = dataclasses.replace(cfg, targets=targets, exclude=None, modules_to_save=saved or None,
                                    trainable_token_indices=token_rows(model, name) or None)
        return {"peft_type": lorakit_type(LoRAConfig), **dataclasses.asdict(exact), "lorakit_reason": reason}
    rank, alpha = cfg.rank, cfg.alpha
    ranks, alphas = dict(cfg.rank_pattern or {}), dict(cfg.alpha_pattern or {})
    if cfg.init == "svd":
        grow = math.sqrt(2) if cfg.rslora else 2
        rank, alpha = 2 * rank, alpha * grow
        ranks, alphas = {k: 2 * r for k, r in ranks.items()}, {k: a * grow for k, a in alphas.items()}
    paths = [p for p, layer in adapter_layers(model) if name in layer.adapter_names and not isinstance(layer, SIDE_LAYERS)]
    conv1d = any(is_hf_conv1d(model.get_submodule(p).base_layer) for p in paths)
    conv1d |= any(is_hf_conv1d(m) for _, m, _, lora in parametrizations(model) if lora.adapter_name == name)
    return {"peft_type": "LORA", **model_metadata(model), "inference_mode": True,
            "r": rank, "lora_alpha": alpha, "lora_dropout": cfg.dropout, "target_modules": targets,
            "use_rslora": cfg.rslora, "modules_to_save": saved or None, "fan_in_fan_out": conv1d, "bias": cfg.bias,
            "lora_bias": cfg.lora_bias, "trainable_token_indices": token_rows(model, name) or None,
            "init_lora_weights": True, "use_dora": cfg.dora, "rank_pattern": ranks, "alpha_pattern": alphas,
            "layers_to_transform": None, "layers_pattern": None,  # target_modules lists the adapted layers exactly
            **({"lorakit_mode": cfg.mode} if cfg.mode != "module" else {})}
