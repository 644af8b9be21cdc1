"""Bottleneck adapters (Houlsby / Pfeiffer): ``h -> h + up(act(down(h)))`` after a module's output.

``down`` is a Linear d -> b with bias, ``up`` a Linear b -> d with bias. ``up`` starts at zero, so the
wrapped module computes exactly what it did before until training moves it. Unlike LoRA, the non-linearity
sits between the two projections, so an adapter cannot be folded into the base weights: ``merge`` says so;
``unload(model, merge=False)`` gives the base model back.

The wrapper keeps the original module as ``base_layer`` and its named adapters in ``nn.ModuleDict``s, so
state-dict keys read ``<path>.adapter_down.<name>.weight``; one adapter is active at a time.

Shapes: ``adapter_down.weight`` (b, d), ``adapter_down.bias`` (b,), ``adapter_up.weight`` (d, b),
``adapter_up.bias`` (d,), for an output of shape (..., d).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..config import AdapterConfig
from .precision import factory_kwargs

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}


def output_width(module: nn.Module) -> int | None:
    """The last dimension of what ``module`` returns, read from its shapes; None when it cannot be told.

    A Linear (or HF Conv1D) gives its output features, a LayerNorm/RMSNorm its normalised size, an Embedding
    its embedding size; a container gives the width of its last such submodule (``T5DenseActDense`` ends in
    ``wo``, ``BertOutput`` in ``LayerNorm``). Inside an adapter wrapper only the base layer counts.
    """
    width = None
    skip: list[str] = []
    for name, sub in module.named_modules():
        if any(name.startswith(prefix) for prefix in skip):
            continue
        if hasattr(sub, "base_layer") and callable(getattr(sub, "adapter_parameters", None)):
            skip += [f"{name}.{child}" if name else child for child, _ in sub.named_children() if child != "base_layer"]
            continue
        if isinstance(sub, nn.Linear):
            width = sub.out_features
        elif type(sub).__name__ == "Conv1D" and hasattr(sub, "nf"):
            width = sub.nf
        elif isinstance(sub, nn.LayerNorm) and sub.normalized_shape:
            width = sub.normalized_shape[-1]
        elif isinstance(sub, nn.Embedding):
            width = sub.embedding_dim
        elif "norm" in type(sub).__name__.lower() and isinstance(getattr(sub, "weight", None), torch.Tensor) \
                and sub.weight.dim() == 1:  # T5LayerNorm, LlamaRMSNorm, ...
            width = sub.weight.numel()
    return width


class BottleneckAdapter(nn.Module):
    """One adapter: ``x + up(act(down(x)))`` on the last dimension of ``x`` (..., d)."""

    def __init__(self, width: int, bottleneck: int, activation: str, reference: torch.Tensor | None = None,
                 dtype_choice: str = "float32") -> None:
        super().__init__()
        kwargs = factory_kwargs(reference, dtype_choice) if reference is not None else {}
        self.down = nn.Linear(width, bottleneck, **kwargs)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(bottleneck, width, **kwargs)
        with torch.no_grad():  # near-identity: down as a default Linear (Kaiming-uniform), biases and up zero
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d) -> (..., b) -> (..., d), computed in the adapter's dtype and added in ``x``'s."""
        return x + self.up(self.act(self.down(x.to(self.down.weight.dtype)))).to(x.dtype)


class AdapterWrapper(nn.Module):
    """A module followed by named bottleneck adapters; the active one is applied to the module's output."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        width = output_width(base_layer)
        if width is None:
            raise ValueError(f"cannot tell the output width of a {type(base_layer).__name__}; adapters go after "
                             "modules that end in a Linear, LayerNorm or Embedding")
        self.base_layer = base_layer
        self.width = width
        self.adapters = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disabled = False

    # -- the protocol shared with LoRA wrappers ---------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        return list(self.adapters)

    def add_adapter(self, name: str, cfg: AdapterConfig) -> None:
        reference = next(self.base_layer.parameters(), None)  # device and dtype rule of the base (precision.py)
        self.adapters[name] = BottleneckAdapter(self.width, cfg.bottleneck, cfg.activation, reference,
                                                cfg.adapter_dtype)
        self.active_adapter = name

    def delete_adapter(self, name: str) -> None:
        del self.adapters[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def set_active(self, name: str | None) -> None:
        self.active_adapter = name

    def adapter_parameters(self, name: str | None = None) -> list[nn.Parameter]:
        modules = self.adapters.values() if name is None else [self.adapters[name]]
        return [p for module in modules for p in module.parameters()]

    def check_mergeable(self) -> None:
        """Raise if ``merge`` would have to fold an active adapter (it cannot)."""
        if self.active_adapter is not None:
            raise ValueError(
                "a bottleneck adapter cannot be merged into the base weights: its activation sits between the "
                "down and up projections, so no single weight matrix computes it. Keep it as a module, or take "
                "it out with lorakit.unload(model, merge=False)")

    def merge(self) -> None:
        self.check_mergeable()

    def unmerge(self) -> None:  # nothing is ever merged
        pass

    # -- checkpoints --------------------------------------------------------------------------------
    def _items(self, name: str):
        adapter = self.adapters[name]
        yield "adapter_down.weight", adapter.down.weight
        yield "adapter_down.bias", adapter.down.bias
        yield "adapter_up.weight", adapter.up.weight
        yield "adapter_up.bias", adapter.up.bias

    def peft_state(self, name: str) -> dict[str, torch.Tensor]:
        """This adapter's tensors under checkpoint key suffixes (``adapter_down.weight`` ...)."""
        return dict(self._items(name))

    # -- forward ------------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        out = self.base_layer(*args, **kwargs)
        if self.active_adapter is None or self.disabled:
            return out
        if not isinstance(out, torch.Tensor) or out.shape[-1] != self.width:
            got = f"a tensor of shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
            raise TypeError(f"an adapter needs its target to return a tensor (..., {self.width}); this "
                            f"{type(self.base_layer).__name__} returned {got}. Target a module inside it instead")
        return self.adapters[self.active_adapter](out)

    def extra_repr(self) -> str:
        return f"width={self.width}, adapters={self.adapter_names}, active={self.active_adapter}"


def adapter_wrapper_for(module: nn.Module) -> type[AdapterWrapper] | None:
    """The wrapper class for a module, or None when its output width cannot be read from its shapes."""
    if isinstance(module, AdapterWrapper):
        return AdapterWrapper
    return AdapterWrapper if output_width(module) is not None else None


def hidden_size(model: nn.Module) -> int | None:
    """The model's hidden size from a Hugging Face config (``hidden_size``/``d_model``/``n_embd``), else None."""
    config = getattr(model, "config", None)
    for key in ("hidden_size", "d_model", "n_embd", "dim"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def probe_outputs(model: nn.Module, paths: list[str]) -> dict[str, object]:
    """What each target returns on the model's own ``dummy_inputs`` (Hugging Face models), or {} if untestable.

    One forward in eval mode without gradients, RNG state restored; nothing in the model changes.
    """
    dummy = getattr(model, "dummy_inputs", None)
    first = next(model.parameters(), None)
    if not isinstance(dummy, dict) or first is None or first.is_meta:
        return {}
    seen: dict[str, object] = {}

    def recorder(path: str):
        def record(module, args, output) -> None:
            seen.setdefault(path, output)
        return record

    handles = [model.get_submodule(p).register_forward_hook(recorder(p)) for p in paths]
    was_training = model.training
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            model.eval()
            model(**{k: v.to(first.device) if isinstance(v, torch.Tensor) else v for k, v in dummy.items()})
    except Exception:  # a model whose dummy inputs do not run: fall back to the static checks and the forward's
        return {}
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return seen


def check_adapter_targets(model: nn.Module, paths: list[str]) -> None:
    """Every target must produce the model's hidden size (when the model states one); errors name the target."""
    width_wanted = hidden_size(model)
    for outer in paths:
        inner = next((p for p in paths if p.startswith(outer + ".")), None)
        if inner is not None:
            raise ValueError(f"adapter targets {outer!r} and {inner!r} are nested; pick one level (e.g. a regex for "
                             "each block's feed-forward output)")
    for path in paths:
        module = model.get_submodule(path)
        base = module.base_layer if isinstance(module, AdapterWrapper) else module
        width = output_width(base)
        if width is None:
            raise ValueError(f"adapter target {path!r} ({type(base).__name__}) has no output width lorakit can read; "
                             "target a Linear or a block that ends in one")
        if width_wanted is not None and width != width_wanted:
            raise ValueError(f"adapter target {path!r} ({type(base).__name__}) outputs width {width}, not the model's "
                             f"hidden size {width_wanted}; adapters go after modules whose output is the hidden state "
                             "(e.g. a block's feed-forward output)")
    for path, output in probe_outputs(model, paths).items():
        width = output_width(model.get_submodule(path))
        if not isinstance(output, torch.Tensor) or output.shape[-1] != width:
            got = f"a tensor of shape {tuple(output.shape)}" if isinstance(output, torch.Tensor) else \
                f"a {type(output).__name__}"
            raise ValueError(f"adapter target {path!r} ({type(model.get_submodule(path)).__name__}) returns {got}, "
                             f"not a tensor (..., {width}); target the module inside it that produces the hidden state")
