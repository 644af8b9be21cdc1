"""Compression: C-LoRA decay schedule (schedule.py), C-LoRA -> low rank (finalize.py), truncated SVD (svd.py).

Importing this package registers the C-LoRA wrapper with ``lorakit.inject`` (``CLoRAConfig`` -> ``CLoRALayer``).
"""
from ..config import CLoRAConfig
from ..inject import WRAPPERS
from ..layers.clora import CLoRALayer, clora_wrapper_for
from ..layers.lowrank import LowRankConv2d, LowRankLinear
from .finalize import compress
from .schedule import DecaySchedule, decay_factor
from .svd import choose_rank, factor_parameters, svd_compress, truncated_svd, whitened_svd

WRAPPERS[CLoRAConfig] = clora_wrapper_for

__all__ = ["compress", "svd_compress", "DecaySchedule", "decay_factor", "choose_rank", "truncated_svd",
           "whitened_svd", "factor_parameters", "CLoRALayer", "LowRankLinear", "LowRankConv2d"]
