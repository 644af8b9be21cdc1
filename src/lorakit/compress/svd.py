"""Truncated SVD compression: plain (Eckart–Young) and activation-aware (whitened, SVD-LLM style).

Plain: ``W = U S V^T`` and ``W_r = U_r S_r V_r^T`` is the best rank-r matrix in Frobenius norm, with error
``||W - W_r||_F = sqrt(sum_{i>r} s_i^2)``. Factors are balanced: ``B = U_r sqrt(S_r)``, ``A = sqrt(S_r) V_r^T``.

Activation-aware: with calibration inputs X (N, in), the layer's output error ``||(W - W') X^T||_F`` is what
matters. Let ``G = X^T X = L L^T`` (Cholesky, slightly damped). The best rank-r output is the truncated SVD of
``W L = U S V^T``, reached by ``W' = U_r U_r^T W`` (SVD-LLM's ``U_r S_r V_r^T L^{-1}`` in exact arithmetic, but
with no inverse of L, so input directions the calibration never excites keep W's weights instead of blowing up).
Convolutions use the unfolded input patches (N * L, in * kh * kw) and W as an (out, in * kh * kw) matrix.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..inject import find_targets
from ..layers.lowrank import LowRankConv2d, LowRankLinear
from ..sharing import set_module
from .als import ALSConfig, als_factors

FineTune = Callable[[nn.Module, list], Any]


# -- the linear algebra -------------------------------------------------------------------------
def truncated_svd(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced factors ``(A (r, in), B (out, r))`` of the best rank-r approximation of an (out, in) matrix."""
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    root = s[:rank].sqrt()
    return (root[:, None] * vh[:rank]).to(weight.dtype), (u[:, :rank] * root).to(weight.dtype)


def whitened_svd(weight: torch.Tensor, gram: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors ``(A, B)`` of the rank-r ``W'`` minimising ``||(W - W') X^T||_F`` for ``gram = X^T X``."""
    u = _output_basis(weight, gram)[0][:, :rank]  # (out, r)
    a, inner = truncated_svd(u.t() @ weight.double(), rank)  # U_r^T W = inner @ a exactly: it has rank <= r
    return a.to(weight.dtype), (u @ inner).to(weight.dtype)


def _output_basis(weight: torch.Tensor, gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Left singular vectors and singular values of ``W L`` with ``L L^T = gram`` (+ a tiny damping)."""
    gram = gram.double()
    damping = 1e-8 * gram.diagonal().mean().clamp_min(1e-12)
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    for _ in range(6):
        chol, info = torch.linalg.cholesky_ex(gram + damping * eye)
        if int(info) == 0:
            break
        damping *= 100
    u, s, _ = torch.linalg.svd(weight.double() @ chol, full_matrices=False)
    return u, s


def choose_rank(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest r whose top-r singular values hold ``energy`` of ``sum(s^2)``."""
    _check_energy(energy)
    power = singular_values.double() ** 2
    kept = torch.cumsum(power, 0) / power.sum()
    return int(torch.searchsorted(kept, torch.tensor(energy - 1e-12, dtype=kept.dtype))) + 1


def _check_energy(energy: float) -> None:
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1] (the fraction of sum(s^2) to keep), got {energy}")


# -- calibration ----------------------------------------------------------------------------------
def _layer_input_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A layer's input as rows of what W multiplies: (N, in) for Linear, unfolded patches for Conv2d."""
    if isinstance(module, nn.Conv2d):
        patches = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)  # (N, in*k*k, L)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])
    return x.reshape(-1, x.shape[-1])


def _run(model: nn.Module, batch) -> None:
    if isinstance(batch, Mapping):
        model(**{k: v for k, v in batch.items() if k != "labels"})
    elif isinstance(batch, (tuple, list)):
        model(batch[0])
    else:
        model(batch)


@torch.no_grad()
def calibration_grams(model: nn.Module, paths: list[str], calibration: Iterable,
                      max_batches: Optional[int] = None) -> dict[str, torch.Tensor]:
    """``X^T X`` (float64) of the inputs each layer in ``paths`` sees while ``model`` runs on ``calibration``.

    Batches are ``(inputs, labels)`` pairs, dicts of model keyword arguments, or input tensors.
    """
    grams: dict[str, torch.Tensor] = {}

    def hook_for(path: str, module: nn.Module):
        def hook(_module, inputs, _output):
            rows = _layer_input_rows(module, inputs[0]).double()
            grams[path] = grams.get(path, 0) + rows.t() @ rows
        return hook

    handles = [model.get_submodule(p).register_forward_hook(hook_for(p, model.get_submodule(p))) for p in paths]
    was_training = model.training
    model.eval()
    seen = 0
    try:
        for batch in calibration:
            try:
                _run(model, batch)
            except (RuntimeError, ValueError, TypeError) as err:
                shape = _describe(batch)
                raise ValueError(f"the calibration batch {shape} does not fit the model: {err}") from err
            seen += 1
            if max_batches is not None and seen >= max_batches:
                break
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if not seen:
        raise ValueError("the calibration loader yielded no batches")
    return grams


def _describe(batch) -> str:
    if isinstance(batch, torch.Tensor):
        return f"of shape {tuple(batch.shape)}"
    if isinstance(batch, Mapping):
        return "with " + ", ".join(f"{k}: {tuple(v.shape)}" for k, v in batch.items() if hasattr(v, "shape"))
    if isinstance(batch, (tuple, list)) and batch and hasattr(batch[0], "shape"):
        return f"with inputs of shape {tuple(batch[0].shape)}"
    return f"of type {type(batch).__name__}"


# -- compressing a model --------------------------------------------------------------------------
def _supported(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1
                                             and module.padding_mode == "zeros")


def svd_compress(model: nn.Module, rank: Optional[int] = None, targets=None, calibration: Optional[Iterable] = None,
                 energy: Optional[float] = None, finetune: Optional[FineTune] = None, exclude=None,
                 max_calibration_batches: Optional[int] = None, solver: str = "svd", als: Optional[ALSConfig] = None,
                 warm_start: Optional[nn.Module] = None) -> nn.Module:
    """Replace target Linear/Conv2d layers by low-rank layers from a truncated SVD of their weights; in place.

    Give ``rank`` (the same for every layer; must be < min(out, in) of each explicitly targeted layer) or
    ``energy`` in (0, 1] (per layer, the smallest rank keeping that share of ``sum(s^2)``; a layer where that
    rank would not compress stays dense). With ``calibration`` (a loader of model inputs) the truncation is
    activation-aware. ``targets=None`` takes every Linear/Conv2d the rank can compress.

    ``solver="als"`` reaches the same optimum by alternating least squares (:mod:`lorakit.compress.als`; needs
    ``rank``; ``als`` sets its tolerance and sweep limit). ``warm_start``: a model holding, at every target's path, a
    low-rank layer of this rank (from an earlier ``svd_compress`` or C-LoRA's ``compress`` of the same model, e.g.
    under other calibration data); ALS starts from its A instead of a random one.

    ``finetune(model, params)``, if given, trains the new factors and biases ``params`` after compression
    (e.g. ``lambda m, p: lorakit.train.train(m, data, cfg, params=p)``). Every check, and the fine-tune, is
    transactional: on any error (a bad rank, energy or calibration, NaN in fine-tuning) the original layers are
    put back and the error is raised.
    """
    if (rank is None) == (energy is None):
        raise ValueError("give exactly one of rank (e.g. rank=16) or energy (e.g. energy=0.9)")
    _check_solver(solver, energy, als, warm_start)
    if energy is not None:
        _check_energy(energy)
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
        raise ValueError(f"rank must be an integer >= 1, got {rank!r}")
    if targets is None and rank is not None:
        fits = lambda m: _supported(m) and rank < min(m.weight.flatten(1).shape)  # noqa: E731
    else:
        fits = _supported
    paths = find_targets(model, targets, exclude, fits)
    for path in paths:
        shape = model.get_submodule(path).weight.flatten(1).shape
        if rank is not None and rank >= min(shape):
            raise ValueError(f"rank {rank} >= min(out, in) = {min(shape)} of layer {path!r} (weight "
                             f"{tuple(shape)}): a rank-{rank} factorisation would not compress it; choose rank < {min(shape)}")
    grams = calibration_grams(model, paths, calibration, max_calibration_batches) if calibration is not None else {}
    missing = [p for p in paths if calibration is not None and p not in grams]
    if missing:
        raise ValueError(f"the calibration data never reached layer {missing[0]!r}; cannot whiten it")

    starts = _warm_starts(warm_start, paths, model, rank) if warm_start is not None else {}
    replacements = []
    for path in paths:
        module = model.get_submodule(path)
        try:
            new = _compressed(module, rank, energy, grams.get(path), solver, als or ALSConfig(), starts.get(path))
        except ValueError as err:
            raise type(err)(f"layer {path!r}: {err}") from None
        if new is not None:
            replacements.append((path, module, new))
    for path, _, new in replacements:
        set_module(model, path, new)
    if finetune is not None and replacements:
        try:
            finetune(model, [p for _, _, new in replacements for p in new.parameters()])
        except BaseException:
            for path, old, _ in replacements:
                set_module(model, path, old)
            raise
    return model


def _check_solver(solver: str, energy, als, warm_start) -> None:
    """Arguments that only ALS reads are refused with the SVD solver (never silently ignored)."""
    if solver not in ("svd", "als"):
        raise ValueError(f"solver={solver!r} is not supported; choose 'svd' or 'als'")
    if solver == "als" and energy is not None:
        raise ValueError("solver='als' needs rank= (ALS fits a given rank; energy= chooses it from the SVD's spectrum)")
    if solver == "svd" and (als is not None or warm_start is not None):
        raise ValueError("als= and warm_start= are settings of solver='als'; pass solver='als' too")
    if als is not None and not isinstance(als, ALSConfig):
        raise TypeError(f"als={als!r} is not an ALSConfig; expected lorakit.ALSConfig(tol=..., max_sweeps=...)")


def _warm_starts(previous: nn.Module, paths: list[str], model: nn.Module, rank: int) -> dict[str, torch.Tensor]:
    """The (r, in) A of ``previous``'s low-rank layer at every path, checked against the layers they start."""
    starts = {}
    for path in paths:
        try:
            layer = previous.get_submodule(path)
        except AttributeError:
            layer = None
        if not isinstance(layer, (LowRankLinear, LowRankConv2d)):
            raise ValueError(f"warm_start has no low-rank layer at {path!r} (found {type(layer).__name__}); expected "
                             "the model an earlier svd_compress or compress() returned")
        a = layer.A.detach().flatten(1)
        expected = (rank, model.get_submodule(path).weight.flatten(1).shape[1])
        if tuple(a.shape) != expected:
            raise ValueError(f"warm_start's layer {path!r} has A of shape {tuple(a.shape)}; rank={rank} here needs "
                             f"{expected}")
        starts[path] = a
    return starts


def _compressed(module: nn.Module, rank: Optional[int], energy: Optional[float], gram: Optional[torch.Tensor],
                solver: str = "svd", als: ALSConfig = ALSConfig(), start: Optional[torch.Tensor] = None
                ) -> Optional[nn.Module]:
    """The low-rank layer replacing ``module``, or None when the energy rank would not compress it."""
    weight = module.weight.detach().flatten(1)  # (out, in * k * k)
    if rank is None:
        s = _output_basis(weight, gram)[1] if gram is not None else torch.linalg.svdvals(weight.double())
        rank = choose_rank(s, energy)
        if rank * sum(weight.shape) >= weight.numel():
            return None
    if solver == "als":
        fit = als_factors(weight, rank, gram, start, als)
        a, b = fit.a, fit.b
    else:
        a, b = whitened_svd(weight, gram, rank) if gram is not None else truncated_svd(weight, rank)
    bias = module.bias.detach() if module.bias is not None else None
    if isinstance(module, nn.Conv2d):
        return LowRankConv2d.from_factors(module, a, b, bias)
    return LowRankLinear.from_factors(a, b, bias)


def factor_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter of the model's low-rank layers (A, B and bias), e.g. to fine-tune them."""
    return [p for m in model.modules() if isinstance(m, (LowRankLinear, LowRankConv2d)) for p in m.parameters()]
