"""lorakit: low-rank adaptation and compression for PyTorch models."""
from .checkpoint import AdapterLoadError, load_adapter, save_adapter
from .compress import ALSConfig, DecaySchedule, compress, svd_compress
from .config import AdapterConfig, CLoRAConfig, LoRAConfig, PromptConfig
from .inject import delete_adapter, disabled, inject, merge, set_active, unload, unmerge
from .layers.lowrank import LowRankConv2d, LowRankLinear
from .mixed import mixed_batch
from .params import ParamCount, count_parameters

__version__ = "0.1.0"

__all__ = [
    "LoRAConfig", "AdapterConfig", "PromptConfig", "CLoRAConfig",
    "inject", "merge", "unmerge", "unload", "disabled", "set_active", "delete_adapter", "mixed_batch",
    "count_parameters", "ParamCount", "save_adapter", "load_adapter", "AdapterLoadError",
    "compress", "svd_compress", "ALSConfig", "DecaySchedule", "LowRankLinear", "LowRankConv2d",
]
