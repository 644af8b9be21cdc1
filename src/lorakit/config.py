"""Configuration dataclasses, one per method. Each validates every field on construction.

`dataclasses.asdict(cfg)` is what goes into results files; a CLI flag maps 1:1 to a field. A bad value is a
``ValueError`` (wrong range or choice) or ``TypeError`` (wrong type) whose message reads
``"<field>=<value!r> ...; expected ..."``.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Optional, Union

Targets = Optional[Union[str, list[str]]]
DTYPE_CHOICES = ("float32", "base")


# -- the checks every config uses -----------------------------------------------------------------
def check_int(name: str, value, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name}={value!r} is not an integer; expected an integer >= {minimum}")
    if value < minimum:
        raise ValueError(f"{name}={value!r} is out of range; expected an integer >= {minimum}")


def check_number(name: str, value, low: float | None = None, high: float | None = None,
                  high_open: bool = False) -> None:
    """A finite int or float (never a bool or a string) in [low, high] (or [low, high) with ``high_open``)."""
    bounds = f" in [{low:g}, {high:g}{')' if high_open else ']'}" if low is not None and high is not None else ""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name}={value!r} is not a number; expected a finite number{bounds}")
    too_high = high is not None and (value >= high if high_open else value > high)
    if not math.isfinite(value) or (low is not None and value < low) or too_high:
        raise ValueError(f"{name}={value!r} is out of range; expected a finite number{bounds}")


def check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name}={value!r} is not a boolean; expected True or False")


def check_choice(name: str, value, choices) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {sorted(choices)}")


def check_targets(name: str, value, allow_empty: bool = False) -> None:
    """None, a regex string (full match) or 'all-linear', or a list of module names."""
    expected = "expected a regex string, 'all-linear', a list of module names, or None"
    if value is None:
        return
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as err:
            raise ValueError(f"{name}={value!r} is not a valid regular expression ({err}); {expected}") from None
        return
    if not isinstance(value, (list, tuple)) or not all(isinstance(t, str) and t for t in value):
        raise TypeError(f"{name}={value!r} is not a target spec; {expected} (non-empty strings)")
    if not value and not allow_empty:
        raise ValueError(f"{name}={value!r} is empty; {expected}")


def check_names(name: str, value) -> None:
    """None or a list of module names (``modules_to_save``)."""
    if value is not None and (not isinstance(value, (list, tuple)) or not all(isinstance(t, str) and t for t in value)):
        raise TypeError(f"{name}={value!r} is not a list of module names; expected a list of non-empty strings or None")


def check_pattern(name: str, value, check_value) -> None:
    """None or {regex: value} (PEFT's ``rank_pattern`` / ``alpha_pattern``), each value passing ``check_value``."""
    if value is None:
        return
    if not isinstance(value, dict) or not all(isinstance(k, str) and k for k in value):
        raise TypeError(f"{name}={value!r} is not a pattern dict; expected {{module-name regex: value}} or None")
    for key, item in value.items():
        try:
            re.compile(key)
        except re.error as err:
            raise ValueError(f"{name} key {key!r} is not a valid regular expression ({err})") from None
        check_value(f"{name}[{key!r}]", item)


def check_layers(name: str, value) -> None:
    """None, a block index, or a list of block indices (PEFT's ``layers_to_transform``)."""
    items = value if isinstance(value, list) else [value]
    if value is not None and not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in items):
        raise TypeError(f"{name}={value!r} is not a block index or a list of them; expected integers >= 0 or None")


def check_token_indices(name: str, value) -> None:
    """None, a list of row indices, or {module name: list of row indices} (PEFT's ``trainable_token_indices``)."""
    if value is None:
        return
    expected = "expected a list of distinct token indices >= 0, {module name: such a list}, or None"
    lists = value.items() if isinstance(value, dict) else [(None, value)]
    if not lists or any(key is not None and not (isinstance(key, str) and key) for key, _ in lists):
        raise TypeError(f"{name}={value!r} is not a token-index spec; {expected}")
    for _, indices in lists:
        if not isinstance(indices, (list, tuple)) or not indices \
                or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indices):
            raise TypeError(f"{name}={value!r} is not a token-index spec; {expected}")
        if len(set(indices)) != len(indices):
            raise ValueError(f"{name}={value!r} repeats an index; {expected}")


def check_identifier(name: str, value) -> None:
    if not isinstance(value, str) or not value.isidentifier():
        raise ValueError(f"{name}={value!r} is not a parameter name; expected a name such as 'weight'")


# -- the configs ----------------------------------------------------------------------------------
@dataclass
class LoRAConfig:
    """Low-rank adaptation: each target computes ``W x + s * B (A x)`` with ``s = alpha / rank``."""

    rank: int = 8
    """r: rows of A (rank, in) and columns of B (out, rank). Must be >= 1."""
    alpha: float = 8.0
    """Scale numerator: s = alpha / rank (or alpha / sqrt(rank) with ``rslora``). Any finite number."""
    dropout: float = 0.0
    """Dropout on the input of the low-rank path, in [0, 1)."""
    targets: Targets = None
    """Regex (full match), list of names (exact or dotted suffix), 'all-linear', or None (every supported layer)."""
    exclude: Targets = None
    """Modules never adapted, same matching rules as ``targets``."""
    init: str = "kaiming"
    """'kaiming' (A Kaiming-uniform, B = 0), 'gaussian' (A ~ N(0, 1), B = 0, as the seeds), 'svd' (PiSSA)."""
    rslora: bool = False
    """Rank-stabilised scale alpha / sqrt(rank)."""
    dora: bool = False
    """DoRA (PEFT's ``use_dora``): the weight becomes ``m / ||W + s B A|| * (W + s B A)`` with a trained magnitude m
    per output (the norm over the input dimension, detached). Linear, Conv1d/2d, Conv1D and (module mode) embedding
    layers, whose outputs are the embedding coordinates; not with init='svd'."""
    mode: str = "module"
    """'module': wrapper layers (fast path); 'parametrize': torch.nn.utils.parametrize on a named weight."""
    target_parameter: str = "weight"
    """The parameter adapted in 'parametrize' mode (any >= 2-D parameter of any module)."""
    modules_to_save: Optional[list[str]] = None
    """Modules trained fully and saved with the adapter (e.g. a new classifier head)."""
    adapter_dtype: str = "float32"
    """dtype of the adapter's factors: 'float32' (as PEFT, also on a bf16/fp16 base) or 'base' (the base weight's)."""
    rank_pattern: Optional[dict[str, int]] = None
    """Per-layer ranks, {regex: rank}, PEFT's rule: a key matches a module path that ends in it after a dot (or is
    it), ``re.match(rf"(.*\.)?({key})$", path)``; the first matching key wins, unmatched layers take ``rank``."""
    alpha_pattern: Optional[dict[str, float]] = None
    """Per-layer alphas, {regex: alpha}, matched as ``rank_pattern``."""
    layers_to_transform: Optional[Union[int, list[int]]] = None
    """Adapt only the targets inside these blocks (the index after ``layers_pattern`` in the path, e.g.
    ``model.layers.3.mlp``). As PEFT: needs a list of ``targets`` (or None / 'all-linear'), not a regex."""
    layers_pattern: Optional[Union[str, list[str]]] = None
    """The name of the block list (``"layers"``, ``"h"``); None takes the first ``<name>.<index>.`` in the path."""
    bias: str = "none"
    """PEFT's ``bias``: 'all' also trains every bias of the model, 'lora_only' the adapted layers' biases; they are
    saved with the adapter. They are the base's own, so ``disabled()`` and ``unload(merge=False)`` keep the trained
    values (as in PEFT, which warns the same)."""
    lora_bias: bool = False
    """PEFT's ``lora_bias``: B gets a bias (zero at the start, scaled by s with B A); ``merge`` adds ``s * bias`` to
    the layer's bias. Module mode, Linear/Conv/Conv1D layers; not with DoRA or init='svd'."""
    trainable_token_indices: Optional[Union[list[int], dict[str, list[int]]]] = None
    """PEFT's ``trainable_token_indices``: these rows of the input embedding (a list), or of the modules a dict
    names (a key matches every module path ending with it), train as new values; a head tied to the embedding
    follows them. A wrapper in both modes (``layers/trainable_tokens.py``)."""

    def __post_init__(self) -> None:
        check_int("rank", self.rank, 1)
        check_number("alpha", self.alpha)
        check_number("dropout", self.dropout, 0.0, 1.0, high_open=True)
        check_targets("targets", self.targets)
        check_targets("exclude", self.exclude, allow_empty=True)
        check_choice("init", self.init, {"kaiming", "gaussian", "svd"})
        check_bool("rslora", self.rslora)
        check_bool("dora", self.dora)
        if self.dora and self.init == "svd":
            raise ValueError("dora=True with init='svd' is not supported (PiSSA moves part of W into the factors, "
                             "which the magnitude would measure twice); use init='kaiming' or 'gaussian' with DoRA")
        check_choice("mode", self.mode, {"module", "parametrize"})
        check_identifier("target_parameter", self.target_parameter)
        check_names("modules_to_save", self.modules_to_save)
        check_choice("adapter_dtype", self.adapter_dtype, DTYPE_CHOICES)
        check_pattern("rank_pattern", self.rank_pattern, lambda key, v: check_int(key, v, 1))
        check_pattern("alpha_pattern", self.alpha_pattern, check_number)
        check_layers("layers_to_transform", self.layers_to_transform)
        patterns = self.layers_pattern if isinstance(self.layers_pattern, list) else [self.layers_pattern]
        if self.layers_pattern is not None and not all(isinstance(p, str) and p for p in patterns):
            raise TypeError(f"layers_pattern={self.layers_pattern!r} is not a name or a list of names; expected "
                            "e.g. 'layers', ['layers', 'h'], or None")
        check_choice("bias", self.bias, {"none", "all", "lora_only"})
        check_bool("lora_bias", self.lora_bias)
        check_token_indices("trainable_token_indices", self.trainable_token_indices)
        if self.lora_bias and (self.dora or self.init == "svd" or self.mode != "module"):
            raise ValueError(f"lora_bias=True with dora={self.dora}, init={self.init!r}, mode={self.mode!r} is not "
                             "supported (as in PEFT); use lora_bias with dora=False, init='kaiming' or 'gaussian' "
                             "and mode='module'")
        if self.bias != "none" and self.modules_to_save:
            raise ValueError(f"bias={self.bias!r} with modules_to_save={self.modules_to_save!r} is not supported "
                             "(PEFT would save the module's copy and its original's biases apart); train the module's "
                             "bias through modules_to_save, or use bias='none'")
        if self.layers_pattern is not None and self.layers_to_transform is None:
            raise ValueError(f"layers_pattern={self.layers_pattern!r} without layers_to_transform selects nothing; "
                             "give layers_to_transform the block indices too, or leave layers_pattern None")
        if self.layers_to_transform is not None and isinstance(self.targets, str) and self.targets != "all-linear":
            raise ValueError(f"layers_to_transform={self.layers_to_transform!r} with the regex targets="
                             f"{self.targets!r}: as in PEFT, a regex already says which blocks it takes; put the "
                             "block indices into the regex, or give targets as a list of names")

    @property
    def scale(self) -> float:
        return self.alpha / (self.rank ** 0.5 if self.rslora else self.rank)

    def for_layer(self, path: str) -> "LoRAConfig":
        """This config with the rank and alpha that ``rank_pattern`` / ``alpha_pattern`` give module ``path``."""
        rank = _pattern_value(self.rank_pattern, path, self.rank)
        alpha = _pattern_value(self.alpha_pattern, path, self.alpha)
        if (rank, alpha) == (self.rank, self.alpha):
            return self
        return dataclasses.replace(self, rank=rank, alpha=alpha, rank_pattern=None, alpha_pattern=None)


def _pattern_value(pattern: Optional[dict], path: str, default):
    """PEFT's ``get_pattern_key``: the value of the first key that matches the end of ``path`` after a dot."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def block_index(path: str, layers_pattern) -> Optional[int]:
    """The block a module path lies in, by PEFT's rule: the first ``<pattern>.<index>.`` (any name for None)."""
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
    regexes = [r".*?\.[^.]*\.(?P<idx>\d+)\."] if not patterns else [rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\." for p in patterns]
    for regex in regexes:
        found = re.match(regex, path)
        if found is not None:
            return int(found.group("idx"))
    return None


@dataclass
class AdapterConfig:
    """Bottleneck adapter (Houlsby/Pfeiffer) after each target's output: ``h + up(act(down(h)))``."""

    bottleneck: int = 8
    """Width b of the down projection d -> b."""
    targets: Targets = None
    """Modules whose output is adapted; same matching rules as LoRA."""
    activation: str = "relu"
    """'relu', 'gelu', 'tanh' or 'silu'."""
    init: str = "near-identity"
    """'near-identity': down small random, up = 0, so the model is unchanged at start."""
    exclude: Targets = None
    modules_to_save: Optional[list[str]] = None
    adapter_dtype: str = "float32"
    """dtype of the adapter's weights: 'float32' (default) or 'base' (the base weight's)."""

    def __post_init__(self) -> None:
        check_int("bottleneck", self.bottleneck, 1)
        check_targets("targets", self.targets)
        check_choice("activation", self.activation, {"relu", "gelu", "tanh", "silu"})
        check_choice("init", self.init, {"near-identity"})
        check_targets("exclude", self.exclude, allow_empty=True)
        check_names("modules_to_save", self.modules_to_save)
        check_choice("adapter_dtype", self.adapter_dtype, DTYPE_CHOICES)


@dataclass
class PromptConfig:
    """Soft prompt tuning: ``num_tokens`` trainable embeddings prepended to ``inputs_embeds``."""

    num_tokens: int = 10
    init: str = "random"
    """'random' (Gaussian at the vocabulary's scale), 'vocab' (copies of random vocabulary rows) or 'text' (the
    embeddings of ``init_text``'s tokens, repeated or cut to ``num_tokens``: PEFT's TEXT init)."""
    modules_to_save: Optional[list[str]] = None
    init_text: Optional[str] = None
    """With ``init="text"``: the text whose token embeddings start the prompt, e.g. "Name the word's category"."""
    tokenizer: Optional[str] = None
    """With ``init="text"``: the tokenizer's Hugging Face id or local folder (PEFT's ``tokenizer_name_or_path``)."""

    def __post_init__(self) -> None:
        check_int("num_tokens", self.num_tokens, 1)
        check_choice("init", self.init, {"random", "vocab", "text"})
        check_names("modules_to_save", self.modules_to_save)
        for name in ("init_text", "tokenizer"):
            value = getattr(self, name)
            if self.init == "text" and (not isinstance(value, str) or not value):
                raise ValueError(f"{name}={value!r} with init='text'; expected a non-empty string "
                                 "(init_text: the text, tokenizer: a tokenizer id or folder)")
            if self.init != "text" and value is not None:
                raise ValueError(f"{name}={value!r} is used only with init='text', but init={self.init!r}; "
                                 "set init='text' or leave it None")


@dataclass
class CLoRAConfig:
    """C-LoRA: ``d(t) W x + noise(t) x + s B A x + C`` while d decays to ``decay_floor`` (SEEDS.md B)."""

    rank: int = 16
    alpha: float = 32.0
    targets: Targets = None
    exclude: Targets = None
    decay_start: float = 0.05
    """Fraction of total steps where W starts decaying."""
    decay_end: float = 0.85
    """Fraction of total steps where W reaches ``decay_floor``."""
    decay_floor: float = 0.0
    noise: str = "scheduled"
    """'scheduled' (off once d < 0.3), 'always', or 'none'."""
    bias: bool = True
    """Add the trainable per-output bias C on the low-rank path."""
    init: str = "random"
    """'random' (the seed's: A variance-scaling uniform, B = 0) or 'svd' (top singular vectors of W)."""
    modules_to_save: Optional[list[str]] = None
    adapter_dtype: str = "float32"
    """dtype of A, B and C: 'float32' (default) or 'base' (the base weight's)."""

    def __post_init__(self) -> None:
        check_int("rank", self.rank, 1)
        check_number("alpha", self.alpha)
        check_targets("targets", self.targets)
        check_targets("exclude", self.exclude, allow_empty=True)
        check_number("decay_start", self.decay_start, 0.0, 1.0)
        check_number("decay_end", self.decay_end, 0.0, 1.0)
        if self.decay_start > self.decay_end:
            raise ValueError(f"decay_start={self.decay_start!r} is after decay_end={self.decay_end!r}; expected "
                             "0 <= decay_start <= decay_end <= 1")
        check_number("decay_floor", self.decay_floor, 0.0, 1.0, high_open=True)
        check_choice("noise", self.noise, {"scheduled", "always", "none"})
        check_bool("bias", self.bias)
        check_choice("init", self.init, {"random", "svd"})
        check_names("modules_to_save", self.modules_to_save)
        check_choice("adapter_dtype", self.adapter_dtype, DTYPE_CHOICES)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank
