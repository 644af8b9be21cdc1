"""Configuration dataclasses, one per method. Each validates every field on construction.

`dataclasses.asdict(cfg)` is what goes into results files; a CLI flag maps 1:1 to a field. A bad value is a
``ValueError`` (wrong range or choice) or ``TypeError`` (wrong type) whose message reads
``"<field>=<value!r> ...; expected ..."``.
"""
from __future__ import annotations

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
    mode: str = "module"
    """'module': wrapper layers (fast path); 'parametrize': torch.nn.utils.parametrize on a named weight."""
    target_parameter: str = "weight"
    """The parameter adapted in 'parametrize' mode (any >= 2-D parameter of any module)."""
    modules_to_save: Optional[list[str]] = None
    """Modules trained fully and saved with the adapter (e.g. a new classifier head)."""
    adapter_dtype: str = "float32"
    """dtype of the adapter's factors: 'float32' (as PEFT, also on a bf16/fp16 base) or 'base' (the base weight's)."""

    def __post_init__(self) -> None:
        check_int("rank", self.rank, 1)
        check_number("alpha", self.alpha)
        check_number("dropout", self.dropout, 0.0, 1.0, high_open=True)
        check_targets("targets", self.targets)
        check_targets("exclude", self.exclude, allow_empty=True)
        check_choice("init", self.init, {"kaiming", "gaussian", "svd"})
        check_bool("rslora", self.rslora)
        check_choice("mode", self.mode, {"module", "parametrize"})
        check_identifier("target_parameter", self.target_parameter)
        check_names("modules_to_save", self.modules_to_save)
        check_choice("adapter_dtype", self.adapter_dtype, DTYPE_CHOICES)

    @property
    def scale(self) -> float:
        return self.alpha / (self.rank ** 0.5 if self.rslora else self.rank)


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
