"""Configuration dataclasses, one per method. Each validates itself on construction.

`dataclasses.asdict(cfg)` is what goes into results files; a CLI flag maps 1:1 to a field.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

Targets = Optional[Union[str, list[str]]]


def _check_choice(field_name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{field_name}={value!r} is not supported; choose one of {sorted(choices)}")


def _check_targets(field_name: str, value) -> None:
    if value is None or isinstance(value, str):
        return
    if not isinstance(value, (list, tuple)) or not all(isinstance(t, str) for t in value):
        raise ValueError(f"{field_name} must be a regex string, a list of module names, 'all-linear' or None; got {value!r}")


@dataclass
class LoRAConfig:
    """Low-rank adaptation: each target computes ``W x + s * B (A x)`` with ``s = alpha / rank``."""

    rank: int = 8
    """r: rows of A (rank, in) and columns of B (out, rank). Must be >= 1."""
    alpha: float = 8.0
    """Scale numerator: s = alpha / rank (or alpha / sqrt(rank) with ``rslora``)."""
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
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ValueError(f"rank must be an integer >= 1, got {self.rank!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        _check_choice("init", self.init, {"kaiming", "gaussian", "svd"})
        _check_choice("mode", self.mode, {"module", "parametrize"})
        _check_choice("adapter_dtype", self.adapter_dtype, {"float32", "base"})
        _check_targets("targets", self.targets)
        _check_targets("exclude", self.exclude)
        _check_targets("modules_to_save", self.modules_to_save)

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
        _check_choice("adapter_dtype", self.adapter_dtype, {"float32", "base"})
        if not isinstance(self.bottleneck, int) or self.bottleneck < 1:
            raise ValueError(f"bottleneck must be an integer >= 1, got {self.bottleneck!r}")
        _check_choice("activation", self.activation, {"relu", "gelu", "tanh", "silu"})
        _check_choice("init", self.init, {"near-identity"})
        _check_targets("targets", self.targets)


@dataclass
class PromptConfig:
    """Soft prompt tuning: ``num_tokens`` trainable embeddings prepended to ``inputs_embeds``."""

    num_tokens: int = 10
    init: str = "random"
    """'random' (N(0, 0.02)-like, scaled to the embedding norm) or 'vocab' (copies of random vocabulary rows)."""
    modules_to_save: Optional[list[str]] = None

    def __post_init__(self) -> None:
        if not isinstance(self.num_tokens, int) or self.num_tokens < 1:
            raise ValueError(f"num_tokens must be an integer >= 1, got {self.num_tokens!r}")
        _check_choice("init", self.init, {"random", "vocab"})


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
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank must be an integer >= 1, got {self.rank!r}")
        if not 0.0 <= self.decay_start <= self.decay_end <= 1.0:
            raise ValueError(
                f"need 0 <= decay_start <= decay_end <= 1, got decay_start={self.decay_start}, decay_end={self.decay_end}"
            )
        if not 0.0 <= self.decay_floor < 1.0:
            raise ValueError(f"decay_floor must be in [0, 1), got {self.decay_floor}")
        _check_choice("noise", self.noise, {"scheduled", "always", "none"})
        _check_choice("adapter_dtype", self.adapter_dtype, {"float32", "base"})
        _check_choice("init", self.init, {"random", "svd"})
        _check_targets("targets", self.targets)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank
