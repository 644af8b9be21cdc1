"""What lorakit must know of a layer it adapts: its logical shape, its weight as a dense matrix, and how a changed
weight goes back in. This is the one place that knows each kind of base layer.

- **Plain layers** (``nn.Linear``, Hugging Face ``Conv1D``, convolutions, embeddings, also sharded or hooked): the
  weight is an ordinary float tensor; it is its own dense form, and a merge adds into it in place.
- **bitsandbytes 4-bit** (``Linear4bit``, nf4 or fp4: QLoRA) stores a packed ``Params4bit`` of shape
  ``(n, 1)``; **bitsandbytes 8-bit** (``Linear8bitLt``) an ``Int8Params`` with per-row scales. Their dense form is
  the dequantised weight; a merge dequantises, adds and quantises again (as PEFT does), which rounds: the outputs
  after a merge differ from the unmerged ones by the quantisation error, and lorakit warns.
- **Other quantisers** (torchao, hqq, quanto, ...) work when the layer says its logical ``in_features`` and
  ``out_features`` (the forward always calls the layer itself); merging into them is refused by name, and a layer
  with a quantised weight and no logical features is refused when adapted.

Only the bitsandbytes kinds are tested (as PEFT tests them, on the CPU backend).
"""
from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

_PLAIN_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _weight_kind(weight: torch.Tensor) -> str:
    """'bnb-4bit', 'bnb-8bit', 'plain' or 'quantised' (some other packed or low-precision storage)."""
    name = type(weight).__name__
    if name == "Params4bit":
        return "bnb-4bit"
    if name == "Int8Params":
        return "bnb-8bit"
    plain_type = type(weight) in (torch.Tensor, nn.Parameter) or type(weight).__name__ == "DTensor"
    return "plain" if plain_type and weight.dtype in _PLAIN_FLOATS else "quantised"


def quantisation(module: nn.Module) -> str | None:
    """A readable name of how ``module``'s weight is quantised (``"bitsandbytes 4-bit (nf4)"``), None when it is not."""
    weight = getattr(module, "weight", None)
    kind = _weight_kind(weight) if isinstance(weight, torch.Tensor) else "plain"
    if kind == "plain":
        return None
    if kind == "bnb-4bit":
        return f"bitsandbytes 4-bit ({weight.quant_type})"
    if kind == "bnb-8bit":
        return "bitsandbytes 8-bit"
    return f"{type(module).__name__} with a {type(weight).__name__} weight of dtype {weight.dtype}"


def linear_features(module: nn.Module, transposed: bool = False) -> tuple[int, int]:
    """``(in_features, out_features)`` of a Linear-like layer: its logical shape, never a packed weight's.

    ``transposed`` is for Hugging Face's ``Conv1D``, whose weight is stored (in, out).

    Raises:
        ValueError: a quantised layer that does not say its logical ``in_features`` / ``out_features``.
    """
    weight = module.weight
    if quantisation(module) is None:
        rows, cols = weight.shape
        return (rows, cols) if transposed else (cols, rows)
    features = getattr(module, "in_features", None), getattr(module, "out_features", None)
    if not all(isinstance(f, int) for f in features):
        raise ValueError(f"{type(module).__name__} is quantised ({quantisation(module)}) and has no logical "
                         "in_features/out_features, so the adapter's shape is unknown; supported quantised layers: "
                         "bitsandbytes Linear4bit and Linear8bitLt, or any layer exposing in_features and out_features")
    return features


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The weight as a dense float tensor shaped as a plain layer stores it (dequantised for bitsandbytes).

    On CPUs with AVX512-BF16, bitsandbytes (>= 0.49) re-packs a 4-bit weight into its CPU kernel's own layout at the
    layer's first eval forward; that layout does not dequantise. The standard layout is read instead: exactly, as
    :func:`keep_4bit_training_exact` kept it (every injected model), else through bitsandbytes' inverse, as its own
    ``state_dict()`` does (bf16-rounded scales). The layer itself is never changed by a read (DoRA reads W at every
    training step; undoing the packing in place made later forwards differ)."""
    weight, kind = module.weight, _weight_kind(module.weight)
    if kind == "plain":
        return weight
    import bitsandbytes.functional as bnb_f

    if kind == "bnb-4bit":
        data, state = weight.data, weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            data, state = _standard_4bit(weight) or _unpacked_4bit(data, state)
        return bnb_f.dequantize_4bit(data, state)
    if kind == "bnb-8bit":  # the row scales move from the weight to the layer's state at its first forward
        scales = weight.SCB if weight.SCB is not None else module.state.SCB
        return bnb_f.int8_vectorwise_dequant(weight.data, scales)
    raise ValueError(cannot_merge(module))


def _standard_4bit(weight: torch.Tensor) -> tuple[torch.Tensor, object] | None:
    """The exact standard layout of a packed 4-bit weight, as :func:`keep_4bit_training_exact` kept it (a copy of
    the state object with its standard fields), else None."""
    saved = getattr(weight, "_lorakit_standard", None)
    if saved is None or saved[0] is not weight.quant_state:
        return None
    standard = copy.copy(saved[0])
    vars(standard).clear()
    vars(standard).update(saved[2])
    return saved[1], standard


def _unpacked_4bit(data: torch.Tensor, state) -> tuple[torch.Tensor, object]:
    """bitsandbytes' inverse of its CPU packing, on a copy of the state (it rewrites the one it is given). Its block
    scales come back rounded to bf16, and (0.50, without double quantisation) as the packing laid them out,
    (in / blocksize, out): they are put back in the standard order, one per block of a flat weight."""
    import bitsandbytes.functional as bnb_f

    data, state = bnb_f._convert_weight_packed_for_cpu_inverse(data, copy.deepcopy(state))
    if state.absmax.dim() == 2:
        state.absmax = state.absmax.T.reshape(-1).float()
    return data, state


def keep_4bit_training_exact(model: nn.Module) -> None:
    """Make training after an evaluation what it would have been without it, on every bitsandbytes 4-bit layer.

    On CPUs with AVX512-BF16, bitsandbytes (0.50) re-packs a 4-bit weight into its CPU inference layout, in place,
    at the layer's first forward in eval mode on an input that needs no gradient, and every later forward, training
    included, runs that layout's kernel, which has no backward: after one evaluation, the adapters below the first
    4-bit layer got no gradient. bitsandbytes' inverse of the packing (its ``state_dict()`` runs it) is not exact:
    the block scales come back rounded to bf16 (and, without double quantisation, still transposed), so an adapter
    trained after it fits another base than a fresh load gives. Instead, a forward pre-hook remembers each layer's
    standard layout (its data and its quant state's fields: references only, as the packing rebinds them and
    writes into none) and puts it back before a forward bitsandbytes would not have packed for (training mode, or an
    input that needs a gradient), and before any forward once bitsandbytes' inverse has run (a checkpoint's
    ``state_dict()``), so that the packing starts from it again.

    Evaluations keep bitsandbytes' packed kernel (and its outputs, as PEFT's), re-packing after each training phase;
    while packed, a layer also holds its standard bytes. A layer packed before the hook first saw it (an evaluation
    before ``inject``) has no exact standard layout left: the hook warns. Off the CPU, or where bitsandbytes does not
    pack, the hook changes nothing.
    """
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and _weight_kind(weight) == "bnb-4bit" \
                and _standard_4bit_layout not in module._forward_pre_hooks.values():
            module.register_forward_pre_hook(_standard_4bit_layout)


def _standard_4bit_layout(module: nn.Module, args) -> None:
    weight = module.weight
    state = getattr(weight, "quant_state", None)
    if state is None or weight.device.type != "cpu" or not getattr(module, "support_avx512bf16_for_cpu", True):
        return
    packed = getattr(state, "packing_format_for_cpu", False)
    packs = not module.training and not any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
    saved = getattr(weight, "_lorakit_standard", None)  # on the weight: a merge or a copy starts afresh
    if saved is None or saved[0] is not state:  # the first forward, or a new weight
        if not packed:
            weight._lorakit_standard = (state, weight.data, dict(vars(state)))
        elif not packs:
            warnings.warn("a bitsandbytes 4-bit layer was already packed for its CPU inference kernel when lorakit "
                          "first saw it (an evaluation before inject?); that kernel has no backward, so the adapters "
                          "below it get no gradient: inject before evaluating", UserWarning, stacklevel=2)
        return
    _, data, standard = saved
    fields = vars(state)
    changed = fields.keys() != standard.keys() or any(fields[k] is not v for k, v in standard.items())
    if changed and not (packed and packs):  # packed (or packed and inverted) by bitsandbytes: back to the standard
        weight.data = data
        fields.clear()
        fields.update(standard)


def cannot_merge(module: nn.Module) -> str:
    return (f"cannot merge into {type(module).__name__}: its weight is quantised ({quantisation(module)}) and lorakit "
            "can write back only into plain and bitsandbytes 4/8-bit weights; keep the adapter unmerged or "
            "unload(merge=False)")


def check_mergeable(module: nn.Module) -> None:
    """Refuse (ValueError) a merge into a weight lorakit cannot write back."""
    if _weight_kind(module.weight) == "quantised":
        raise ValueError(cannot_merge(module))


def add_to_weight(module: nn.Module, delta: torch.Tensor) -> None:
    """``W += delta`` (``delta`` shaped like :func:`dense_weight`): in place, or dequantised, added and requantised.

    Callers warn about the rounding of a requantised weight (:func:`warn_requantising`), once per merge.
    """
    weight, kind = module.weight, _weight_kind(module.weight)
    with torch.no_grad():
        if kind == "plain":
            weight.add_(delta.to(weight.dtype))
            return
        check_mergeable(module)
        new = dense_weight(module).float() + delta.float()
        module.weight = _requantised(weight, kind, new, module)
    if hasattr(module, "state") and hasattr(module.state, "reset_grads"):  # Linear8bitLt caches its int8 weight
        module.state.reset_grads()


def warn_requantising(kinds: set[str]) -> None:
    """The warning for a merge or unmerge that writes into quantised weights (``kinds`` from :func:`quantisation`)."""
    if kinds:
        warnings.warn(f"merging into {', '.join(sorted(kinds))} layers quantises their weights again: the outputs "
                      "change by rounding (unload(merge=False) keeps the base exact)", UserWarning, stacklevel=3)


def _requantised(weight: torch.Tensor, kind: str, dense: torch.Tensor, module: nn.Module) -> nn.Parameter:
    import bitsandbytes as bnb

    if kind == "bnb-4bit":
        new = bnb.nn.Params4bit(dense.to("cpu"), requires_grad=False, quant_type=weight.quant_type,
                                blocksize=weight.blocksize, compress_statistics=weight.compress_statistics,
                                quant_storage=weight.quant_storage, module=module)
    else:
        new = bnb.nn.Int8Params(dense.to("cpu"), requires_grad=False, has_fp16_weights=False)
    return new.to(weight.device)  # moving to a device is what quantises


def logical_numel(param: torch.Tensor) -> int:
    """How many numbers ``param`` stands for; a 4-bit tensor packs two per byte of storage (PEFT counts it so)."""
    if type(param).__name__ == "Params4bit":
        return param.numel() * 2 * param.element_size()
    return param.numel()
