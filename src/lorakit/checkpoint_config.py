"""``adapter_config.json``: read into a validated config before anything touches the model, and written.

Two kinds of file:

- **PEFT's LoRA** (``"peft_type": "LORA"``). Every ``peft.LoraConfig`` field has one rule here: it is *read*
  into :class:`~lorakit.LoRAConfig` (``r`` -> ``rank``, ...), it is *metadata* (type-checked, no effect on the
  outputs), or it is *refused unless at PEFT's default*, because lorakit would compute other outputs than PEFT.
  A key in none of these (a newer PEFT's option) is refused when set and warned about when empty. The keys
  whose absence would silently change the outputs are required: ``r``, ``lora_alpha``, ``target_modules``,
  ``use_rslora`` (PEFT always writes them).
- **lorakit's own** (``"peft_type": "LORAKIT_<CONFIG CLASS>"``, e.g. ``LORAKIT_LORACONFIG``): the config
  dataclass's fields. lorakit writes it for the methods PEFT does not have, and for a LoRA adapter whose outputs
  PEFT would not reproduce (``"lorakit_reason"`` says why). PEFT refuses such a file (unknown ``peft_type``).

Every refusal is an :class:`AdapterLoadError` (a ``ValueError``) naming the file, the key, the value found and
what is accepted. Reading needs no model; what a model's adapter writes is ``checkpoint_write.py``.
"""
from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

from . import config as configs
from .config import (LoRAConfig, check_bool, check_choice, check_int, check_layers, check_names, check_number,
                     check_pattern, check_targets, check_token_indices)

CONFIG_FILE, WEIGHTS_FILE, BIN_FILE = "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"
NoneType = type(None)


class AdapterLoadError(ValueError):
    """An adapter folder lorakit refuses: missing or unreadable files, invalid values, or tensors that do not fit
    the model. ``load_adapter`` raises it before the model changes, or after rolling every change back."""


@dataclass(frozen=True)
class FileConfig:
    """A validated ``adapter_config.json``: the lorakit config and how to read the tensors."""

    config: object
    """A LoRAConfig, AdapterConfig, PromptConfig or CLoRAConfig."""
    peft_format: bool
    """True for PEFT's LoRA (PEFT's semantics, e.g. its LoRA convolutions pad with zeros)."""
    path: Path


# -- PEFT's LoraConfig, field by field --------------------------------------------------------------
def _dropout(key, value):
    check_number(key, value, 0.0, 1.0, high_open=True)


def _exclude(key, value):
    check_targets(key, value, allow_empty=True)


def _rank(key, value):
    check_int(key, value, 1)


def _rank_pattern(key, value):
    check_pattern(key, value, _rank)


def _alpha_pattern(key, value):
    check_pattern(key, value, check_number)


def _layers_pattern(key, value):
    if not isinstance(value, (str, list, NoneType)):
        raise TypeError(f"{key}={value!r} has the wrong type; expected a name, a list of names, or null")


READ = {  # PEFT key -> (LoRAConfig field, check(key, value)); these decide the outputs
    "r": ("rank", _rank),
    "lora_alpha": ("alpha", check_number),
    "lora_dropout": ("dropout", _dropout),
    "target_modules": ("targets", check_targets),
    "exclude_modules": ("exclude", _exclude),
    "use_rslora": ("rslora", check_bool),
    "use_dora": ("dora", check_bool),
    "lora_bias": ("lora_bias", check_bool),
    "bias": ("bias", lambda key, value: check_choice(key, value, {"none", "all", "lora_only"})),
    "modules_to_save": ("modules_to_save", check_names),
    "rank_pattern": ("rank_pattern", _rank_pattern),
    "alpha_pattern": ("alpha_pattern", _alpha_pattern),
    "layers_to_transform": ("layers_to_transform", check_layers),
    "layers_pattern": ("layers_pattern", _layers_pattern),
    "trainable_token_indices": ("trainable_token_indices", check_token_indices),
}
EMPTY_IS_UNSET = ("rank_pattern", "alpha_pattern", "layers_to_transform", "layers_pattern")  # PEFT writes {} / [] / ""
REQUIRED = ("r", "lora_alpha", "target_modules", "use_rslora")

REFUSED_UNLESS = {  # PEFT key -> (the only value lorakit loads, what another value would change)
    "layer_replication": (None, "it stacks replicated layers"),
    "target_parameters": (None, "PEFT's parameter LoRA has its own layout"),
    "use_qalora": (False, "QALoRA pools the input in groups"),
    "alora_invocation_tokens": (None, "aLoRA applies the adapter only after the invocation tokens"),
    "use_bdlora": (None, "BD-LoRA uses block-diagonal factors"),
    "arrow_config": (None, "Arrow routes among several adapters"),
    "kasa_config": (None, "KaSA truncates W's smallest singular components and adds a diagonal"),
    "monteclora_config": (None, "MonteCLoRA samples the adapters"),
    "megatron_config": (None, "it builds Megatron parallel layers"),
    "ensure_weight_tying": (False, "it ties adapter copies across tied layers"),
    "velora_config": (None, "VeLoRA saves extra per-layer state (lora_velora_embed) for its backward pass"),
    "astra_config": (None, "ASTRA is another PEFT variant whose outputs lorakit does not compute"),
}

_OPTIONAL_STR = (str, NoneType)
METADATA = {  # keys that describe the file, not the outputs -> accepted types
    "task_type": _OPTIONAL_STR, "peft_version": _OPTIONAL_STR, "base_model_name_or_path": _OPTIONAL_STR,
    "revision": _OPTIONAL_STR, "inference_mode": bool, "auto_mapping": (dict, NoneType),
    "fan_in_fan_out": bool,  # PEFT sets it per layer from the layer type (Conv1D), as lorakit does
    "megatron_core": _OPTIONAL_STR, "qalora_group_size": int, "loftq_config": dict,  # used only with their option
    "eva_config": (dict, NoneType), "corda_config": (dict, NoneType), "lora_ga_config": (dict, NoneType),
    "runtime_config": object,  # PEFT drops it when reading
}

# init_lora_weights: values that only initialise the factors (the file's tensors replace them) ...
INIT_FACTORS_ONLY = (True, False, "gaussian", "orthogonal", "eva", "mica")
# ... and values that also change W at the start, which the saved factors alone cannot reproduce.
INIT_REFUSED = {"olora": "OLoRA", "corda": "CorDA", "loftq": "LoftQ", "lora_ga": "LoRA-GA"}


def _peft_init(value) -> str:
    """lorakit's ``init`` for PEFT's ``init_lora_weights``; 'pissa' is lorakit's 'svd' (the same residual W)."""
    if any(value is v or (isinstance(value, str) and value == v) for v in INIT_FACTORS_ONLY):
        return "kaiming"
    if value == "pissa":
        return "svd"
    convert = ("convert it with PEFT first: save_pretrained(..., path_initial_model_for_weight_conversion=...) "
               "writes a plain LoRA adapter on the original base")
    if isinstance(value, str) and (value in INIT_REFUSED or value.startswith("pissa_niter_")):
        what = INIT_REFUSED.get(value, "fast (randomised) PiSSA")
        raise ValueError(f"init_lora_weights={value!r} is not supported: {what} changes the base weights "
                               f"at the start in a way the saved factors do not record; {convert}")
    raise ValueError(f"init_lora_weights={value!r} is not supported; expected one of "
                           f"{list(INIT_FACTORS_ONLY) + ['pissa']}")


def _is_default(value, default) -> bool:
    return type(value) is type(default) and value == default


def _unknown(path: Path, raw: dict, known) -> None:
    """Refuse an unknown key that is set; warn about unknown keys that are empty."""
    unknown = sorted(set(raw) - set(known))
    for key in unknown:
        if raw[key] not in (None, False, {}, [], ""):
            raise AdapterLoadError(f"{path}: {key}={raw[key]!r} is a setting lorakit does not know (from a newer PEFT "
                                   "or lorakit?); lorakit refuses it rather than ignore something that may change "
                                   "the outputs")
    if unknown:
        warnings.warn(f"{path}: ignoring keys lorakit does not know: {unknown} (all empty)", stacklevel=5)


def _from_peft(path: Path, raw: dict) -> LoRAConfig:
    missing = [key for key in REQUIRED if key not in raw]
    if missing:
        raise AdapterLoadError(f"{path} has no {missing[0]!r}, which decides the outputs; expected a PEFT LoRA config "
                               f"with {', '.join(REQUIRED)} (PEFT writes them all; use_rslora is false for adapters "
                               "saved before PEFT 0.7)")
    try:  # the settings lorakit refuses first: their names explain more than another key's type
        for key, (default, why) in REFUSED_UNLESS.items():
            if key in raw and not _is_default(raw[key], default):
                raise ValueError(f"{key}={raw[key]!r} is not supported ({why}); lorakit loads {key}={default!r} only")
        init = _peft_init(raw.get("init_lora_weights", True))
        for key, (_, check) in READ.items():
            if key in raw:
                check(key, raw[key])
        if raw["target_modules"] is None:
            raise ValueError("target_modules=None names no module; expected the adapted modules' names or a regex")
        for key, types in METADATA.items():
            value = raw.get(key)
            if key in raw and (not isinstance(value, types) or (types is int and isinstance(value, bool))):
                raise TypeError(f"{key}={value!r} has the wrong type; expected {_type_names(types)}")
        check_choice("lorakit_mode", raw.get("lorakit_mode", "module"), {"module", "parametrize"})
    except (TypeError, ValueError) as err:
        raise AdapterLoadError(f"{path}: {err}") from None
    _unknown(path, raw, {*READ, *REFUSED_UNLESS, *METADATA, "peft_type", "init_lora_weights", "lorakit_mode"})
    kwargs = {ours: raw[key] for key, (ours, _) in READ.items() if key in raw and not _unset(key, raw[key])}
    try:  # settings valid one by one may still not go together (DoRA with PiSSA)
        return LoRAConfig(**kwargs, init=init, mode=raw.get("lorakit_mode", "module"))
    except (TypeError, ValueError) as err:
        raise AdapterLoadError(f"{path}: {err}") from None


def _unset(key: str, value) -> bool:
    return value is None or (key in EMPTY_IS_UNSET and isinstance(value, (dict, list, str)) and not value)


def _type_names(types) -> str:
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join("null" if t is NoneType else t.__name__ for t in types)


# -- PEFT's prompt tuning -------------------------------------------------------------------------
PROMPT_INITS = {"RANDOM": "random", "SAMPLE_VOCAB": "vocab", "TEXT": "text"}  # PEFT's prompt_tuning_init -> ours
PROMPT_METADATA = {  # keys that describe the model or the file, not the prompt's outputs -> accepted types
    **{k: METADATA[k] for k in ("task_type", "peft_version", "base_model_name_or_path", "revision",
                                "inference_mode", "auto_mapping")},
    "token_dim": (int, NoneType),  # checked against the model through the tensor's shape
    "num_attention_heads": (int, NoneType), "num_layers": (int, NoneType), "tokenizer_kwargs": (dict, NoneType),
}


def _prompt_from_peft(path: Path, raw: dict) -> configs.PromptConfig:
    """PEFT's ``PROMPT_TUNING`` config as a :class:`PromptConfig` (the file's ``prompt_embeddings`` replace the init)."""
    try:
        check_int("num_virtual_tokens", raw.get("num_virtual_tokens"), 1)
        check_choice("prompt_tuning_init", raw.get("prompt_tuning_init", "RANDOM"), set(PROMPT_INITS))
        if raw.get("num_transformer_submodules", 1) not in (1, None):
            raise ValueError(f"num_transformer_submodules={raw['num_transformer_submodules']!r} is not supported: "
                             "PEFT prompts an encoder-decoder's encoder and decoder, lorakit the encoder only; "
                             "expected 1 (a decoder or an encoder)")
        if raw.get("modules_to_save") not in (None, []):
            raise ValueError(f"modules_to_save={raw['modules_to_save']!r} is not supported in a PEFT prompt file; "
                             "expected null")
        for key, types in PROMPT_METADATA.items():
            if key in raw and not isinstance(raw[key], types):
                raise TypeError(f"{key}={raw[key]!r} has the wrong type; expected {_type_names(types)}")
        text = raw.get("prompt_tuning_init", "RANDOM") == "TEXT"
        cfg = configs.PromptConfig(num_tokens=raw["num_virtual_tokens"],
                                   init=PROMPT_INITS[raw.get("prompt_tuning_init", "RANDOM")],
                                   init_text=raw.get("prompt_tuning_init_text") if text else None,
                                   tokenizer=raw.get("tokenizer_name_or_path") if text else None)
    except (TypeError, ValueError) as err:
        raise AdapterLoadError(f"{path}: {err}") from None
    _unknown(path, raw, {*PROMPT_METADATA, "peft_type", "num_virtual_tokens", "prompt_tuning_init",
                         "num_transformer_submodules", "modules_to_save", "prompt_tuning_init_text",
                         "tokenizer_name_or_path"})
    return cfg


# -- lorakit's own files ------------------------------------------------------------------------------
def lorakit_type(cls: type) -> str:
    return f"LORAKIT_{cls.__name__.upper()}"


KINDS = {lorakit_type(c): c for c in (configs.LoRAConfig, configs.AdapterConfig, configs.PromptConfig,
                                        configs.CLoRAConfig)}
OPTIONAL_FIELDS = {"exclude", "modules_to_save", "adapter_dtype", "target_parameter", "init_text", "tokenizer",
                   "dora", "bias", "lora_bias", "rank_pattern", "alpha_pattern", "layers_to_transform",
                   "layers_pattern", "trainable_token_indices"}  # a default that cannot mislead (older files lack the newer fields)


def _from_lorakit(path: Path, raw: dict, cls: type):
    fields = [f.name for f in dataclasses.fields(cls)]
    missing = [f for f in fields if f not in raw and f not in OPTIONAL_FIELDS]
    if missing:
        raise AdapterLoadError(f"{path} has no {missing[0]!r}; a {raw['peft_type']} config holds every field of "
                               f"{cls.__name__}: {', '.join(fields)}")
    if not isinstance(raw.get("lorakit_reason", ""), str):
        raise AdapterLoadError(f"{path}: lorakit_reason={raw['lorakit_reason']!r} is not a string")
    _unknown(path, raw, {*fields, "peft_type", "lorakit_reason"})
    try:
        return cls(**{f: raw[f] for f in fields if f in raw})
    except (TypeError, ValueError) as err:
        raise AdapterLoadError(f"{path}: {err}") from None


def read_config(directory: str | Path) -> FileConfig:
    """The validated config in ``directory/adapter_config.json``; :class:`AdapterLoadError` otherwise."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise AdapterLoadError(f"{path} does not exist; an adapter folder holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        raw = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise AdapterLoadError(f"{path} is not valid JSON (truncated or corrupted?): {err}") from None
    except OSError as err:
        raise AdapterLoadError(f"{path} cannot be read: {err}") from None
    if not isinstance(raw, dict) or "peft_type" not in raw:
        raise AdapterLoadError(f"{path} has no 'peft_type'; expected a PEFT adapter config such as "
                               "{'peft_type': 'LORA', 'r': 8, ...}")
    kind = raw["peft_type"]
    if kind == "LORA":
        return FileConfig(_from_peft(path, raw), True, path)
    if kind == "PROMPT_TUNING":
        return FileConfig(_prompt_from_peft(path, raw), False, path)
    if isinstance(kind, str) and kind in KINDS:
        return FileConfig(_from_lorakit(path, raw, KINDS[kind]), False, path)
    raise AdapterLoadError(f"{path}: peft_type={kind!r} is not one lorakit loads; expected one of "
                           f"{['LORA', 'PROMPT_TUNING', *KINDS]}")
