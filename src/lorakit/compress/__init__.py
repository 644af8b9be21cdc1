"""Compression: C-LoRA decay schedule (schedule.py), C-LoRA -> low rank (finalize.py), truncated SVD (svd.py) and its
ALS solver (als.py).

C-LoRA itself is injected like every method, through ``lorakit.inject.METHODS`` (``CLoRAConfig`` ->
``CLoRALayer`` wrappers, every target checked before the model changes).
"""
from ..layers.clora import CLoRALayer
from ..layers.lowrank import LowRankConv2d, LowRankLinear
from .als import ALSConfig, ALSError, ALSFit, als_factors
from .finalize import compress
from .schedule import DecaySchedule, decay_factor
from .svd import choose_rank, factor_parameters, svd_compress, truncated_svd, whitened_svd

__all__ = ["compress", "svd_compress", "DecaySchedule", "decay_factor", "choose_rank", "truncated_svd",
           "whitened_svd", "factor_parameters", "CLoRALayer", "LowRankLinear", "LowRankConv2d", "ALSConfig", "ALSError",
           "ALSFit", "als_factors"]
