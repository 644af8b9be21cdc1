"""The data side of ``digit-stream``: rotating images, building a stream of stages, replay, and the metrics.

A stream is a list of :class:`Stage`: each has its own training data (a shifted distribution) and its own
test set. Two streams, the same for every method: ``rotations`` (domain-incremental Rotated MNIST,
:func:`rotation_stream`) and ``digits`` (class-incremental, :func:`digit_stream`).

The metrics take the accuracy matrix ``R`` (T x T, ``R[i][j]`` = accuracy in % on stage j's test set after
training on stage i, stages counted from 0).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

STREAMS = ("rotations", "digits")


# -- rotation ------------------------------------------------------------------------------------
def rotate(images: torch.Tensor, degrees: float, fill: float = 0.0) -> torch.Tensor:
    """Rotate images (N, C, H, W) counter-clockwise by ``degrees`` about their centre; bilinear.

    Pixels that come from outside the image take the value ``fill``: 0 for raw images; for normalised ones,
    pass the normalised value of black (``-mean / std``), which gives exactly the normalised rotated raw image,
    because rotation with zero fill is linear and its bilinear weights sum to 1.
    """
    if images.dim() != 4:
        raise ValueError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
    angle = math.radians(degrees)
    cos, sin = math.cos(angle), math.sin(angle)
    # affine_grid maps each output pixel (x right, y down, in [-1, 1]) to the input point it samples; a
    # counter-clockwise turn on screen (y pointing down) samples the input at the clockwise-turned point.
    # On a non-square image, normalised x and y have different units: scale by the aspect ratio.
    n, c, h, w = images.shape
    aspect = w / h
    # float64 arithmetic: in float32 the grid's rounding alone moves samples by ~1e-6 of a pixel, enough that
    # even 0° and 90° would not reproduce the pixels; in float64 they match to ~1e-15.
    theta = torch.tensor([[cos, -sin / aspect, 0.0], [sin * aspect, cos, 0.0]], dtype=torch.float64)
    grid = F.affine_grid(theta.unsqueeze(0), [1, c, h, w], align_corners=False)  # (1, H, W, 2), same for all
    shifted = images.to(torch.float64) - fill
    out = F.grid_sample(shifted, grid.expand(n, h, w, 2), mode="bilinear", padding_mode="zeros", align_corners=False)
    return (out + fill).to(images.dtype)


# -- stages --------------------------------------------------------------------------------------
@dataclass
class Stage:
    """One step of the stream: ``train`` and ``test`` are ``TensorDataset(images (N, 1, 28, 28), labels (N,))``."""

    name: str
    """What shifted, e.g. 'rotated 40°' or 'digit 9'."""
    train: TensorDataset
    test: TensorDataset
    digit: int | None = None
    """The digit of a class-incremental stage (None for rotations)."""


def black(mean_std: tuple[float, float] | None) -> float:
    """The value of a black pixel after the model's input normalisation."""
    return 0.0 if mean_std is None else -mean_std[0] / mean_std[1]


def rotation_stream(train_set: TensorDataset, test_set: TensorDataset, angles: list[float], seed: int,
                    mean_std=None, stage_train_size: int | None = None, test_size: int | None = None) -> list[Stage]:
    """Rotated MNIST: stage k = a disjoint random subset of the real training images (seeded), and the test images,
    all rotated by ``angles[k]`` degrees. ``stage_train_size`` defaults to an equal share of the training set;
    ``test_size`` takes the same random test images for every stage (default: all of them)."""
    images, labels = train_set.tensors
    per_stage = stage_train_size or len(images) // len(angles)
    if per_stage * len(angles) > len(images):
        raise ValueError(f"--stage-train-size {per_stage} x {len(angles)} stages needs {per_stage * len(angles)} "
                         f"training images; there are {len(images)}")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(images), generator=generator)
    test_images, test_labels = _test_subset(test_set, test_size, seed)
    fill = black(mean_std)
    stages = []
    for k, angle in enumerate(angles):
        pick = order[k * per_stage:(k + 1) * per_stage]
        stages.append(Stage(f"rotated {angle:g}°", TensorDataset(rotate(images[pick], angle, fill), labels[pick]),
                            TensorDataset(rotate(test_images, angle, fill), test_labels)))
    return stages


def digit_stream(train_set: TensorDataset, test_set: TensorDataset, wrong_per_class: list[int], stages: int,
                 seed: int, stage_train_size: int | None = None, test_size: int | None = None) -> list[Stage]:
    """Class-incremental: stage k trains on the k-th worst digit's training images (worst by the pre-trained
    model's ``wrong_per_class``, so stage 0's is the digit digit-finetune's ``--digit auto`` fixes; ties go to the
    smaller digit) and is tested on that digit's test images."""
    if not 1 <= stages <= len(wrong_per_class):
        raise ValueError(f"--digit-stages must be between 1 and {len(wrong_per_class)}, got {stages}")
    order = sorted(range(len(wrong_per_class)), key=lambda d: (-wrong_per_class[d], d))[:stages]
    images, labels = train_set.tensors
    test_images, test_labels = _test_subset(test_set, test_size, seed)
    generator = torch.Generator().manual_seed(seed)
    result = []
    for digit in order:
        mine = (labels == digit).nonzero().squeeze(1)
        if stage_train_size:
            mine = mine[torch.randperm(len(mine), generator=generator)[:stage_train_size]]
        test_mine = test_labels == digit
        result.append(Stage(f"digit {digit}", TensorDataset(images[mine], labels[mine]),
                            TensorDataset(test_images[test_mine], test_labels[test_mine]), digit=digit))
    return result


def _test_subset(test_set: TensorDataset, size: int | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = test_set.tensors
    if size is None or size >= len(images):
        return images, labels
    pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:size]
    return images[pick], labels[pick]


# -- replay --------------------------------------------------------------------------------------
def with_replay(stage: Stage, earlier: list[TensorDataset], replay: float, seed: int) -> TensorDataset:
    """The stage's training images plus ``replay`` x as many replayed ones, as (images, labels, replayed).

    ``earlier`` holds the data seen before this stage: the pre-training set first, then each earlier stage's
    training set. Each source gives an equal share, drawn at random (seeded). Images of the stage's own digit
    are never replayed (in the digits stream they are the new data, as in digit-finetune --preserve).
    """
    images, labels = stage.train.tensors
    count = int(round(replay * len(images)))
    generator = torch.Generator().manual_seed(seed)
    picked_images, picked_labels = [images], [labels]
    shares = [count // len(earlier) + (i < count % len(earlier)) for i in range(len(earlier))] if earlier else []
    for source, share in zip(earlier, shares):
        source_images, source_labels = source.tensors
        allowed = (source_labels != stage.digit).nonzero().squeeze(1) if stage.digit is not None \
            else torch.arange(len(source_labels))
        pick = allowed[torch.randint(len(allowed), (share,), generator=generator)] if len(allowed) else allowed
        picked_images.append(source_images[pick])
        picked_labels.append(source_labels[pick])
    replayed = torch.zeros(sum(len(x) for x in picked_labels), dtype=torch.bool)
    replayed[len(labels):] = True
    return TensorDataset(torch.cat(picked_images), torch.cat(picked_labels), replayed)


# -- metrics -------------------------------------------------------------------------------------
def _check_square(matrix: list[list[float]]) -> int:
    size = len(matrix)
    if size == 0 or any(len(row) != size for row in matrix):
        raise ValueError(f"the accuracy matrix must be T x T (after stage i, on stage j), got rows of lengths "
                         f"{[len(row) for row in matrix]}")
    return size


def average_accuracy(matrix: list[list[float]]) -> float:
    """Final average accuracy: the mean of the last row, over every stage's test set (in %)."""
    _check_square(matrix)
    return sum(matrix[-1]) / len(matrix[-1])


def backward_transfer(matrix: list[list[float]]) -> float:
    """BWT in percentage points: mean over j < T-1 of ``R[T-1][j] - R[j][j]`` (negative = forgetting).

    0 for a one-stage stream (nothing could be forgotten)."""
    size = _check_square(matrix)
    if size == 1:
        return 0.0
    return sum(matrix[-1][j] - matrix[j][j] for j in range(size - 1)) / (size - 1)


def seen_average(matrix: list[list[float]]) -> list[float]:
    """Average accuracy over the stages seen so far after each stage: ``mean(R[i][:i+1])``."""
    _check_square(matrix)
    return [sum(row[:i + 1]) / (i + 1) for i, row in enumerate(matrix)]
